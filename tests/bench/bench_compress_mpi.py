#!/usr/bin/env python3
"""Error-table time of `lqd compress` on SmolLM2-135M at K = 1 and K = 2 MPI ranks (prints
figures; never a timed test).

The GGUF (tests/models/fetch_smollm2.sh; $LQD_SMOLLM2) is imported once into a HuggingFace
directory (`lqd import`) so that every rank reads only the matrices it is given. Each K runs
with a fresh cache (the whole table is computed) and --threads T per rank (default 1, so that
K ranks use K cores: on one machine the figure shows what the scale-out costs and gains; on a
cluster give one rank per host and T = its cores). K = 1 is the plain command, without
mpirun. The default grid is reduced (3 configurations: b0 in {2, 3, 4}, b1 = 3, fp16 top-level
scales, B0 = 64, B1 = 256) so that the run takes minutes on a small machine; --grid table1
gives the paper's 243. With a GPU (nvidia-smi lists one) the same runs follow with
--device cuda, one GPU per rank. Every K's model directory is checked to equal K = 1's.

  python3 tests/bench/bench_compress_mpi.py [--lqd build/server/lqd] [--gguf PATH]
      [--ranks 1,2] [--threads 1] [--grid GRID|table1] [--rank 16] [--bits 3]
"""
import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REDUCED_GRID = "2,3,fp16,64,256;3,3,fp16,64,256;4,3,fp16,64,256"


def same_tree(a, b):
    compare = filecmp.dircmp(a, b)
    if compare.left_only or compare.right_only:
        return False
    return all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
               for f in compare.common_files)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lqd", default=os.path.join(ROOT, "build/server/lqd"))
    parser.add_argument("--gguf", default=os.environ.get(
        "LQD_SMOLLM2", os.path.join(ROOT, ".models/SmolLM2-135M-Instruct.Q4_1.gguf")))
    parser.add_argument("--ranks", default="1,2", help="comma-separated K values")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--grid", default=REDUCED_GRID, help="configurations, or table1")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cpu, then cuda when nvidia-smi lists a GPU)")
    args = parser.parse_args()
    mpirun = shutil.which("mpirun")
    if not os.path.isfile(args.gguf):
        sys.exit(f"{args.gguf}: no such file (sh tests/models/fetch_smollm2.sh fetches it)")
    ranks = [int(k) for k in args.ranks.split(",")]
    if any(k > 1 for k in ranks) and not mpirun:
        sys.exit("mpirun is missing (deploy/setup.sh installs openmpi-bin)")
    devices = [args.device] if args.device else ["cpu"]
    if not args.device and shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if listed.returncode == 0 and "GPU" in listed.stdout:
            devices.append("cuda")

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "smollm2-hf")
        subprocess.run([args.lqd, "import", "--model", args.gguf, "--out", source], check=True,
                       capture_output=True)
        print(f"machine: {os.cpu_count()} CPUs; lqd {args.lqd}; grid: {args.grid}; rank "
              f"{args.rank}; {args.threads} thread(s) per rank")
        print(f"{'device':6} {'K':>2} {'table s':>9} {'final s':>8} {'wall s':>8} "
              f"{'decompositions':>14}  per rank  same model as K=1")
        for device in devices:
            first = None
            for k in ranks:
                out, cache = os.path.join(tmp, f"{device}-k{k}"), os.path.join(tmp, f"cache-{device}-k{k}")
                command = [args.lqd, "compress", "--model", source, "--bits", str(args.bits),
                           "--rank", str(args.rank), "--configs", args.grid, "--out", out,
                           "--cache-dir", cache, "--threads", str(args.threads), "--json",
                           "--quiet", "--device", device]
                if k > 1:
                    launcher = [mpirun, "-n", str(k), "--oversubscribe"]
                    if os.geteuid() == 0:
                        launcher.append("--allow-run-as-root")
                    command = launcher + command
                started = time.time()
                result = subprocess.run(command, capture_output=True, text=True)
                wall = time.time() - started
                if result.returncode != 0:
                    sys.exit(f"K={k} failed: {result.stderr[-2000:]}")
                report = json.loads([l for l in result.stdout.splitlines() if l.startswith("{")][-1])
                same = "-" if first is None else ("yes" if same_tree(first, out) else "NO")
                first = first or out
                print(f"{device:6} {k:>2} {report['seconds']['table']:>9.1f} "
                      f"{report['seconds']['final']:>8.1f} {wall:>8.1f} "
                      f"{report['decompositions']:>14}  {report.get('rank_decompositions')}  {same}",
                      flush=True)


if __name__ == "__main__":
    main()
