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
           [--no-native] [--json-out FILE]
--model defaults to the SmolLM2-135M-Instruct Q4_1 GGUF that tests/models/fetch_smollm2.sh
fetches. Prints the machine, the commands and one table on stdout (progress on stderr);
--json-out writes the same as JSON. Figures on a shared VM are noisy: compare within a run.

TODO (issue #9): perplexity of both sides on the same text under the same protocol. Not done
here because the protocols differ: llama-perplexity scores only the second half of each n_ctx
window (its own protocol), while `lqd eval --documents stream --context N` scores every
position of consecutive windows (HF's protocol, no stride). The fair route is either an lqd
eval option that scores the second half of each window as llama-perplexity does, or llama.cpp
logits (llama-perplexity --kl-divergence-base dumps them, or llama-cpp-python) scored with
lqd's protocol. The build already has llama-perplexity; a Side would add a `ppl` field.
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


def table(rows):
    header = ["side", "model/format", "threads", "bits/param", f"pp{PROMPT_TOKENS} tok/s",
              f"tg{GEN_TOKENS} tok/s", "peak RSS (MiB)"]
    body = [[r["side"], r["model"], str(r["threads"]),
             f"{r['bits_per_param']:.2f}" if r["bits_per_param"] is not None else "-",
             rate(r["pp"]), rate(r["tg"]),
             f"{r['peak_rss_mib']:.1f}" if r["peak_rss_mib"] is not None else "-"] for r in rows]
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
    args = parser.parse_args()

    if not os.access(args.lqd_bench, os.X_OK):
        sys.exit(f"{args.lqd_bench}: not built (meson compile -C build; or pass --lqd-bench)")
    gguf = os.path.abspath(args.model or default_gguf())
    if args.llama_bin:
        build = {"bin": os.path.abspath(args.llama_bin), "llama_cpp_commit": "unknown (--llama-bin)"}
    else:
        build = build_llama_cpp(os.path.abspath(args.cache), args.jobs, not args.no_native)
    build["version"] = llama_cpp_version(build["bin"])
    machine = machine_info()
    machine["load_average_before"] = os.getloadavg()

    thread_counts = [int(t) for t in args.threads.split(",")]
    rows = []
    for threads in thread_counts:
        rows.append(side_llama_cpp(build["bin"], gguf, threads, args.repetitions, args.timeout))
        rows.append(side_lqd(args.lqd_bench, gguf, f"{os.path.basename(gguf)} → fp32 in memory",
                             threads, args.repetitions, args.timeout))
        gguf_params = rows[-1].get("params")
        for directory in args.lq_model:
            directory = os.path.abspath(directory)
            row = side_lqd(args.lqd_bench, directory, f"LQ {os.path.basename(directory.rstrip('/'))}",
                           threads, args.repetitions, args.timeout)
            if row.get("pp"):
                row["model"] += (f" (linears NF {row['linear_bits_per_param']:.2f} bits, "
                                 f"{row['linear_effective_bits']:.2f} with L1 L2)")
                if gguf_params and row["params"] != gguf_params:
                    log(f"warning: {directory} has {row['params']} parameters, the GGUF "
                        f"{gguf_params}: not the same model")
                    row["model"] += " [NOT the GGUF's model]"
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
    print()
    print(table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "llama_cpp_build": build, "model": gguf,
                       "threads": thread_counts, "repetitions": args.repetitions,
                       "results": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
