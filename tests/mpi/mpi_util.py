"""Shared helpers of the MPI tests: the lqd binary, mpirun, stories260K, and comparing what two
runs wrote byte for byte. Tests skip (exit 77, with the reason printed) when the build has no
MPI or mpirun is missing."""
import filecmp
import glob
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "peer"))
from peer_util import LQD, ROOT, SKIP, Checks  # noqa: E402

__all__ = ["Checks", "LQD", "ROOT", "SOURCE", "TOKENIZER", "GRID", "skip", "require_mpi",
           "mpirun_args", "compress_args", "environment", "run", "report", "same_tree", "cache_file",
           "rank_pids"]

# stories260K: ../shared's copy when the checkout sits beside it, else the repository's own.
_SHARED = os.path.join(ROOT, "..", "shared", "models", "stories260K-hf")
SOURCE = _SHARED if os.path.isfile(os.path.join(_SHARED, "model.safetensors")) else os.path.join(
    ROOT, "models/stories260K-hf")
TOKENIZER = os.path.join(ROOT, "models/stories260K/tok512.bin")
# A small grid: 4 configurations x 35 matrices = 140 decompositions, under a second.
GRID = "4,8,fp32,64,256;3,8,fp32,64,256;2,4,fp16,16,16;3,3,fp16,16,64"


def skip(reason):
    print(f"skipped: {reason}")
    sys.exit(SKIP)


def require_mpi():
    """The path of mpirun, or the test is skipped."""
    if os.environ.get("LQD_MPI", "1") != "1":
        skip("this build has no MPI (meson setup -Dmpi=enabled needs libopenmpi-dev)")
    mpirun = shutil.which("mpirun")
    if not mpirun:
        skip("mpirun is not installed (deploy/setup.sh installs openmpi-bin)")
    try:  # a sandbox may forbid what mpirun needs (shared memory, its own sockets)
        probe = subprocess.run(mpirun_args(mpirun, 2) + ["true"], capture_output=True, text=True,
                               timeout=60)
    except subprocess.TimeoutExpired:
        skip("mpirun -n 2 true did not finish in 60 s here")
    if probe.returncode != 0:
        skip(f"mpirun cannot start processes here: {probe.stderr.strip()[-300:]}")
    return mpirun


def mpirun_args(mpirun, ranks):
    """mpirun -n ranks, allowed as root (CI containers) and on a machine with fewer cores."""
    args = [mpirun, "-n", str(ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        args.append("--allow-run-as-root")
    return args


def compress_args(out, cache, *extra, grid=GRID):
    return [LQD, "compress", "--model", SOURCE, "--tokenizer", TOKENIZER, "--bits", "3", "--rank",
            "4", "--configs", grid, "--out", out, "--cache-dir", cache, "--json", *extra]


def _with_option(value, option):
    return f"{value}:{option}" if value else option


def environment(env=None):
    """os.environ with env's entries, for a run under mpirun."""
    full_env = {**os.environ, **(env or {})}
    # Under AddressSanitizer builds, Open MPI's own allocations kept until exit would fail every
    # rank: suppress those (full stacks, so that the library names show), keep lqd's checked.
    supp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lsan-openmpi.supp")
    full_env["ASAN_OPTIONS"] = _with_option(full_env.get("ASAN_OPTIONS", ""), "fast_unwind_on_malloc=0")
    full_env["LSAN_OPTIONS"] = _with_option(full_env.get("LSAN_OPTIONS", ""), f"suppressions={supp}")
    return full_env


def run(args, env=None, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=environment(env))


def report(result):
    """The --json report on stdout (the last line; mpirun prints nothing there)."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def same_tree(a, b):
    """(True, "") when directories a and b hold the same files with the same bytes."""
    files_a = sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**"), recursive=True)
                     if os.path.isfile(p))
    files_b = sorted(os.path.relpath(p, b) for p in glob.glob(os.path.join(b, "**"), recursive=True)
                     if os.path.isfile(p))
    if files_a != files_b:
        return False, f"files differ: {files_a} vs {files_b}"
    for name in files_a:
        if not filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False):
            return False, f"{name} differs"
    return True, ""


def cache_file(cache):
    files = glob.glob(os.path.join(cache, "error-table-*.bin"))
    return files[0] if len(files) == 1 else None


def rank_pids(launcher):
    """{rank: pid} of the lqd processes below process `launcher` (mpirun), each rank read from
    the environment its launcher gave it (Open MPI, PMIx, then MPICH's Hydra)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, stack = {}, [launcher]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != "lqd":
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                continue
            for name in (b"OMPI_COMM_WORLD_RANK", b"PMIX_RANK", b"PMI_RANK"):
                if name in variables:
                    found[int(variables[name])] = pid
                    break
    return found
