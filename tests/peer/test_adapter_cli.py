"""`lqd eval --adapter` and `lqd generate --adapter` (server/cli_model.c) against independent
references, on LQ models compressed here from stories260K (rank 8 for LQ-LoRA, rank 0 for
QLoRA-style) and adapters trained here with `lqd finetune`:

  - the adapter lqd saved is what lqd applies, bit for bit: `lqd eval --adapter A` equals
    `lqd eval` on a copy of the model directory whose lora_A / lora_B tensors were replaced by
    A's, the copy written by the `safetensors` package (perplexity, and the logits of a token
    sequence compared bit for bit); the same for an add-mode adapter on the rank-0 model,
    whose copy gains A's pairs as its own low-rank part; `lqd generate --adapter` writes the
    copy's greedy text;
  - the saved adapter reloads bit-identically: lqd's file, re-read and re-written by the
    `safetensors` package, gives the same logits; an LQ model carrying A's pairs, finetuned
    for one step at learning rate 0, saves an adapter_model.safetensors byte for byte A's;
  - the daemon serving "model:adapter" (POST /v1/adapters/load) generates the same greedy text
    as `lqd generate --adapter`, for both modes;
  - mismatched adapters (a replace-mode adapter on a dense model, another rank, a pair of the
    wrong shape) and corrupt ones (truncated weights, bad JSON, NaN, no directory) exit 1 with
    a message naming the adapter and the problem; nothing is generated."""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_util import DATA, KINDS, N_LAYERS, ROOT, Checks, require_safetensors, run_lqd  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from serve_util import JsonDaemon  # noqa: E402

require_safetensors()
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

checks = Checks()
DENSE = os.path.join(ROOT, "models/stories260K-hf")
# A grid without bf16 group scales, so that NumPy (and so the safetensors package) can hold
# every tensor of the model file.
GRID = "3,8,fp32,64,256;4,8,fp16,64,256;2,8,fp32,64,256;3,8,fp16,128,256"
TOKENS = "1,403,407,261,378,345,259,500,280,311,402,269,436,290,302,13"
PROMPTS = ["Once upon a time", "Lily and Ben", "The cat"]


def lqd(*args, check=True):
    return run_lqd(*args, check=check)


def read_model(directory):
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    return load_file(path), metadata


def read_adapter(directory):
    """{(layer, kind): (L1 = lora_B, L2 = lora_A)} of a PEFT directory, by the safetensors package."""
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    pairs = {}
    for layer in range(N_LAYERS):
        for kind in KINDS:
            prefix = f"base_model.model.model.layers.{layer}.{kind}"
            if prefix + ".lora_A.weight" in tensors:
                pairs[(layer, kind)] = (tensors[prefix + ".lora_B.weight"], tensors[prefix + ".lora_A.weight"])
    return pairs


def write_model_with_pairs(source, target, pairs):
    """A copy of the LQ directory source whose own low-rank part is pairs (P.lora_B = L1,
    P.lora_A = L2, P.lq_rank their rank), written whole by the safetensors package."""
    shutil.copytree(source, target)
    tensors, metadata = read_model(source)
    ranks = set()
    for (layer, kind), (L1, L2) in pairs.items():
        name = f"model.layers.{layer}.{kind}"
        tensors[name + ".lora_B"] = np.ascontiguousarray(L1, dtype=np.float32)
        tensors[name + ".lora_A"] = np.ascontiguousarray(L2, dtype=np.float32)
        metadata[name + ".lq_rank"] = str(L2.shape[0])
        ranks.add(L2.shape[0])
    metadata["lqd.rank"] = str(max(ranks))
    os.remove(os.path.join(target, "model.safetensors"))
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata=metadata)


def write_peft(directory, pairs, mode, rank):
    """A PEFT directory written by the safetensors package (lora_alpha = r: scaling 1)."""
    os.makedirs(directory)
    tensors = {}
    for (layer, kind), (L1, L2) in pairs.items():
        prefix = f"base_model.model.model.layers.{layer}.{kind}"
        tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(L2, dtype=np.float32)
        tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(L1, dtype=np.float32)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "bias": "none",
              "target_modules": sorted({k.split(".")[1] for _, k in pairs}), "lqd_mode": mode,
              "lqd_init": "lq" if mode == "replace" else "zero", "lqd_layers": N_LAYERS}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def ppl(model, *extra):
    return json.loads(lqd("eval", "--model", model, "--ppl", HELDOUT, "--json", *extra).stdout)


def logits(model, out, *extra):
    lqd("eval", "--model", model, "--tokens", TOKENS, "--dump-logits", out, *extra)
    return np.load(out)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def generate(model, prompt, *extra):
    return lqd("generate", "--model", model, "--prompt", prompt, "--max-tokens", "80",
               "--temperature", "0", *extra).stdout


