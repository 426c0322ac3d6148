"""Background jobs of `lqd serve` over its real HTTP API: a compress job of stories260K with a
small grid runs to "succeeded" within its budget, is activated (listed in /v1/models, generates);
a second budget of the same model reuses the cached error table (every cell cached, no
decomposition); a job on the full Table 1 grid is cancelled within seconds and leaves no output
(nor a half-written OUTPUT.tmp-*); `kill -9` of the daemon during a job, then a restart on the
same state directory, resumes the job (never lost) and it succeeds from the cache; events as a
JSON array and as Server-Sent Events; a catalogue of bad requests, each a 4xx with OpenAI's error
shape; auth on every job route; the jobs gauge in /metrics; a Fisher-weighted job on an uploaded
calibration text (result weighting "fisher-...", weights unlike the unweighted job's, the cache
key and bytes of `lqd compress --fisher` with the same draw, read back from its record and
linked text after the upload is deleted and the daemon restarted; bad "fisher" bodies name the
field).

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

KEY = "jobs-key-0123456789"
from serve_util import SMALL_GRID, MEDIUM_GRID, FISHER  # noqa: E402
DATA = serve_util.CALIBRATION


def safetensors(directory):
    """model.safetensors of an LQ directory: (whole bytes, its metadata, the tensor bytes after the header)."""
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    return data, json.loads(data[8:8 + size]).get("__metadata__", {}), data[8 + size:]


class Daemon(serve_util.Daemon):
    """lqd serve with --models-dir MODELS (holding a copy of stories260K-hf) and STATE."""

    def __init__(self, models_dir, state_dir, *extra):
        super().__init__(state_dir, "--models-dir", models_dir,
                         "--model", "stories=" + os.path.join(models_dir, "stories260K-hf"), "--api-key", KEY, *extra,
                         key=KEY)


def error_shape(body):
    return (isinstance(body, dict) and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("message"), str) and "type" in body["error"])


def leftovers(models_dir, name):
    return [n for n in os.listdir(models_dir) if n == name or n.startswith(name + ".tmp-")]


work = tempfile.mkdtemp(prefix="lqd-jobs-test-")
models_dir = os.path.join(work, "models")
state_dir = os.path.join(work, "state")
os.makedirs(models_dir)
shutil.copytree(os.path.join(ROOT, "models/stories260K-hf"), os.path.join(models_dir, "stories260K-hf"))
os.environ["LQD_CACHE_DIR"] = os.path.join(work, "cache")  # the error-table cache, private to the test

daemon = Daemon(models_dir, state_dir)

# ---- a compress job, activated ----
status, job = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                               "rank": 4, "configs": SMALL_GRID, "output": "stories-3bit",
                                               "activate": True})
check(status == 200 and job and job["status"] in ("queued", "running"), f"submit: {status} {job}")
check(job and job["id"].startswith("job-") and job["object"] == "job", f"job id/object: {job}")
first = daemon.wait(job["id"], ("succeeded", "failed", "cancelled"), 120)
check(first["status"] == "succeeded", f"first job succeeded: {first}")
result = first.get("result") or {}
output = os.path.join(os.path.realpath(models_dir), "stories-3bit")
check(result.get("output") == output, f"result output {result.get('output')} == {output}")
check(0 < result.get("bits_per_param", 99) <= 3, f"bits_per_param {result.get('bits_per_param')} <= 3")
check(result.get("activated") is True and result.get("name") == "stories-3bit", f"activated: {result}")
check(first["progress"] == 1 and first["finished_at"] and first["started_at"], f"progress/times: {first}")
check(os.path.isfile(os.path.join(output, "model.safetensors")), "output written")
check(os.path.isfile(os.path.join(state_dir, "jobs", job["id"] + ".json")), "record in STATE_DIR/jobs")
status, models = daemon.json("GET", "/v1/models")
names = [m["id"] for m in models["data"]]
check("stories-3bit" in names, f"activated model listed: {names}")
lq_entry = [m for m in models["data"] if m["id"] == "stories-3bit"]
check(lq_entry and 0 < lq_entry[0]["bits_per_param"] <= 3, f"listed bits: {lq_entry}")
status, completion = daemon.json("POST", "/v1/completions", {"model": "stories-3bit", "prompt": "Once upon a time",
                                                             "max_tokens": 12, "temperature": 0})
check(status == 200 and completion["choices"][0]["text"], f"activated model generates: {status} {completion}")
status, events = daemon.json("GET", f"/v1/jobs/{job['id']}/events")
types = [e.get("type") for e in events] if isinstance(events, list) else []
check(status == 200 and "progress" in types and "activated" in types, f"events: {types}")
check(isinstance(events, list) and events[-1].get("status") == "succeeded", "last event: succeeded")
check([e["seq"] for e in events] == list(range(1, len(events) + 1)), "event seq 1..n")
status, listing = daemon.json("GET", "/v1/jobs")
check(status == 200 and listing["object"] == "list" and any(j["id"] == job["id"] for j in listing["data"]),
      "GET /v1/jobs lists the job")

# SSE of a finished job: every event, then [DONE].
status, body, _ = daemon.request("GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"})
text = body.decode()
data_lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
check(status == 200 and data_lines and data_lines[-1] == "[DONE]" and len(data_lines) == len(events) + 1,
      f"SSE events: {len(data_lines)} vs {len(events)}")

# ---- a second budget reuses the cached error table ----
status, job2 = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 2.5,
                                                "rank": 4, "configs": SMALL_GRID, "output": "stories-2.5bit"})
second = daemon.wait(job2["id"], ("succeeded", "failed", "cancelled"), 120)
result2 = second.get("result") or {}
check(second["status"] == "succeeded", f"second job: {second}")
check(result2.get("cells_cached") == 35 * 3 and result2.get("decompositions") == 0,
      f"second budget from the cache: {result2.get('cells_cached')} cached, {result2.get('decompositions')} run")
check(0 < result2.get("bits_per_param", 99) <= 2.5 and result2.get("activated") is False, f"result2: {result2}")
events2 = daemon.json("GET", f"/v1/jobs/{job2['id']}/events")[1]
check(any(e.get("type") == "progress" and e.get("cells_cached") == 105 for e in events2),
      "events report the cached cells")

# ---- cancel a job on the full grid ----
status, job3 = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                                "rank": 8, "output": "stories-table1"})
check(status == 200 and job3["request"]["configs"] == "table1", f"table1 job: {status}")
running = daemon.wait(job3["id"], ("running",), 30)
time.sleep(1.5)
status, cancelling = daemon.json("POST", f"/v1/jobs/{job3['id']}/cancel")
check(status == 200, f"cancel: {status} {cancelling}")
asked = time.time()
third = daemon.wait(job3["id"], ("cancelled", "failed", "succeeded"), 10)
check(third["status"] == "cancelled" and time.time() - asked < 5,
      f"cancelled within seconds: {third['status']} after {time.time() - asked:.1f} s")
check(leftovers(models_dir, "stories-table1") == [], f"no output left: {leftovers(models_dir, 'stories-table1')}")
status, again = daemon.json("POST", f"/v1/jobs/{job3['id']}/cancel")
check(status == 409 and error_shape(again), f"cancelling a cancelled job: {status}")

# A queued job (behind a running one: --max-jobs 1) cancels at once.
status, busy = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                                "rank": 8, "output": "stories-busy"})
status, queued = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                                  "rank": 4, "configs": SMALL_GRID, "output": "stories-queued"})
check(queued["status"] == "queued", f"second job queued behind the first: {queued['status']}")
check(daemon.json("GET", f"/v1/jobs/{queued['id']}")[1]["status"] == "queued", "bounded: one runs, one queued")
status, cancelled = daemon.json("POST", f"/v1/jobs/{queued['id']}/cancel")
check(status == 200 and cancelled["status"] == "cancelled", f"queued job cancelled at once: {cancelled['status']}")
daemon.json("POST", f"/v1/jobs/{busy['id']}/cancel")
check(daemon.wait(busy["id"], ("cancelled",), 10)["status"] == "cancelled", "busy job cancelled")

# ---- the catalogue of bad requests ----
base = {"type": "compress", "model": "stories", "target_bits": 3, "rank": 4, "configs": SMALL_GRID,
        "output": "stories-bad"}
bad = [
    ({**base, "model": "no-such-model"}, 404, "model"),
    ({**base, "target_bits": 1.0}, 400, "2.126953"),
    ({**base, "rank": 100000}, 400, "rank"),
    ({**base, "output": "../escape"}, 403, ".."),
    ({**base, "output": "x/../../escape"}, 403, ".."),
    ({**base, "output": "/tmp/lqd-jobs-outside"}, 403, "outside"),
    ({**base, "output": "stories260K-hf"}, 409, "exists"),
    ({**base, "output": "no-such-dir/out"}, 404, "parent"),
    ({**base, "type": "pretrain"}, 400, "type"),
    ({**base, "target_bits": "3"}, 400, "target_bits"),
    ({k: v for k, v in base.items() if k != "target_bits"}, 400, "target_bits"),
    ({k: v for k, v in base.items() if k != "output"}, 400, "output"),
    ({**base, "configs": "/etc/passwd"}, 400, "configs"),
    ({**base, "configs": "9,9,fp32,64,256"}, 400, "configs"),
    ({**base, "iters": 0}, 400, "iters"),
    ({**base, "name": "bad name!"}, 400, "name"),
    ({**base, "model": "stories-3bit"}, 400, "LQ"),
    ("{not json", 400, "JSON"),
    ([1, 2], 400, "object"),
]
for body, expected, word in bad:
    status, answer = daemon.json("POST", "/v1/jobs", body)
    message = answer["error"]["message"] if error_shape(answer) else ""
    check(status == expected and error_shape(answer) and word.lower() in message.lower(),
          f"bad job {str(body)[:80]}: {status} (want {expected}) {message!r}")
check(leftovers(models_dir, "stories-bad") == [], "refused jobs create nothing")
for method, path in [("GET", "/v1/jobs/job-nope"), ("GET", "/v1/jobs/job-nope/events"),
                     ("POST", "/v1/jobs/job-nope/cancel")]:
    status, answer = daemon.json(method, path)
    check(status == 404 and error_shape(answer) and answer["error"]["code"] == "job_not_found",
          f"{method} {path}: {status}")
for method, path in [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"),
                     ("GET", f"/v1/jobs/{job['id']}/events"), ("POST", f"/v1/jobs/{job['id']}/cancel")]:
    status, answer = daemon.json(method, path, base if method == "POST" else None, key=None)
    check(status == 401 and error_shape(answer), f"{method} {path} without a key: {status}")
    status, _ = daemon.json(method, path, base if method == "POST" else None, key="wrong")
    check(status == 401, f"{method} {path} with a wrong key: {status}")

metrics = daemon.request("GET", "/metrics")[1].decode()
check('lqd_jobs{status="succeeded"} 2' in metrics and 'lqd_jobs{status="cancelled"} 3' in metrics,
      "jobs gauge in /metrics")

# ---- a Fisher-weighted compress job (lqd compress --fisher on an upload) ----
calibration = os.path.join(work, "calibration.txt")
with open(DATA) as f:
    calibration_lines = f.readlines()[:200]
with open(calibration, "w") as f:
    f.writelines(calibration_lines)
status, calibration_file = daemon.upload_file(calibration, "calibration.txt")
check(status == 200 and calibration_file["id"].startswith("file-"), f"calibration upload: {status} {calibration_file}")
fisher_id = calibration_file["id"]
check(result.get("weighting") == "none" and result.get("fisher") is None, f"unweighted result: {result}")
base = {"type": "compress", "model": "stories", "target_bits": 3, "rank": 4, "configs": SMALL_GRID,
        "output": "stories-fisher-bad"}
fisher_ok = {"file": fisher_id, **FISHER}
bad_fisher = [
    ("file-0123456789abcdef01234567", 400, "fisher"),
    ([fisher_id], 400, "fisher"),
    ({"samples": 4}, 400, "fisher.file"),
    ({"file": 7, "samples": 4}, 400, "fisher.file"),
    ({"file": fisher_id}, 400, "fisher.samples"),
    ({**fisher_ok, "samples": 0}, 400, "fisher.samples"),
    ({**fisher_ok, "samples": 100000001}, 400, "fisher.samples"),
    ({**fisher_ok, "samples": 2.5}, 400, "fisher.samples"),
    ({**fisher_ok, "samples": "16"}, 400, "fisher.samples"),
    ({**fisher_ok, "samples": 1000}, 400, "fisher.samples"),  # more than the text's 100 non-empty lines
    ({**fisher_ok, "seq_len": 1}, 400, "fisher.seq_len"),
    ({**fisher_ok, "seq_len": 2 ** 24 + 1}, 400, "fisher.seq_len"),
    ({**fisher_ok, "seed": -1}, 400, "fisher.seed"),
    ({**fisher_ok, "seed": "5"}, 400, "fisher.seed"),
    ({**fisher_ok, "sample": 3}, 400, "fisher.sample"),
    ({**fisher_ok, "file": "file-0123456789abcdef01234567"}, 404, "fisher.file"),
]
for fisher, expected, param in bad_fisher:
    status, answer = daemon.json("POST", "/v1/jobs", {**base, "fisher": fisher})
    check(status == expected and error_shape(answer) and answer["error"].get("param") == param
          and param in answer["error"]["message"],
          f"bad fisher {str(fisher)[:80]}: {status} (want {expected}, {param}) {answer}")
check(leftovers(models_dir, "stories-fisher-bad") == [], "refused weighted jobs create nothing")

status, wjob = daemon.json("POST", "/v1/jobs", {**base, "output": "stories-3bit-fisher", "fisher": fisher_ok})
check(status == 200 and wjob["request"]["fisher"]["file"] == fisher_id
      and wjob["request"]["fisher"]["samples"] == 16 and wjob["request"]["fisher"]["seed"] == 5,
      f"weighted job submitted: {status} {wjob}")
check(os.path.isfile(os.path.join(state_dir, "jobs", wjob["id"], "fisher_file")), "calibration linked into the job")
weighted = daemon.wait(wjob["id"], ("succeeded", "failed", "cancelled"), 180)
wresult = weighted.get("result") or {}
check(weighted["status"] == "succeeded", f"weighted job succeeded: {weighted}")
weighting = wresult.get("weighting", "")
check(weighting.startswith("fisher-") and len(weighting) == len("fisher-") + 16, f"result weighting: {weighting!r}")
check((wresult.get("fisher") or {}).get("samples") == 16 and wresult["fisher"].get("seq_len") == 128
      and wresult["fisher"].get("tokens", 0) > 16, f"result fisher: {wresult.get('fisher')}")
wevents = daemon.json("GET", f"/v1/jobs/{wjob['id']}/events")[1]
check(any(e.get("phase") == "fisher" and e.get("sequences_done") == 16 and e.get("sequences_total") == 16
          for e in wevents), "progress events of phase fisher")
check(not os.path.exists(os.path.join(state_dir, "jobs", wjob["id"])), "the job's directory removed when done")
woutput = os.path.join(os.path.realpath(models_dir), "stories-3bit-fisher")
_, wmeta, wtensors = safetensors(woutput)
_, meta, tensors = safetensors(output)
check(wmeta.get("lqd.weighting") == weighting and meta.get("lqd.weighting") == "none",
      f"weighting metadata: {wmeta.get('lqd.weighting')} / {meta.get('lqd.weighting')}")
check(wtensors != tensors, "the weighted model's weights differ from the unweighted job's")

# The CLI with the same text, N, L and seed: the same cache key (every cell cached) and the same bytes.
cli_out = os.path.join(work, "cli-fisher")
cli = subprocess.run([LQD, "compress", "--model", weighted["request"]["source"], "--bits", "3", "--rank", "4",
                      "--configs", SMALL_GRID, "--out", cli_out, "--fisher", calibration,
                      "--fisher-samples", "16", "--fisher-seq-len", "128", "--fisher-seed", "5", "--json", "--quiet"],
                     capture_output=True, text=True, timeout=300)
cli_report = json.loads(cli.stdout) if cli.returncode == 0 else {}
check(cli.returncode == 0, f"lqd compress --fisher: {cli.stderr}")
check(cli_report.get("weighting") == weighting and cli_report.get("cells_cached") == 105
      and cli_report.get("decompositions") == 0,
      f"CLI shares the job's cache key: {cli_report.get('weighting')} {cli_report.get('cells_cached')}")
check(safetensors(cli_out)[0] == safetensors(woutput)[0], "CLI and job write byte-identical model weights")

# Queued behind a busy job, the upload deleted, the daemon restarted: read back from its record and
# linked data, the job is weighted the same.
status, busy = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                                "rank": 8, "output": "stories-fisher-busy"})
status, wjob2 = daemon.json("POST", "/v1/jobs", {**base, "output": "stories-3bit-fisher2", "fisher": fisher_ok})
check(status == 200 and wjob2["status"] == "queued", f"second weighted job queued: {status} {wjob2.get('status')}")
check(daemon.json("DELETE", f"/v1/files/{fisher_id}")[0] == 200, "calibration upload deleted")
daemon.stop()
daemon = Daemon(models_dir, state_dir)
daemon.json("POST", f"/v1/jobs/{busy['id']}/cancel")
status, wrecord = daemon.json("GET", f"/v1/jobs/{wjob2['id']}")
check(status == 200 and wrecord["request"].get("fisher") == wjob2["request"]["fisher"],
      f"fisher read back from the record: {wrecord.get('request')}")
weighted2 = daemon.wait(wjob2["id"], ("succeeded", "failed", "cancelled"), 180)
result_w2 = weighted2.get("result") or {}
check(weighted2["status"] == "succeeded" and result_w2.get("weighting") == weighting,
      f"restarted weighted job: {weighted2['status']} {result_w2.get('weighting')} {weighted2.get('error')}")
check(weighted2["status"] == "succeeded"
      and safetensors(os.path.join(os.path.realpath(models_dir), "stories-3bit-fisher2"))[2] == wtensors,
      "the restarted weighted job writes the same weights")
check(daemon.wait(busy["id"], ("cancelled",), 10)["status"] == "cancelled", "busy job cancelled")

# ---- kill -9 during a job; the restarted daemon resumes it ----
status, job4 = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 3,
                                                "rank": 4, "configs": MEDIUM_GRID, "output": "stories-medium"})
deadline = time.time() + 60
while time.time() < deadline:
    current = daemon.json("GET", f"/v1/jobs/{job4['id']}")[1]
    # Far enough that finished table rows have been saved to the cache (at most once a second).
    if current["status"] == "running" and current["progress"] >= 0.4:
        break
    time.sleep(0.1)
check(current["status"] == "running" and current["progress"] < 0.85, f"medium job mid-table: {current}")
check(current["phase"] == "error table", f"phase while running: {current['phase']}")
check(current.get("eta_seconds") is not None and current["eta_seconds"] > 0, f"ETA while running: {current}")
daemon.kill9()
daemon = Daemon(models_dir, state_dir)
status, resumed = daemon.json("GET", f"/v1/jobs/{job4['id']}")
check(status == 200 and resumed["status"] in ("queued", "running", "succeeded"), f"job not lost: {resumed}")
# SSE while it runs: ends when the job does, with [DONE].
status, body, _ = daemon.request("GET", f"/v1/jobs/{job4['id']}/events", headers={"Accept": "text/event-stream"},
                              timeout=180)
sse = body.decode()
check(status == 200 and sse.rstrip().endswith("data: [DONE]") and "resumed after restart" in sse,
      "SSE follows the resumed job to its end")
fourth = daemon.wait(job4["id"], ("succeeded", "failed", "cancelled"), 120)
check(fourth["status"] == "succeeded" and fourth["attempts"] == 2, f"resumed job succeeded: {fourth}")
check((fourth.get("result") or {}).get("cells_cached", 0) > 0,
      f"resumed from the cached rows: {(fourth.get('result') or {}).get('cells_cached')} cells cached")
check(leftovers(models_dir, "stories-medium") == ["stories-medium"], "one output, no temporary left")
events4 = daemon.json("GET", f"/v1/jobs/{job4['id']}/events")[1]
check(any(e.get("message") == "resumed after restart" for e in events4), "event 'resumed after restart'")
# The activated model of the first daemon is not re-activated, but its job record survived.
status, old = daemon.json("GET", f"/v1/jobs/{job['id']}")
check(status == 200 and old["status"] == "succeeded" and old["result"]["output"] == output, "records survive")

# ---- SIGTERM during a job: it stays queued and the next start finishes it ----
status, job5 = daemon.json("POST", "/v1/jobs", {"type": "compress", "model": "stories", "target_bits": 2.75,
                                                "rank": 8, "output": "stories-sigterm"})
daemon.wait(job5["id"], ("running",), 30)
time.sleep(1)
started = time.time()
daemon.stop()
check(daemon.process.returncode == 0 and time.time() - started < 10,
      f"SIGTERM with a job running exits 0 promptly ({daemon.process.returncode}, {time.time() - started:.1f} s)")
record = json.load(open(os.path.join(state_dir, "jobs", job5["id"] + ".json")))
check(record["status"] == "queued", f"interrupted job left queued: {record['status']}")
check(leftovers(models_dir, "stories-sigterm") == [], "no partial output after SIGTERM")
daemon = Daemon(models_dir, state_dir)
status, cancel5 = daemon.json("POST", f"/v1/jobs/{job5['id']}/cancel")
check(status == 200, f"the re-queued job can be cancelled: {status}")
daemon.wait(job5["id"], ("cancelled",), 10)
daemon.stop()

shutil.rmtree(work, ignore_errors=True)
finish("test_jobs")
