"""Benchmark: `lqd serve` against llama.cpp's `llama-server` under the same load, same machine.

Sides (issue #9, serving and memory targets), one after the other, each a fresh server process:
  llama.cpp  llama-server -m GGUF --parallel P -t T -tb T -c CTX --no-cache-prompt --cache-ram 0
             --no-webui: P slots of CTX/P positions each, continuous batching (its default).
             The prompt cache is off because lqd has none: with it on, llama.cpp would skip the
             prefill of the repeated prompts (--llama-cache-prompt turns it back on).
  lqd        LQ_THREADS=T OPENBLAS_NUM_THREADS=1 lqd serve --model GGUF --max-running P
             --context CTX/P --max-queued 4*clients: the same GGUF, dequantized to fp32 on load.
  lqd LQ     the same daemon on each --lq-model DIR (an `lqd compress` output directory).
CTX defaults to 4096, so 512 positions per sequence on both sides: room for the longest prompt
(47 tokens) plus --max-tokens. Both sides tokenize the prompts alike (usage.prompt_tokens, mean
in the JSON).

Load: --requests streaming POST /v1/completions requests (temperature 0, stream_options
include_usage), drawn from one shared counter by --clients threads (raw http.client, a new
connection per request), each prompt one of PROMPTS in turn, the same text on both sides. Every
body carries "ignore_eos": true so llama.cpp generates exactly --max-tokens; lqd has no such
field (nor min_tokens) and ignores it, so a request may stop early at EOS there: the generated
tokens are counted from each stream's usage chunk on both sides, and the table shows the mean
per request. One untimed warm-up request runs before the load.

Columns: tokens/s = all generated tokens / wall time of the whole load (first request sent to
last stream closed); req/s likewise; TTFT = request sent to the first chunk with text (p50,
p99 over the successful requests); failed = HTTP errors, connection errors, an error event in
the stream, or a stream without finish_reason or usage. Memory from /proc/PID/status of the
server process: idle RSS once it answers ready (lqd: GET /ready 200, llama-server: GET /health
200) before the warm-up, RSS right after the load and 2 s later (idle again), and peak = VmHWM
at the end (which includes loading: lqd's peak can come from loading, not from serving, when idle RSS < peak and RSS after
the load < peak; the JSON has VmHWM at idle too). llama.cpp mmaps
the GGUF, so its weights count as file-backed RSS (RssFile, in the JSON); lqd's fp32 copy is
anonymous memory. A server that exits during the load is reported with its exit status and the
tail of its log. CPU seconds during the load come from /proc: the server's utime + stime, the
load generator's own rusage, and the rest of the machine's busy time (/proc/stat) as "other
processes": a large figure there means another tenant competed for the cores.

Threads: T defaults to 2 (this project's VM). As with bench_llamacpp.py, compare T = all cores
only on an otherwise idle machine: ggml's threads spin at barriers, and on a busy machine one
descheduled thread stalls the others. The load average before each side is printed; the load
generator itself (Python threads) shares the machine with the server under test.

Usage: .venv/bin/python3 tests/bench/bench_serve_llamacpp.py [--model GGUF] [--lq-model DIR]...
           [--lqd build/server/lqd] [--llama-bin DIR] [--clients 16] [--requests 96]
           [--max-tokens 32] [--threads 2] [--parallel 8] [--ctx 4096] [--timeout 900]
           [--json-out FILE] [--no-llama] [--no-lqd-gguf]
--llama-bin defaults to the llama.cpp build that bench_llamacpp.py makes in .bench-cache/.
Prints the machine, the commands and one table on stdout (progress on stderr).
"""
import argparse
import http.client
import json
import os
import resource
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llamacpp import LLAMA_CPP_PYTHON, ROOT, default_gguf, log, machine_info  # noqa: E402
from bench_serve import percentile  # noqa: E402

