"""End to end on the GPU, through the lqd binary: the CUDA backend must give what the CPU gives.

- greedy generation of stories260K (fp32, HF directory) equals the CPU's text;
- perplexities of stories260K and of the shipped LQ model within 0.5% of the CPU's;
- a compress run with --device cuda (error table and final decompositions on the GPU) writes a
  model whose perplexity is close to the CPU-compressed one's;
- `lqd serve --device cuda` answers a streaming completion with the CPU's greedy text.
Skips (exit 77) where no GPU is usable: lqd then says it falls back to the CPU.
"""
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from serve_util import LQD, ROOT, SKIP, STARTED, check, finish, free_port  # noqa: E402

HF = os.path.join(ROOT, "models/stories260K-hf")
LQ = os.path.join(ROOT, "models/stories260K-lq")
TOKENIZER = os.path.join(ROOT, "models/stories260K/tok512.bin")
DEVICE = os.environ.get("LQ_E2E_DEVICE", "cuda")  # "cpu" only to try this script without a GPU
TEXT = os.environ.get("LQ_PPL_TEXT", os.path.join(ROOT, "tests", "data", "tinystories_val_subset.txt"))


def lqd(*args, timeout=900, env=None):
    return subprocess.run([LQD, *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


# The training ops' products with frozen weights: bf16 tensor cores by default, SGEMMs with
# LQ_CUDA_TRAIN_MATH=fp32, TF32 with =tf32. Each GPU run below is compared with the CPU's, the
# SGEMM run at fp32 rounding's bound, the others at bounds their mantissas (10 and 7 bits)
# leave room for.
TRAIN_MATH = (("fp32", {"LQ_CUDA_TRAIN_MATH": "fp32"}), ("tf32", {"LQ_CUDA_TRAIN_MATH": "tf32"}),
              ("bf16", {}))


def generate(device, prompt):
    r = lqd("generate", "--model", HF, "--tokenizer", TOKENIZER, "--temperature", "0",
            "--max-tokens", "200", "--prompt", prompt, "--device", device)
    check(r.returncode == 0, f"generate on {device}: {r.stderr}")
    return r.stdout, r.stderr


def ppl(device, model, max_tokens="40000"):
    r = lqd("eval", "--model", model, "--tokenizer", TOKENIZER, "--ppl", TEXT, "--max-tokens",
            max_tokens, "--json", "--device", device)
    check(r.returncode == 0, f"eval {model} on {device}: {r.stderr}")
    return json.loads(r.stdout)["ppl"] if r.returncode == 0 else float("nan")


def main():
    probe = lqd("generate", "--model", HF, "--tokenizer", TOKENIZER, "--max-tokens", "1",
                "--device", "cuda")
    if "falling back to the CPU" in probe.stderr or probe.returncode != 0:
        print("no usable GPU:", probe.stderr.strip(), "- skipped")
        sys.exit(SKIP)
    print(probe.stderr.strip())

    for prompt in ["", "Once upon a time", "The little dog"]:
        cpu_text, _ = generate("cpu", prompt)
        gpu_text, _ = generate("cuda", prompt)
        check(gpu_text == cpu_text and len(cpu_text) > 100,
              f"greedy text differs for prompt {prompt!r}:\nCPU {cpu_text!r}\nGPU {gpu_text!r}")

    for model in (HF, LQ):
        p_cpu, p_gpu = ppl("cpu", model), ppl("cuda", model)
        print(f"ppl {os.path.basename(model)}: cpu {p_cpu:.4f} cuda {p_gpu:.4f}")
        check(abs(p_gpu - p_cpu) <= 0.005 * p_cpu, f"{model}: ppl cuda {p_gpu} vs cpu {p_cpu}")

    with tempfile.TemporaryDirectory() as tmp:
        # LoRA finetuning on the GPU (the CUDA training ops) against the CPU: same data, same
        # steps; the losses agree to rounding
        train = os.path.join(tmp, "train.txt")
        with open(TEXT) as f:
            lines = [line for line in f if line.strip()][:300]
        with open(train, "w") as f:
            f.writelines(lines)
        losses = {}
        runs = [("cpu", "cpu", {})] + [("cuda", "cuda " + name, env) for name, env in TRAIN_MATH]
        for device, label, env in runs:
            started = time.time()
            r = lqd("finetune", "--model", LQ, "--tokenizer", TOKENIZER, "--train", train, "--out",
                    os.path.join(tmp, "adapter-" + label.replace(" ", "-")), "--steps", "20",
                    "--batch-size", "8", "--seq-len", "128", "--learning-rate", "3e-3", "--json",
                    "--device", device, env=env)
            check(r.returncode == 0, f"finetune on {label}: {r.stderr}")
            events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            steps = [e for e in events if e.get("train_loss") is not None]
            losses[label] = [e["train_loss"] for e in steps]
            print(f"finetune on {label}: {time.time() - started:.1f} s, train loss "
                  f"{losses[label][0] if steps else None} -> {losses[label][-1] if steps else None}; "
                  f"{r.stderr.strip().splitlines()[:1]}")
            if device == "cuda":
                check("running on cuda" in r.stderr and "no training ops" not in r.stderr,
                      f"lqd finetune --device cuda ({label}) trains on the GPU")
        for label, bound in (("cuda fp32", 1e-4), ("cuda tf32", 2e-3), ("cuda bf16", 1e-2)):
            worst = max((abs(a - b) / abs(a) for a, b in zip(losses["cpu"], losses[label])),
                        default=float("inf"))
            print(f"train losses, {label} vs cpu: worst relative difference {worst:.2e}")
            check(losses["cpu"] and len(losses["cpu"]) == len(losses[label]) and worst <= bound,
                  f"train losses agree: cpu {losses['cpu']} {label} {losses[label]}")

        grid = "2,8,fp32,64,256;3,8,fp32,64,256;4,8,fp32,64,256;3,4,bf16,32,64"
        # the Fisher estimate on the GPU (the training ops) equals the CPU's to rounding
        fisher = {}
        # the HF model's layers are dense: bf16 runs them on TF32, as the tf32 run does
        runs = [run for run in runs if run[1] != "cuda bf16"]
        for device, label, env in runs:
            path = os.path.join(tmp, f"fisher-{label.replace(' ', '-')}.safetensors")
            r = lqd("compress", "--model", HF, "--bits", "3", "--rank", "8", "--configs", grid,
                    "--out", os.path.join(tmp, f"fisher-model-{label.replace(' ', '-')}"),
                    "--no-cache", "--fisher", train, "--fisher-samples", "32",
                    "--fisher-seq-len", "128", "--fisher-save", path, "--device", device, env=env)
            check(r.returncode == 0, f"compress --fisher on {label}: {r.stderr}")
            check(device == "cpu" or "on cuda" in r.stderr, f"Fisher estimated on the GPU: {r.stderr}")
            try:
                from safetensors.numpy import load_file
                fisher[label] = load_file(path)
            except ImportError:
                print("safetensors is not installed: the Fisher files are not compared")
        if len(fisher) == len(runs):
            import numpy as np
            for label, bound in (("cuda fp32", 1e-3), ("cuda tf32", 1e-2)):
                worst = max(float(np.linalg.norm(fisher[label][k] - v) / max(np.linalg.norm(v), 1e-30))
                            for k, v in fisher["cpu"].items())
                print(f"Fisher: worst relative difference {label} vs CPU over {len(fisher['cpu'])} "
                      f"matrices: {worst:.2e}")
                check(fisher["cpu"].keys() == fisher[label].keys() and worst <= bound,
                      f"Fisher on the GPU ({label}) equals the CPU's: worst relative difference {worst}")
        outputs = {}
        for device in ("cpu", "cuda"):
            out = os.path.join(tmp, device)
            started = time.time()
            r = lqd("compress", "--model", HF, "--bits", "3", "--rank", "8", "--configs", grid,
                    "--out", out, "--no-cache", "--quiet", "--json", "--device", device)
            check(r.returncode == 0, f"compress on {device}: {r.stderr}")
            print(f"compress on {device}: {time.time() - started:.1f} s")
            outputs[device] = out
        p_cpu, p_gpu = ppl("cpu", outputs["cpu"]), ppl("cpu", outputs["cuda"])
        print(f"ppl of the compressed model: CPU-compressed {p_cpu:.4f}, GPU-compressed {p_gpu:.4f}")
        check(abs(p_gpu - p_cpu) <= 0.03 * p_cpu, f"GPU-compressed ppl {p_gpu} vs {p_cpu}")

        port = free_port()
        daemon = subprocess.Popen([LQD, "serve", "--model", f"s={HF}", "--model", f"lq={LQ}",
                                   "--tokenizer", TOKENIZER, "--port", str(port), "--device", "cuda",
                                   "--state-dir", os.path.join(tmp, "state")],
                                  stdout=open(os.path.join(tmp, "daemon.log"), "w"),
                                  stderr=subprocess.STDOUT, text=True)
        STARTED.append(daemon)
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        expected, _ = generate("cpu", "Once upon a time")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "s", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                "stream": True}
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = c.getresponse()
        text = ""
        for line in response.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0].get("text", "")
        check(response.status == 200 and text == expected,
              f"served text on cuda differs:\n{text!r}\n{expected!r}")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        metrics = c.getresponse().read().decode()
        check('lqd_device_memory_bytes{device="cuda",purpose="weights"}' in metrics,
              "metrics name the GPU's memory")

        # a compress job and a finetune job of the daemon, both on its GPU
        def call(method, path, payload=None, headers=None):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            if isinstance(payload, dict):
                payload = json.dumps(payload)
                headers = {"Content-Type": "application/json"}
            c.request(method, path, payload, headers or {})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")

        def wait(job_id):
            for _ in range(1200):
                status, job = call("GET", f"/v1/jobs/{job_id}")
                if job and job.get("status") in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(0.1)
            return job

        output = f"gpu-e2e-job-{os.getpid()}"  # in the first model's directory's parent
        status, job = call("POST", "/v1/jobs", {"type": "compress", "model": "s", "target_bits": 3,
                                               "rank": 8, "configs": grid, "output": output})
        check(status == 200, f"compress job: {status} {job}")
        done = wait(job["id"]) if status == 200 else {}
        check(done.get("status") == "succeeded", f"compress job on the GPU: {done}")
        written = (done.get("result") or {}).get("output")
        if written and os.path.basename(written) == output:
            shutil.rmtree(written, ignore_errors=True)
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
        from serve_util import multipart  # noqa: E402
        with open(train, "rb") as f:
            body, content_type = multipart([("purpose", "fine-tune", None), ("file", f.read(), "train.txt")])
        status, upload = call("POST", "/v1/files", body, {"Content-Type": content_type})
        check(status == 200, f"upload: {status} {upload}")
        status, job = call("POST", "/v1/jobs", {"type": "finetune", "model": "lq", "adapter": "gpu",
                                               "training_file": upload["id"] if upload else "",
                                               "steps": 10, "batch_size": 4, "seq_len": 64})
        check(status == 200, f"finetune job: {status} {job}")
        done = wait(job["id"]) if status == 200 else {}
        check(done.get("status") == "succeeded" and (done.get("result") or {}).get("device") == DEVICE,
              f"finetune job on the GPU: {done}")
        status, completion = call("POST", "/v1/completions", {"model": "lq:gpu", "prompt": "Once",
                                                             "max_tokens": 20, "temperature": 0})
        check(status == 200, f"the job's adapter serves on the GPU: {status} {completion}")
        daemon.terminate()
        daemon.wait(timeout=30)
    finish("test_gpu_e2e")


if __name__ == "__main__":
    main()
