"""lqd's tokenizer (through tests/peer/tokenize_tool.c) against the sentencepiece library on
the Llama 2 tokenizer: every line of WikiText-2's test split, the whole file as one text, and
strings chosen to hit the edges (spaces, newlines, byte fallback, emoji, CJK, literal "▁" and
"<s>"). The same vocabulary is read from tokenizer.model, llama2.c's tokenizer.bin and a
tokenizer.json converted as transformers does (when `tokenizers` is installed), and all three
must give sentencepiece's ids exactly. Decoding must give sentencepiece's text back. Variants
of the model (no byte fallback, UNUSED and USER_DEFINED pieces, no dummy prefix, extra
whitespace removal) exercise the rarer rules, and the Metaspace form of tokenizer.json is
checked against HF tokenizers itself, whose rule for a leading space differs."""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks  # noqa: E402

try:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
except ImportError:
    print("sentencepiece (with protobuf) is not installed: skipped")
    sys.exit(SKIP)
try:
    import tokenizers
except ImportError:
    tokenizers = None
import tokenizer_fixtures as fixtures  # noqa: E402

TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
SHARED = os.path.join(ROOT, "..", "shared")
LLAMA = os.path.join(SHARED, "models", "llama2-tokenizer")
WIKI = os.path.join(SHARED, "data", "wiki.test.raw")
STORIES = os.path.join(SHARED, "data", "tinystories_val_subset.txt")
TOK512 = os.path.join(ROOT, "models", "stories260K", "tok512.bin")

for needed in (TOOL, os.path.join(LLAMA, "tokenizer.model"), WIKI):
    if not os.path.exists(needed):
        print(f"{needed} is missing: skipped")
        sys.exit(SKIP)

checks = Checks()

TRICKY = [
    "", " ", "  ", "   a", "a ", "a  ", " a b  c   d ", "\t", "a\tb", "\n", "a\nb\n\nc",
    "\r\n", " \n ", "Hello world", "hello  world", "  leading", "trailing  ",
    "😀", "😀😀 a 😀", "日本語のテキスト", "中文 English 混合", "Ελληνικά", "Привет, мир",
    "e\u0301", "ﬁ", "\u200b", "\u2581", "\u2581\u2581a", "a\u2581b", "<s>", "</s>", "<unk>",
    "<0x41>", "a\x00b", "\x00", "\x7f", "$$$ 1234567890 3.14159", "@-@ , .", "l'été",
    "\U0010ffff", "\ufffd", "x" * 3000, " " * 200, "ab" * 1500, "😀" * 300,
    "The quick brown fox jumps over the lazy dog. " * 40,
]
# Bytes that are not UTF-8: sentencepiece reads each bad byte as U+FFFD, lqd encodes the byte
# itself through byte fallback; only the round trip is checked for these.
INVALID = [b"\xff", b"a\x80b", b"\xe2\x96", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
           b"caf\xe9", b"\xf0\x9f\x98"]


def run_tool(path, lines, *flags, hex_lines=False, check=True):
    """Returns ([output line], seconds the tool spent inside lqd)."""
    payload = [line.hex() if hex_lines else line for line in lines]
    if hex_lines:
        flags = flags + ("--hex",)
    data = b"".join((p.encode() if isinstance(p, str) else p) + b"\n" for p in payload)
    result = subprocess.run([TOOL, *flags, "--time", path], input=data, capture_output=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"tokenize_tool {' '.join(flags)} {path}: "
                             f"{result.stderr.decode(errors='replace')}")
    seconds = 0.0
    for line in result.stderr.decode(errors="replace").splitlines():
        if line.startswith("seconds "):
            seconds = float(line.split()[1])
    out = result.stdout.decode("utf-8", errors="surrogateescape").split("\n")[:-1]
    return out, seconds


def encode(path, texts, bos=False):
    """lqd's ids for each text (str or bytes), through the tool's hex mode."""
    raw = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t for t in texts]
    out, seconds = run_tool(path, raw, *(["--bos"] if bos else []), hex_lines=True)
    return [[int(x) for x in line.split()] for line in out], seconds


def decode(path, id_lists):
    out, _ = run_tool(path, [" ".join(map(str, ids)) for ids in id_lists], "--decode", "--hex")
    return [bytes.fromhex(line) for line in out]


