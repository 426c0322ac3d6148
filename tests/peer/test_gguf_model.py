"""`lqd` on llama.cpp GGUF models: stories260K-hf's weights written with gguf.GGUFWriter under
llama.cpp's names and keys, Q/K rows permuted as llama.cpp's convert_hf_to_gguf does, must load
as the same model: F32 logits equal to the HF directory's to 1e-5 and the same greedy text; F16
and Q8_0 files load with logits close to them; malformed files are refused, naming the problem."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_util import ROOT, SKIP, STORIES, Checks, require_safetensors, run_lqd  # noqa: E402

require_safetensors()
try:
    import gguf  # noqa: E402
    import gguf.quants  # noqa: E402
except ImportError:
    print("gguf is not installed (tests/run.sh installs it in a venv): skipped")
    sys.exit(SKIP)
import json  # noqa: E402

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

Q = gguf.GGMLQuantizationType
HF = os.path.join(ROOT, "models/stories260K-hf")
TOK = os.path.join(ROOT, "models/stories260K/tok512.bin")
CONFIG = json.load(open(os.path.join(HF, "config.json")))
N_HEADS, N_KV_HEADS = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
WEIGHTS = safetensors.numpy.load_file(STORIES)
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(weights, n_head):
    """convert_hf_to_gguf's LlamaModel.permute: within each head, rows (i, i + hd/2) of HF's
    rotate-half layout become the interleaved pair (2i, 2i + 1)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(untied=False, permute=True):
    """llama.cpp's tensor names -> float32 arrays in NumPy (HF) shape."""
    out = {"token_embd.weight": WEIGHTS["model.embed_tokens.weight"],
           "output_norm.weight": WEIGHTS["model.norm.weight"]}
    if untied:
        out["output.weight"] = WEIGHTS["model.embed_tokens.weight"]
    for layer in range(CONFIG["num_hidden_layers"]):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
        out[blk + "attn_norm.weight"] = WEIGHTS[hf + "input_layernorm.weight"]
        out[blk + "ffn_norm.weight"] = WEIGHTS[hf + "post_attention_layernorm.weight"]
        for hf_name, name in LINEARS.items():
            w = WEIGHTS[hf + hf_name + ".weight"]
            if name == "attn_q" and permute:
                w = llama_cpp_permute(w, N_HEADS)
            elif name == "attn_k" and permute:
                w = llama_cpp_permute(w, N_KV_HEADS)
            out[blk + name + ".weight"] = w
    return out


def write_gguf(path, qtype=Q.F32, arch="llama", drop_key=None, drop_tensor=None, reshape=None,
               untied=False, tokens=True, permute=True):
    writer = gguf.GGUFWriter(path, arch=arch)
    keys = {f"{arch}.embedding_length": CONFIG["hidden_size"],
            f"{arch}.block_count": CONFIG["num_hidden_layers"],
            f"{arch}.attention.head_count": N_HEADS, f"{arch}.attention.head_count_kv": N_KV_HEADS,
            f"{arch}.feed_forward_length": CONFIG["intermediate_size"],
            f"{arch}.context_length": CONFIG["max_position_embeddings"],
            f"{arch}.rope.dimension_count": CONFIG["head_dim"],
            "tokenizer.ggml.bos_token_id": CONFIG["bos_token_id"],
            "tokenizer.ggml.eos_token_id": CONFIG["eos_token_id"]}
    floats = {f"{arch}.rope.freq_base": CONFIG["rope_parameters"]["rope_theta"],
              f"{arch}.attention.layer_norm_rms_epsilon": CONFIG["rms_norm_eps"]}
    for key, value in keys.items():
        if key != drop_key:
            writer.add_uint32(key, value)
    for key, value in floats.items():
        if key != drop_key:
            writer.add_float32(key, value)
    if tokens:
        writer.add_token_list([f"<tok{i}>" for i in range(CONFIG["vocab_size"])])
    for name, array in gguf_tensors(untied, permute).items():
        if name == drop_tensor:
            continue
        if name == reshape:
            array = array[:-1]
        array = np.ascontiguousarray(array, dtype=np.float32)
        # llama.cpp keeps 1-D tensors in F32 and falls back to F32 for rows that are not a whole
        # number of Q8_0 blocks (stories260K's ffn_down rows have 172 values).
        if qtype == Q.F16 and array.ndim == 2:
            writer.add_tensor(name, array.astype(np.float16))
        elif qtype == Q.Q8_0 and array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model, ids, out):
    run_lqd("eval", "--model", model, "--tokens", ids, "--dump-logits", out)
    return np.load(out)


