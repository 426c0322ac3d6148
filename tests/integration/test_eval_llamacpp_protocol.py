"""`lqd eval --documents llama-perplexity` (issue 9) against an independent NumPy implementation
of llama.cpp's llama-perplexity protocol (tools/perplexity/perplexity.cpp, perplexity()): the
text less one trailing newline tokenized once (tokenize_tool, BOS first when the tokenizer adds
one), n_chunk = tokens // n_ctx chunks (at most --max-chunks), each chunk's logits taken from
`lqd eval --tokens ... --dump-logits` with its first token replaced by BOS when the tokenizer
adds one, positions j in [n_ctx // 2, n_ctx - 1) scored against token j + 1, PPL = exp(mean NLL)
and llama-perplexity's "+/-". Also: the BOS replacement changes the figure (so this test sees
it), too short a text fails with a message, option misuse is a usage error. stories260K (its
tokenizer adds BOS) always; SmolLM2's GGUF (no BOS) when present. Needs no llama.cpp: the
agreement with llama-perplexity itself is measured by tests/bench/bench_llamacpp.py.
Environment: LQD (the binary), LQ_REPO_ROOT, LQ_TOKENIZE_TOOL, LQD_SMOLLM2."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peer"))
from peer_util import LQD, ROOT, Checks, require_numpy, run_lqd  # noqa: E402

require_numpy()
import numpy as np  # noqa: E402

TOKENIZE_TOOL = os.environ.get("LQ_TOKENIZE_TOOL",
                                os.path.join(os.path.dirname(os.path.dirname(LQD)), "tests", "tokenize_tool"))
STORIES = os.path.join(ROOT, "models/stories260K/stories260K.bin")
STORIES_TOK = os.path.join(ROOT, "models/stories260K/tok512.bin")
SMOLLM2 = os.environ.get("LQD_SMOLLM2", os.path.join(ROOT, ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TINYSTORIES = os.path.join(ROOT, "tests/data/tinystories_val_subset.txt")
WIKI = os.path.join(ROOT, "tests/data/wiki.test.raw")
checks = Checks()


def tokenize(tokenizer, text):
    """ids of text with BOS first when the tokenizer adds one, and whether it does."""
    bos = int(subprocess.run([TOKENIZE_TOOL, "--info", tokenizer], capture_output=True, text=True,
                             check=True).stdout.split()[1])
    out = subprocess.run([TOKENIZE_TOOL, "--hex", "--bos", tokenizer], input=text.encode().hex() + "\n",
                         capture_output=True, text=True, check=True).stdout
    ids = [int(v) for v in out.split()]
    empty = subprocess.run([TOKENIZE_TOOL, "--bos", tokenizer], input="\n", capture_output=True, text=True,
                           check=True).stdout.split()
    return ids, bos, empty == [str(bos)]


def chunk_nlls(model, tokenizer_args, ids, bos, replace_bos, n_ctx, n_chunk, tmp):
    """llama-perplexity's scored NLLs, from lqd's logits of each chunk."""
    first, nlls = n_ctx // 2, []
    for c in range(n_chunk):
        tokens = ids[c * n_ctx:(c + 1) * n_ctx]
        batch = ([bos] if replace_bos else tokens[:1]) + tokens[1:]
        out = os.path.join(tmp, "logits.npy")
        run_lqd("eval", "--model", model, *tokenizer_args, "--tokens", ",".join(map(str, batch)),
                "--dump-logits", out)
        logits = np.load(out).astype(np.float64)[first:n_ctx - 1]
        top = logits.max(axis=1, keepdims=True)
        log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        nlls.extend(-log_softmax[np.arange(len(logits)), tokens[first + 1:n_ctx]])
    return np.array(nlls)


def estimate(nlls):
    """Final estimate: PPL = exp(mean) +/- ppl * sqrt(var / (count - 1)), as perplexity.cpp."""
    mean = nlls.mean()
    variance = (nlls * nlls).mean() - mean * mean
    return float(np.exp(mean)), float(np.exp(mean) * np.sqrt(variance / (len(nlls) - 1)))


def check_protocol(name, model, tokenizer, tokenizer_args, text, n_ctx, max_chunks, tmp):
    path = os.path.join(tmp, "text.txt")
    with open(path, "w") as f:
        f.write(text)
    ids, bos, adds_bos = tokenize(tokenizer, text[:-1] if text.endswith("\n") else text)
    n_chunk = len(ids) // n_ctx if max_chunks is None else min(max_chunks, len(ids) // n_ctx)
    limit = [] if max_chunks is None else ["--max-chunks", str(max_chunks)]
    args = ["eval", "--model", model, *tokenizer_args, "--ppl", path, "--documents", "llama-perplexity",
            "--context", str(n_ctx), *limit]
    report = json.loads(run_lqd(*args, "--json").stdout)
    nlls = chunk_nlls(model, tokenizer_args, ids, bos, adds_bos, n_ctx, n_chunk, tmp)
    ppl, error = estimate(nlls)
    print(f"{name}: n_ctx {n_ctx}, {len(ids)} tokens, {n_chunk} chunks, BOS {adds_bos}: lqd {report['ppl']:.6f}"
          f" +/- {report.get('ppl_error', float('nan')):.6f} over {report['tokens']}, NumPy {ppl:.6f} +/- {error:.6f}"
          f" over {len(nlls)}")
    checks.check(report["tokens"] == n_chunk * (n_ctx - n_ctx // 2 - 1) == len(nlls),
                 f"{name}: scored tokens {report['tokens']}, expected {len(nlls)}")
    checks.check(report["documents"] == n_chunk, f"{name}: chunks {report['documents']}, expected {n_chunk}")
    checks.check(report["protocol"] == "llama-perplexity" and report["context"] == n_ctx,
                 f"{name}: protocol/context {report['protocol']}/{report['context']}")
    checks.check(abs(report["ppl"] - ppl) <= 1e-5 * ppl, f"{name}: ppl {report['ppl']} vs NumPy {ppl}")
    checks.check(abs(report["ppl_error"] - error) <= 1e-4 * error, f"{name}: +/- {report['ppl_error']} vs {error}")
    if adds_bos and n_chunk > 1:
        # the same protocol without the BOS replacement gives another figure: the check above sees it
        plain, _ = estimate(chunk_nlls(model, tokenizer_args, ids, bos, False, n_ctx, n_chunk, tmp))
        checks.check(abs(plain - ppl) > 1e-3 * ppl, f"{name}: BOS replacement changes nothing ({plain} vs {ppl})")
    printed = run_lqd(*args).stdout
    checks.check(f"Final estimate: PPL = {report['ppl']:.4f} +/- " in printed, f"{name}: text output {printed!r}")
    return ids


with tempfile.TemporaryDirectory() as tmp:
    stories = ["--tokenizer", STORIES_TOK]
    lines = open(TINYSTORIES).read().splitlines(keepends=True)
    text = "".join(lines[:12])
    ids = check_protocol("stories260K", STORIES, STORIES_TOK, stories, text, 64, None, tmp)
    checks.check(len(ids) // 64 >= 3, f"the stories text holds {len(ids)} tokens: too few chunks for the test")
    check_protocol("stories260K odd context", STORIES, STORIES_TOK, stories, text, 65, 2, tmp)

    # fewer than 2 * n_ctx tokens: llama-perplexity refuses, so does lqd
    short = os.path.join(tmp, "short.txt")
    with open(short, "w") as f:
        f.write(lines[0])
    failed = run_lqd("eval", "--model", STORIES, *stories, "--ppl", short, "--documents", "llama-perplexity",
                     "--context", "256", check=False)
    checks.check(failed.returncode == 1 and "at least 2 * context = 512" in failed.stderr,
                 f"short text: exit {failed.returncode}, {failed.stderr!r}")
    for misuse in (["--documents", "stream", "--max-chunks", "2"],
                   ["--documents", "llama-perplexity", "--max-tokens", "100"]):
        wrong = run_lqd("eval", "--model", STORIES, *stories, "--ppl", short, *misuse, check=False)
        checks.check(wrong.returncode == 2, f"{misuse}: exit {wrong.returncode}, {wrong.stderr!r}")

    # a byte-level BPE tokenizer that adds no BOS: chunks go in as they are
    if os.path.exists(SMOLLM2):
        wiki = open(WIKI).read(4000)
        check_protocol("SmolLM2 GGUF", SMOLLM2, SMOLLM2, [], wiki, 48, 3, tmp)
    else:
        print(f"{SMOLLM2} is missing (tests/models/fetch_smollm2.sh): the no-BOS case skipped")

checks.finish()