def compare_encodings(name, path, texts, expected, limit=5):
    got, seconds = encode(path, texts)
    checks.check(len(got) == len(texts), f"{name}: {len(got)} outputs for {len(texts)} texts")
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    for i in bad[:limit]:
        print(f"  {name}: text {i} {texts[i][:80]!r}\n    lqd {got[i][:20]}\n    ref {expected[i][:20]}")
    checks.check(not bad, f"{name}: {len(bad)} of {len(texts)} texts encode differently")
    print(f"{name}: {len(texts) - len(bad)} of {len(texts)} texts match ({seconds:.3f} s in lqd)")
    return got


def wiki_lines():
    with open(WIKI, "rb") as f:
        data = f.read()
    # The file has CRLF line ends; a line keeps its "\r" (a real character to encode).
    return data.decode("utf-8"), [line for line in data.decode("utf-8").split("\n") if line]


def check_llama():
    sp = spm.SentencePieceProcessor(model_file=os.path.join(LLAMA, "tokenizer.model"))
    whole, lines = wiki_lines()
    texts = lines + [line.rstrip("\r") for line in lines] + TRICKY
    expected = [sp.encode(t) for t in texts]
    paths = [("tokenizer.model", os.path.join(LLAMA, "tokenizer.model")),
             ("tokenizer.bin", os.path.join(LLAMA, "tokenizer.bin"))]
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizers is not None:
            model_bytes = open(os.path.join(LLAMA, "tokenizer.model"), "rb").read()
            json_path = os.path.join(tmp, "tokenizer.json")
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(fixtures.json_from_model(model_bytes))
            # The converted file must itself be faithful before it can judge lqd.
            hf = tokenizers.Tokenizer.from_file(json_path)
            hf_ids = [hf.encode(t, add_special_tokens=False).ids for t in lines]
            checks.check(hf_ids == expected[:len(lines)], "HF tokenizers on the converted "
                         "tokenizer.json agrees with sentencepiece on the wiki lines")
            paths.append(("tokenizer.json", json_path))
        else:
            print("tokenizers is not installed: tokenizer.json not compared")
        for name, path in paths:
            got = compare_encodings(f"llama2 {name}", path, texts, expected)
            with_bos, _ = encode(path, lines[:50], bos=True)
            checks.check(all(g == [1] + e for g, e in zip(with_bos, expected)),
                         f"llama2 {name}: --bos puts 1 first")
            # Decoding: sentencepiece's text, which is the original text (no "▁" in it).
            decoded = decode(path, got + [[1] + ids for ids in got[:200]])
            reference = [sp.decode(ids).encode() for ids in got] + \
                        [sp.decode([1] + ids).encode() for ids in got[:200]]
            bad = [i for i, (d, r) in enumerate(zip(decoded, reference)) if d != r]
            checks.check(not bad, f"llama2 {name}: {len(bad)} decodes differ from sentencepiece"
                         + (f", first {decoded[bad[0]][:60]!r}" if bad else ""))
            originals = [t.encode() for t in texts] + [t.encode() for t in texts[:200]]
            bad = [i for i, (d, o) in enumerate(zip(decoded, originals))
                   if d != o and "\u2581" not in texts[i % len(texts)]]
            checks.check(not bad, f"llama2 {name}: {len(bad)} texts do not round-trip")
            # Bad UTF-8: byte fallback keeps the bytes, so decoding restores them.
            ids, _ = encode(path, INVALID)
            checks.check(decode(path, ids) == INVALID, f"llama2 {name}: invalid UTF-8 round-trips")
            # The whole file as one text: the same ids as sentencepiece, and fast.
            started = time.perf_counter()
            reference_ids = sp.encode(whole)
            sp_seconds = time.perf_counter() - started
            ids, seconds = encode(path, [whole])
            checks.check(ids[0] == reference_ids, f"llama2 {name}: whole wiki.test.raw "
                         f"({len(reference_ids)} ids) matches sentencepiece")
            checks.check(seconds < 1.0, f"llama2 {name}: whole file encodes in {seconds:.3f} s")
            print(f"llama2 {name}: whole wiki.test.raw ({len(whole.encode())} bytes, "
                  f"{len(reference_ids)} ids) in {seconds:.3f} s (sentencepiece {sp_seconds:.3f} s)")


