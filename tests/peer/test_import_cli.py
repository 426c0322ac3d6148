"""`lqd import --model FILE.gguf --out DIR` (issue 7): a GGUF model written as an HF directory.
(a) stories260K-hf written as GGUF (F32, untied, Q8_0) with its SentencePiece tokenizer
(tok512) as tokenizer.ggml.model "llama": every imported tensor equals the HF original (the
Q/K permutation undone exactly) or, for Q8_0, gguf's dequantization; config.json has the HF
values; lqd eval --dump-logits of the directory equals that of the GGUF bit for bit; the
written tokenizer.json, read by HF `tokenizers` and by lqd, gives lqd's GGUF ids on TinyStories
lines; bad input is refused. (b) the Llama 2 tokenizer (32000 pieces) on a tiny random model:
`tokenizers` on the written tokenizer.json gives `sentencepiece`'s ids on WikiText-2 lines.
(c) with LQD_SMOLLM2 (SmolLM2-135M-Instruct Q4_1): identical logits, and `tokenizers` on the
written byte-level tokenizer.json gives lqd's GGUF ids on TinyStories and WikiText-2 lines."""
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_util import DATA, ROOT, SKIP, STORIES, Checks, require_safetensors, run_lqd  # noqa: E402

require_safetensors()
try:
    import gguf
    import gguf.quants
    import tokenizers
except ImportError as missing:
    print(f"{missing.name} is not installed (tests/run.sh installs it in a venv): skipped")
    sys.exit(SKIP)
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

Q = gguf.GGMLQuantizationType
HF = os.path.join(ROOT, "models/stories260K-hf")
TOK512 = os.path.join(ROOT, "models/stories260K/tok512.bin")
TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
SHARED = os.path.join(ROOT, "..", "shared")
LLAMA2 = os.path.join(SHARED, "models", "llama2-tokenizer", "tokenizer.model")
WIKI = os.path.join(SHARED, "data", "wiki.test.raw")
CONFIG = json.load(open(os.path.join(HF, "config.json")))
WEIGHTS = safetensors.numpy.load_file(STORIES)
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
checks = Checks()


def permute(weights, n_head):
    """convert_hf_to_gguf's LlamaModel.permute (HF rotate-half rows to interleaved pairs)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights, n_head):
    rows = weights.shape[0]
    return (weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def to_gguf(weights, config, untied=False):
    """HF names -> llama.cpp names, Q/K permuted."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {"token_embd.weight": weights["model.embed_tokens.weight"],
           "output_norm.weight": weights["model.norm.weight"]}
    if untied:
        out["output.weight"] = weights["model.embed_tokens.weight"]
    for layer in range(config["num_hidden_layers"]):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
        out[blk + "attn_norm.weight"] = weights[hf + "input_layernorm.weight"]
        out[blk + "ffn_norm.weight"] = weights[hf + "post_attention_layernorm.weight"]
        for hf_name, name in LINEARS.items():
            w = weights[hf + hf_name + ".weight"]
            if name == "attn_q":
                w = permute(w, heads)
            elif name == "attn_k":
                w = permute(w, kv_heads)
            out[blk + name + ".weight"] = w
    return out