HOST = "127.0.0.1"
# Openings of 24 to 47 tokens (SmolLM2's tokenizer), sent as plain completions (no chat
# template) so that both sides see the same token ids. Chosen so that neither the GGUF nor
# lq-3.0-r16 reaches EOS within 32 tokens at temperature 0 (lqd cannot ignore EOS; a question
# ending in "Answer:" made the GGUF stop at once).
PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined several existing technologies into a single machine that "
    "could",
    "Why is the sky blue? The short answer is that sunlight, which looks white to us, is really "
    "a mixture of every colour, and when it passes through the air",
    "In the following report we describe the results of our experiments with three different "
    "fertilizers on tomato plants grown in greenhouses over two summers. The first fertilizer, "
    "a mixture of compost and bone meal, produced plants that were noticeably taller, while "
    "the second",
]


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_status(pid):
    """VmRSS, VmHWM, RssAnon, RssFile of pid in MiB (None where unreadable: the process died)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return fields


def process_cpu_seconds(pid):
    """utime + stime of pid (all its threads), seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu_seconds():
    """(busy, all) CPU seconds of the whole machine since boot, from /proc/stat's cpu line."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / tick, sum(ticks[:8]) / tick


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds spent during a span by the server, by this load generator, and by everything
    else on the machine (the other tenants of a shared VM: the figure that says how noisy it was)."""

    def __init__(self, pid):
        self.pid = pid
        self.server, self.own, (self.busy, self.total) = (process_cpu_seconds(pid), own_cpu_seconds(),
                                                          machine_cpu_seconds())

    def stop(self):
        server, own, (busy, total) = process_cpu_seconds(self.pid), own_cpu_seconds(), machine_cpu_seconds()
        result = {"available": total - self.total, "busy": busy - self.busy, "load_generator": own - self.own}
        result["server"] = server - self.server if server is not None and self.server is not None else None
        result["others"] = max(0.0, result["busy"] - result["load_generator"] - (result["server"] or 0))
        return result


# --- one server ----------------------------------------------------------------------------------

class Server:
    """A server process in its own session (Ctrl-C reaches only us; we stop it), logging to a file."""

    def __init__(self, args, env, ready_path):
        self.args, self.ready_path = args, ready_path
        self.log_file = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT, start_new_session=True)

    def wait_ready(self, port, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with status {self.process.returncode} before it was "
                                   f"ready:\n{self.log_tail()}")
            try:
                connection = http.client.HTTPConnection(HOST, port, timeout=5)
                connection.request("GET", self.ready_path)
                response = connection.getresponse()
                response.read()
                connection.close()
                if response.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines=20):
        try:
            with open(self.log_file.name, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, then SIGKILL after 15 s; returns the exit status (None if it was still running
        when we stopped it, which is the normal case)."""
        status = self.process.poll()
        if status is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return status

    def cleanup(self):
        try:
            os.unlink(self.log_file.name)
        except OSError:
            pass


RUNNING = []  # servers to stop on any exit


def stop_all():
    while RUNNING:
        RUNNING.pop().stop()


# --- the load ------------------------------------------------------------------------------------

def stream_request(port, body, timeout):
    """One streaming completion: dict with ttft, seconds, completion_tokens, prompt_tokens, or an
    'error' string."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:300]!r}"}
        first, usage, finish = None, None, None
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": f"error event in the stream: {json.dumps(chunk['error'])[:300]}"}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if first is None and choice.get("text"):
                    first = time.perf_counter() - start
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        if finish is None or usage is None:
            return {"error": f"stream ended without {'finish_reason' if finish is None else 'usage'}"}
        return {"ttft": first, "seconds": time.perf_counter() - start, "finish": finish,
                "completion_tokens": usage["completion_tokens"],
                "prompt_tokens": usage["prompt_tokens"]}
    except (OSError, ValueError, http.client.HTTPException) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        connection.close()


def run_load(port, model, clients, requests, max_tokens, timeout):
    results, counter, lock = [], [0], threading.Lock()

    def client():
        while True:
            with lock:
                index = counter[0]
                if index >= requests:
                    return
                counter[0] += 1
            body = {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True}
            outcome = stream_request(port, body, timeout)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["completion_tokens"] for r in good)
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    return {
        "seconds": wall, "requests_ok": len(good), "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall, "requests_per_s": len(good) / wall,
        "tokens_per_request": tokens / len(good) if good else None,
        "short_requests": sum(1 for r in good if r["completion_tokens"] < max_tokens),
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in good) / len(good) if good else None,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "latency_p50_ms": 1e3 * percentile([r["seconds"] for r in good], 50),
    }


