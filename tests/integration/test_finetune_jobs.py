"""Finetune jobs of `lqd serve` over its real HTTP API: a TinyStories upload (POST /v1/files)
finetunes stories260K-lq to "succeeded" with events (start, step with train/validation loss,
tokens/s and ETA, checkpoint) and a PEFT adapter in STATE_DIR/adapters/<model>/<adapter> whose
weights are byte for byte those `lqd finetune` writes from the same data and settings; a job
whose upload is deleted right after submission still runs (the job holds a link to it), and
`kill -9` of the daemon in the middle of it, then a restart on the same state directory, resumes
from its last checkpoint and ends with exactly the uninterrupted run's adapter; a cancelled job
stops between steps and leaves nothing; a catalogue of bad bodies, each a 4xx with OpenAI's
error shape naming the field.

Environment: LQD (the binary, default build/server/lqd), LQ_REPO_ROOT."""
import http.client
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

KEY = "finetune-key-0123456789"
DATA = os.path.join(ROOT, "tests/data/tinystories_val_subset.txt")
SETTINGS = {"batch_size": 4, "seq_len": 64, "learning_rate": 3e-3, "seed": 3}
CLI_SETTINGS = ["--batch-size", "4", "--seq-len", "64", "--learning-rate", "3e-3", "--seed", "3"]


class Daemon(serve_util.Daemon):
    """lqd serve with stories260K-lq as "stories" and stories260K-hf as "dense", on STATE."""

    def __init__(self, state_dir):
        super().__init__(state_dir, "--model", "stories=" + os.path.join(ROOT, "models/stories260K-lq"),
                         "--model", "dense=" + os.path.join(ROOT, "models/stories260K-hf"), "--api-key", KEY,
                         key=KEY)


def error_shape(body, param=None):
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and error.get("type")
            and (param is None or error.get("param") == param))


def cli_adapter(work, name, train, *args):
    """The adapter `lqd finetune` writes from train with the job's settings: its weight bytes."""
    out = os.path.join(work, name)
    result = subprocess.run([LQD, "finetune", "--model", os.path.join(ROOT, "models/stories260K-lq"),
                             "--train", train, "--out", out, "--quiet", *CLI_SETTINGS, *args],
                            capture_output=True, text=True, timeout=600)
    check(result.returncode == 0, f"lqd finetune {name}: {result.stderr}")
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        return f.read()


def adapter_bytes(path):
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        return f.read()


work = tempfile.mkdtemp(prefix="lqd-finetune-jobs-")
state_dir = os.path.join(work, "state")
train = os.path.join(work, "train.txt")
with open(DATA) as f:
    lines = f.readlines()[:400]
with open(train, "w") as f:
    f.writelines(lines)

daemon = Daemon(state_dir)
status, upload = daemon.upload_file(train, "train.txt")
check(status == 200 and upload["format"] == "plain", f"upload: {status} {upload}")
file_id = upload["id"]

# ---- a finetune job to "succeeded", equal to the CLI ----
body = {"type": "finetune", "model": "stories", "training_file": file_id, "adapter": "tiny", "steps": 30,
        "validation_fraction": 0.1, "eval_every": 10, **SETTINGS}
status, job = daemon.json("POST", "/v1/jobs", body)
check(status == 200 and job and job["type"] == "finetune" and job["status"] in ("queued", "running"),
      f"submit: {status} {job}")
done = daemon.wait(job["id"], ("succeeded", "failed", "cancelled"), 120)
check(done["status"] == "succeeded", f"finetune job succeeded: {done}")
result = done.get("result") or {}
adapter_dir = os.path.join(os.path.realpath(state_dir), "adapters", "stories", "tiny")
check(result.get("path") == adapter_dir, f"result path {result.get('path')} == {adapter_dir}")
check(result.get("mode") == "replace" and result.get("init") == "lq" and result.get("rank") == 8,
      f"replace mode, init lq, rank 8: {result}")
