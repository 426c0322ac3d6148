"""Benchmark: LQ-LoRA initialisation against QLoRA-style zero initialisation (LQ-LoRA §4), both
finetuned with `lqd finetune` on stories260K at 2.5 and 2.75 bits/param (ILP over Table 1).

  - LQ-LoRA: `lqd compress --bits B --rank 8`, then `lqd finetune --init lq` trains the model's
    own L1, L2 (Q frozen); the adapter replaces them (replace mode).
  - QLoRA: `lqd compress --bits B --rank 0` (the same ILP, no low-rank part), then
    `lqd finetune --init zero --rank 8` trains a new pair, L1 = 0 (add mode).

Data: the non-empty lines of ../shared/data/tinystories_val_subset.txt (lqd eval's documents),
in file order. Lines 1-1800 train (one document per line, written to a plain-text file with
blank lines between), lines 1801-2000 are the validation split on which the learning rate is
chosen, lines 2001-4356 are held out and touched only by the final `lqd eval --ppl` (the held-out
split of tests/bench/fisher_table.py). Every run: STEPS optimizer steps of BATCH rows of SEQ_LEN
tokens (AdamW, cosine decay to 0, no warmup, gradient norm clipped at 1: lqd finetune's
defaults), seeds 0 and 1. Each method's learning rate is the one of LEARNING_RATES with the
lowest validation loss after training, mean over the seeds; the held-out perplexity of each
seed's adapter is then measured with `lqd eval --adapter`.
Usage: python3 tests/bench/finetune_table.py [build/server/lqd]"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

LQD = sys.argv[1] if len(sys.argv) > 1 else "build/server/lqd"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models/stories260K-hf")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinystories_val_subset.txt")
N_TRAIN, N_VALIDATION = 1800, 200
BUDGETS = (2.5, 2.75)
RANK = 8
STEPS, BATCH, SEQ_LEN = 320, 8, 128
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1)


def lqd(*args):
    return subprocess.run([LQD, *args], check=True, capture_output=True, text=True).stdout


def split_text(tmp):
    """lqd eval's documents: lines trimmed of ASCII whitespace, empty ones skipped."""
    with open(TEXT, encoding="utf-8") as f:
        lines = [line.strip(" \t\r\n\f\v") for line in f.read().split("\n")]
    lines = [line for line in lines if line]
    paths = {name: os.path.join(tmp, name + ".txt") for name in ("train", "validation", "heldout")}
    parts = {"train": lines[:N_TRAIN], "validation": lines[N_TRAIN:N_TRAIN + N_VALIDATION],
             "heldout": lines[N_TRAIN + N_VALIDATION:]}
    for name, part in parts.items():
        with open(paths[name], "w", encoding="utf-8") as f:
            # finetune's plain format splits documents on blank lines; eval reads lines
            f.write(("\n" if name == "heldout" else "\n\n").join(part) + "\n")
    return paths, len(lines)


def heldout_ppl(model, paths, adapter=None):
    extra = ["--adapter", adapter] if adapter else []
    return json.loads(lqd("eval", "--model", model, "--ppl", paths["heldout"], "--json", *extra))


def finetune(model, init, paths, learning_rate, seed, out):
    args = ["finetune", "--model", model, "--init", init, "--train", paths["train"], "--validation",
            paths["validation"], "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len",
            str(SEQ_LEN), "--learning-rate", f"{learning_rate:g}", "--seed", str(seed), "--out", out,
            "--json"]
    if init == "zero":
        args += ["--rank", str(RANK)]
    started = time.time()
    events = [json.loads(line) for line in lqd(*args).splitlines() if line.strip()]
    start = [e for e in events if e["type"] == "start"][0]
    done = [e for e in events if e["type"] == "done"][0]
    return {"val_before": start["val_loss"], "val_after": done["val_loss"], "rows": start["train_rows"],
            "targets": start["train_targets"], "seconds": time.time() - started}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        paths, n_lines = split_text(tmp)
        cache = os.path.join(tmp, "cache")
        print(f"non-empty lines: {n_lines}; train: lines 1-{N_TRAIN}; validation (learning rate): lines "
              f"{N_TRAIN + 1}-{N_TRAIN + N_VALIDATION}; held out: lines {N_TRAIN + N_VALIDATION + 1}-{n_lines}; "
              f"{STEPS} steps x {BATCH} rows x {SEQ_LEN} tokens; seeds {SEEDS}; learning rates {LEARNING_RATES}",
              flush=True)
        results = []
        for bits in BUDGETS:
            for method, rank, init in (("LQ-LoRA (init lq)", RANK, "lq"), ("QLoRA (init zero)", 0, "zero")):
                model = os.path.join(tmp, f"lq-{bits}-r{rank}")
                lqd("compress", "--model", MODEL, "--bits", str(bits), "--rank", str(rank), "--out", model,
                    "--cache-dir", cache, "--quiet")
                before = heldout_ppl(model, paths)
                runs = {}
                for learning_rate in LEARNING_RATES:
                    for seed in SEEDS:
                        out = os.path.join(tmp, f"adapter-{bits}-{init}-{learning_rate:g}-{seed}")
                        runs[(learning_rate, seed)] = run = finetune(model, init, paths, learning_rate, seed, out)
                        run["adapter"] = out
                        print(f"  {bits} bits, {method}, lr {learning_rate:g}, seed {seed}: validation loss "
                              f"{run['val_before']:.4f} -> {run['val_after']:.4f} ({run['seconds']:.0f} s)",
                              flush=True)
                mean_val = {lr: sum(runs[(lr, s)]["val_after"] for s in SEEDS) / len(SEEDS) for lr in LEARNING_RATES}
                chosen = min(LEARNING_RATES, key=lambda lr: mean_val[lr])
                after = [heldout_ppl(model, paths, runs[(chosen, s)]["adapter"])["ppl"] for s in SEEDS]
                print(f"  {bits} bits, {method}: chosen lr {chosen:g}; held-out perplexity {before['ppl']:.4f} -> "
                      f"{', '.join(f'{p:.4f}' for p in after)}", flush=True)
                results.append((bits, method, before, runs, mean_val, chosen, after))
        print()
        print(f"held out: {results[0][2]['documents']} documents, {results[0][2]['tokens']} predicted tokens; "
              f"train: {results[0][3][(LEARNING_RATES[0], 0)]['rows']} rows of {SEQ_LEN} "
              f"({results[0][3][(LEARNING_RATES[0], 0)]['targets']} targets); "
              f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
        print()
        print("| bits | method | validation loss after, by learning rate (mean of seeds) | chosen lr |")
        print("| --- | --- | --- | --- |")
        for bits, method, before, runs, mean_val, chosen, after in results:
            by_lr = ", ".join(f"{lr:g}: {mean_val[lr]:.4f}" for lr in LEARNING_RATES)
            print(f"| {bits} | {method} | {by_lr} | {chosen:g} |")
        print()
        print("| bits | method | lr | validation loss before → after (seed 0 / 1) | ppl before finetuning | "
              "ppl after (seed 0 / seed 1) | mean ppl after |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for bits, method, before, runs, mean_val, chosen, after in results:
            val = " / ".join(f"{runs[(chosen, s)]['val_after']:.4f}" for s in SEEDS)
            print(f"| {bits} | {method} | {chosen:g} | {runs[(chosen, 0)]['val_before']:.4f} → {val} | "
                  f"{before['ppl']:.4f} | {' / '.join(f'{p:.4f}' for p in after)} | "
                  f"{sum(after) / len(after):.4f} |")


main()
