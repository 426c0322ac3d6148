"""`mpirun -n K lqd compress` on stories260K: the model directory and the error-table cache equal
the single-process ones byte for byte for K = 1, 2 and 3; only rank 0 prints (plain and
--progress-json progress); a rank killed midway (SIGKILL from this test once rank 0's progress
shows a tenth of the error table done) fails the job cleanly (non-zero exit, rank 0's message,
mpirun's naming the rank, no output directory) with the finished rows cached, and a rerun with
another K computes only what is missing and writes the same model.

The kill needs a table phase of several seconds (--progress-json reports once a second), so that
case compresses over Table 1 at B1 = 64 (81 configurations, 2835 cells) instead of the small
grid, with its own single-process reference."""
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading

from mpi_util import (SOURCE, Checks, cache_file, compress_args, environment, mpirun_args, rank_pids,
                      report, require_mpi, run, same_tree)

mpirun = require_mpi()
checks = Checks()
N_CELLS = 35 * 4  # matrices x configurations of mpi_util.GRID
# The kill case: the paper's Table 1 at B1 = 64, 81 configurations (about 11 s of one core here).
KILL_GRID = ";".join(f"{b0},{b1},{b2},{B0},64" for b0 in (2, 3, 4) for b1 in (2, 3, 4)
                     for b2 in ("bf16", "fp16", "fp32") for B0 in (16, 32, 64))
KILL_CELLS = 35 * 81
# Rank 1 is killed at rank 0's first progress report past a tenth of the table (one comes a second:
# about a fifth of it here, under 60% on a machine three times as fast).
KILL_AT = 0.1

