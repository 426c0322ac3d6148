"""lqd's tokenizer read from GGUF metadata (issue 7), written with the `gguf` package as
llama.cpp's converter writes it: (1) the 32000-piece Llama 2 SentencePiece tokenizer
(tokenizer.ggml.model "llama": tokens, scores, token types) must give the `sentencepiece`
library's ids on every line of WikiText-2's test split; (2) byte-level BPE tokenizers trained
with `tokenizers` (model "gpt2": tokens, merges, types, and each tokenizer.ggml.pre lqd knows)
must give `tokenizers`' ids on the same lines; (3) malformed metadata (no tokens, a merge
naming an unknown piece, an unknown pre-tokenizer) is refused with the key or value named."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks  # noqa: E402

try:
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
except ImportError as missing:
    print(f"{missing.name} is not installed: skipped")
    sys.exit(SKIP)

TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
# The Llama 2 tokenizer lives in the project's shared inputs only: without it the
# SentencePiece part is skipped and the byte-level part still runs.
LLAMA = os.path.join(ROOT, "..", "shared", "models", "llama2-tokenizer", "tokenizer.model")
WIKI = os.path.join(ROOT, "tests", "data", "wiki.test.raw")  # CC BY-SA 3.0: tests/data/README.md
for needed in (TOOL, WIKI):
    if not os.path.exists(needed):
        print(f"{needed} is missing: skipped")
        sys.exit(SKIP)

checks = Checks()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
TRICKY = ["", " ", "  a", "a\nb\n\nc", "\r\n", "Hello world", "hello world", "😀 日本語 Ελληνικά",
          "12 345 6789 1,000,000", "I'M you're", "<|im_start|>user\nHi<|im_end|>", "<s>",
          "<0x41>", "\u2581", "x" * 500]


def tool(path, texts, *flags):
    data = b"".join(t.encode().hex().encode() + b"\n" for t in texts)
    return subprocess.run([TOOL, "--hex", *flags, path], input=data, capture_output=True,
                          timeout=600)


def encode(path, texts, *flags):
    result = tool(path, texts, *flags)
    if result.returncode != 0:
        raise AssertionError(f"tokenize_tool {path}: {result.stderr.decode(errors='replace')}")
    return [[int(x) for x in line.split()] for line in result.stdout.decode().split("\n")[:-1]]


def compare(name, path, texts, expected):
    got = encode(path, texts)
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    for i in bad[:5]:
        print(f"  {name}: text {i} {texts[i][:60]!r}\n    lqd {got[i][:16]}\n    ref {expected[i][:16]}")
    checks.check(len(got) == len(texts) and not bad,
                 f"{name}: {len(bad)} of {len(texts)} texts encode differently")
    print(f"{name}: {len(texts) - len(bad)} of {len(texts)} texts match")


def write_gguf(path, fields):
    """fields: (method name of GGUFWriter, value) pairs; None values are left out."""
    writer = gguf.GGUFWriter(path, "llama")
    for method, value in fields:
        if value is not None:
            getattr(writer, method)(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def refused(name, path, expected):
    result = tool(path, ["a"])
    message = result.stderr.decode(errors="replace")
    checks.check(result.returncode != 0 and expected in message,
                 f"{name}: expected a refusal naming {expected!r}, got rc {result.returncode}: "
                 f"{message.strip()[:200]}")


def llama_fields():
    proto = pb.ModelProto()
    with open(LLAMA, "rb") as f:
        proto.ParseFromString(f.read())
    return [("add_tokenizer_model", "llama"),
            ("add_token_list", [p.piece.encode() for p in proto.pieces]),
            ("add_token_scores", [p.score for p in proto.pieces]),
            ("add_token_types", [int(p.type) for p in proto.pieces]),
            ("add_bos_token_id", 1), ("add_eos_token_id", 2), ("add_unk_token_id", 0),
            ("add_add_bos_token", True)]


def check_llama(tmp, lines):
    path = os.path.join(tmp, "llama.gguf")
    write_gguf(path, llama_fields())
    sp = spm.SentencePieceProcessor(model_file=LLAMA)
    texts = lines + TRICKY
    compare("llama gguf", path, texts, [sp.encode(t) for t in texts])
    got = encode(path, ["Hello world"], "--bos")
    checks.check(got == [[1] + sp.encode("Hello world")], f"llama gguf: BOS first, got {got}")
    # Malformed: no tokens; an unknown model.
    fields = [f for f in llama_fields() if f[0] != "add_token_list"]
    write_gguf(os.path.join(tmp, "no_tokens.gguf"), fields)
    refused("no tokens", os.path.join(tmp, "no_tokens.gguf"), "tokenizer.ggml.tokens")
    fields = [("add_tokenizer_model", "rwkv")] + llama_fields()[1:]
    write_gguf(os.path.join(tmp, "rwkv.gguf"), fields)
    refused("unknown model", os.path.join(tmp, "rwkv.gguf"), "rwkv")


def train(pre_tokenizer, lines, ignore_merges=False):
    tokenizer = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.add_tokens(["hello world"])  # added, not special: user-defined, matched whole
    return tokenizer


def bpe_fields(tokenizer, pre, merges=None):
    """The GGUF metadata llama.cpp's converter writes for a byte-level BPE tokenizer."""
    model = json.loads(tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for piece, id_ in vocab.items():
        tokens[id_] = piece
    added = tokenizer.get_added_tokens_decoder()
    types = [(3 if added[i].special else 4) if i in added else 1 for i in range(len(tokens))]
    if merges is None:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", pre),
            ("add_token_list", [t.encode() for t in tokens]), ("add_token_types", types),
            ("add_token_merges", [m.encode() for m in merges]),
            ("add_eos_token_id", vocab["<|endoftext|>"]), ("add_add_bos_token", False)]


def check_bpe(tmp, lines):
    training = lines[:4000]
    variants = [
        ("default", train(pre_tokenizers.ByteLevel(add_prefix_space=False), training)),
        ("llama-bpe", train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), training,
            ignore_merges=True)),
        ("qwen2", train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), training)),
        ("smollm", train(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)]), training)),
    ]
    texts = lines + TRICKY
    for pre, tokenizer in variants:
        path = os.path.join(tmp, f"bpe_{pre}.gguf")
        write_gguf(path, bpe_fields(tokenizer, pre))
        compare(f"gpt2 gguf pre={pre}", path,
                texts, [tokenizer.encode(t, add_special_tokens=False).ids for t in texts])
    tokenizer = variants[0][1]
    path = os.path.join(tmp, "bad_pre.gguf")
    write_gguf(path, bpe_fields(tokenizer, "deepseek-coder"))
    refused("unknown pre", path, "deepseek-coder")
    path = os.path.join(tmp, "bad_merge.gguf")
    write_gguf(path, bpe_fields(tokenizer, "default", merges=["t h", "zzqq xyzzy"]))
    refused("unknown merge piece", path, "zzqq xyzzy")
    fields = [f for f in bpe_fields(tokenizer, "default") if f[0] != "add_token_merges"]
    write_gguf(os.path.join(tmp, "no_merges.gguf"), fields)
    refused("no merges", os.path.join(tmp, "no_merges.gguf"), "tokenizer.ggml.merges")


def main():
    with open(WIKI, "rb") as f:
        lines = [line for line in f.read().decode("utf-8").split("\n") if line]
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.exists(LLAMA):
            check_llama(tmp, lines)
        else:
            print(f"{LLAMA} is missing: the SentencePiece part is skipped")
        check_bpe(tmp, lines)
    checks.finish()


if __name__ == "__main__":
    main()
