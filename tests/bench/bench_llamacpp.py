"""Benchmark: lqd against llama.cpp on the CPU, same machine, same GGUF, same thread count.

Sides (issue #7; issue #9 extends it, see TODO below):
  llama.cpp  llama-bench -t T -p 512 -n 128 -r R -o json -m GGUF: pp512 and tg128 tokens/s
             (avg_ts ± stddev_ts over R repetitions), built from the llama.cpp sources that
             PyPI's llama-cpp-python==0.3.36 sdist vendors (vendor/llama.cpp).
  lqd        build/tests/bench_prefill_decode GGUF --threads T: the same work through lqd's
             core API (tests/bench/bench_prefill_decode.c): pp = one 512-token forward from an
             empty KV cache, tg = 128 single-token forwards after a 1-token (BOS) prompt, both
             the mean ± sample stddev of R repetitions after an untimed warm-up, pseudo-random
             token ids, last token's logits only, no sampling; as llama-bench does.
  lqd LQ     the same program on each --lq-model DIR (an `lqd compress` output directory).

Columns: bits/param is the weights as each side holds them for compute, over all parameters
(llama.cpp: llama-bench's model_size * 8 / model_n_params; lqd: the bytes lq_model_summary
counts, embeddings and head included; lqd dequantizes a GGUF's tensors to fp32 on load, so 32).
Peak RSS is each process's ru_maxrss (os.wait4), one process per side measuring both pp and
tg: binary, weights, KV cache and scratch (llama.cpp mmaps the GGUF: its mapped pages count).

Build: the first run downloads the sdist with pip (`pip download --no-binary :all: --no-deps
llama-cpp-python==0.3.36`), unpacks it and builds the targets llama-bench, llama-server and
llama-perplexity from vendor/llama.cpp with cmake (Release, -DGGML_NATIVE=ON unless
--no-native, static, -j --jobs) into --cache (default .bench-cache/, git-ignored); later runs
reuse that build. The llama.cpp commit is the sdist's recorded submodule HEAD
(.git/modules/vendor/llama.cpp/HEAD), passed to cmake as LLAMA_BUILD_COMMIT so llama-bench
reports it (build_number stays 0: the sdist has no history to count).

Threads: llama-bench -t T; lqd LQ_THREADS=T (core/parallel.c's pool; its CPU backend runs
OpenBLAS single-threaded inside each part). T defaults to 2, this project's VM; --threads 1,2
runs every side at each count. On a machine busier than its cores, T = all cores is unfair to
llama.cpp: ggml's threads meet at spinning barriers after every op, so one descheduled thread
stalls the other for a scheduler slice (seen here: tg 0.3 tokens/s at -t 2 with load average 6
on 2 cores, 167 at -t 1), while lqd's pool sleeps on condition variables. Compare T = cores only
on an otherwise idle machine (the load averages are printed); a side that runs past --timeout
seconds is killed and shown as "timed out".

Usage: .venv/bin/python3 tests/bench/bench_llamacpp.py [--model GGUF] [--lq-model DIR]...
           [--threads 2|1,2] [--repetitions 5] [--timeout 900] [--llama-bin DIR]
           [--lqd-bench build/tests/bench_prefill_decode] [--cache DIR] [--jobs 2]
           [--no-native] [--json-out FILE] [--lqd build/server/lqd] [--ppl-text FILE]
           [--ppl-context 512] [--ppl-chunks 20] [--no-ppl]
--model defaults to the SmolLM2-135M-Instruct Q4_1 GGUF that tests/models/fetch_smollm2.sh
fetches. Prints the machine, the commands and one table on stdout (progress on stderr);
--json-out writes the same as JSON. Figures on a shared VM are noisy: compare within a run.

Perplexity (issue #9): quality is part of the comparison, so each model gets a PPL column,
the same text under the same protocol on both sides: llama.cpp's llama-perplexity protocol
(tools/perplexity/perplexity.cpp: the text tokenized once, chunks of CTX tokens each from an
empty KV cache with BOS replacing their first token when the tokenizer adds one, the second
half of each chunk scored; "PPL ± error" is its "Final estimate: PPL = X +/- Y").
  llama.cpp  llama-perplexity -m GGUF -f TEXT -c CTX --chunks K -t T
  lqd        lqd eval --model M --ppl TEXT --documents llama-perplexity --context CTX
             --max-chunks K --json (the GGUF, dequantized to fp32, and each --lq-model)
Both run once per model at the first --threads count. The scored token counts of both sides
are printed under the table and must be equal (K * (CTX - CTX/2 - 1)). The figures differ a
little for a quantized GGUF: llama.cpp multiplies Q4_1 weights with int8-quantized
activations, lqd dequantizes the weights to fp32. --ppl-text (default tests/data/wiki.test.raw,
WikiText-2 test), --ppl-context (512), --ppl-chunks (20), --no-ppl skips the column; --lqd is
the lqd binary (default build/server/lqd).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA_CPP_PYTHON = "0.3.36"
REQUIRED_TARGETS = ("llama-bench", "llama-server")
OPTIONAL_TARGETS = ("llama-perplexity",)
FINAL_ESTIMATE = "Final estimate: PPL = "
PROMPT_TOKENS, GEN_TOKENS = 512, 128


def log(message):
    print(message, file=sys.stderr, flush=True)


def run_checked(args, **kwargs):
    log("+ " + " ".join(args))
    subprocess.run(args, check=True, **kwargs)


class TimedOut(Exception):
    pass


def run_measured(args, env=None, timeout=None):
    """Runs args; returns (stdout, stderr, peak RSS MiB, wall seconds). Raises on failure, and
    TimedOut (after killing it) when it runs past timeout seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # this child's own rusage
            if pid:
                break
            if timeout and time.monotonic() - start > timeout:
                process.kill()
                os.wait4(process.pid, 0)
                process.returncode = -9
                raise TimedOut(f"{' '.join(args)}: killed after {timeout} s")
            time.sleep(0.1)
        wall = time.monotonic() - start
        process.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {code}:\n{stderr[-4000:]}")
    return stdout, stderr, usage.ru_maxrss / 1024.0, wall


