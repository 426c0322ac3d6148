"""What the integration tests share: the binary and repository paths, a failure-counting check,
free loopback ports, `lqd serve` started and waited for (Daemon, JsonDaemon), a slowly read
stream, and a guarantee that no daemon a test started outlives it."""
import atexit
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

ROOT = os.path.abspath(os.environ.get("LQ_REPO_ROOT", os.path.join(os.path.dirname(__file__), "..", "..")))
LQD = os.path.abspath(os.environ.get("LQD", os.path.join(ROOT, "build/server/lqd")))

# Compress jobs of the job tests (test_jobs.py, test_compress_launcher.py): a 3-configuration grid
# that runs in seconds, a 162-configuration one long enough (about 10 s on 2 CPUs) to be killed
# in the middle of, and the calibration text and draw of Fisher-weighted jobs.
SMALL_GRID = "4,8,fp32,64,256;3,8,fp32,64,256;2,8,fp32,64,256"
MEDIUM_GRID = ";".join(f"{b0},{b1},{b2},{B0},{B1}" for b0 in (2, 3, 4) for b1 in (2, 3, 4)
                       for b2 in ("bf16", "fp16", "fp32") for B0 in (16, 32, 64) for B1 in (64, 256))
CALIBRATION = os.path.join(ROOT, "tests/data/tinystories_val_subset.txt")
FISHER = {"samples": 16, "seq_len": 128, "seed": 5}
SKIP = 77  # meson's exit status for a skipped test

_counts = {"passed": 0, "failed": 0}


def check(condition, message):
    """Counts a check; prints the message of a failed one and carries on."""
    if condition:
        _counts["passed"] += 1
    else:
        _counts["failed"] += 1
        print("FAIL:", message, flush=True)


def failures():
    return _counts["failed"]


def finish(name):
    """Prints the closing line and exits 1 when any check failed."""
    print(f"{name}: {_counts['passed']} checks passed, {_counts['failed']} failed")
    sys.exit(1 if _counts["failed"] else 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED = []  # daemons (subprocess.Popen) started by the test


@atexit.register
def kill_leftovers():
    """A test that fails half-way must not leave daemons behind."""
    for process in STARTED:
        if process.poll() is None:
            process.kill()


_OWN_KEY = object()  # request(key=...) left out: the daemon's own key


class Daemon:
    """`lqd serve` on 127.0.0.1 and a free port with STATE_DIR and the test's own arguments, its
    output in a log file (by default daemon-PORT.log beside STATE_DIR); the constructor returns
    once GET /ready answers 200. Requests carry `Authorization: Bearer KEY` when key is set."""

    timeout = 120  # seconds a request may take
    json_headers = False  # json() returns (status, body), or (status, body, headers) when True

    def __init__(self, state_dir, *args, key=None, log_path=None, cwd=ROOT):
        self.port = free_port()
        self.key = key
        self.log_path = log_path or os.path.join(os.path.dirname(state_dir), f"daemon-{self.port}.log")
        self.log = open(self.log_path, "w")
        command = [LQD, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--state-dir", state_dir, *args]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        STARTED.append(self.process)
        self.wait_ready()

    def wait_ready(self, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lqd serve exited {self.process.returncode}:\n{self.tail()}")
            try:
                if self.http("GET", "/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"lqd serve not ready in {seconds} s:\n" + self.tail())

    def tail(self):
        if not self.log.closed:
            self.log.flush()
        return "".join(open(self.log_path).readlines()[-30:])

    def http(self, method, path, body=None, headers=None, key=_OWN_KEY, timeout=None, chunked=False):
        """One request: (status, body bytes, headers with lower-case names). A body that is not
        bytes or str is sent as JSON (unless chunked: then it is an iterable of bytes); key None
        or "" sends no Authorization header."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout or self.timeout)
        key = self.key if key is _OWN_KEY else key
        all_headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None and not isinstance(body, (bytes, str)) and not chunked:
            body = json.dumps(body)
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}

    request = http

    def json(self, method, path, body=None, **kw):
        """A request whose answer is read as JSON (None when it is not)."""
        status, data, headers = self.http(method, path, body, **kw)
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        return (status, parsed, headers) if self.json_headers else (status, parsed)

    def upload(self, fields, **kw):
        """POSTs fields [(name, value, filename or None)] to /v1/files as multipart/form-data."""
        body, content_type = multipart(fields)
        return self.json("POST", "/v1/files", body, headers={"Content-Type": content_type}, **kw)

    def upload_file(self, path, filename):
        """POST /v1/files of the file at path, purpose fine-tune: status, record."""
        with open(path, "rb") as f:
            content = f.read()
        return self.upload([("purpose", "fine-tune", None), ("file", content, filename)])

    def wait(self, job_id, statuses, timeout):
        """The job's record once its status is one of statuses, or as it is after timeout s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, job = self.json("GET", f"/v1/jobs/{job_id}")[:2]
            if status == 200 and job["status"] in statuses:
                return job
            time.sleep(0.1)
        return self.json("GET", f"/v1/jobs/{job_id}")[1]

    def events(self, job_id):
        status, events = self.json("GET", f"/v1/jobs/{job_id}/events")[:2]
        return events if status == 200 and isinstance(events, list) else []

    def stop(self, grace=20):
        """SIGTERM, then SIGKILL after grace seconds: the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def kill9(self):
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()


class JsonDaemon(Daemon):
    """A Daemon whose request() always says Content-Type: application/json and answers
    (status, the body parsed as JSON or None when empty)."""

    def request(self, method, path, body=None):
        status, data, _ = self.http(method, path, body, headers={"Content-Type": "application/json"})
        return status, json.loads(data) if data else None


def multipart(fields, boundary=None):
    """A multipart/form-data body (RFC 7578) and its Content-Type, written by hand."""
    boundary = boundary or "lqd-" + uuid.uuid4().hex
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}"
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'
        value = value.encode() if isinstance(value, str) else value
        parts.append(head.encode() + b"\r\n\r\n" + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def slow_stream(daemon, model, prompt):
    """A greedy streaming completion of 200 tokens, read slowly (2 ms a chunk) so that it is still
    running when a test swaps weights: (status, the data: chunks parsed, whether [DONE] came)."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    body = {"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    chunks, done = [], False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunks.append(json.loads(line[6:]))
        time.sleep(0.002)
    connection.close()
    return response.status, chunks, done
