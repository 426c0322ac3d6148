#!/usr/bin/env python3
"""`lqd compress` on the repository's stories260K (models/stories260K-hf, the small grid of
test_compress_mpi.py), plain and under `mpirun -n K`, on each device given; prints each run's
wall time. Fails (exit 1, saying which) when a run fails or takes over 60 s (stories260K takes
seconds), when the first device's K-rank model directory or error-table cache differs from its
plain run's by a byte, or, on a GPU, when the plain run fell back to the CPU or a rank did not
take the GPU it should (local rank modulo the GPUs nvidia-smi lists). For every further device
it runs only `mpirun -n K` and prints whether the result equals the first device's (the GPU's
and the CPU's errors may differ in the last bits: never a failure).

Run by tests/kernels/gpu_check.sh mpi (LQD=.devrun/lqd, .devrun/mpi-env.sh's mpirun) and by
tests/kernels/check_packed_openmpi.sh here:
  LQD=build/server/lqd python3 tests/mpi/compare_ranks.py [--devices cuda,cpu] [--ranks 2]"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from mpi_util import GRID, LQD, ROOT, TOKENIZER, cache_file, mpirun_args, report, run, same_tree

MODEL = os.path.join(ROOT, "models/stories260K-hf")


def gpu_count():
    if not shutil.which("nvidia-smi"):
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listed.stdout.count("GPU ") if listed.returncode == 0 else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    devices = args.devices.split(",")
    failures = []

    def fail(message):
        print(f"FAILED: {message}", flush=True)
        failures.append(message)

    mpirun = shutil.which("mpirun")
    if not mpirun:
        sys.exit("FAILED: no mpirun on PATH (on the GPU machine: . .devrun/mpi-env.sh)")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True)
    print(f"mpirun: {mpirun}: {(version.stdout or version.stderr).strip().splitlines()[:1]}")
    print(f"lqd: {LQD}; model: {MODEL}; grid: {GRID}; {args.ranks} ranks")
    gpus = gpu_count()

    with tempfile.TemporaryDirectory() as tmp:
        def compress(name, device, ranks):
            out, cache = os.path.join(tmp, name), os.path.join(tmp, "cache-" + name)
            command = [LQD, "compress", "--model", MODEL, "--tokenizer", TOKENIZER, "--bits", "3",
                       "--rank", "4", "--configs", GRID, "--out", out, "--cache-dir", cache,
                       "--json", "--device", device]
            if ranks > 1:  # each rank its share of the cores (mpirun would bind each to one)
                share = max(1, (os.cpu_count() or 1) // ranks)
                command = mpirun_args(mpirun, ranks) + ["--bind-to", "none"] + command + [
                    "--threads", str(share)]
            started = time.time()
            try:
                result = run(command, timeout=60)
            except subprocess.TimeoutExpired:
                fail(f"{name}: still running after 60 s (killed)")
                return None
            wall = time.time() - started
            r = report(result)
            print(f"{name}: exit {result.returncode}, {wall:.1f} s wall"
                  + (f", table {r['seconds']['table']:.2f} s, decompositions per rank "
                     f"{r.get('rank_decompositions')}" if r else ""), flush=True)
            for line in result.stderr.splitlines():
                if "running on" in line or "falling back" in line:
                    print("  " + line)
            if result.returncode != 0 or r is None:
                fail(f"{name}: exit {result.returncode}: {result.stderr[-1500:]}")
                return None
            if ranks > 1 and r.get("ranks") != ranks:
                fail(f"{name}: the report says {r.get('ranks')} ranks, not {ranks}")
            return out, cache, result.stderr

        def same(a, b):
            tree, why = same_tree(a[0], b[0])
            ca, cb = cache_file(a[1]), cache_file(b[1])
            caches = (ca is not None and cb is not None
                      and os.path.basename(ca) == os.path.basename(cb)
                      and open(ca, "rb").read() == open(cb, "rb").read())
            return tree and caches, (why or "same model files") + (
                "; same cache file" if caches else f"; cache files differ: {ca} vs {cb}")

        first = devices[0]
        plain = compress(f"{first}-plain", first, 1)
        ranked = compress(f"{first}-n{args.ranks}", first, args.ranks)
        if plain and ranked:
            equal, why = same(plain, ranked)
            print(f"{first}: mpirun -n {args.ranks} equals the plain run byte for byte: "
                  f"{'yes' if equal else 'NO'} ({why})")
            if not equal:
                fail(f"{first}: mpirun -n {args.ranks} wrote other bytes than the plain run: {why}")
            if first != "cpu":
                if not re.search(r"running on cuda:\d", plain[2]):
                    fail(f"the plain run did not run on a GPU: {plain[2][:400]!r}")
                for rank in range(args.ranks):  # all ranks local: local rank = rank
                    expected = f"cuda:{rank % gpus}" if gpus else "cuda:?"
                    pattern = rf"rank {rank} \(local rank {rank}, --device {first}\): running on " \
                              + re.escape(expected) + r"\b"
                    if not re.search(pattern, ranked[2]):
                        fail(f"rank {rank} did not say it runs on {expected} ({gpus} GPUs listed)")
        for device in devices[1:]:
            other = compress(f"{device}-n{args.ranks}", device, args.ranks)
            if other and ranked:
                equal, why = same(ranked, other)
                print(f"{device}: mpirun -n {args.ranks} equals {first}'s: "
                      f"{'yes' if equal else 'no'} ({why})")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("all checks passed")


if __name__ == "__main__":
    main()