check(result.get("steps") == 30 and result.get("activated") is False, f"steps, activated: {result}")
check(isinstance(result.get("val_loss"), float) and result["val_loss"] < result.get("initial_val_loss", 0),
      f"validation loss falls: {result.get('initial_val_loss')} -> {result.get('val_loss')}")
check(isinstance(result.get("train_loss"), float), "final train loss recorded")
for name in ("adapter_config.json", "adapter_model.safetensors"):
    check(os.path.isfile(os.path.join(adapter_dir, name)), f"{name} in the adapter directory")
with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
check(config.get("peft_type") == "LORA" and config.get("lqd_mode") == "replace", f"PEFT config: {config}")
check(not os.path.exists(os.path.join(state_dir, "jobs", job["id"])), "the job's directory is removed when done")
events = daemon.events(job["id"])
types = [e.get("type") for e in events]
check("start" in types and "step" in types and "checkpoint" in types, f"event types: {types}")
steps = [e for e in events if e.get("type") == "step"]
for key in ("step", "train_loss", "val_loss", "tokens_per_second", "eta_seconds", "learning_rate"):
    check(all(key in e for e in steps), f"step events carry {key}")
check([e["step"] for e in steps if e["val_loss"] is not None] == [10, 20, 30], "validation at 10, 20, 30")
check(steps and steps[-1]["step"] == 30 and steps[-1]["eta_seconds"] == 0, "last step event: step 30, ETA 0")
check(events and events[-1].get("status") == "succeeded", "last event: succeeded")
check(adapter_bytes(adapter_dir) == cli_adapter(work, "cli-tiny", train, "--steps", "30",
                                                "--validation-fraction", "0.1"),
      "the job's adapter equals lqd finetune's, byte for byte")
status, again = daemon.json("POST", "/v1/jobs", body)
check(status == 409 and error_shape(again, "adapter"), f"an existing adapter: {status} {again}")

# ---- the job's adapter serves as stories:tiny; a second job's adapter is hot-swapped behind
# that name while streams run on it: zero failures, each stream all one version, and new
# requests get the new version's text ----
def complete(model, max_tokens=60):
    status, answer = daemon.json("POST", "/v1/completions", {"model": model, "prompt": "Once upon a time",
                                                             "max_tokens": max_tokens, "temperature": 0})
    check(status == 200, f"completion on {model}: {status} {answer}")
    return answer["choices"][0]["text"] if status == 200 else None


def stream(model, max_tokens, out):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
        connection.request("POST", "/v1/completions",
                           json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                                       "temperature": 0, "stream": True}),
                           {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        text, first = "", None
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0].get("text", "")
                if first is None:
                    first = time.time()
        out.append((response.status, text, first))
    except Exception as e:  # counted as a failed request
        out.append((0, repr(e), None))


status, listing = daemon.json("GET", "/v1/adapters")
names = [a.get("name") for a in (listing or {}).get("data", [])]
check(status == 200 and "tiny" in names, f"the finished job's adapter is registered: {status} {listing}")
base_text, v1_text = complete("stories"), complete("stories:tiny")
check(v1_text and v1_text != base_text, f"the adapter changes the text: {v1_text!r} vs {base_text!r}")
status, job2 = daemon.json("POST", "/v1/jobs", {**body, "adapter": "tiny-v2", "steps": 40, "seed": 11,
                                                "learning_rate": 1e-2, "activate": True})
check(status == 200, f"second job: {status} {job2}")
done2 = daemon.wait(job2["id"], ("succeeded", "failed", "cancelled"), 120)
check(done2["status"] == "succeeded" and (done2.get("result") or {}).get("activated") is True,
      f"second job succeeded and activated: {done2}")
