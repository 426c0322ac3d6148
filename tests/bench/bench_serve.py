"""Load generator for `lqd serve`: streaming completions from 1, 8 and 32 concurrent clients
(Python threads, raw http.client), reporting requests/s, generated tokens/s and the time to
first token (p50, p99). Starts its own daemon on a free 127.0.0.1 port unless --url is given.

  python3 tests/bench/bench_serve.py [--lqd build/server/lqd] [--model PATH] [--max-tokens 128]
                                     [--requests 4] [--clients 1,8,32] [--url http://127.0.0.1:8080]

--requests is per client; the token counts come from each stream's usage chunk."""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


def stream_once(host, port, headers, body):
    """One streaming request: (seconds to first text, total seconds, completion tokens)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and chunk["choices"] and chunk["choices"][0].get("text"):
            first = time.perf_counter() - start
    connection.close()
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


def run_level(host, port, headers, model, clients, requests, max_tokens):
    results, errors = [], []
    lock = threading.Lock()

    def client(index):
        for r in range(requests):
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": index * 1000 + r, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                outcome = stream_once(host, port, headers, body)
                with lock:
                    results.append(outcome)
            except Exception as error:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(error))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "seconds": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "latency_p50_ms": 1e3 * percentile([r[1] for r in results], 50), "first_error": errors[:1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lqd", default=os.environ.get("LQD", os.path.join(ROOT, "build/server/lqd")))
    parser.add_argument("--model", help="--model for the daemon (default: the bundled stories260K)")
    parser.add_argument("--url", help="use a running daemon instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("LQD_API_KEY"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-running", default="32")
    args = parser.parse_args()

    process = None
    if args.url:
        url = urllib.parse.urlparse(args.url)
        host, port = url.hostname, url.port or 80
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        host = "127.0.0.1"
        command = [args.lqd, "serve", "--host", host, "--port", str(port), "--state-dir",
                   tempfile.mkdtemp(prefix="lqd-bench-"), "--max-running", args.max_running,
                   "--max-queued", "256", "--log-level", "warn"]
        if args.model:
            command += ["--model", args.model]
        process = subprocess.Popen(command, cwd=ROOT)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection(host, port, timeout=5)
                connection.request("GET", "/v1/models", headers=headers)
                response = connection.getresponse()
                listing = json.loads(response.read())
                if response.status == 200 and listing["data"]:
                    model = listing["data"][0]["id"]
                    break
            except (OSError, ValueError):
                pass
            if time.time() > deadline or (process and process.poll() is not None):
                sys.exit("the daemon did not become ready")
            time.sleep(0.1)
        stream_once(host, port, headers, {"model": model, "prompt": "", "max_tokens": 8, "stream": True})  # warm
        print(f"model {model}, {args.max_tokens} tokens per request, {args.requests} requests per client, "
              f"streaming, temperature 0.8")
        print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} {'tokens/s':>9} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'latency p50':>11}")
        for clients in [int(c) for c in args.clients.split(",")]:
            r = run_level(host, port, headers, model, clients, args.requests, args.max_tokens)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>8.1f} "
                  f"{r['tokens_per_s']:>9.0f} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
                  f"{r['latency_p50_ms']:>9.1f}ms", flush=True)
            if r["first_error"]:
                print("   first error:", r["first_error"][0])
    finally:
        if process:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


if __name__ == "__main__":
    main()