def variant(tmp, name, edit):
    """A copy of the Llama 2 model changed by edit(ModelProto), written to tmp."""
    model = pb.ModelProto()
    model.ParseFromString(open(os.path.join(LLAMA, "tokenizer.model"), "rb").read())
    edit(model)
    path = os.path.join(tmp, name + ".model")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def check_variants():
    _, lines = wiki_lines()
    texts = lines[:600] + TRICKY

    def no_byte_fallback(m):
        m.trainer_spec.byte_fallback = False
        for p in m.pieces:
            if p.type == 6:
                p.type = 5  # sentencepiece refuses BYTE pieces without byte fallback

    def unused(m):
        for i, p in enumerate(m.pieces):
            if p.type == 1 and i % 7 == 3:
                p.type = 5

    def user_defined(m):
        for p in m.pieces:
            if p.piece in ("ing", "\u2581the", "@-@", "\u2581of", "er"):
                p.type = 4

    def no_prefix(m):
        m.normalizer_spec.add_dummy_prefix = False

    def remove_extra(m):
        m.normalizer_spec.remove_extra_whitespaces = True

    with tempfile.TemporaryDirectory() as tmp:
        for name, edit, extra in (("no_byte_fallback", no_byte_fallback, ["😀😀 a 😀", "日本語 x 😀日本"]),
                                  ("unused", unused, []),
                                  ("user_defined", user_defined, ["theing", "@-@@-@", "ingest"]),
                                  ("no_dummy_prefix", no_prefix, []),
                                  ("remove_extra_whitespaces", remove_extra, ["  a   b  "])):
            path = variant(tmp, name, edit)
            sp = spm.SentencePieceProcessor(model_file=path)
            all_texts = texts + extra
            got = compare_encodings(f"variant {name}", path, all_texts,
                                    [sp.encode(t) for t in all_texts])
            decoded = decode(path, got)
            reference = [sp.decode(ids).encode() for ids in got]
            bad = sum(d != r for d, r in zip(decoded, reference))
            checks.check(bad == 0, f"variant {name}: {bad} decodes differ from sentencepiece")


def check_metaspace_json():
    """transformers' non-legacy Llama conversion: Metaspace adds no prefix to text that starts
    with a space, unlike sentencepiece; lqd must follow the file, i.e. HF tokenizers."""
    if tokenizers is None:
        return
    _, lines = wiki_lines()
    texts = lines[:600] + TRICKY
    model_bytes = open(os.path.join(LLAMA, "tokenizer.model"), "rb").read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(fixtures.json_from_model(model_bytes, legacy=False))
        hf = tokenizers.Tokenizer.from_file(path)
        # HF matches special tokens written in the text; lqd (like sentencepiece) does not.
        plain = [t for t in texts if "<s>" not in t and "</s>" not in t and "<unk>" not in t]
        compare_encodings("metaspace tokenizer.json vs HF", path, plain,
                          [hf.encode(t, add_special_tokens=False).ids for t in plain])


def check_tok512():
    """stories260K's 512-piece vocabulary, made into a SentencePiece model, on TinyStories."""
    if not os.path.exists(TOK512) or not os.path.exists(STORIES):
        print("tok512.bin or TinyStories is missing: tok512 not compared")
        return
    with open(STORIES, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()][:1500] + TRICKY
    model_bytes = fixtures.model_from_llama2c_bin(TOK512)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    expected = [sp.encode(t) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "tok512.model")
        with open(model_path, "wb") as f:
            f.write(model_bytes)
        paths = [("tok512.bin", TOK512), ("tok512.model", model_path)]
        if tokenizers is not None:
            json_path = os.path.join(tmp, "tok512.json")
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(fixtures.json_from_model(model_bytes))
            paths.append(("tok512.json", json_path))
        for name, path in paths:
            compare_encodings(name, path, texts, expected)


def check_errors():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(open(os.path.join(LLAMA, "tokenizer.model"), "rb").read()[:1000])
        result = subprocess.run([TOOL, "--info", path], capture_output=True, text=True)
        checks.check(result.returncode != 0 and "tokenizer.model" in result.stderr,
                     f"truncated model rejected with the file named: {result.stderr.strip()}")


check_llama()
check_variants()
check_metaspace_json()
check_tok512()
check_errors()
checks.finish()
