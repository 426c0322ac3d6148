"""Hot swap while streams run: requests already streaming finish on the old weights, requests
started after the swap use the new ones, and no request fails.

The daemon serves the bundled stories260K (fp32) under the name "story"; eight greedy streams
start; mid-way the name is re-pointed (POST /v1/models/load) at an LQ-compressed variant made
with `lqd compress`. Every stream must complete with the fp32 model's text; a request after
the swap must give the LQ model's text (which differs).
Environment: LQD (the binary), LQ_REPO_ROOT."""
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import LQD, ROOT, STARTED, check, finish, free_port  # noqa: E402


def request(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request(method, path, json.dumps(body) if body is not None else None,
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None


def stream(port, prompt, results, index):
    """A greedy streaming completion, read slowly so that it is still running at the swap."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": "story", "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    text, reason, done = "", None, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        text += chunk["choices"][0]["text"]
        reason = chunk["choices"][0]["finish_reason"] or reason
        time.sleep(0.002)
    results[index] = (response.status, text, reason, done, time.time())
    connection.close()


with tempfile.TemporaryDirectory() as tmp:
    models = os.path.join(tmp, "models")
    os.makedirs(models)
    shutil.copytree(os.path.join(ROOT, "models/stories260K-hf"), os.path.join(models, "fp32"))
    subprocess.run([LQD, "compress", "--model", os.path.join(models, "fp32"), "--bits", "2.5", "--rank", "4",
                    "--out", os.path.join(models, "lq"), "--configs", "2,8,fp32,64,256;3,8,fp32,64,256",
                    "--no-cache", "--quiet"], check=True, capture_output=True)
    port = free_port()
    log = open(os.path.join(tmp, "daemon.log"), "w")
    daemon = subprocess.Popen([LQD, "serve", "--host", "127.0.0.1", "--port", str(port), "--state-dir",
                               os.path.join(tmp, "state"), "--model", "story=" + os.path.join(models, "fp32"),
                               "--models-dir", models, "--max-running", "16"], stdout=log, stderr=subprocess.STDOUT)
    STARTED.append(daemon)
    try:
        for _ in range(600):
            try:
                if request(port, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        prompts = ["Once upon a time", "The cat", "Lily and Ben", "One day", "Tom had a", "The sun", "A big",
                   "She saw"]
        expected = {}
        for p in prompts:  # the fp32 model's text, alone
            status, body = request(port, "POST", "/v1/completions",
                                   {"model": "story", "prompt": p, "max_tokens": 200, "temperature": 0})
            expected[p] = body["choices"][0]["text"]
        results = [None] * len(prompts)
        threads = [threading.Thread(target=stream, args=(port, p, results, i)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        status, body = request(port, "POST", "/v1/models/load", {"name": "story", "path": os.path.join(models, "lq")})
        swapped_at = time.time()
        check(status == 200, f"swap: {status} {body}")
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            status, text, reason, done, ended = results[i]
            check(status == 200 and done and reason in ("stop", "length"), f"stream {i}: {results[i][0]} {reason}")
            check(text == expected[p], f"stream {i} finished on the old weights: {text[:60]!r} vs {expected[p][:60]!r}")
        check(sum(r[4] > swapped_at for r in results) >= 4, "most streams were still running at the swap")
        status, body = request(port, "POST", "/v1/completions",
                               {"model": "story", "prompt": prompts[0], "max_tokens": 200, "temperature": 0})
        after = body["choices"][0]["text"]
        direct = subprocess.run([LQD, "generate", "--model", os.path.join(models, "lq"), "--prompt", prompts[0],
                                 "--max-tokens", "200", "--temperature", "0"], capture_output=True, text=True).stdout
        check(status == 200 and after == direct and after != expected[prompts[0]],
              f"after the swap the LQ model answers: {after[:60]!r} vs {direct[:60]!r}")
        status, body = request(port, "GET", "/v1/models")
        listed = [m for m in body["data"] if m["id"] == "story"]
        check(len(listed) == 1 and listed[0].get("quantization") == "lq", f"listed as the LQ variant: {listed}")
    finally:
        daemon.terminate()
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = -9
        check(code == 0, f"SIGTERM exit code {code}")

finish("test_hot_swap")