class Daemon(JsonDaemon):
    """lqd serve on a free loopback port, as tests/integration/ start it."""

    def __init__(self, tmp, models, served):
        args = [arg for name, path in served for arg in ("--model", f"{name}={path}")]
        super().__init__(os.path.join(tmp, "state"), "--models-dir", models, *args,
                         log_path=os.path.join(tmp, "daemon.log"), cwd=None)

    def complete(self, model, prompt):
        status, body = self.request("POST", "/v1/completions", {"model": model, "prompt": prompt,
                                                                "max_tokens": 80, "temperature": 0})
        return body["choices"][0]["text"] if status == 200 else f"HTTP {status}: {body}"

    def stop(self):
        return super().stop(30)


with tempfile.TemporaryDirectory() as tmp:
    HELDOUT = os.path.join(tmp, "heldout.txt")
    with open(DATA) as f:
        lines = [line.strip() for line in f if line.strip()]
    train = os.path.join(tmp, "train.txt")
    with open(train, "w") as f:
        f.write("\n\n".join(lines[:300]) + "\n")
    with open(HELDOUT, "w") as f:
        f.write("\n".join(lines[300:340]) + "\n")

    models = os.path.join(tmp, "models")
    os.makedirs(models)
    lq8, lq0, lq4 = (os.path.join(models, name) for name in ("lq8", "lq0", "lq4"))
    for out, rank in ((lq8, 8), (lq0, 0), (lq4, 4)):
        lqd("compress", "--model", DENSE, "--bits", "3", "--rank", str(rank), "--configs", GRID,
            "--no-cache", "--quiet", "--out", out)
    common = ["--train", train, "--seq-len", "64", "--batch-size", "4", "--learning-rate", "3e-3",
              "--steps", "30", "--seed", "3", "--quiet"]
    replace = os.path.join(models, "replace")  # LQ-LoRA: the rank-8 model's own pairs, trained
    add = os.path.join(models, "add")          # QLoRA-style: a new rank-4 pair on the rank-0 model
    lqd("finetune", "--model", lq8, "--init", "lq", "--out", replace, *common)
    lqd("finetune", "--model", lq0, "--init", "zero", "--rank", "4", "--out", add, *common)
    replace_pairs, add_pairs = read_adapter(replace), read_adapter(add)
    checks.check(len(replace_pairs) == 35 and len(add_pairs) == 35, "35 pairs in each adapter")

    # --- eval --adapter equals eval on the model with the adapter's pairs written in -----------
    for label, model, adapter, pairs in (("replace", lq8, replace, replace_pairs),
                                         ("add", lq0, add, add_pairs)):
        copy = os.path.join(tmp, f"{label}-written-in")
        write_model_with_pairs(model, copy, pairs)
        with_adapter, written_in, bare = ppl(model, "--adapter", adapter), ppl(copy), ppl(model)
        checks.check(with_adapter["nll"] == written_in["nll"] and with_adapter["tokens"] == written_in["tokens"],
                     f"{label}: eval --adapter {with_adapter} equals eval of the written-in copy {written_in}")
        checks.check(with_adapter.get("adapter") == adapter, f"{label}: --json names the adapter")
        checks.check(with_adapter["ppl"] < bare["ppl"],
                     f"{label}: the trained adapter lowers held-out perplexity: {bare['ppl']:.4f} -> "
                     f"{with_adapter['ppl']:.4f}")
        a = logits(model, os.path.join(tmp, "a.npy"), "--adapter", adapter)
        b = logits(copy, os.path.join(tmp, "b.npy"))
        checks.check(same_bits(a, b), f"{label}: logits with --adapter equal the copy's bit for bit "
                     f"(max diff {np.abs(a - b).max() if a.shape == b.shape else 'shape'})")
        for prompt in PROMPTS[:2]:
            text = generate(model, prompt, "--adapter", adapter)
            checks.check(text == generate(copy, prompt) and text != generate(model, prompt),
                         f"{label}: generate --adapter equals the copy and differs from the bare model "
                         f"({prompt!r}): {text[:60]!r}")

    # --- the saved adapter reloads bit-identically --------------------------------------------
    rewritten = os.path.join(tmp, "rewritten")
    write_peft(rewritten, replace_pairs, "replace", 8)
    a = logits(lq8, os.path.join(tmp, "a.npy"), "--adapter", replace)
    b = logits(lq8, os.path.join(tmp, "b.npy"), "--adapter", rewritten)
    checks.check(same_bits(a, b), "lqd's adapter and its rewrite by the safetensors package give the same logits")
    carrier = os.path.join(tmp, "carrier")
    write_model_with_pairs(lq8, carrier, replace_pairs)
    resaved = os.path.join(tmp, "resaved")
    lqd("finetune", "--model", carrier, "--init", "lq", "--train", train, "--seq-len", "64",
        "--batch-size", "4", "--steps", "1", "--learning-rate", "0", "--out", resaved, "--quiet")
    with open(os.path.join(replace, "adapter_model.safetensors"), "rb") as f:
        original = f.read()
    with open(os.path.join(resaved, "adapter_model.safetensors"), "rb") as f:
        checks.check(f.read() == original, "the adapter's pairs, loaded as a model's and saved again, "
                     "give adapter_model.safetensors byte for byte")

    # --- the daemon serving model:adapter generates what lqd generate --adapter does -----------
    daemon = Daemon(tmp, models, [("lq8", lq8), ("lq0", lq0)])
    try:
        for model, name, path in (("lq8", "a", replace), ("lq0", "z", add)):
            status, body = daemon.request("POST", "/v1/adapters/load", {"model": model, "name": name, "path": path})
            checks.check(status == 200, f"POST /v1/adapters/load {model}:{name}: {status} {body}")
        for prompt in PROMPTS:
            for served, model, adapter in (("lq8:a", lq8, replace), ("lq0:z", lq0, add), ("lq8", lq8, None)):
                extra = ["--adapter", adapter] if adapter else []
                direct, over_http = generate(model, prompt, *extra), daemon.complete(served, prompt)
                checks.check(over_http == direct, f"{served} over HTTP equals lqd generate {' '.join(extra)} "
                             f"({prompt!r}):\n  {over_http!r}\n  {direct!r}")
    finally:
        code = daemon.stop()
        checks.check(code == 0, f"lqd serve exits 0 on SIGTERM (got {code})")

    # --- mismatched and corrupt adapters: exit 1 naming the adapter and the problem -------------
    bad = os.path.join(tmp, "bad")
    os.makedirs(bad)
    wrong_shape = dict(add_pairs)
    L1, _ = wrong_shape[(2, "mlp.up_proj")]
    wrong_shape[(2, "mlp.up_proj")] = (L1, np.zeros((4, 32), dtype=np.float32))
    write_peft(os.path.join(bad, "wrong_shape"), wrong_shape, "add", 4)
    shutil.copytree(replace, os.path.join(bad, "truncated"))
    weights = os.path.join(bad, "truncated", "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    shutil.copytree(replace, os.path.join(bad, "bad_json"))
    with open(os.path.join(bad, "bad_json", "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": 8,')
    nan_pairs = dict(replace_pairs)
    L1, L2 = nan_pairs[(1, "self_attn.v_proj")]
    L2 = L2.copy()
    L2[0, 5] = np.nan
    nan_pairs[(1, "self_attn.v_proj")] = (L1, L2)
    write_peft(os.path.join(bad, "nan"), nan_pairs, "replace", 8)
    cases = [
        ("eval", DENSE, replace, ["replace", "does not fit", "dense"]),
        ("eval", lq4, replace, ["does not fit", "rank 8", "rank 4"]),
        ("generate", lq4, replace, ["does not fit", "rank"]),
        ("eval", lq0, os.path.join(bad, "wrong_shape"), ["does not fit", "layers.2.mlp.up_proj", "172 x 32"]),
        ("eval", lq8, os.path.join(bad, "truncated"), ["adapter_model.safetensors"]),
        ("generate", lq8, os.path.join(bad, "truncated"), ["adapter_model.safetensors"]),
        ("eval", lq8, os.path.join(bad, "bad_json"), ["adapter_config.json"]),
        ("eval", lq8, os.path.join(bad, "nan"), ["layers.1.self_attn.v_proj", "nan"]),
        ("generate", lq8, os.path.join(bad, "missing"), ["missing", "not an adapter directory"]),
    ]
    for command, model, adapter, needles in cases:
        extra = ["--ppl", HELDOUT] if command == "eval" else ["--prompt", "Once", "--max-tokens", "5"]
        r = lqd(command, "--model", model, "--adapter", adapter, *extra, check=False)
        stderr = r.stderr.strip()
        checks.check(r.returncode == 1 and r.stdout == "" and all(n in stderr for n in needles),
                     f"lqd {command} --model {os.path.basename(model)} --adapter {os.path.basename(adapter)}: "
                     f"exit {r.returncode}, stdout {r.stdout[:40]!r}, stderr {stderr!r} should name {needles}")
    r = lqd("eval", "--model", lq8, "--ppl", HELDOUT, "--adapter", check=False)
    checks.check(r.returncode == 2 and "--adapter" in r.stderr, f"--adapter without a value: exit {r.returncode}")
    for command in ("eval", "generate"):
        r = lqd(command, "--help")
        checks.check("--adapter DIR" in r.stdout and "model:adapter" in r.stdout, f"lqd {command} --help documents --adapter")

checks.finish()