def run_side(label, side, args, env, ready_path, model_name, opts):
    """Starts one server, measures idle memory, warms it up, runs the load, measures again."""
    load_before = os.getloadavg()
    command = " ".join(args)
    if env is not os.environ:
        command = f"LQ_THREADS={env['LQ_THREADS']} OPENBLAS_NUM_THREADS=1 " + command
    log(f"running {label}: {command}")
    row = {"side": side, "model": label, "command": command, "load_average_before": load_before}
    server = Server(args, env, ready_path)
    RUNNING.append(server)
    port = int(args[args.index("--port") + 1])
    try:
        started = time.monotonic()
        server.wait_ready(port, opts.timeout)
        row["ready_seconds"] = time.monotonic() - started
        time.sleep(1.0)
        row["idle"] = proc_status(server.process.pid)
        warm = stream_request(port, {"model": model_name, "prompt": PROMPTS[0], "max_tokens": 4,
                                     "temperature": 0, "stream": True,
                                     "stream_options": {"include_usage": True}}, opts.timeout)
        if "error" in warm:
            raise RuntimeError(f"warm-up request failed: {warm['error']}\n{server.log_tail()}")
        meter = CpuMeter(server.process.pid)
        row.update(run_load(port, model_name, opts.clients, opts.requests, opts.max_tokens,
                            opts.timeout))
        row["cpu_seconds"] = meter.stop()
        row["after_load"] = proc_status(server.process.pid)
        time.sleep(2)  # the server idle again: what it keeps (lqd trims malloc's free lists)
        row["settled"] = proc_status(server.process.pid)
        status = server.process.poll()
        if status is not None:
            row["crash"] = f"exited with status {status} during the load:\n{server.log_tail()}"
    except RuntimeError as error:
        row["crash"] = str(error)
    finally:
        status = server.stop()  # still in RUNNING: if a second signal cuts this short, stop_all() ends it
        RUNNING.remove(server)
        if row.get("crash") is None and status is not None:
            row["crash"] = f"exited with status {status}:\n{server.log_tail()}"
        if row.get("crash"):
            log(f"warning: {label}: {row['crash']}")
        server.cleanup()
    return row


# --- report --------------------------------------------------------------------------------------

def fmt(value, spec):
    return "-" if value is None or value != value else format(value, spec)


