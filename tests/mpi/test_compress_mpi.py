"""`mpirun -n K lqd compress` on stories260K: the model directory and the error-table cache equal
the single-process ones byte for byte for K = 1, 2 and 3; only rank 0 prints (plain and
--progress-json progress); a rank that dies midway fails the job cleanly (non-zero exit,
rank 0's message, mpirun's naming the rank) with the finished rows cached, and a rerun with
another K computes only what is missing and writes the same model.

The fault is injected with lqd's test-only hook LQD_MPI_TEST_DIE_AFTER=N: rank
LQD_MPI_TEST_DIE_RANK (default 1) _exits with status 3 after sending its N-th result
(core/compress_mpi_serve.c)."""
import json
import os
import shutil
import struct
import tempfile

from mpi_util import (SOURCE, Checks, cache_file, compress_args, mpirun_args, report, require_mpi,
                      run, same_tree)

mpirun = require_mpi()
checks = Checks()
N_CELLS = 35 * 4  # matrices x configurations of mpi_util.GRID

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

    def check_same(name, cache, label):
        same, why = same_tree(path("single"), path(name))
        checks.check(same, f"{label}: the model directory equals the single-process one ({why})")
        written = cache_file(path(cache))
        checks.check(written is not None and reference_cache is not None
                     and os.path.basename(written) == os.path.basename(reference_cache)
                     and open(written, "rb").read() == open(reference_cache, "rb").read(),
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

    # --- a rank dies midway; the rerun resumes from the cache with another K -------------------
    crash = run(mpirun_args(mpirun, 2) + compress_args(path("crash"), path("cache-crash"),
                                                       "--threads", "1"),
                env={"LQD_MPI_TEST_DIE_AFTER": "2"})
    checks.check(crash.returncode != 0, f"a dead rank fails the job (exit {crash.returncode})")
    checks.check("stopped by a signal" in crash.stderr and "cached" in crash.stderr,
                 f"rank 0 says it stopped and what is cached: {crash.stderr[-1500:]!r}")
    checks.check("],1]" in crash.stderr or "rank 1" in crash.stderr,
                 f"the failing rank is named: {crash.stderr[-1500:]!r}")
    checks.check(not os.path.exists(path("crash")), "no model directory after the failure")
    checks.check(cache_file(path("cache-crash")) is not None, "finished rows are cached")
    resumed = run(mpirun_args(mpirun, 3) + compress_args(path("crash"), path("cache-crash"),
                                                         "--threads", "1"))
    checks.check(resumed.returncode == 0, f"the rerun with 3 ranks succeeds ({resumed.stderr[-800:]})")
    r = report(resumed)
    if r:
        checks.check(r["cells_cached"] > 0, f"the rerun reads finished rows: cells_cached {r['cells_cached']}")
        checks.check(r["decompositions"] == N_CELLS - r["cells_cached"],
                     f"the rerun computes only what is missing: {r['decompositions']} of {N_CELLS}")
        print(f"crash: {r['cells_cached']} of {N_CELLS} cells were cached when rank 1 died")
    check_same("crash", "cache-crash", "after the resumed run")

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