def write_model(path, weights, config, tokenizer, qtype=Q.F32, untied=False):
    """A llama GGUF as convert_hf_to_gguf writes it; tokenizer: (GGUFWriter method, value)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in {"embedding_length": config["hidden_size"],
                       "block_count": config["num_hidden_layers"],
                       "attention.head_count": config["num_attention_heads"],
                       "attention.head_count_kv": config["num_key_value_heads"],
                       "feed_forward_length": config["intermediate_size"],
                       "context_length": config["max_position_embeddings"],
                       "rope.dimension_count": config["hidden_size"] // config["num_attention_heads"]
                       }.items():
        writer.add_uint32("llama." + key, value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    for method, value in tokenizer:
        getattr(writer, method)(value)
    for name, array in to_gguf(weights, config, untied).items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype != Q.F32 and array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tok512_fields():
    """tok512.bin (llama2.c's export of a SentencePiece model) back as llama.cpp's fields:
    "▁" for space, <s>/</s> without llama2.c's newlines, SentencePiece's piece types."""
    data = open(TOK512, "rb").read()
    at, pieces, scores, types = 4, [], [], []
    while at < len(data):
        score, length = struct.unpack_from("<fi", data, at)
        piece = data[at + 8:at + 8 + length].decode()
        at += 8 + length
        piece = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}.get(piece, piece).replace(" ", "\u2581")
        pieces.append(piece)
        scores.append(score)
        types.append(2 if piece == "<unk>" else 3 if piece in ("<s>", "</s>") else
                     6 if len(piece) == 6 and piece.startswith("<0x") else 1)
    return [("add_tokenizer_model", "llama"), ("add_token_list", pieces),
            ("add_token_scores", scores), ("add_token_types", types),
            ("add_bos_token_id", 1), ("add_eos_token_id", 2), ("add_unk_token_id", 0),
            ("add_add_bos_token", True), ("add_chat_template", "{{ messages }}")]


def lqd_ids(path, texts, bos=False):
    """lqd's ids (tests/peer/tokenize_tool) for each text."""
    data = b"".join(t.encode().hex().encode() + b"\n" for t in texts)
    result = subprocess.run([TOOL, "--hex", *(["--bos"] if bos else []), path], input=data,
                            capture_output=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"tokenize_tool {path}: {result.stderr.decode(errors='replace')}")
    return [[int(x) for x in line.split()] for line in result.stdout.decode().split("\n")[:-1]]


def compare_ids(name, texts, got, expected):
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    for i in bad[:3]:
        print(f"  {name}: text {i} {texts[i][:60]!r}\n    got {got[i][:16]}\n    ref {expected[i][:16]}")
    checks.check(len(got) == len(expected) == len(texts) and not bad,
                 f"{name}: {len(bad)} of {len(texts)} texts encode differently")
    print(f"{name}: {len(texts) - len(bad)} of {len(texts)} texts match")


def hf_ids(directory, texts, special=False):
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=special)]


def lqd_import(gguf_path, out, *extra, check=True):
    return run_lqd("import", "--model", gguf_path, "--out", out, *extra, check=check)


def logits(model, ids, out):
    run_lqd("eval", "--model", model, "--tokens", ids, "--dump-logits", out)
    return open(out, "rb").read()


def lines_of(path, count=None):
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return lines[:count] if count else lines


