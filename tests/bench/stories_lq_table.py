"""Benchmark: stories260K compressed by lqd at several budgets and ranks, against plain NF3 /
NF4 (QLoRA-style: zero low-rank part) and the fp32 model. Prints a Markdown table of
perplexity (first 200,000 tokens of ../shared/data/tinystories_val_subset.txt), bits/param of
the quantized part, effective bits (low-rank part included, at fp32 as stored and at 16 bits)
and compress time. Usage: python3 tests/bench/stories_lq_table.py [build/server/lqd]"""
import json
import os
import subprocess
import sys
import tempfile
import time

LQD = sys.argv[1] if len(sys.argv) > 1 else "build/server/lqd"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models/stories260K-hf")
TOKENIZER = os.path.join(ROOT, "models/stories260K/tok512.bin")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinystories_val_subset.txt")


def lqd(*args):
    return subprocess.run([LQD, *args], check=True, capture_output=True, text=True).stdout


def ppl(model):
    report = json.loads(lqd("eval", "--model", model, "--tokenizer", TOKENIZER, "--ppl", TEXT,
                            "--max-tokens", "200000", "--json"))
    return report["ppl"]


def compress(out, bits, rank, cache, configs=None):
    args = ["compress", "--model", MODEL, "--tokenizer", TOKENIZER, "--bits", str(bits), "--rank",
            str(rank), "--out", out, "--cache-dir", cache, "--quiet", "--force"]
    if configs:
        args += ["--configs", configs]
    started = time.time()
    lqd(*args)
    seconds = time.time() - started
    info = json.loads(lqd("inspect", out, "--json"))
    return seconds, info


def main():
    rows = [("fp32 (no compression)", "32", "32", "32", "-", f"{ppl(MODEL):.4f}")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for name, configs, bits in (("NF3 (3, 8, fp32, 64, 256), rank 0", "3,8,fp32,64,256", 3.127),
                                    ("NF4 (4, 8, fp32, 64, 256), rank 0", "4,8,fp32,64,256", 4.127)):
            out = os.path.join(tmp, name.split()[0])
            seconds, info = compress(out, bits, 0, cache, configs)
            rows.append((name, f"{info['bits_per_param']:.3f}", f"{info['effective_bits']:.3f}", "-",
                         f"{seconds:.1f}", f"{ppl(out):.4f}"))
        for rank in (4, 8):
            for bits in (2.5, 2.75, 3.0, 3.5, 4.0):
                out = os.path.join(tmp, f"lq-{bits}-{rank}")
                seconds, info = compress(out, bits, rank, cache)
                sixteen = info["effective_bits_16"]
                rows.append((f"LQ-LoRA, ILP over Table 1, {bits} bits, rank {rank}",
                             f"{info['bits_per_param']:.3f}", f"{info['effective_bits']:.3f}",
                             f"{sixteen:.3f}", f"{seconds:.1f}", f"{ppl(out):.4f}"))
    print("| model | bits/param (Q) | effective bits (fp32 L1, L2) | effective bits (16-bit L1, L2) "
          "| compress s | perplexity |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


main()
