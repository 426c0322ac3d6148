"""Hot swap while streams run: requests already streaming finish on the old weights, requests
started after the swap use the new ones, and no request fails.

The daemon serves the bundled stories260K (fp32) under the name "story"; eight greedy streams
start; mid-way the name is re-pointed (POST /v1/models/load) at an LQ-compressed variant made
with `lqd compress`. Every stream must complete with the fp32 model's text; a request after
the swap must give the LQ model's text (which differs).
Environment: LQD (the binary), LQ_REPO_ROOT."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import LQD, ROOT, JsonDaemon, check, finish, slow_stream  # noqa: E402


def stream(daemon, prompt, results, index):
    """A greedy streaming completion, read slowly so that it is still running at the swap."""
    status, chunks, done = slow_stream(daemon, "story", prompt)
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    reason = None
    for chunk in chunks:
        reason = chunk["choices"][0]["finish_reason"] or reason
    results[index] = (status, text, reason, done, time.time())


with tempfile.TemporaryDirectory() as tmp:
    models = os.path.join(tmp, "models")
    os.makedirs(models)
    shutil.copytree(os.path.join(ROOT, "models/stories260K-hf"), os.path.join(models, "fp32"))
    subprocess.run([LQD, "compress", "--model", os.path.join(models, "fp32"), "--bits", "2.5", "--rank", "4",
                    "--out", os.path.join(models, "lq"), "--configs", "2,8,fp32,64,256;3,8,fp32,64,256",
                    "--no-cache", "--quiet"], check=True, capture_output=True)
    daemon = JsonDaemon(os.path.join(tmp, "state"), "--model", "story=" + os.path.join(models, "fp32"),
                        "--models-dir", models, "--max-running", "16", log_path=os.path.join(tmp, "daemon.log"),
                        cwd=None)
    try:
        prompts = ["Once upon a time", "The cat", "Lily and Ben", "One day", "Tom had a", "The sun", "A big",
                   "She saw"]
        expected = {}
        for p in prompts:  # the fp32 model's text, alone
            status, body = daemon.request("POST", "/v1/completions",
                                          {"model": "story", "prompt": p, "max_tokens": 200, "temperature": 0})
            expected[p] = body["choices"][0]["text"]
        results = [None] * len(prompts)
        threads = [threading.Thread(target=stream, args=(daemon, p, results, i)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        status, body = daemon.request("POST", "/v1/models/load", {"name": "story", "path": os.path.join(models, "lq")})
        swapped_at = time.time()
        check(status == 200, f"swap: {status} {body}")
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            status, text, reason, done, ended = results[i]
            check(status == 200 and done and reason in ("stop", "length"), f"stream {i}: {results[i][0]} {reason}")
            check(text == expected[p], f"stream {i} finished on the old weights: {text[:60]!r} vs {expected[p][:60]!r}")
        check(sum(r[4] > swapped_at for r in results) >= 4, "most streams were still running at the swap")
        status, body = daemon.request("POST", "/v1/completions",
                                      {"model": "story", "prompt": prompts[0], "max_tokens": 200, "temperature": 0})
        after = body["choices"][0]["text"]
        direct = subprocess.run([LQD, "generate", "--model", os.path.join(models, "lq"), "--prompt", prompts[0],
                                 "--max-tokens", "200", "--temperature", "0"], capture_output=True, text=True).stdout
        check(status == 200 and after == direct and after != expected[prompts[0]],
              f"after the swap the LQ model answers: {after[:60]!r} vs {direct[:60]!r}")
        status, body = daemon.request("GET", "/v1/models")
        listed = [m for m in body["data"] if m["id"] == "story"]
        check(len(listed) == 1 and listed[0].get("quantization") == "lq", f"listed as the LQ variant: {listed}")
    finally:
        code = daemon.stop(grace=30)
        check(code == 0, f"SIGTERM exit code {code}")

finish("test_hot_swap")
