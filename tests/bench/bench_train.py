"""Benchmark: `lqd finetune` training speed and peak memory on the CPU, LQ-LoRA (--init lq) on the
bundled models/stories260K-lq (4 bits, rank 8), at a few batch shapes, with and without
--recompute (only each layer's input is kept; the rest is recomputed during backward).

Data: the first 1800 non-empty lines of ../shared/data/tinystories_val_subset.txt, one document
per line. Each run is STEPS optimizer steps at learning rate 1e-3 with lqd's default threads (all
CPUs), as many steps as make about TOKENS_PER_RUN tokens (at least 8). Printed per run: training tokens/s (loss targets per second of optimizer steps, the last
step event's tokens_per_second: model loading, data packing and validation excluded) and the
peak resident memory of the lqd process (ru_maxrss of that child, from os.wait4), which
includes the binary, the model, OpenBLAS's buffers and the thread pool.
Usage: python3 tests/bench/bench_train.py [build/server/lqd]"""
import json
import os
import platform
import subprocess
import sys
import tempfile

LQD = sys.argv[1] if len(sys.argv) > 1 else "build/server/lqd"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models/stories260K-lq")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinystories_val_subset.txt")
TOKENS_PER_RUN = 131072
# (batch rows per step, micro-batch rows per forward/backward, tokens per row)
SHAPES = ((4, 4, 128), (16, 16, 128), (4, 4, 512), (16, 16, 512), (16, 4, 512))


def steps_for(batch, seq_len):
    return max(8, TOKENS_PER_RUN // (batch * seq_len))


def run(train, out, batch, micro, seq_len, recompute):
    """Runs lqd finetune; returns (tokens/s, peak RSS in MiB, seconds in lqd finetune)."""
    steps = steps_for(batch, seq_len)
    args = [LQD, "finetune", "--model", MODEL, "--init", "lq", "--train", train, "--steps", str(steps),
            "--batch-size", str(batch), "--micro-batch", str(micro), "--seq-len", str(seq_len),
            "--learning-rate", "1e-3", "--out", out, "--force", "--json"]
    if recompute:
        args.append("--recompute")
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        process.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(args)}: exit {code}: {stderr.read().decode()}")
        stdout.seek(0)
        events = [json.loads(line) for line in stdout.read().decode().splitlines() if line.strip()]
    steps = [e for e in events if e["type"] == "step"]
    done = [e for e in events if e["type"] == "done"][0]
    return steps[-1]["tokens_per_second"], usage.ru_maxrss / 1024.0, done["seconds"]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        with open(TEXT, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()][:1800]
        train = os.path.join(tmp, "train.txt")
        with open(train, "w", encoding="utf-8") as f:
            f.write("\n\n".join(lines) + "\n")
        cpu = "unknown CPU"
        if os.path.exists("/proc/cpuinfo"):
            names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
            cpu = names[0] if names else cpu
        print(f"lqd finetune --init lq on {os.path.relpath(MODEL, ROOT)}, about {TOKENS_PER_RUN} tokens a run; {cpu}, "
              f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print()
        print("| batch | micro-batch | seq_len | steps | --recompute | training tokens/s | peak RSS MiB | run s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for batch, micro, seq_len in SHAPES:
            for recompute in (False, True):
                speed, rss, seconds = run(train, os.path.join(tmp, "adapter"), batch, micro, seq_len, recompute)
                print(f"| {batch} | {micro} | {seq_len} | {steps_for(batch, seq_len)} | "
                      f"{'yes' if recompute else 'no'} | {speed:,.0f} | {rss:.1f} | {seconds:.1f} |", flush=True)


main()