def check_stories(tmp):
    ids = ",".join(map(str, json.load(open(os.path.join(HF, "ref_logits.json")))["greedy200"]["ids"][:64]))
    tinystories = lines_of(DATA, 300)
    for label, options in [("f32", {}), ("f32-untied", {"untied": True}), ("q8_0", {"qtype": Q.Q8_0})]:
        path, out = os.path.join(tmp, label + ".gguf"), os.path.join(tmp, label)
        write_model(path, WEIGHTS, CONFIG, tok512_fields(), **options)
        report = json.loads(lqd_import(path, out, "--json").stdout)
        got = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
        expected = dict(WEIGHTS)
        if options.get("untied"):
            expected["lm_head.weight"] = WEIGHTS["model.embed_tokens.weight"]
        if options.get("qtype"):  # gguf's dequantization of what was written, un-permuted
            reader = gguf.GGUFReader(path)
            for tensor in reader.tensors:
                if tensor.tensor_type != Q.Q8_0:
                    continue
                w = gguf.quants.dequantize(tensor.data, Q.Q8_0)
                layer, kind = tensor.name.split(".")[1:3] if tensor.name.startswith("blk") else (0, "")
                hf = {v: k for k, v in LINEARS.items()}.get(kind)
                if tensor.name == "token_embd.weight":
                    expected["model.embed_tokens.weight"] = w
                elif hf:
                    heads = {"attn_q": CONFIG["num_attention_heads"],
                             "attn_k": CONFIG["num_key_value_heads"]}.get(kind)
                    expected[f"model.layers.{layer}.{hf}.weight"] = unpermute(w, heads) if heads else w
        checks.check(sorted(got) == sorted(expected),
                     f"{label}: tensors {sorted(set(got) ^ set(expected))} differ in presence")
        unequal = [n for n in expected if n in got and not (got[n].dtype == np.float32 and
                   got[n].shape == expected[n].shape and np.array_equal(got[n], expected[n]))]
        checks.check(not unequal, f"{label}: tensors not equal to the reference: {unequal[:5]}")
        checks.check(report["tensors"] == len(expected) and report["tokenizer"]["model"] == "llama",
                     f"{label}: report {report}")
        config = json.load(open(os.path.join(out, "config.json")))
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                    "bos_token_id", "eos_token_id", "head_dim"):
            checks.check(config.get(key) == CONFIG[key], f"{label}: config {key} {config.get(key)}")
        checks.check(config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32" and
                     config["architectures"] == ["LlamaForCausalLM"] and
                     config["tie_word_embeddings"] == (not options.get("untied")),
                     f"{label}: config {config}")
        same = logits(path, ids, os.path.join(tmp, "g.npy")) == logits(out, ids, os.path.join(tmp, "d.npy"))
        checks.check(same, f"{label}: logits of the imported directory differ from the GGUF's")
        if label != "f32":
            continue
        # the SentencePiece tokenizer: tokenizers and lqd on tokenizer.json against lqd on the GGUF
        want = lqd_ids(path, tinystories)
        compare_ids("tok512 tokenizers", tinystories, hf_ids(out, tinystories), want)
        compare_ids("tok512 lqd json", tinystories, lqd_ids(os.path.join(out, "tokenizer.json"),
                                                            tinystories), want)
        compare_ids("tok512 tokenizers + BOS", tinystories[:50], hf_ids(out, tinystories[:50], True),
                    lqd_ids(path, tinystories[:50], bos=True))
        tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
        checks.check(tc.get("chat_template") == "{{ messages }}" and tc.get("bos_token") == "<s>"
                     and tc.get("eos_token") == "</s>" and tc.get("add_bos_token") is True,
                     f"tokenizer_config.json {tc}")
        text = run_lqd("generate", "--model", out, "--prompt", "Once upon a time", "--max-tokens",
                       "20", "--temperature", "0").stdout
        text_gguf = run_lqd("generate", "--model", path, "--tokenizer", path, "--prompt",
                            "Once upon a time", "--max-tokens", "20", "--temperature", "0").stdout
        checks.check(text == text_gguf and len(text) > 20, f"greedy text {text!r} vs {text_gguf!r}")
    return os.path.join(tmp, "f32.gguf")


def check_refusals(tmp, good):
    out = os.path.join(tmp, "f32")  # imported above
    result = lqd_import(good, out, check=False)
    checks.check(result.returncode == 1 and "already exists" in result.stderr,
                 f"existing DIR: {result.returncode} {result.stderr!r}")
    before = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    lqd_import(good, out, "--force")
    checks.check(os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns != before,
                 "--force did not replace the earlier import")
    other = os.path.join(tmp, "other")
    os.mkdir(other)
    open(os.path.join(other, "notes.txt"), "w").write("keep me")
    result = lqd_import(good, other, "--force", check=False)
    checks.check(result.returncode == 1 and "not a directory lqd import wrote" in result.stderr
                 and os.path.exists(os.path.join(other, "notes.txt")),
                 f"--force on another directory: {result.returncode} {result.stderr!r}")
    result = lqd_import(DATA, os.path.join(tmp, "x"), check=False)
    checks.check(result.returncode == 1 and "not a GGUF" in result.stderr,
                 f"text file: {result.returncode} {result.stderr!r}")
    bad = os.path.join(tmp, "q5_0.gguf")  # a type lqd does not dequantize
    write_model(bad, WEIGHTS, CONFIG, tok512_fields(), qtype=Q.Q5_0)
    result = lqd_import(bad, os.path.join(tmp, "y"), check=False)
    checks.check(result.returncode == 1 and "Q5_0" in result.stderr and "token_embd" in result.stderr,
                 f"Q5_0 tensors: {result.returncode} {result.stderr!r}")
    result = run_lqd("import", "--model", good, check=False)
    checks.check(result.returncode == 2 and "--out" in result.stderr, f"no --out: {result.stderr!r}")
    checks.check("--model FILE.gguf" in run_lqd("import", "--help").stdout, "import --help")
    left = [n for n in os.listdir(tmp) if ".tmp-" in n or ".old-" in n]
    checks.check(not left and not os.path.exists(os.path.join(tmp, "x")) and
                 not os.path.exists(os.path.join(tmp, "y")), f"left behind: {left}")


