"""lqd's byte-level BPE (core/tokenizer_bpe.c, through tests/peer/tokenize_tool.c) against HF
`tokenizers`: byte-level BPE tokenizers are trained with `tokenizers` itself on part of
WikiText-2's test split (vocabulary 2000, with special tokens such as <|im_start|>), saved as
tokenizer.json, and lqd must give the same ids as `tokenizers` on every line of the file and
on strings chosen to hit the edges (emoji, CJK, accents, contractions, numbers, runs of spaces
and newlines, special tokens written in the text, invalid UTF-8 for the round trip). The
pre-tokenizers are those of the model families: GPT-2 (ByteLevel with its regex), Llama 3
(Split with its pattern + ByteLevel, and ignore_merges), Qwen 2 (single digits), SmolLM2
(Digits + ByteLevel) and ByteLevel with add_prefix_space. Decoding must give `tokenizers`'
text back, and decode(encode(text)) == text for text without special tokens."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks  # noqa: E402

try:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
except ImportError:
    print("tokenizers is not installed: skipped")
    sys.exit(SKIP)

TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
WIKI = os.path.join(ROOT, "tests", "data", "wiki.test.raw")  # CC BY-SA 3.0: tests/data/README.md
for needed in (TOOL, WIKI):
    if not os.path.exists(needed):
        print(f"{needed} is missing: skipped")
        sys.exit(SKIP)

checks = Checks()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

TRICKY = [
    "", " ", "  ", "   a", "a ", "a  ", " a b  c   d ", "\t", "a\tb", "\n", "a\nb\n\nc", "\r\n",
    " \n ", "  \n  a", "a \n\n b", "x\r\n\r\ny", "Hello world", "hello  world", "  leading",
    "trailing  ", "😀", "😀😀 a 😀", "👍🏽 family 👨‍👩‍👧", "日本語のテキスト", "中文 English 混合",
    "한국어 텍스트", "Ελληνικά", "Привет, мир", "e\u0301", "café naïve résumé", "ﬁ", "\u200b",
    "\u00a0nbsp\u00a0", "a\u3000b", "l'été", "I'm you're we've they'll she'd it's don't",
    "I'M YOU'RE WE'VE THEY'LL SHE'D IT'S", "'s 'S ''s x'sy", "rock'n'roll", "$$$ 1234567890 3.14159",
    "12 345 6789 1,000,000", "٣٤٥ ½ Ⅻ ²", "@-@ , .", "(hello) [world] {x}", "a...b!!!?",
    "<|im_start|>user\nHi there<|im_end|>\n", "<|endoftext|>", "x<|endoftext|>y",
    "<|im_start|><|im_end|>", "<|im_start", "< |im_end|>", "\x00", "a\x00b", "\x7f",
    "\U0010ffff", "\ufffd", "x" * 3000, " " * 200, "\n" * 50, "ab" * 1500, "😀" * 300,
    "The quick brown fox jumps over the lazy dog. " * 40,
]
INVALID = [b"\xff", b"a\x80b", b"\xe2\x96", b"\xc0\xaf", b"caf\xe9", b"\xf0\x9f\x98"]


def run_tool(path, lines, *flags):
    data = b"".join(line + b"\n" for line in lines)
    result = subprocess.run([TOOL, *flags, path], input=data, capture_output=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"tokenize_tool {' '.join(flags)} {path}: "
                             f"{result.stderr.decode(errors='replace')}")
    return result.stdout.decode().split("\n")[:-1]


def encode(path, texts, bos=False):
    raw = [(t.encode() if isinstance(t, str) else t).hex().encode() for t in texts]
    out = run_tool(path, raw, "--hex", *(["--bos"] if bos else []))
    return [[int(x) for x in line.split()] for line in out]


def decode(path, id_lists):
    out = run_tool(path, [" ".join(map(str, ids)).encode() for ids in id_lists], "--decode", "--hex")
    return [bytes.fromhex(line) for line in out]


def train(pre_tokenizer, lines, ignore_merges=False, bos=False):
    tokenizer = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.add_tokens(["hello world", "@-@"])  # added, not special: matched whole
    if bos:
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          special_tokens=[("<|begin_of_text|>", 3)])])
    return tokenizer


def check_variant(name, tokenizer, lines, tmp, round_trip=True):
    path = os.path.join(tmp, name, "tokenizer.json")
    os.makedirs(os.path.dirname(path))
    tokenizer.save(path)
    hf = tokenizers.Tokenizer.from_file(path)
    texts = lines + TRICKY
    expected = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    got = encode(path, texts)
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    for i in bad[:5]:
        print(f"  {name}: text {i} {texts[i][:60]!r}\n    lqd {got[i][:16]}\n    ref {expected[i][:16]}")
    checks.check(len(got) == len(texts) and not bad,
                 f"{name}: {len(bad)} of {len(texts)} texts encode differently from tokenizers")
    print(f"{name}: {len(texts) - len(bad)} of {len(texts)} texts match tokenizers")
    # Decoding: tokenizers' text (special tokens skipped), and the original text back.
    decoded = decode(path, expected)
    reference = [hf.decode(ids).encode() for ids in expected]
    bad = [i for i, (d, r) in enumerate(zip(decoded, reference)) if d != r]
    checks.check(not bad, f"{name}: {len(bad)} decodes differ from tokenizers"
                 + (f", first {texts[bad[0]][:40]!r}: {decoded[bad[0]][:40]!r}" if bad else ""))
    if round_trip:
        plain = [i for i, t in enumerate(texts) if not any(s in t for s in SPECIAL)]
        bad = [i for i in plain if decoded[i] != texts[i].encode()]
        checks.check(not bad, f"{name}: {len(bad)} of {len(plain)} texts do not round-trip"
                     + (f", first {texts[bad[0]][:40]!r}" if bad else ""))
        ids = encode(path, INVALID)
        checks.check(decode(path, ids) == INVALID, f"{name}: invalid UTF-8 round-trips")
    return path, hf


def main():
    with open(WIKI, "rb") as f:
        data = f.read().decode("utf-8")
    lines = [line for line in data.split("\n") if line]
    training = lines[:1500]
    with tempfile.TemporaryDirectory() as tmp:
        gpt2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False), training)
        path, hf = check_variant("gpt2", gpt2, lines, tmp)
        info = subprocess.run([TOOL, "--info", path], capture_output=True, text=True).stdout.split()
        checks.check(info[:3] == [str(hf.get_vocab_size()), "-1", "0"],
                     f"gpt2: vocab, BOS none, EOS <|endoftext|>: {info}")
        # The whole file as one text, through the directory lookup.
        whole = encode(os.path.dirname(path), [data])[0]
        checks.check(whole == hf.encode(data, add_special_tokens=False).ids,
                     f"gpt2: whole wiki.test.raw ({len(whole)} ids) matches tokenizers")

        split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3), behavior="isolated")
        llama3 = train(pre_tokenizers.Sequence([
            split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            training, ignore_merges=True, bos=True)
        path, hf = check_variant("llama3", llama3, lines, tmp)
        with_bos = encode(path, lines[:50], bos=True)
        checks.check(all(g == hf.encode(t).ids for g, t in zip(with_bos, lines[:50])),
                     "llama3: --bos gives tokenizers' ids with the template's <|begin_of_text|>")
        # The same file without ignore_merges: BPE must rebuild whole-word pieces itself.
        config = json.loads(hf.to_str())
        config["model"]["ignore_merges"] = False
        check_variant("llama3_merges", tokenizers.Tokenizer.from_str(json.dumps(config)), lines,
                      tmp)

        qwen = train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), training)
        check_variant("qwen2", qwen, lines, tmp)

        smol = train(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)]), training)
        check_variant("smollm2", smol, lines, tmp)

        # add_prefix_space adds a space that decoding keeps: ids and decodes only.
        prefixed = train(pre_tokenizers.ByteLevel(add_prefix_space=True), training)
        check_variant("prefix_space", prefixed, lines[:800], tmp, round_trip=False)

        # Files lqd must refuse, naming what it cannot do.
        config = json.loads(gpt2.to_str())
        for label, edit, expected in (
                ("nfc", lambda c: c.update(normalizer={"type": "NFC"}), "NFC"),
                ("pattern", lambda c: c.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated",
                     "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
                 "Split pattern"),
                ("no_decoder", lambda c: c.update(decoder=None), "ByteLevel decoder")):
            broken = json.loads(json.dumps(config))
            edit(broken)
            path = os.path.join(tmp, label + ".json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(broken, f)
            result = subprocess.run([TOOL, "--info", path], capture_output=True, text=True)
            checks.check(result.returncode != 0 and expected in result.stderr,
                         f"{label}: refused: {result.stderr.strip()}")
    checks.finish()


main()