def table(rows, max_tokens):
    header = ["side", "model/format", "tokens/s", "req/s", "tokens/req", "TTFT p50 (ms)",
              "TTFT p99 (ms)", "failed", "idle RSS (MiB)", "RSS after (MiB)",
              "RSS 2 s later (MiB)", "peak RSS (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        idle, after, settled = r.get("idle", {}), r.get("after_load", {}), r.get("settled", {})
        failed = str(r["failed"]) if "failed" in r else "-"
        if r.get("crash"):
            failed += " (server died)" if "exited" in r["crash"] else " (error)"
        tokens_per_request = fmt(r.get("tokens_per_request"), ".1f")
        if r.get("short_requests"):
            tokens_per_request += f" ({r['short_requests']} < {max_tokens})"
        lines.append("| " + " | ".join([
            r["side"], r["model"], fmt(r.get("tokens_per_s"), ".1f"), fmt(r.get("requests_per_s"), ".2f"),
            tokens_per_request, fmt(r.get("ttft_p50_ms"), ".0f"), fmt(r.get("ttft_p99_ms"), ".0f"),
            failed, fmt(idle.get("VmRSS"), ".0f"), fmt(after.get("VmRSS"), ".0f"),
            fmt(settled.get("VmRSS"), ".0f"), fmt(after.get("VmHWM"), ".0f")]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: fetch_smollm2.sh's SmolLM2 Q4_1)")
    parser.add_argument("--lq-model", action="append", default=[],
                        help="an lqd compress output directory to serve too (repeatable)")
    parser.add_argument("--lqd", default=os.path.join(ROOT, "build", "server", "lqd"))
    parser.add_argument("--llama-bin", default=os.path.join(
        ROOT, ".bench-cache", f"llama-cpp-python-{LLAMA_CPP_PYTHON}", "build", "bin"),
        help="llama.cpp bin/ directory holding llama-server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8,
                        help="llama-server --parallel and lqd --max-running")
    parser.add_argument("--ctx", type=int, default=4096,
                        help="llama-server -c (all slots); lqd --context gets ctx/parallel")
    parser.add_argument("--llama-cache-prompt", action="store_true",
                        help="leave llama-server's prompt cache on (lqd has none)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds for a server to become ready, and per request")
    parser.add_argument("--json-out")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama-server side")
    parser.add_argument("--no-lqd-gguf", action="store_true",
                        help="skip lqd serving the GGUF itself (fp32)")
    args = parser.parse_args()

    llama_server = os.path.join(os.path.abspath(args.llama_bin), "llama-server")
    for path in (llama_server, args.lqd):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path}: not built (see bench_llamacpp.py for llama.cpp, meson compile for "
                     f"lqd; or pass --llama-bin / --lqd)")
    gguf = os.path.abspath(args.model or default_gguf())
    machine = machine_info()
    per_sequence = args.ctx // args.parallel

    # SIGTERM/SIGHUP end us like Ctrl-C does, so the finally below stops the servers.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    rows = []
    try:
        port = free_port()
        llama_args = [llama_server, "-m", gguf, "--parallel", str(args.parallel),
                      "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.ctx),
                      "--host", HOST, "--port", str(port), "--no-webui", "--cache-ram", "0"]
        if not args.llama_cache_prompt:
            llama_args.append("--no-cache-prompt")
        if not args.no_llama:
            rows.append(run_side(f"{os.path.basename(gguf)} (llama.cpp's own kernels)",
                                 "llama.cpp", llama_args, os.environ, "/health", "model", args))

        lqd_env = dict(os.environ, LQ_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1")
        models = [] if args.no_lqd_gguf else [(gguf, f"{os.path.basename(gguf)} → fp32 in memory")]
        models += [(os.path.abspath(d), f"LQ {os.path.basename(os.path.abspath(d))}")
                   for d in args.lq_model]
        for path, label in models:
            port = free_port()
            state = tempfile.mkdtemp(prefix="lqd-bench-serve-")
            lqd_args = [os.path.abspath(args.lqd), "serve", "--model", f"bench={path}",
                        "--host", HOST, "--port", str(port), "--state-dir", state,
                        "--max-running", str(args.parallel), "--context", str(per_sequence),
                        "--max-queued", str(4 * args.clients), "--log-level", "warn"]
            try:
                rows.append(run_side(label, "lqd", lqd_args, lqd_env, "/ready", "bench", args))
            finally:
                shutil.rmtree(state, ignore_errors=True)
    except KeyboardInterrupt as error:
        stop_all()
        sys.exit(f"interrupted ({str(error) or 'Ctrl-C'}); servers stopped")
    finally:
        stop_all()
    machine["load_average_after"] = os.getloadavg()

    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
          f"Linux {machine['kernel']} (shared VM: noisy); date {machine['date']}; "
          f"lqd {machine['lqd_commit']}; llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}")
    print(f"model: {gguf}; {args.threads} threads, {args.parallel} sequences at once "
          f"({per_sequence} positions each), {args.clients} streaming clients, {args.requests} "
          f"requests of max_tokens {args.max_tokens}, temperature 0, {len(PROMPTS)} prompts in turn, "
          f"llama.cpp prompt cache {'on' if args.llama_cache_prompt else 'off'}")
    print("load average (1/5/15 min) before each side: " + "; ".join(
        f"{r['side']} {r['model'].split()[0]} {' '.join(f'{x:.2f}' for x in r['load_average_before'])}"
        for r in rows) + f"; after {machine['load_average_after'][0]:.2f}")
    print("CPU seconds during each load (server / load generator / other processes / of the "
          "machine's total): " + "; ".join(
              f"{r['side']} {r['model'].split()[0]} {fmt(c['server'], '.1f')} / "
              f"{c['load_generator']:.1f} / {c['others']:.1f} / {c['available']:.1f}"
              for r in rows if (c := r.get("cpu_seconds"))))
    print("commands:")
    for r in rows:
        print("  " + r["command"])
    print()
    print(table(rows, args.max_tokens))
    for r in rows:
        if r.get("errors"):
            print(f"\n{r['side']} {r['model']}: {r['failed']} failed; distinct errors:")
            for error in r["errors"]:
                print("  " + error)
        if r.get("crash"):
            print(f"\n{r['side']} {r['model']}: {r['crash']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "model": gguf, "threads": args.threads,
                       "parallel": args.parallel, "ctx": args.ctx, "clients": args.clients,
                       "requests": args.requests, "max_tokens": args.max_tokens,
                       "prompts": PROMPTS, "results": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