checks = Checks()
ids = ",".join(map(str, json.load(open(os.path.join(HF, "ref_logits.json")))["greedy200"]["ids"][:120]))
with tempfile.TemporaryDirectory() as tmp:
    reference = logits(HF, ids, os.path.join(tmp, "hf.npy"))
    text_hf = run_lqd("generate", "--model", HF, "--tokenizer", TOK, "--max-tokens", "120",
                      "--temperature", "0").stdout

    # F32: the same model (tied; untied with output.weight; vocab from token_embd rows)
    for label, options in [("f32", {}), ("f32-untied", {"untied": True}), ("f32-notokens", {"tokens": False})]:
        path = os.path.join(tmp, label + ".gguf")
        write_gguf(path, **options)
        worst = float(np.abs(logits(path, ids, os.path.join(tmp, label + ".npy")) - reference).max())
        checks.check(worst <= 1e-5, f"{label}: logits differ from the HF directory's by {worst}")
        text = run_lqd("generate", "--model", path, "--tokenizer", TOK, "--max-tokens", "120",
                       "--temperature", "0").stdout
        checks.check(text == text_hf and len(text) > 100, f"{label}: greedy text {text!r} vs {text_hf!r}")

    # without llama.cpp's permutation the file is another model: the undoing is not a no-op
    path = os.path.join(tmp, "unpermuted.gguf")
    write_gguf(path, permute=False)
    worst = float(np.abs(logits(path, ids, os.path.join(tmp, "unpermuted.npy")) - reference).max())
    checks.check(worst > 1e-2, f"unpermuted Q/K: logits differ by only {worst}")

    # F16 (relative error 2^-11 per weight) and Q8_0 (8-bit blocks of 32): close, not equal.
    # Tolerances: max |logit difference| over 120 positions, logits of magnitude ~10.
    for label, qtype, tolerance in [("f16", Q.F16, 0.02), ("q8_0", Q.Q8_0, 0.6)]:
        path = os.path.join(tmp, label + ".gguf")
        write_gguf(path, qtype=qtype)
        got = logits(path, ids, os.path.join(tmp, label + ".npy"))
        worst = float(np.abs(got - reference).max())
        agree = float((got.argmax(1) == reference.argmax(1)).mean())
        print(f"{label}: max |logit difference| {worst:.4g}, argmax agreement {agree:.3f}")
        checks.check(0 < worst <= tolerance, f"{label}: logits differ by {worst} (tolerance {tolerance})")
        checks.check(agree >= 0.95, f"{label}: argmax agrees at {agree} of positions")

    # malformed files: refused, the message naming the problem
    cases = [
        ({"drop_tensor": "blk.3.ffn_up.weight"}, "blk.3.ffn_up.weight"),
        ({"drop_tensor": "output_norm.weight"}, "output_norm.weight"),
        ({"reshape": "blk.1.attn_k.weight"}, "blk.1.attn_k.weight"),
        ({"reshape": "token_embd.weight", "tokens": True}, "token_embd.weight"),
        ({"drop_key": "llama.embedding_length"}, "llama.embedding_length"),
        ({"drop_key": "llama.attention.layer_norm_rms_epsilon"}, "llama.attention.layer_norm_rms_epsilon"),
        ({"arch": "gpt2"}, "gpt2"),
    ]
    for number, (options, text) in enumerate(cases):
        path = os.path.join(tmp, f"bad{number}.gguf")
        write_gguf(path, **options)
        result = run_lqd("eval", "--model", path, "--tokens", "1,2,3", "--dump-logits",
                         os.path.join(tmp, "bad.npy"), check=False)
        checks.check(result.returncode != 0 and text in result.stderr and path in result.stderr,
                     f"{options}: exit {result.returncode}, stderr {result.stderr!r}")

checks.finish()
