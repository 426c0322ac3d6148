"""`lqd finetune` end to end on stories260K-lq and TinyStories: the JSON events, a validation
loss that falls, the adapter as the `safetensors` package reads it (PEFT names, lora_A = L2
[r, cols], lora_B = L1 [rows, r], the model's own L1 L2 when nothing is learned), init zero on
the dense model, a run killed (SIGKILL) or interrupted (SIGINT) and resumed that equals the
uninterrupted one byte for byte, and bad inputs that exit non-zero naming the problem."""
import json
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import DATA, KINDS, LQD, N_LAYERS, ROOT, Checks, require_safetensors, run_lqd  # noqa: E402

require_safetensors()
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

checks = Checks()
LQ_MODEL = os.path.join(ROOT, "models/stories260K-lq")
DENSE_MODEL = os.path.join(ROOT, "models/stories260K-hf")
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (172, 64), "mlp.up_proj": (172, 64),
          "mlp.down_proj": (64, 172)}


def finetune(*args, check=True):
    return run_lqd("finetune", *args, check=check)


def events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def check_peft_layout(directory, rank, label):
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    checks.check(len(tensors) == 2 * 7 * N_LAYERS, f"{label}: {len(tensors)} tensors")
    for layer in range(N_LAYERS):
        for kind in KINDS:
            prefix = f"base_model.model.model.layers.{layer}.{kind}"
            A, B = tensors.get(prefix + ".lora_A.weight"), tensors.get(prefix + ".lora_B.weight")
            rows, cols = SHAPES[kind]
            checks.check(A is not None and A.shape == (rank, cols) and A.dtype == np.float32,
                         f"{label}: {prefix}.lora_A is [{rank}, {cols}] float32")
            checks.check(B is not None and B.shape == (rows, rank) and B.dtype == np.float32,
                         f"{label}: {prefix}.lora_B is [{rows}, {rank}] float32")
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    checks.check(config.get("peft_type") == "LORA", f"{label}: peft_type LORA")
    checks.check(config.get("r") == rank and config.get("lora_alpha") == rank,
                 f"{label}: r = lora_alpha = {rank} (scaling 1): {config}")
    checks.check(sorted(config.get("target_modules", [])) ==
                 sorted(k.split(".")[1] for k in KINDS), f"{label}: target_modules")
    return tensors, config