v2_text = complete("stories:tiny-v2")
check(v2_text and v2_text != v1_text, "the second adapter generates differently")
import threading  # noqa: E402
v2_full = complete("stories:tiny-v2", 200)
status, kept = daemon.json("POST", "/v1/adapters/load", {"model": "stories", "name": "v1", "path": adapter_dir})
check(status == 200, f"the first adapter also served as stories:v1: {status} {kept}")
v1_full = complete("stories:v1", 200)
check(v1_full != v2_full, "the two adapters' 200-token texts differ")
results, stop = [], threading.Event()


def keep_streaming():
    while not stop.is_set():
        stream("stories:tiny", 200, results)


threads = [threading.Thread(target=keep_streaming) for _ in range(8)]
for t in threads:
    t.start()
# swap once streams have finished on the first version, stop once streams started after the swap
# have finished (timing-free: a loaded machine only makes it slower)
deadline = time.time() + 120
while not results and time.time() < deadline:
    time.sleep(0.02)
status, swapped = daemon.json("POST", "/v1/adapters/load",
                              {"model": "stories", "name": "tiny",
                               "path": os.path.join(os.path.realpath(state_dir), "adapters", "stories", "tiny-v2")})
check(status == 200, f"hot swap of stories:tiny to the second adapter: {status} {swapped}")
at_swap = len(results)
while len(results) < at_swap + 16 and time.time() < deadline + 120:
    time.sleep(0.02)
stop.set()
for t in threads:
    t.join(180)
texts = [text for _, text, _ in results]
check(results and all(code == 200 for code, _, _ in results),
      f"zero failed streams across the swap ({len(results)} streams): {[c for c, _, _ in results if c != 200]}")
check(all(text in (v1_full, v2_full) for text in texts), "each stream is all one version")
check(v1_full in texts and v2_full in texts, "streams ran on both versions: the swap happened while they ran")
check(complete("stories:tiny", 200) == v2_full, "after the swap, stories:tiny generates the second adapter's text")

# ---- the upload deleted after submission; kill -9 mid-job; restart resumes ----
long_body = {"type": "finetune", "model": "stories", "training_file": file_id, "adapter": "long",
             "steps": 200, "checkpoint_every": 5, **SETTINGS}
status, long_job = daemon.json("POST", "/v1/jobs", long_body)
check(status == 200, f"submit the long job: {status} {long_job}")
status, _ = daemon.json("DELETE", f"/v1/files/{file_id}")
check(status == 200, f"upload deleted: {status}")
checkpointed = None
deadline = time.time() + 120
while time.time() < deadline and checkpointed is None:
    points = [e["step"] for e in daemon.events(long_job["id"]) if e.get("type") == "checkpoint"]
    if points and points[-1] >= 20:
        checkpointed = points[-1]
    time.sleep(0.05)
running = daemon.json("GET", f"/v1/jobs/{long_job['id']}")[1]
check(checkpointed is not None and running["status"] == "running",
      f"checkpointed mid-run: step {checkpointed}, {running['status']}")
daemon.kill9()
check(os.path.isfile(os.path.join(state_dir, "jobs", long_job["id"], "checkpoint.safetensors")),
      "the checkpoint survives kill -9")
daemon = Daemon(state_dir)
resumed = daemon.wait(long_job["id"], ("succeeded", "failed", "cancelled"), 180)
check(resumed["status"] == "succeeded" and resumed["attempts"] == 2, f"resumed job succeeded: {resumed}")
starts = [e for e in daemon.events(long_job["id"]) if e.get("type") == "start"]
check(len(starts) == 2 and starts[0]["resumed_from"] == 0 and starts[1]["resumed_from"] >= checkpointed,
      f"the second run resumed from the checkpoint: {[s.get('resumed_from') for s in starts]}")
check((resumed.get("result") or {}).get("resumed_from", 0) >= 20, f"result resumed_from: {resumed.get('result')}")
long_dir = os.path.join(os.path.realpath(state_dir), "adapters", "stories", "long")
check(os.path.isdir(long_dir) and adapter_bytes(long_dir) == cli_adapter(work, "cli-long", train, "--steps", "200"),
      "the resumed job's adapter equals an uninterrupted run's, byte for byte")