# --- llama.cpp: download, build, reuse ---------------------------------------------------------

def build_llama_cpp(cache, jobs, native):
    """Builds (or reuses) llama.cpp from the llama-cpp-python sdist; returns its build record."""
    home = os.path.join(cache, f"llama-cpp-python-{LLAMA_CPP_PYTHON}" + ("" if native else "-generic"))
    record_path = os.path.join(home, "build.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if all(os.path.exists(os.path.join(record["bin"], t)) for t in REQUIRED_TARGETS):
            log(f"reusing llama.cpp build in {record['bin']}")
            return record
    os.makedirs(home, exist_ok=True)
    sdist = os.path.join(home, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not os.path.exists(sdist):
        run_checked([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                     "--no-binary", ":all:", "--no-deps", "-d", home,
                     f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
    src = os.path.join(home, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
    if not os.path.exists(os.path.join(src, "vendor", "llama.cpp", "CMakeLists.txt")):
        log(f"unpacking {sdist}")
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(home, filter="data")
            else:
                tar.extractall(home)
    with open(os.path.join(src, ".git", "modules", "vendor", "llama.cpp", "HEAD")) as f:
        commit = f.read().strip()
    build = os.path.join(home, "build")
    flags = ["-DCMAKE_BUILD_TYPE=Release", f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
             "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_CURL=OFF", f"-DLLAMA_BUILD_COMMIT={commit[:7]}", "-DLLAMA_BUILD_NUMBER=0"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    start = time.monotonic()
    run_checked(["cmake", "-S", os.path.join(src, "vendor", "llama.cpp"), "-B", build]
                + generator + flags, stdout=sys.stderr)
    run_checked(["cmake", "--build", build, "-j", str(jobs), "--target"] + list(REQUIRED_TARGETS),
                stdout=sys.stderr)
    built = list(REQUIRED_TARGETS)
    for target in OPTIONAL_TARGETS:
        try:
            run_checked(["cmake", "--build", build, "-j", str(jobs), "--target", target],
                        stdout=sys.stderr)
            built.append(target)
        except subprocess.CalledProcessError:
            log(f"warning: optional target {target} did not build; going on without it")
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout
    record = {
        "source": f"PyPI llama-cpp-python=={LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp",
        "llama_cpp_commit": commit,
        "cmake_flags": flags,
        "targets": built,
        "compiler": compiler.splitlines()[0] if compiler else "unknown",
        "build_seconds": round(time.monotonic() - start, 1),
        "bin": os.path.join(build, "bin"),
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def llama_cpp_version(bin_dir):
    """llama-bench --version's first line: "version: 0.5.0-dev (build 0, commit 0c1e570)"."""
    done = subprocess.run([os.path.join(bin_dir, "llama-bench"), "--version"],
                          capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# --- the sides -----------------------------------------------------------------------------------

def timed_out_row(side, model, threads, command, error):
    log(f"warning: {error}")
    return {"side": side, "model": model, "threads": threads, "bits_per_param": None,
            "pp": None, "tg": None, "peak_rss_mib": None, "command": command,
            "error": str(error)}


def side_llama_cpp(bin_dir, gguf, threads, repetitions, timeout):
    args = [os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", str(threads),
            "-p", str(PROMPT_TOKENS), "-n", str(GEN_TOKENS), "-r", str(repetitions), "-o", "json"]
    log("running: " + " ".join(args))
    try:
        stdout, _, rss, wall = run_measured(args, timeout=timeout)
    except TimedOut as error:
        return timed_out_row("llama.cpp", os.path.basename(gguf), threads, " ".join(args), error)
    entries = json.loads(stdout)
    pp = [e for e in entries if e["n_prompt"] == PROMPT_TOKENS and e["n_gen"] == 0][0]
    tg = [e for e in entries if e["n_prompt"] == 0 and e["n_gen"] == GEN_TOKENS][0]
    return {
        "side": "llama.cpp",
        "model": f"{os.path.basename(gguf)} ({pp['model_type']}, llama.cpp's own kernels)",
        "threads": threads,
        "bits_per_param": pp["model_size"] * 8.0 / pp["model_n_params"],
        "params": pp["model_n_params"],
        "pp": {"tokens": PROMPT_TOKENS, "avg_ts": pp["avg_ts"], "stddev_ts": pp["stddev_ts"],
               "samples_ts": pp.get("samples_ts")},
        "tg": {"tokens": GEN_TOKENS, "avg_ts": tg["avg_ts"], "stddev_ts": tg["stddev_ts"],
               "samples_ts": tg.get("samples_ts")},
        "peak_rss_mib": rss,
        "wall_seconds": wall,
        "command": " ".join(args),
        "build_commit": pp.get("build_commit"),
        "cpu_info": pp.get("cpu_info"),
        "n_threads": pp.get("n_threads"),
    }


def side_lqd(bench, model, label, threads, repetitions, timeout):
    args = [bench, model, "--threads", str(threads), "--prompt-tokens", str(PROMPT_TOKENS),
            "--gen-tokens", str(GEN_TOKENS), "--repetitions", str(repetitions)]
    env = dict(os.environ, LQ_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    command = f"LQ_THREADS={threads} " + " ".join(args)
    log("running: " + command)
    try:
        stdout, _, rss, wall = run_measured(args, env=env, timeout=timeout)
    except TimedOut as error:
        return timed_out_row("lqd", label, threads, command, error)
    result = json.loads(stdout)
    return {
        "side": "lqd",
        "model": label,
        "threads": threads,
        "bits_per_param": result["bits_per_param"],
        "linear_bits_per_param": result["linear_bits_per_param"],
        "linear_effective_bits": result["linear_effective_bits"],
        "params": result["params"],
        "pp": result["pp"],
        "tg": result["tg"],
        "peak_rss_mib": rss,
        "wall_seconds": wall,
        "load_seconds": result["load_seconds"],
        "command": command,
        "n_threads": result["threads"],
    }


# --- perplexity: llama-perplexity's protocol on both sides -------------------------------------

def ppl_llama_cpp(bin_dir, gguf, text, context, chunks, threads, timeout):
    """llama-perplexity's final estimate; None (with a warning) when it is absent or fails."""
    binary = os.path.join(bin_dir, "llama-perplexity")
    args = [binary, "-m", gguf, "-f", text, "-c", str(context), "--chunks", str(chunks),
            "-t", str(threads)]
    command = " ".join(args)
    if not os.access(binary, os.X_OK):
        log(f"warning: {binary} is not built: no llama.cpp perplexity")
        return {"command": command, "error": "llama-perplexity not built"}
    log("running: " + command)
    try:
        stdout, stderr, _, wall = run_measured(args, timeout=timeout)
    except (TimedOut, RuntimeError) as error:
        log(f"warning: {error}")
        return {"command": command, "error": str(error)}
    return parse_llama_perplexity(stdout + stderr, context) | {"command": command,
                                                                "wall_seconds": wall}


def parse_llama_perplexity(output, context):
    """{"ppl", "ppl_error", "chunks", "tokens"} from llama-perplexity's log: the line
    "Final estimate: PPL = X +/- Y" and "calculating perplexity over N chunks"."""
    result = {"ppl": None, "ppl_error": None, "chunks": None, "tokens": None}
    for line in output.splitlines():
        if FINAL_ESTIMATE in line:
            value, _, error = line.split(FINAL_ESTIMATE, 1)[1].partition("+/-")
            result["ppl"], result["ppl_error"] = float(value), float(error) if error else None
        elif "calculating perplexity over " in line:
            result["chunks"] = int(line.split("calculating perplexity over ", 1)[1].split()[0])
            result["tokens"] = result["chunks"] * (context - context // 2 - 1)
    if result["ppl"] is None:
        raise RuntimeError(f"no '{FINAL_ESTIMATE}' line in llama-perplexity's output:\n"
                           + output[-2000:])
    return result


def ppl_lqd(lqd, model, text, context, chunks, threads, timeout):
    """lqd eval --documents llama-perplexity; None (with a warning) when it fails."""
    args = [lqd, "eval", "--model", model, "--ppl", text, "--documents", "llama-perplexity",
            "--context", str(context), "--max-chunks", str(chunks), "--json"]
    env = dict(os.environ, LQ_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    command = f"LQ_THREADS={threads} " + " ".join(args)
    log("running: " + command)
    try:
        stdout, _, _, wall = run_measured(args, env=env, timeout=timeout)
    except (TimedOut, RuntimeError) as error:
        log(f"warning: {error}")
        return {"command": command, "error": str(error)}
    report = json.loads(stdout)
    return {"ppl": report["ppl"], "ppl_error": report.get("ppl_error"),
            "chunks": report["documents"], "tokens": report["tokens"], "command": command,
            "wall_seconds": wall}


# --- report --------------------------------------------------------------------------------------

def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1048576:.1f} GiB"
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "kernel": platform.release(), "lqd_commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def rate(phase):
    return f"{phase['avg_ts']:,.1f} ± {phase['stddev_ts']:,.1f}" if phase else "timed out"


def perplexity(result):
    if not result:
        return "-"
    if result.get("ppl") is None:
        return "failed"
    error = result.get("ppl_error")
    return f"{result['ppl']:.4f} ± {error:.4f}" if error is not None else f"{result['ppl']:.4f}"


def table(rows, ppl_header=None):
    header = ["side", "model/format", "threads", "bits/param", f"pp{PROMPT_TOKENS} tok/s",
              f"tg{GEN_TOKENS} tok/s", "peak RSS (MiB)"] + ([ppl_header] if ppl_header else [])
    body = [[r["side"], r["model"], str(r["threads"]),
             f"{r['bits_per_param']:.2f}" if r["bits_per_param"] is not None else "-",
             rate(r["pp"]), rate(r["tg"]),
             f"{r['peak_rss_mib']:.1f}" if r["peak_rss_mib"] is not None else "-"]
            + ([perplexity(r.get("ppl"))] if ppl_header else []) for r in rows]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def default_gguf():
    script = os.path.join(ROOT, "tests", "models", "fetch_smollm2.sh")
    env = dict(os.environ, PIP=f"{sys.executable} -m pip")
    return subprocess.run(["sh", script], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file (default: fetch_smollm2.sh's SmolLM2 Q4_1)")
    parser.add_argument("--lq-model", action="append", default=[],
                        help="an lqd compress output directory to benchmark too (repeatable)")
    parser.add_argument("--threads", default="2",
                        help="threads for both sides; a comma list (1,2) runs every side at each")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per side and thread count before it is killed and shown as "
                             "timed out (default 900)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--lqd-bench", default=os.path.join(ROOT, "build", "tests",
                                                            "bench_prefill_decode"))
    parser.add_argument("--llama-bin", help="an existing llama.cpp bin/ directory (skips the build)")
    parser.add_argument("--cache", default=os.path.join(ROOT, ".bench-cache"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-native", action="store_true", help="build with -DGGML_NATIVE=OFF")
    parser.add_argument("--json-out")
    parser.add_argument("--lqd", default=os.path.join(ROOT, "build", "server", "lqd"),
                        help="the lqd binary, for the perplexity column (default build/server/lqd)")
    parser.add_argument("--ppl-text", default=os.path.join(ROOT, "tests", "data", "wiki.test.raw"),
                        help="text for the perplexity column (default tests/data/wiki.test.raw)")
    parser.add_argument("--ppl-context", type=int, default=512,
                        help="n_ctx of llama-perplexity's protocol on both sides (default 512)")
    parser.add_argument("--ppl-chunks", type=int, default=20,
                        help="chunks of --ppl-context tokens scored on both sides (default 20)")
    parser.add_argument("--no-ppl", action="store_true", help="no perplexity column")
    args = parser.parse_args()

    if not os.access(args.lqd_bench, os.X_OK):
        sys.exit(f"{args.lqd_bench}: not built (meson compile -C build; or pass --lqd-bench)")
    if not args.no_ppl and not os.access(args.lqd, os.X_OK):
        sys.exit(f"{args.lqd}: not built (meson compile -C build; or pass --lqd, or --no-ppl)")
    if not args.no_ppl and (args.ppl_context < 3 or args.ppl_chunks < 1):
        sys.exit("--ppl-context must be >= 3 and --ppl-chunks >= 1")
    gguf = os.path.abspath(args.model or default_gguf())
    if args.llama_bin:
        build = {"bin": os.path.abspath(args.llama_bin), "llama_cpp_commit": "unknown (--llama-bin)"}
    else:
        build = build_llama_cpp(os.path.abspath(args.cache), args.jobs, not args.no_native)
    build["version"] = llama_cpp_version(build["bin"])
    machine = machine_info()
    machine["load_average_before"] = os.getloadavg()

    thread_counts = [int(t) for t in args.threads.split(",")]
    lq_models = [os.path.abspath(directory) for directory in args.lq_model]
    # perplexity once per model (it does not depend on the thread count), at the first count
    ppl = {}
    if not args.no_ppl:
        ppl_text = os.path.abspath(args.ppl_text)
        measure = (ppl_text, args.ppl_context, args.ppl_chunks, thread_counts[0], args.timeout)
        ppl[("llama.cpp", gguf)] = ppl_llama_cpp(build["bin"], gguf, *measure)
        for model in [gguf] + lq_models:
            ppl[("lqd", model)] = ppl_lqd(args.lqd, model, *measure)
    rows = []
    for threads in thread_counts:
        rows.append(side_llama_cpp(build["bin"], gguf, threads, args.repetitions, args.timeout))
        rows[-1]["ppl"] = ppl.get(("llama.cpp", gguf))
        rows.append(side_lqd(args.lqd_bench, gguf, f"{os.path.basename(gguf)} → fp32 in memory",
                             threads, args.repetitions, args.timeout))
        rows[-1]["ppl"] = ppl.get(("lqd", gguf))
        gguf_params = rows[-1].get("params")
        for directory in lq_models:
            row = side_lqd(args.lqd_bench, directory, f"LQ {os.path.basename(directory.rstrip('/'))}",
                           threads, args.repetitions, args.timeout)
            if row.get("pp"):
                row["model"] += (f" (linears NF {row['linear_bits_per_param']:.2f} bits, "
                                 f"{row['linear_effective_bits']:.2f} with L1 L2)")
                if gguf_params and row["params"] != gguf_params:
                    log(f"warning: {directory} has {row['params']} parameters, the GGUF "
                        f"{gguf_params}: not the same model")
                    row["model"] += " [NOT the GGUF's model]"
            row["ppl"] = ppl.get(("lqd", directory))
            rows.append(row)
    machine["load_average_after"] = os.getloadavg()

    load = machine["load_average_before"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
          f"Linux {machine['kernel']}; load average before {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}, after {machine['load_average_after'][0]:.2f} (shared VM: noisy)")
    print(f"date: {machine['date']}; lqd {machine['lqd_commit']}; llama.cpp "
          f"{build['llama_cpp_commit']}, llama-bench {build['version']} "
          f"(llama-cpp-python {LLAMA_CPP_PYTHON} sdist; {' '.join(build.get('cmake_flags', []))})")
    print(f"model: {gguf}; threads {args.threads} on both sides; {args.repetitions} "
          f"repetitions; tok/s = mean ± sample stddev")
    print("commands:")
    for r in rows:
        print("  " + r["command"])
    for result in ppl.values():
        print("  " + result["command"])
    print()
    ppl_header = None
    if ppl:
        ppl_header = f"PPL ctx {args.ppl_context} × {args.ppl_chunks} chunks"
    print(table(rows, ppl_header))
    if ppl:
        print()
        print(f"perplexity: {os.path.relpath(ppl_text, ROOT)}, llama-perplexity's protocol "
              f"(-c {args.ppl_context} --chunks {args.ppl_chunks}), PPL ± its error estimate; "
              "scored tokens: " + ", ".join(
                  f"{side} {os.path.basename(model.rstrip('/'))} {result.get('tokens')}"
                  for (side, model), result in ppl.items()))
        counts = {result.get("tokens") for result in ppl.values() if result.get("ppl") is not None}
        if len(counts) > 1:
            print("WARNING: the sides scored different token counts: not the same protocol")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "llama_cpp_build": build, "model": gguf,
                       "threads": thread_counts, "repetitions": args.repetitions,
                       "perplexity": None if args.no_ppl else {
                           "text": ppl_text, "context": args.ppl_context,
                           "chunks": args.ppl_chunks, "protocol": "llama-perplexity"},
                       "results": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