with tempfile.TemporaryDirectory() as tmp:
    # A few hundred lines of TinyStories (paragraphs separated by blank lines: plain format).
    with open(DATA) as f:
        lines = f.readlines()[:400]
    train = os.path.join(tmp, "train.txt")
    with open(train, "w") as f:
        f.writelines(lines)
    common = ["--model", LQ_MODEL, "--train", train, "--seq-len", "64", "--batch-size", "4",
              "--learning-rate", "3e-3", "--seed", "7"]

    # --- a 20-step run: events, falling loss, the adapter ------------------------------------
    out = os.path.join(tmp, "adapter")
    result = finetune(*common, "--steps", "20", "--validation-fraction", "0.1", "--eval-every", "5",
                      "--out", out, "--json")
    lines_out = events(result.stdout)
    start = [e for e in lines_out if e["type"] == "start"]
    steps = [e for e in lines_out if e["type"] == "step"]
    done = [e for e in lines_out if e["type"] == "done"]
    checks.check(len(start) == 1 and start[0]["train_rows"] > 0 and start[0]["validation_rows"] > 0,
                 f"one start event with rows: {start}")
    checks.check([e["step"] for e in steps] == list(range(1, 21)), "one step event per step")
    for key in ["step", "train_loss", "val_loss", "learning_rate", "tokens_per_second", "eta_seconds"]:
        checks.check(all(key in e for e in steps), f"every step event has {key}")
    evaluated = [e for e in steps if e["val_loss"] is not None]
    checks.check([e["step"] for e in evaluated] == [5, 10, 15, 20], "validation every 5 steps")
    initial = start[0]["val_loss"]
    checks.check(initial is not None and evaluated[-1]["val_loss"] < initial,
                 f"validation loss falls: {initial} -> {evaluated[-1]['val_loss']}")
    first = np.mean([e["train_loss"] for e in steps[:5]])
    last = np.mean([e["train_loss"] for e in steps[-5:]])
    checks.check(last < first, f"training loss falls: {first:.4f} -> {last:.4f}")
    checks.check(all(e["tokens_per_second"] > 0 for e in steps), "tokens/s reported")
    checks.check(steps[-1]["eta_seconds"] == 0, "ETA 0 at the last step")
    lrs = [e["learning_rate"] for e in steps]
    checks.check(abs(lrs[0] - 3e-3) < 1e-9 and all(a >= b for a, b in zip(lrs, lrs[1:])),
                 "cosine decay from the peak")
    checks.check(len(done) == 1 and done[0]["mode"] == "replace" and done[0]["steps"] == 20,
                 f"done event: {done}")
    tensors, config = check_peft_layout(out, 8, "init lq")
    checks.check(config.get("lqd_mode") == "replace" and config.get("lqd_init") == "lq",
                 "lqd_mode replace, lqd_init lq")
    checks.check(sorted(os.listdir(tmp)) == ["adapter", "train.txt"],
                 f"no temporary directory left: {os.listdir(tmp)}")

    # --- nothing learned: the adapter is the model's own L1 (lora_B), L2 (lora_A) ------------
    still = os.path.join(tmp, "still")
    finetune(*common, "--steps", "1", "--learning-rate", "0", "--out", still, "--quiet")
    with safe_open(os.path.join(LQ_MODEL, "model.safetensors"), framework="numpy") as f:
        own = {name: f.get_tensor(name) for name in f.keys() if ".lora_" in name}
    adapter = load_file(os.path.join(still, "adapter_model.safetensors"))
    same = all(np.array_equal(adapter[f"base_model.model.model.layers.{l}.{k}.lora_{ab}.weight"],
                              own[f"model.layers.{l}.{k}.lora_{ab}"])
               for l in range(N_LAYERS) for k in KINDS for ab in "AB")
    checks.check(same, "learning rate 0: lora_A/lora_B equal the LQ model's own P.lora_A/P.lora_B")
    moved = any(not np.array_equal(tensors[name], adapter[name]) for name in tensors)
    checks.check(moved, "training changed the pairs")

    # --- init zero on the dense model: an add-mode adapter ------------------------------------
    zero = os.path.join(tmp, "zero")
    finetune("--model", DENSE_MODEL, "--train", train, "--seq-len", "64", "--batch-size", "2",
             "--steps", "1", "--learning-rate", "0", "--init", "zero", "--rank", "4", "--out", zero,
             "--quiet")
    tensors, config = check_peft_layout(zero, 4, "init zero")
    checks.check(config.get("lqd_mode") == "add" and config.get("lqd_init") == "zero",
                 "lqd_mode add, lqd_init zero")
    checks.check(all(not tensors[n].any() for n in tensors if n.endswith("lora_B.weight")),
                 "init zero: lora_B starts at 0")
    bounded = all(np.abs(t).max() <= 1 / np.sqrt(t.shape[1]) + 1e-7 and np.abs(t).max() > 0
                  for n, t in tensors.items() if n.endswith("lora_A.weight"))
    checks.check(bounded, "init zero: lora_A kaiming-uniform within 1/sqrt(cols)")

    # --- resume: killed and interrupted runs equal the uninterrupted one ----------------------
    long_args = [*common, "--steps", "120", "--validation-fraction", "0.1", "--eval-every", "40"]
    reference = os.path.join(tmp, "reference")
    finetune(*long_args, "--out", reference, "--quiet")
    with open(os.path.join(reference, "adapter_model.safetensors"), "rb") as f:
        reference_bytes = f.read()

    for how in (signal.SIGKILL, signal.SIGINT):
        label = signal.Signals(how).name
        checkpoint = os.path.join(tmp, f"ckpt-{label}.safetensors")
        resumed = os.path.join(tmp, f"resumed-{label}")
        args = [LQD, "finetune", *long_args, "--checkpoint", checkpoint, "--checkpoint-every", "5",
                "--out", resumed, "--json"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stopped_at = None
        for line in process.stdout:
            event = json.loads(line)
            if event["type"] == "step" and event["step"] >= 12:
                stopped_at = event["step"]
                process.send_signal(how)
                break
        process.stdout.read()
        process.wait(timeout=120)
        checks.check(stopped_at is not None and stopped_at < 120, f"{label}: stopped mid-run")
        expected_rc = -signal.SIGKILL if how == signal.SIGKILL else 130
        checks.check(process.returncode == expected_rc,
                     f"{label}: exit {process.returncode}, expected {expected_rc}")
        checks.check(os.path.isfile(checkpoint) and os.path.isfile(checkpoint + ".json"),
                     f"{label}: checkpoint and its run description exist")
        checks.check(not os.path.exists(resumed), f"{label}: no adapter from a stopped run")
        again = finetune(*long_args, "--checkpoint", checkpoint, "--checkpoint-every", "5",
                         "--out", resumed, "--json")
        start = events(again.stdout)[0]
        checks.check(start["type"] == "start" and 10 <= start["resumed_from"] < 120,
                     f"{label}: resumed from step {start.get('resumed_from')}")
        with open(os.path.join(resumed, "adapter_model.safetensors"), "rb") as f:
            checks.check(f.read() == reference_bytes,
                         f"{label}: the resumed run's adapter equals the uninterrupted run's, byte "
                         "for byte")
        # A finished checkpoint makes the same command write the same adapter again at once.
        third = finetune(*long_args, "--checkpoint", checkpoint, "--out", resumed, "--force",
                         "--json")
        checks.check(events(third.stdout)[0]["resumed_from"] == 120,
                     f"{label}: a finished checkpoint resumes at the end")

    # Another run's checkpoint is refused, naming the setting that differs.
    checkpoint = os.path.join(tmp, "ckpt-SIGKILL.safetensors")
    bad = finetune(*[a if a != "3e-3" else "1e-3" for a in long_args], "--checkpoint", checkpoint,
                   "--out", os.path.join(tmp, "other"), check=False)
    checks.check(bad.returncode == 1 and "learning_rate" in bad.stderr,
                 f"a checkpoint of another learning rate is refused: {bad.stderr.strip()}")

    # --- bad inputs exit non-zero, naming the problem -----------------------------------------
    bad_json = os.path.join(tmp, "bad.jsonl")
    with open(bad_json, "w") as f:
        f.write('{"text": "Once upon a time"}\n{"text": oops}\n')
    empty = os.path.join(tmp, "empty.txt")
    open(empty, "w").close()
    target = os.path.join(tmp, "never")
    cases = [
        (["--model", LQ_MODEL, "--train", os.path.join(tmp, "missing.txt"), "--out", target], 1,
         "missing.txt"),
        (["--model", LQ_MODEL, "--train", bad_json, "--out", target], 1, "bad.jsonl:2"),
        (["--model", LQ_MODEL, "--train", empty, "--out", target], 1, "empty.txt"),
        (["--model", os.path.join(tmp, "no-model"), "--train", train, "--out", target], 1, "no-model"),
        (["--model", DENSE_MODEL, "--train", train, "--init", "lq", "--out", target], 1, "init"),
        (["--model", LQ_MODEL, "--train", train, "--seq-len", "4096", "--out", target], 1, "4096"),
        (["--model", LQ_MODEL, "--train", train, "--out", out], 1, "already exists"),
        (["--model", LQ_MODEL, "--train", train, "--steps", "5", "--epochs", "1", "--out", target], 2,
         "--epochs"),
        (["--model", LQ_MODEL, "--train", train, "--init", "lq", "--rank", "4", "--out", target], 2,
         "--rank"),
        (["--model", LQ_MODEL, "--train", train, "--checkpoint-every", "5", "--out", target], 2,
         "--checkpoint"),
        (["--model", LQ_MODEL, "--train", train, "--format", "csv", "--out", target], 2, "csv"),
        (["--model", LQ_MODEL, "--train", train, "--learning-rate", "fast", "--out", target], 2,
         "--learning-rate"),
        (["--model", LQ_MODEL, "--train", train, "--validation", train, "--validation-fraction",
          "0.1", "--out", target], 2, "--validation"),
        (["--model", LQ_MODEL, "--train", train], 2, "--out"),
    ]
    for args, code, needle in cases:
        r = finetune(*args, check=False)
        checks.check(r.returncode == code and needle in r.stderr,
                     f"lqd finetune {' '.join(args)}: exit {r.returncode} (expected {code}), "
                     f"stderr {r.stderr.strip()!r} should name {needle!r}")
    checks.check(not os.path.exists(target), "no adapter from a failed run")

    # --device cuda trains on the GPU, or says why not and trains on the CPU.
    cuda = finetune(*common, "--steps", "1", "--device", "cuda", "--out", os.path.join(tmp, "cuda"),
                    "--quiet")
    checks.check(cuda.returncode == 0 and ("running on cuda" in cuda.stderr or
                                           "falling back to the CPU" in cuda.stderr),
                 f"--device cuda: {cuda.returncode} {cuda.stderr.strip()}")

checks.finish()
