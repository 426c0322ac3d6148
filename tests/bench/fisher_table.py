"""Benchmark: Fisher-weighted against unweighted LQ (LQ-LoRA §3.3) on stories260K, rank 8, the
ILP over Table 1 at 2.5 / 2.75 / 3.0 bits. Calibration and evaluation never share a line:
the non-empty lines of ../shared/data/tinystories_val_subset.txt (lqd eval's documents) are
split into the first 2000 (calibration, written to /tmp/lqd_fisher_calibration.txt) and the
rest (held out, /tmp/lqd_fisher_heldout.txt). The Fisher information comes from four draws of
the calibration lines: 256 lines with --fisher-seed 0, 1 and 2, and all 2000. Printed:
a Markdown table of perplexity on every held-out line (`lqd eval --ppl`), bits/param, the
matrices whose configuration differs from the unweighted allocation, and the Fisher-weighted
relative error sqrt(Σ‖√F⊙(W−Q−L1L2)‖² / Σ‖√F⊙W‖²) of every model under one yardstick (F from all
2000 lines), computed with NumPy from the written files (Q dequantized by
tests/peer/nf_reference.py). Needs NumPy (tests/run.sh's .venv).
Usage: .venv/bin/python3 tests/bench/fisher_table.py [build/server/lqd]"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

LQD = sys.argv[1] if len(sys.argv) > 1 else "build/server/lqd"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "peer"))
import nf_reference as ref  # noqa: E402

MODEL = os.path.join(ROOT, "models/stories260K-hf")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinystories_val_subset.txt")
CALIBRATION = "/tmp/lqd_fisher_calibration.txt"
HELDOUT = "/tmp/lqd_fisher_heldout.txt"
N_CALIBRATION = 2000
BUDGETS = (2.5, 2.75, 3.0)
RANK = 8
DRAWS = (("256 lines, seed 0", 256, 0), ("256 lines, seed 1", 256, 1), ("256 lines, seed 2", 256, 2),
         ("all 2000 lines", 2000, 0))
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def lqd(*args):
    return subprocess.run([LQD, *args], check=True, capture_output=True, text=True).stdout


def ppl(model):
    return json.loads(lqd("eval", "--model", model, "--ppl", HELDOUT, "--json"))


def split_text():
    """lqd eval's documents: lines trimmed of ASCII whitespace, empty ones skipped."""
    with open(TEXT, encoding="utf-8") as f:
        lines = [line.strip(" \t\r\n\f\v") for line in f.read().split("\n")]
    lines = [line for line in lines if line]
    with open(CALIBRATION, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:N_CALIBRATION]) + "\n")
    with open(HELDOUT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[N_CALIBRATION:]) + "\n")
    return len(lines)


def weighted_relative_error(directory, fisher, weights):
    tensors, metadata = ref.read_safetensors(os.path.join(directory, "model.safetensors"))
    error = norm = 0.0
    for layer in range(5):
        for kind in KINDS:
            name = f"model.layers.{layer}.{kind}"
            w = weights[name + ".weight"].astype(np.float64)
            b0, b1, b2, B0, B1 = metadata[name + ".lq_config"].split(",")
            q, *_ = ref.dequantize_stored(tensors, name, w.shape, (int(b0), int(b1), b2, int(B0), int(B1)))
            lowrank = tensors[name + ".lora_B"].astype(np.float64) @ tensors[name + ".lora_A"].astype(np.float64)
            f = fisher[name + ".weight"].astype(np.float64)
            error += float((f * (w - q - lowrank) ** 2).sum())
            norm += float((f * w * w).sum())
    return (error / norm) ** 0.5


def main():
    n_lines = split_text()
    weights, _ = ref.read_safetensors(os.path.join(MODEL, "model.safetensors"))
    fp32 = ppl(MODEL)
    print(f"non-empty lines: {n_lines}; calibration: lines 1-{N_CALIBRATION} ({CALIBRATION}); held out: "
          f"lines {N_CALIBRATION + 1}-{n_lines} ({HELDOUT}), {fp32['tokens']} tokens, "
          f"{fp32['documents']} documents; fp32 perplexity {fp32['ppl']:.4f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        fisher_files = {}
        allocations = {}
        for bits in BUDGETS:
            variants = [("none", None)] + [(label, (samples, seed)) for label, samples, seed in DRAWS]
            for label, draw in variants:
                out = os.path.join(tmp, f"lq-{bits}-{len(rows)}")
                args = ["compress", "--model", MODEL, "--bits", str(bits), "--rank", str(RANK), "--out", out,
                        "--cache-dir", cache, "--quiet", "--json"]
                if draw and label in fisher_files:
                    args += ["--fisher-load", fisher_files[label]]
                elif draw:
                    fisher_files[label] = os.path.join(tmp, f"fisher-{len(fisher_files)}.safetensors")
                    args += ["--fisher", CALIBRATION, "--fisher-samples", str(draw[0]), "--fisher-seed",
                             str(draw[1]), "--fisher-save", fisher_files[label]]
                started = time.time()
                report = json.loads(lqd(*args))
                seconds = time.time() - started
                configs = [m["config"] for m in report["matrices"]]
                if label == "none":
                    allocations[bits] = configs
                differ = sum(a != b for a, b in zip(configs, allocations[bits]))
                result = ppl(out)
                rows.append([bits, label, report, seconds, differ, result["ppl"], out])
                print(f"  {bits} bits, {label}: {report['bits_per_param']:.4f} bits/param, {differ} configurations "
                      f"differ, compress {seconds:.1f} s, perplexity {result['ppl']:.4f}", flush=True)
        yardstick, _ = ref.read_safetensors(fisher_files["all 2000 lines"])
        print()
        print(f"| budget | Fisher weighting | bits/param (Q) | configurations ≠ unweighted | "
              f"weighted rel. error (F of all 2000 lines) | compress s | perplexity (held out) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(f"| fp32 | - | 32 | - | 0 | - | {fp32['ppl']:.4f} |")
        for bits, label, report, seconds, differ, perplexity, out in rows:
            error = weighted_relative_error(out, yardstick, weights)
            print(f"| {bits} | {label} | {report['bits_per_param']:.3f} | {differ}/35 | {error:.4f} | "
                  f"{seconds:.1f} | {perplexity:.4f} |")


main()