# ---- cancel between steps ----
status, upload = daemon.upload_file(train, "train.txt")
file_id = upload["id"]
status, endless = daemon.json("POST", "/v1/jobs", {"type": "finetune", "model": "dense", "training_file": file_id,
                                                   "adapter": "endless", "init": "zero", "rank": 4,
                                                   "steps": 1000000, **SETTINGS})
check(status == 200 and endless["request"]["init"] == "zero", f"submit an endless job: {status} {endless}")
deadline = time.time() + 60
while time.time() < deadline and not any(e.get("type") == "step" for e in daemon.events(endless["id"])):
    time.sleep(0.05)
status, cancelling = daemon.json("POST", f"/v1/jobs/{endless['id']}/cancel")
asked = time.time()
check(status == 200, f"cancel: {status} {cancelling}")
cancelled = daemon.wait(endless["id"], ("cancelled", "failed", "succeeded"), 20)
check(cancelled["status"] == "cancelled" and time.time() - asked < 5,
      f"cancelled within seconds: {cancelled['status']} after {time.time() - asked:.1f} s")
adapters = os.path.join(state_dir, "adapters", "dense")
check(not os.path.exists(adapters) or os.listdir(adapters) == [], "a cancelled job leaves no adapter")
check(not os.path.exists(os.path.join(state_dir, "jobs", endless["id"])), "nor its directory")

# ---- bad bodies ----
base = {"type": "finetune", "model": "stories", "training_file": file_id, "adapter": "bad"}
cases = [
    ({k: v for k, v in base.items() if k != "model"}, 400, "model"),
    ({**base, "model": "nope"}, 404, "model"),
    ({k: v for k, v in base.items() if k != "training_file"}, 400, "training_file"),
    ({**base, "training_file": "file-000000000000000000000000"}, 404, "training_file"),
    ({**base, "training_file": 7}, 400, "training_file"),
    ({k: v for k, v in base.items() if k != "adapter"}, 400, "adapter"),
    ({**base, "adapter": "../x"}, 400, "adapter"),
    ({**base, "steps": 5, "epochs": 1}, 400, "steps"),
    ({**base, "steps": 0}, 400, "steps"),
    ({**base, "epochs": -1}, 400, "epochs"),
    ({**base, "validation_file": file_id, "validation_fraction": 0.1}, 400, "validation_fraction"),
    ({**base, "validation_file": "file-000000000000000000000000"}, 404, "validation_file"),
    ({**base, "model": "dense", "init": "lq"}, 400, "init"),
    ({**base, "init": "lq", "rank": 4}, 400, "rank"),
    ({**base, "init": "random"}, 400, "init"),
    ({**base, "seq_len": 4096}, 400, "seq_len"),
    ({**base, "schedule": "step"}, 400, "schedule"),
    ({**base, "format": "csv"}, 400, "format"),
    ({**base, "batch_size": 0}, 400, "batch_size"),
    ({**base, "batch_size": 2, "micro_batch": 4}, 400, "micro_batch"),
    ({**base, "learning_rate": -1}, 400, "learning_rate"),
    ({**base, "activate": "yes"}, 400, "activate"),
    ({**base, "type": "pretrain"}, 400, "type"),
]
for request, code, param in cases:
    status, answer = daemon.json("POST", "/v1/jobs", request)
    check(status == code and error_shape(answer, param),
          f"{json.dumps(request)}: {status} {answer} (expected {code} naming {param})")
check(not os.path.exists(os.path.join(state_dir, "adapters", "stories", "bad")), "no adapter from refused jobs")

daemon.stop()
shutil.rmtree(work, ignore_errors=True)
finish("test_finetune_jobs")
