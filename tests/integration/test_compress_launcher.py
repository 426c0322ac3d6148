"""Compress jobs through `lqd serve --compress-launcher`: the daemon runs `<launcher words> <lqd>
compress ... --progress-json --json` as a child process group instead of compressing itself.

(1) A launcher script (in a directory whose name has a space, quoted in the launcher) records its
    argv and execs the rest: the job succeeds with progress events of every phase, its result
    equals an in-process job's on the same input (every field but seconds, cache and the added
    "launcher"; every output file byte for byte), it is activated and generates, and the job
    shows its launcher; the same for a Fisher-weighted job (the CLI's draw, the same F). The
    launcher comes from the config file here.
(2) Cancel: a launcher that sleeps (with a background child) before exec, and a real compression
    on the full grid, each cancelled mid-run: "cancelled" within seconds, no process of the
    child's group left, no output.
(3) A launcher that exits 3 fails the job with its exit status and its last stderr line; one that
    does not exist, or exits 0 without a report, fails it with a clear message.
(4) With mpirun installed, `mpirun --allow-run-as-root --oversubscribe -n 1` runs a job (same
    result as in-process) and a cancel stops its rank.
(5) Startup refuses an empty or unparsable launcher (flag, environment, config file): exit 2.
(6) kill -9 of the daemon mid-job: the child dies with it (PR_SET_PDEATHSIG), and the restarted
    daemon resumes the job through the launcher from the cached rows; SIGTERM leaves it queued.

Environment: LQD (the binary, default build/server/lqd), LQ_REPO_ROOT."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_util  # noqa: E402
from serve_util import LQD, ROOT, check, finish  # noqa: E402

from serve_util import SMALL_GRID, MEDIUM_GRID, FISHER  # noqa: E402
DATA = serve_util.CALIBRATION
FINAL = ("succeeded", "failed", "cancelled")
# Result fields that depend on the run, not on the input.
RUN_FIELDS = {"seconds", "cache", "output", "launcher", "name"}

work = tempfile.mkdtemp(prefix="lqd-launcher-test-")
models_dir = os.path.join(work, "models")
scripts = os.path.join(work, "launch ers")  # a space: the launcher must quote it
os.makedirs(models_dir)
os.makedirs(scripts)
shutil.copytree(os.path.join(ROOT, "models/stories260K-hf"), os.path.join(models_dir, "stories260K-hf"))
calibration = os.path.join(work, "calibration.txt")
with open(DATA) as f:
    lines = f.readlines()[:200]
with open(calibration, "w") as f:
    f.writelines(lines)
argv_file = os.path.join(work, "argv.txt")


def script(name, body):
    path = os.path.join(scripts, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


record = script("record.sh", f"printf '%s\\n' \"$@\" > '{argv_file}'\nexec \"$@\"\n")
slow = script("slow.sh", "echo 'slow launcher: waiting for hosts' >&2\nsleep 300 &\nsleep 300\nexec \"$@\"\n")
failing = script("fail.sh", "echo 'fail launcher: starting' >&2\necho 'fail launcher: no hosts in the hostfile' >&2\n"
                            "exit 3\n")
silent = script("silent.sh", "exit 0\n")


class Daemon(serve_util.Daemon):
    """lqd serve on STATE_DIR work/state-NAME with --models-dir, stories260K as "stories" and its own
    error-table cache work/cache-NAME (so that every daemon computes its table)."""

    def __init__(self, name, *extra, cache=None):
        os.environ["LQD_CACHE_DIR"] = os.path.join(work, "cache-" + (cache or name))
        super().__init__(os.path.join(work, "state-" + name), "--models-dir", models_dir,
                         "--model", "stories=" + os.path.join(models_dir, "stories260K-hf"), *extra)

    def submit(self, output, **fields):
        body = {"type": "compress", "model": "stories", "target_bits": 3, "rank": 4, "configs": SMALL_GRID,
                "output": output, **fields}
        status, job = self.json("POST", "/v1/jobs", body)
        check(status == 200 and job and job.get("id"), f"submit {output}: {status} {job}")
        return job

    def run(self, output, timeout=180, **fields):
        job = self.submit(output, **fields)
        return self.wait(job["id"], FINAL, timeout), job

    def upload_calibration(self):
        status, record_ = self.upload_file(calibration, "calibration.txt")
        check(status == 200, f"calibration upload: {status} {record_}")
        return record_["id"]


def group_members(pgid):
    """Processes (not zombies) whose process group is pgid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def processes_writing(output):
    """lqd compress processes whose command line names output."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "compress" in words and output in words:
            found.append(int(entry))
    return found


def launched_pid(daemon, job_id, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in daemon.events(job_id):
            if event.get("type") == "launched":
                return event.get("pid"), event.get("command")
        time.sleep(0.05)
    return None, None


def outputs_equal(a, b):
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    for name in names:
        with open(os.path.join(a, name), "rb") as x, open(os.path.join(b, name), "rb") as y:
            if x.read() != y.read():
                return False
    return True


def same_result(launched, local, label):
    """The launcher job's result against the in-process one's."""
    check(launched is not None and local is not None, f"{label}: both results present")
    if not launched or not local:
        return
    # a launched job adds its launcher and the ranks that ran it (1 without mpirun)
    check(set(launched) - {"launcher", "ranks", "rank_decompositions"} == set(local), f"{label}: the same fields: {sorted(launched)} vs {sorted(local)}")
    for key in sorted(set(local) - RUN_FIELDS):
        check(launched.get(key) == local.get(key), f"{label}: {key} {launched.get(key)!r} == {local.get(key)!r}")
    check(set(launched["seconds"]) == set(local["seconds"]), f"{label}: seconds fields {launched['seconds']}")


def leftovers(name):
    return [n for n in os.listdir(models_dir) if n == name or n.startswith(name + ".tmp-")]


def real(name):
    return os.path.join(os.path.realpath(models_dir), name)


# ---- the reference: in-process jobs ----
local = Daemon("local")
reference, _ = local.run("local-3bit", activate=True)
check(reference["status"] == "succeeded" and reference.get("launcher") is None,
      f"in-process job succeeded, launcher null: {reference['status']} {reference.get('launcher')}")
local_fisher_file = local.upload_calibration()
reference_fisher, _ = local.run("local-fisher", activate=True, fisher={"file": local_fisher_file, **FISHER})
check(reference_fisher["status"] == "succeeded", f"in-process weighted job: {reference_fisher.get('error')}")
local.stop()

# ---- (1) a launcher script, from the config file ----
launcher = f"'{record}'"
config = os.path.join(work, "serve.conf")
with open(config, "w") as f:
    f.write(f"# compress jobs through a launcher\ncompress-launcher = {launcher}\nmax-jobs = 1\n")
daemon = Daemon("record", "--config", config)
submitted = daemon.submit("launched-3bit", activate=True)
check(submitted.get("launcher") == launcher, f"queued job shows the launcher: {submitted.get('launcher')!r}")
job = daemon.wait(submitted["id"], FINAL, 180)
result = job.get("result") or {}
check(job["status"] == "succeeded", f"launcher job succeeded: {job['status']} {job.get('error')}")
check(job.get("launcher") == launcher and result.get("launcher") == launcher,
      f"job and result name the launcher: {job.get('launcher')!r} {result.get('launcher')!r}")
check(job["progress"] == 1 and job["phase"] == "done" and job["attempts"] == 1, f"progress/phase: {job}")
check(result.get("output") == real("launched-3bit"), f"result output {result.get('output')}")
check(result.get("decompositions") == 105 and result.get("cells_cached") == 0,
      f"computed its own table: {result.get('decompositions')} {result.get('cells_cached')}")
same_result(result, reference.get("result"), "launcher vs in-process")
check(outputs_equal(real("launched-3bit"), real("local-3bit")), "launcher output equals the in-process output, byte for byte")
with open(argv_file) as f:
    argv = f.read().splitlines()
check(argv[:2] == [os.path.realpath(LQD), "compress"], f"argv starts with this lqd, compress: {argv[:2]}")
for flag in ("--progress-json", "--json", "--model", "--bits", "--rank", "--out", "--configs", "--iters", "--seed",
             "--cache-dir"):
    check(flag in argv, f"argv has {flag}: {argv}")
check(argv[argv.index("--out") + 1] == real("launched-3bit") and argv[argv.index("--configs") + 1] == SMALL_GRID,
      f"argv --out/--configs: {argv}")
events = daemon.events(job["id"])
types = [e.get("type") for e in events]
phases = {e.get("phase") for e in events if e.get("type") == "progress"}
check("launched" in types and "activated" in types and types[-1] == "status", f"events: {types}")
check({"error table", "allocation", "decomposition"} <= phases, f"progress events of every phase: {phases}")
check(any(e.get("type") == "progress" and e.get("cells_done") == 105 and e.get("phase_finished") for e in events),
      "the table's last progress event: 105 cells")
progress_values = [e["progress"] for e in events if e.get("type") == "progress"]
check(progress_values == sorted(progress_values) and progress_values[-1] == 1, f"progress rises to 1: {progress_values}")
launched_event = next((e for e in events if e.get("type") == "launched"), {})
check(launched_event.get("command", [None])[0] == record and launched_event.get("pid", 0) > 0,
      f"launched event: {launched_event}")
status, models = daemon.json("GET", "/v1/models")
check(status == 200 and "launched-3bit" in [m["id"] for m in models["data"]], "activated model listed")
status, completion = daemon.json("POST", "/v1/completions", {"model": "launched-3bit", "prompt": "Once upon a time",
                                                             "max_tokens": 12, "temperature": 0})
check(status == 200 and completion["choices"][0]["text"], f"activated model generates: {status}")

# A Fisher-weighted job: the CLI draws the same sequences, so F, the weighting and the bytes agree.
fisher_file = daemon.upload_calibration()
weighted = daemon.wait(daemon.submit("launched-fisher", activate=True, fisher={"file": fisher_file, **FISHER})["id"],
                       FINAL, 240)
wresult = weighted.get("result") or {}
check(weighted["status"] == "succeeded", f"weighted launcher job: {weighted['status']} {weighted.get('error')}")
check(wresult.get("weighting", "").startswith("fisher-"), f"weighting: {wresult.get('weighting')}")
expected_fisher = dict(reference_fisher["result"]["fisher"], file=fisher_file, seconds=None)
check(dict(wresult.get("fisher") or {}, seconds=None) == expected_fisher,
      f"result fisher {wresult.get('fisher')} vs {expected_fisher}")
same_result({k: v for k, v in wresult.items() if k != "fisher"},
            {k: v for k, v in reference_fisher["result"].items() if k != "fisher"}, "weighted launcher vs in-process")
check(outputs_equal(real("launched-fisher"), real("local-fisher")), "weighted outputs equal byte for byte")
wevents = daemon.events(weighted["id"])
check(any(e.get("phase") == "fisher" and e.get("sequences_done") == 16 and e.get("sequences_total") == 16
          for e in wevents), "progress events of phase fisher")
with open(argv_file) as f:
    argv = f.read().splitlines()
check("--fisher" in argv and argv[argv.index("--fisher-samples") + 1] == "16"
      and argv[argv.index("--fisher-seq-len") + 1] == "128" and argv[argv.index("--fisher-seed") + 1] == "5",
      f"fisher argv: {argv}")
check(not os.path.exists(os.path.join(work, "state-record", "jobs", weighted["id"])),
      "the job's directory removed when done")
daemon.stop()

# ---- (2) cancel ----
daemon = Daemon("slow", "--compress-launcher", f"'{slow}'")
job = daemon.submit("slow-out")
pid, command = launched_pid(daemon, job["id"])
check(pid and command and command[0] == slow, f"slow launcher started: {pid} {command}")
deadline = time.time() + 10
while pid and len(group_members(pid)) < 3 and time.time() < deadline:  # sh and its two sleeps
    time.sleep(0.05)
check(pid and len(group_members(pid)) >= 3, f"the launcher's group: {group_members(pid) if pid else None}")
status, _ = daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
asked = time.time()
cancelled = daemon.wait(job["id"], FINAL, 20)
check(status == 200 and cancelled["status"] == "cancelled" and time.time() - asked < 5,
      f"slow launcher cancelled within seconds: {cancelled['status']} after {time.time() - asked:.1f} s")
check(pid and group_members(pid) == [], f"no process of the group left: {group_members(pid) if pid else None}")
check(cancelled.get("error") is None and leftovers("slow-out") == [], f"cancelled cleanly: {cancelled.get('error')}")
daemon.stop()

daemon = Daemon("exec", "--compress-launcher", f"'{record}'")
job = daemon.submit("table1-out", configs="table1", rank=8)
running = daemon.wait(job["id"], ("running",), 30)
pid, _ = launched_pid(daemon, job["id"])
deadline = time.time() + 60
while time.time() < deadline:
    current = daemon.json("GET", f"/v1/jobs/{job['id']}")[1]
    if current["status"] != "running" or current["progress"] > 0.02:
        break
    time.sleep(0.1)
check(current["status"] == "running" and current["phase"] == "error table", f"mid-table: {current}")
status, _ = daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
asked = time.time()
cancelled = daemon.wait(job["id"], FINAL, 20)
check(cancelled["status"] == "cancelled" and time.time() - asked < 5,
      f"compression through the launcher cancelled within seconds: {cancelled['status']} {time.time() - asked:.1f} s")
check(pid and group_members(pid) == [] and processes_writing(real("table1-out")) == [],
      "no process of the cancelled job left")
check(leftovers("table1-out") == [], f"no output left: {leftovers('table1-out')}")
check(any(e.get("type") == "cancel_requested" for e in daemon.events(job["id"])), "cancel_requested event")
daemon.stop()

# ---- (3) failing launchers ----
daemon = Daemon("fail", "--compress-launcher", f"'{failing}' --some-option")
failed, _ = daemon.run("fail-out")
message = (failed.get("error") or {}).get("message", "")
check(failed["status"] == "failed" and "exited with status 3" in message
      and "no hosts in the hostfile" in message and "starting" in message,
      f"failing launcher: {failed['status']} {message!r}")
check(leftovers("fail-out") == [], "a failed job leaves nothing")
daemon.stop()
daemon = Daemon("missing", "--compress-launcher", os.path.join(work, "no-such-launcher") + " -n 4")
failed, _ = daemon.run("missing-out")
message = (failed.get("error") or {}).get("message", "")
check(failed["status"] == "failed" and "no-such-launcher" in message and "not an executable" in message,
      f"missing launcher: {failed['status']} {message!r}")
log = daemon.tail()
check("compress launcher not usable now" in log, "the daemon warned about the missing launcher at start")
daemon.stop()
daemon = Daemon("silent", "--compress-launcher", f"'{silent}'")
failed, _ = daemon.run("silent-out")
message = (failed.get("error") or {}).get("message", "")
check(failed["status"] == "failed" and "no lqd compress --json report" in message,
      f"a launcher without a report: {failed['status']} {message!r}")
daemon.stop()

# ---- (4) through real mpirun (two ranks when lqd was built with MPI, else one) ----
mpirun = shutil.which("mpirun")
if mpirun:
    ranks = 2 if os.environ.get("LQD_MPI") == "1" else 1
    mpi_launcher = f"mpirun --allow-run-as-root --oversubscribe -n {ranks}"
    daemon = Daemon("mpi", "--compress-launcher", mpi_launcher)
    job, _ = daemon.run("mpi-3bit", activate=True)
    check(job["status"] == "succeeded" and job.get("launcher") == mpi_launcher,
          f"mpirun job: {job['status']} {job.get('error')}")
    check(job["status"] != "succeeded" or (job.get("result") or {}).get("ranks", 1) == ranks,
          f"the job ran on {ranks} rank(s): {(job.get('result') or {}).get('ranks')}")
    same_result(job.get("result") or {}, reference.get("result"), "mpirun vs in-process")
    check(job["status"] == "succeeded" and outputs_equal(real("mpi-3bit"), real("local-3bit")),
          "mpirun output equals the in-process output")
    job = daemon.submit("mpi-table1", configs="table1", rank=8)
    daemon.wait(job["id"], ("running",), 30)
    deadline = time.time() + 60
    while time.time() < deadline and not processes_writing(real("mpi-table1")):
        time.sleep(0.1)
    time.sleep(1)
    status, _ = daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    cancelled = daemon.wait(job["id"], FINAL, 30)
    check(cancelled["status"] == "cancelled", f"mpirun job cancelled: {cancelled['status']} {cancelled.get('error')}")
    time.sleep(0.5)
    check(processes_writing(real("mpi-table1")) == [] and leftovers("mpi-table1") == [],
          f"the rank stopped: {processes_writing(real('mpi-table1'))}")
    daemon.stop()
else:
    print("mpirun is not installed: (4) skipped")

# ---- (5) startup refuses a bad launcher ----
for how, value in [("flag", ""), ("flag", "mpirun 'x"), ("flag", "mpirun -n 4 | tee log"),
                   ("flag", "mpirun --hostfile $HOME/hosts"), ("env", "mpirun;x"), ("config", "mpirun -n \"4")]:
    env = dict(os.environ)
    command = [LQD, "serve", "--port", "0", "--state-dir", os.path.join(work, "state-refused")]
    if how == "flag":
        command += ["--compress-launcher", value]
    elif how == "env":
        env["LQD_COMPRESS_LAUNCHER"] = value
    else:
        bad_config = os.path.join(work, "bad.conf")
        with open(bad_config, "w") as f:
            f.write(f"compress-launcher = {value}\n")
        command += ["--config", bad_config]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
    check(refused.returncode == 2 and "compress-launcher" in refused.stderr,
          f"{how} {value!r} refused at startup: {refused.returncode} {refused.stderr.strip()!r}")

# ---- (6) kill -9 of the daemon mid-job; SIGTERM ----
daemon = Daemon("restart", "--compress-launcher", f"'{record}'")
job = daemon.submit("restart-out", configs=MEDIUM_GRID)
pid, _ = launched_pid(daemon, job["id"])
deadline = time.time() + 60
while time.time() < deadline:
    current = daemon.json("GET", f"/v1/jobs/{job['id']}")[1]
    if current["status"] != "running" or current["progress"] >= 0.4:  # rows saved to the cache
        break
    time.sleep(0.1)
check(current["status"] == "running" and current["progress"] < 0.85, f"medium job mid-table: {current}")
daemon.kill9()
deadline = time.time() + 10
while pid and group_members(pid) and time.time() < deadline:
    time.sleep(0.05)
check(pid and group_members(pid) == [], f"the child died with the daemon: {group_members(pid) if pid else None}")
daemon = Daemon("restart", "--compress-launcher", f"'{record}'")
resumed = daemon.wait(job["id"], FINAL, 180)
rresult = resumed.get("result") or {}
check(resumed["status"] == "succeeded" and resumed["attempts"] == 2, f"resumed launcher job: {resumed}")
check(rresult.get("cells_cached", 0) > 0 and rresult.get("launcher") == f"'{record}'",
      f"resumed from the cached rows: {rresult.get('cells_cached')}")
check(any(e.get("message") == "resumed after restart" for e in daemon.events(job["id"])), "resumed after restart")
check(leftovers("restart-out") == ["restart-out"], f"one output: {leftovers('restart-out')}")

job = daemon.submit("sigterm-out", configs="table1", rank=8)
daemon.wait(job["id"], ("running",), 30)
pid, _ = launched_pid(daemon, job["id"])
time.sleep(1)
started = time.time()
daemon.stop()
check(daemon.process.returncode == 0 and time.time() - started < 15,
      f"SIGTERM with a launcher job exits 0 ({daemon.process.returncode}, {time.time() - started:.1f} s)")
with open(os.path.join(work, "state-restart", "jobs", job["id"] + ".json")) as f:
    stopped = json.load(f)
check(stopped["status"] == "queued", f"interrupted launcher job left queued: {stopped['status']}")
check(pid and group_members(pid) == [] and leftovers("sigterm-out") == [], "nothing left after SIGTERM")

shutil.rmtree(work, ignore_errors=True)
finish("test_compress_launcher")