def check_llama2(tmp):
    """The Llama 2 SentencePiece tokenizer: tokenizers on the written file against sentencepiece."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        print("sentencepiece is not installed: Llama 2 tokenizer check skipped")
        return
    if not os.path.exists(LLAMA2) or not os.path.exists(WIKI):
        print(f"{LLAMA2} or {WIKI} is missing: Llama 2 tokenizer check skipped")
        return
    proto = pb.ModelProto()
    proto.ParseFromString(open(LLAMA2, "rb").read())
    fields = [("add_tokenizer_model", "llama"),
              ("add_token_list", [p.piece.encode() for p in proto.pieces]),
              ("add_token_scores", [p.score for p in proto.pieces]),
              ("add_token_types", [int(p.type) for p in proto.pieces]),
              ("add_bos_token_id", 1), ("add_eos_token_id", 2), ("add_unk_token_id", 0),
              ("add_add_bos_token", True)]
    config = dict(CONFIG, vocab_size=len(proto.pieces), num_hidden_layers=1)
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(w.shape).astype(np.float32) * 0.02
               for n, w in WEIGHTS.items() if not n.startswith("model.layers.") or ".0." in n}
    weights["model.embed_tokens.weight"] = rng.standard_normal((len(proto.pieces), 64)).astype(np.float32)
    path, out = os.path.join(tmp, "llama2.gguf"), os.path.join(tmp, "llama2")
    write_model(path, weights, config, fields)
    lqd_import(path, out)
    lines = lines_of(WIKI)
    sp = spm.SentencePieceProcessor(model_file=LLAMA2)
    want = [sp.encode(t) for t in lines]
    compare_ids("llama2 tokenizers vs sentencepiece", lines, hf_ids(out, lines), want)
    compare_ids("llama2 lqd json vs sentencepiece", lines,
                lqd_ids(os.path.join(out, "tokenizer.json"), lines), want)


def check_smollm2(tmp):
    model = os.environ.get("LQD_SMOLLM2", "")
    if not model or not os.path.isfile(model):
        print("LQD_SMOLLM2 does not name the SmolLM2-135M-Instruct GGUF "
              "(tests/models/fetch_smollm2.sh): SmolLM2 checks skipped")
        return False
    out = os.path.join(tmp, "smollm2")
    report = json.loads(lqd_import(model, out, "--json").stdout)
    checks.check(report["tensors"] == 272 and report["tokenizer"]["model"] == "gpt2" and
                 report["tokenizer"]["chat_template"], f"SmolLM2 report {report}")
    ids = "1,9690,198,2683,359,253,5356,5646,11173,3365,3511,308,34519,28,7018,411,407,19712,8182,2"
    same = logits(model, ids, os.path.join(tmp, "g.npy")) == logits(out, ids, os.path.join(tmp, "d.npy"))
    checks.check(same, "SmolLM2: logits of the imported directory differ from the GGUF's")
    texts = lines_of(DATA, 300)
    if os.path.exists(WIKI):
        texts += lines_of(WIKI)
    else:
        print(f"{WIKI} is missing: SmolLM2 tokenizer checked on TinyStories only")
    want = lqd_ids(model, texts)
    compare_ids("SmolLM2 tokenizers", texts, hf_ids(out, texts), want)
    compare_ids("SmolLM2 lqd json", texts, lqd_ids(os.path.join(out, "tokenizer.json"), texts), want)
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    checks.check("<|im_start|>" in tc.get("chat_template", "") and tc.get("eos_token") == "<|im_end|>"
                 and tc.get("add_bos_token") is False, f"SmolLM2 tokenizer_config.json {tc}")
    return True


def main():
    with tempfile.TemporaryDirectory() as tmp:
        good = check_stories(tmp)
        check_refusals(tmp, good)
        check_llama2(tmp)
        check_smollm2(tmp)
    checks.finish()


if __name__ == "__main__":
    main()