with tempfile.TemporaryDirectory() as tmp:
    def path(name):
        return os.path.join(tmp, name)

    # --- the single-process reference ---------------------------------------------------------
    single = run(compress_args(path("single"), path("cache-single")))
    checks.check(single.returncode == 0, f"single-process compress: {single.stderr[-500:]}")
    reference_cache = cache_file(path("cache-single"))
    checks.check(reference_cache is not None, "the single-process run wrote one cache file")
    reference_report = report(single)
    checks.check(reference_report and reference_report["ranks"] == 1, "report: 1 rank")

    def check_same(name, cache, label, reference="single", reference_cache_dir="cache-single"):
        same, why = same_tree(path(reference), path(name))
        checks.check(same, f"{label}: the model directory equals the single-process one ({why})")
        written, expected = cache_file(path(cache)), cache_file(path(reference_cache_dir))
        checks.check(written is not None and expected is not None
                     and os.path.basename(written) == os.path.basename(expected)
                     and open(written, "rb").read() == open(expected, "rb").read(),
                     f"{label}: the error-table cache file equals the single-process one")

    # --- K = 1, 2, 3 -------------------------------------------------------------------------
    for ranks, extra in [(1, []), (2, []), (3, ["--threads", "1"])]:
        name, cache = f"k{ranks}", f"cache-k{ranks}"
        result = run(mpirun_args(mpirun, ranks) + compress_args(path(name), path(cache), *extra))
        label = f"mpirun -n {ranks}"
        checks.check(result.returncode == 0, f"{label}: exit 0 ({result.stderr[-800:]})")
        if result.returncode != 0:
            continue
        check_same(name, cache, label)
        r = report(result)
        checks.check(r is not None and r["ranks"] == ranks, f"{label}: report says {ranks} ranks")
        if r and ranks > 1:
            per_rank = r["rank_decompositions"]
            checks.check(len(per_rank) == ranks and sum(per_rank) == N_CELLS + 35,
                         f"{label}: decompositions per rank {per_rank} add up to {N_CELLS + 35}")
            checks.check(sum(per_rank[1:]) > 0, f"{label}: the other ranks did work: {per_rank}")
            checks.check("rank 1" not in result.stderr and result.stderr.count("layers x 7 matrices") == 1,
                         f"{label}: only rank 0 prints: {result.stderr[:600]!r}")

    # --- --progress-json under MPI: only rank 0's lines, each one JSON object ------------------
    result = run(mpirun_args(mpirun, 2) + compress_args(path("progress"), path("cache-progress"),
                                                        "--progress-json"))
    checks.check(result.returncode == 0, f"--progress-json under mpirun: exit 0 ({result.stderr[-500:]})")
    events = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    phases = [e["phase"] for e in events if e.get("event") == "progress" and e.get("finished")]
    checks.check(phases == ["error table", "allocation", "decomposition"],
                 f"--progress-json: one finished event per phase, from rank 0 only: {phases}")
    table_end = [e for e in events if e.get("phase") == "error table" and e.get("finished")]
    checks.check(table_end and table_end[0]["cells_done"] == N_CELLS,
                 f"--progress-json: the table's last event counts every cell: {table_end}")

    # --- rank 1 killed midway (SIGKILL); the rerun resumes from the cache with another K ----------
    kill_reference = run(compress_args(path("kill-single"), path("cache-kill-single"), grid=KILL_GRID))
    checks.check(kill_reference.returncode == 0,
                 f"single-process compress over {KILL_CELLS} cells: {kill_reference.stderr[-500:]}")
    args = compress_args(path("kill"), path("cache-kill"), "--threads", "1", "--progress-json",
                         grid=KILL_GRID)
    crash = subprocess.Popen(mpirun_args(mpirun, 2) + args, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=environment())
    watchdog = threading.Timer(240, crash.terminate)  # mpirun then stops its ranks
    watchdog.start()
    stderr, killed, pids = [], None, {}  # killed: (pid, cells done when rank 1 was killed)
    for line in crash.stderr:  # rank 0's progress, a line a second; mpirun's messages after
        stderr.append(line)
        if killed or not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line that mpirun's forwarding cut
        if event.get("phase") != "error table" or event["cells_done"] < KILL_AT * KILL_CELLS:
            continue
        pids = rank_pids(crash.pid)
        if 1 in pids:
            os.kill(pids[1], signal.SIGKILL)
            killed = (pids[1], event["cells_done"])
    crash.wait()
    watchdog.cancel()
    stderr = "".join(stderr)
    checks.check(killed is not None, f"rank 1 was killed once {KILL_AT:.0%} of the table was done "
                 f"(lqd processes under mpirun by rank: {pids}): {stderr[-1500:]!r}")
    checks.check(crash.returncode != 0, f"a killed rank fails the job (exit {crash.returncode})")
    checks.check("stopped by a signal" in stderr and "cached" in stderr,
                 f"rank 0 says it stopped and what is cached: {stderr[-1500:]!r}")
    checks.check("],1]" in stderr or "rank 1" in stderr, f"the failing rank is named: {stderr[-1500:]!r}")
    checks.check(not os.path.exists(path("kill")), "no model directory after the failure")
    checks.check(cache_file(path("cache-kill")) is not None, "finished rows are cached")
    resumed = run(mpirun_args(mpirun, 3) + compress_args(path("kill"), path("cache-kill"),
                                                         "--threads", "1", grid=KILL_GRID))
    checks.check(resumed.returncode == 0, f"the rerun with 3 ranks succeeds ({resumed.stderr[-800:]})")
    r = report(resumed)
    if r:
        cached = r["cells_cached"]
        checks.check(0 < cached < 0.8 * KILL_CELLS,
                     f"rank 1 died midway: {cached} of {KILL_CELLS} cells cached, between 0 and 80%")
        checks.check(r["decompositions"] == KILL_CELLS - cached,
                     f"the rerun computes only what is missing: {r['decompositions']} of {KILL_CELLS}")
        print(f"kill: rank 1 (pid {killed[0] if killed else '?'}) got SIGKILL at "
              f"{killed[1] if killed else '?'} of {KILL_CELLS} cells done; {cached} "
              f"({cached / KILL_CELLS:.0%}) were cached")
    check_same("kill", "cache-kill", "after the resumed run", "kill-single", "cache-kill-single")

    # --- a rank that reads other weights is refused by name ------------------------------------
    # (MPMD: rank 1 is given a copy of the model with one linear weight changed)
    altered = path("altered")
    shutil.copytree(SOURCE, altered)
    data = bytearray(open(os.path.join(altered, "model.safetensors"), "rb").read())
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_size])
    for name, entry in header.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            data[8 + header_size + entry["data_offsets"][0]] ^= 1  # every linear: any item hits one
    open(os.path.join(altered, "model.safetensors"), "wb").write(data)
    one = mpirun_args(mpirun, 1)
    args = compress_args(path("mismatch"), path("cache-mismatch"), "--threads", "1")
    other = [altered if a == SOURCE else a for a in args]
    result = run(one + args + [":"] + one[1:] + other, timeout=120)
    checks.check(result.returncode != 0 and "rank 1 on " in result.stderr
                 and "differs from rank 0's" in result.stderr,
                 f"a rank with other model files is named: {result.stderr[-800:]!r}")
    checks.check(not os.path.exists(path("mismatch")), "no model directory after the mismatch")

checks.finish()
