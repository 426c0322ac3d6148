"""LoRA adapters served on top of a model ("model:adapter"), end to end over HTTP.

Adapters are written here with NumPy + safetensors in PEFT's layout (an independent writer):
REPLACE adapters for the bundled LQ model (models/stories260K-lq, rank 8: its own L1, L2
perturbed) and an ADD adapter (rank 4 on every linear) for the dense models/stories260K-hf.
Checked:
  - load, GET /v1/adapters, /v1/models listing "model:adapter";
  - a REPLACE adapter generates what `lqd generate` generates on a copy of the model directory
    whose L1, L2 were replaced by the adapter's (written here byte by byte), and differs from
    the base; an ADD adapter gives, token for token, the log-probabilities of a NumPy forward
    pass (float64) of W + L1·L2;
  - hot swap under 8 streams: zero failures, every stream all of one version;
  - base + two adapters, concurrent, greedy and seeded: each equals its solo output, text and
    log-probabilities;
  - shape or rank mismatch and a corrupt file: 400, the old adapter still serving; unload,
    then 404 in OpenAI's error shape; a path outside the allowed directories: 403; an adapter
    in STATE_DIR/adapters found by its name.
Environment: LQD (the binary), LQ_REPO_ROOT."""
import concurrent.futures
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import LQD, ROOT, SKIP, JsonDaemon, check, finish, slow_stream  # noqa: E402

try:
    import numpy as np
    from safetensors.numpy import load_file, save_file
except ImportError:
    print("numpy and safetensors are needed (tests/run.sh installs them in .venv): skipped")
    sys.exit(SKIP)

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PROMPTS = ["Once upon a time", "The cat", "Lily and Ben", "One day", "Tom had a", "The sun", "A big",
           "She saw"]


# ---------- files ----------

def read_raw_safetensors(path):
    """Header and data of a safetensors file, parsed by hand (the LQ file holds BF16, which
    NumPy cannot load): {name: (dtype, shape, start, end)} with absolute offsets, and the bytes."""
    data = open(path, "rb").read()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: (t["dtype"], t["shape"], base + t["data_offsets"][0], base + t["data_offsets"][1])
            for name, t in header.items()}, bytearray(data)


def lq_pairs(model_dir):
    """The LQ model's own pairs: {(layer, kind): (L1 = lora_B, L2 = lora_A)}."""
    tensors, data = read_raw_safetensors(os.path.join(model_dir, "model.safetensors"))
    pairs = {}
    for layer in range(5):
        for kind in KINDS:
            prefix = f"model.layers.{layer}.{kind}"
            got = []
            for suffix in ("lora_B", "lora_A"):
                dtype, shape, start, end = tensors[f"{prefix}.{suffix}"]
                assert dtype == "F32"
                got.append(np.frombuffer(bytes(data[start:end]), dtype="<f4").reshape(shape).copy())
            pairs[(layer, kind)] = tuple(got)
    return pairs


def write_peft(directory, pairs, mode, rank, layers=5):
    """A PEFT LoRA directory: adapter_config.json + adapter_model.safetensors with
    base_model.model.<module>.lora_A.weight = L2 [r, cols] and .lora_B.weight = L1 [rows, r];
    lora_alpha = r, so PEFT's scaling is 1."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for (layer, kind), (L1, L2) in pairs.items():
        module = f"base_model.model.model.layers.{layer}.{kind}"
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(L2, dtype=np.float32)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(L1, dtype=np.float32)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({k.split(".")[1] for _, k in pairs}),
              "base_model_name_or_path": "stories260K", "task_type": "CAUSAL_LM",
              "lqd_mode": mode, "lqd_init": "lq" if mode == "replace" else "zero", "lqd_layers": layers}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def perturbed(pairs, seed, scale=0.35):
    """The pairs with relative Gaussian noise: a different but still sensible model."""
    rng = np.random.default_rng(seed)
    return {key: (L1 * (1 + scale * rng.standard_normal(L1.shape)).astype(np.float32),
                  L2 * (1 + scale * rng.standard_normal(L2.shape)).astype(np.float32))
            for key, (L1, L2) in pairs.items()}


def write_replaced_model(source, target, pairs):
    """A copy of the LQ model directory whose lora_A / lora_B bytes are the given pairs'."""
    shutil.copytree(source, target)
    path = os.path.join(target, "model.safetensors")
    tensors, data = read_raw_safetensors(path)
    for (layer, kind), (L1, L2) in pairs.items():
        for suffix, value in (("lora_B", L1), ("lora_A", L2)):
            dtype, shape, start, end = tensors[f"model.layers.{layer}.{kind}.{suffix}"]
            raw = np.ascontiguousarray(value, dtype="<f4").tobytes()
            assert list(value.shape) == shape and len(raw) == end - start
            data[start:end] = raw
    with open(path, "wb") as f:
        f.write(data)


# ---------- a NumPy LLaMA forward pass (float64), the reference for the ADD adapter ----------

class Reference:
    def __init__(self, model_dir, pairs=None):
        t = load_file(os.path.join(model_dir, "model.safetensors"))
        c = json.load(open(os.path.join(model_dir, "config.json")))
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps, self.theta, self.layers = c["rms_norm_eps"], c.get("rope_theta", 10000.0), c["num_hidden_layers"]
        f = {name: value.astype(np.float64) for name, value in t.items()}
        self.embed = f["model.embed_tokens.weight"]
        self.norm = f["model.norm.weight"]
        self.head = f.get("lm_head.weight", self.embed)
        self.w = {}
        for layer in range(self.layers):
            for kind in KINDS:
                w = f[f"model.layers.{layer}.{kind}.weight"]
                if pairs and (layer, kind) in pairs:
                    L1, L2 = pairs[(layer, kind)]
                    w = w + L1.astype(np.float64) @ L2.astype(np.float64)
                self.w[(layer, kind)] = w
            self.w[(layer, "in")] = f[f"model.layers.{layer}.input_layernorm.weight"]
            self.w[(layer, "post")] = f[f"model.layers.{layer}.post_attention_layernorm.weight"]

    def rmsnorm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, heads):
        n, half = x.shape[0], self.head_dim // 2
        angles = np.arange(n)[:, None] * self.theta ** (-np.arange(half) * 2.0 / self.head_dim)[None, :]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        x = x.reshape(n, heads, self.head_dim)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(n, -1)

    def logits(self, ids):
        x = self.embed[ids]
        n, group = len(ids), self.heads // self.kv_heads
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for layer in range(self.layers):
            h = self.rmsnorm(x, self.w[(layer, "in")])
            q = self.rope(h @ self.w[(layer, "self_attn.q_proj")].T, self.heads)
            k = self.rope(h @ self.w[(layer, "self_attn.k_proj")].T, self.kv_heads)
            v = h @ self.w[(layer, "self_attn.v_proj")].T
            out = np.zeros_like(q)
            for head in range(self.heads):
                s = slice(head * self.head_dim, (head + 1) * self.head_dim)
                kv = slice((head // group) * self.head_dim, (head // group + 1) * self.head_dim)
                scores = q[:, s] @ k[:, kv].T / np.sqrt(self.head_dim) + mask
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                out[:, s] = (scores / scores.sum(axis=1, keepdims=True)) @ v[:, kv]
            x = x + out @ self.w[(layer, "self_attn.o_proj")].T
            h = self.rmsnorm(x, self.w[(layer, "post")])
            gate, up = h @ self.w[(layer, "mlp.gate_proj")].T, h @ self.w[(layer, "mlp.up_proj")].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w[(layer, "mlp.down_proj")].T
        return self.rmsnorm(x, self.norm) @ self.head.T

    def greedy_logprobs(self, prompt, count, eos=2):
        """Greedy continuation of prompt (ids): each chosen token's log-probability."""
        ids, out = list(prompt), []
        for _ in range(count):
            row = self.logits(ids)[-1]
            token = int(np.argmax(row))
            if token == eos:
                break
            out.append(row[token] - (row.max() + np.log(np.exp(row - row.max()).sum())))
            ids.append(token)
        return out


# ---------- HTTP ----------

class Server(JsonDaemon):
    def __init__(self, tmp, models):
        self.state = os.path.join(tmp, "state")
        super().__init__(self.state, "--model", "lq=" + os.path.join(models, "lq"),
                         "--model", "hf=" + os.path.join(models, "hf"), "--models-dir", models, "--max-running", "16",
                         log_path=os.path.join(tmp, "daemon.log"), cwd=None)

    def complete(self, model, prompt, **options):
        body = {"model": model, "prompt": prompt, "max_tokens": 60, "temperature": 0, **options}
        status, answer = self.request("POST", "/v1/completions", body)
        if status != 200:
            return status, answer, None
        choice = answer["choices"][0]
        logprobs = choice["logprobs"]["token_logprobs"] if choice.get("logprobs") else None
        return status, choice["text"], logprobs

    def load(self, model, name, path):
        return self.request("POST", "/v1/adapters/load", {"model": model, "name": name, "path": path})

    def stream(self, model, prompt, results, index):
        """A greedy streaming completion, read slowly so that it is still running at a swap."""
        try:
            status, chunks, done = slow_stream(self, model, prompt)
            text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk.get("choices"))
            errors = sum("error" in chunk for chunk in chunks)
            results[index] = (status, text, done and not errors, time.time())
        except Exception as e:  # noqa: BLE001 - a failed stream is a finding, not a crash
            results[index] = (0, repr(e), False, time.time())


def error_shape(body):
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and \
        all(key in body["error"] for key in ("message", "type", "code"))


# ---------- the test ----------

def main():
    with tempfile.TemporaryDirectory() as tmp:
        models = os.path.join(tmp, "models")
        os.makedirs(models)
        shutil.copytree(os.path.join(ROOT, "models/stories260K-lq"), os.path.join(models, "lq"))
        shutil.copytree(os.path.join(ROOT, "models/stories260K-hf"), os.path.join(models, "hf"))
        own = lq_pairs(os.path.join(models, "lq"))
        pairs_a, pairs_b = perturbed(own, 1), perturbed(own, 2)
        adapters = os.path.join(models, "adapters")
        write_peft(os.path.join(adapters, "a"), pairs_a, "replace", 8)
        write_peft(os.path.join(adapters, "b"), pairs_b, "replace", 8)
        write_replaced_model(os.path.join(models, "lq"), os.path.join(tmp, "lq-replaced"), pairs_a)
        # ADD, rank 4 on every linear of the dense model
        rng = np.random.default_rng(7)
        hf = load_file(os.path.join(models, "hf", "model.safetensors"))
        add_pairs = {}
        for layer in range(5):
            for kind in KINDS:
                rows, cols = hf[f"model.layers.{layer}.{kind}.weight"].shape
                add_pairs[(layer, kind)] = ((0.1 * rng.standard_normal((rows, 4))).astype(np.float32),
                                            (0.1 * rng.standard_normal((4, cols))).astype(np.float32))
        write_peft(os.path.join(adapters, "add"), add_pairs, "add", 4)
        # mismatches: REPLACE of rank 4 (the model's is 8); an ADD pair of the wrong width;
        # REPLACE on the dense model; a copy of b with its weights cut short
        write_peft(os.path.join(adapters, "rank4"), {k: (L1[:, :4], L2[:4]) for k, (L1, L2) in own.items()},
                   "replace", 4)
        wrong = dict(add_pairs)
        L1, L2 = wrong[(2, "mlp.up_proj")]
        wrong[(2, "mlp.up_proj")] = (L1, np.zeros((4, 32), dtype=np.float32))
        write_peft(os.path.join(adapters, "wrong_shape"), wrong, "add", 4)
        shutil.copytree(os.path.join(adapters, "b"), os.path.join(adapters, "corrupt"))
        weights = os.path.join(adapters, "corrupt", "adapter_model.safetensors")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)

        server = Server(tmp, models)
        try:
            run(server, tmp, models, adapters, add_pairs)
        finally:
            code = server.stop(grace=30)
            check(code == 0, f"SIGTERM exit code {code}")
            if code != 0:
                print(open(os.path.join(tmp, "daemon.log")).read()[-3000:])


def run(server, tmp, models, adapters, add_pairs):
    # ---- load and list ----
    for name in ("a", "b", "swap"):
        status, body = server.load("lq", name, os.path.join(adapters, "b" if name == "b" else "a"))
        check(status == 200 and body["id"] == f"lq:{name}" and body["mode"] == "replace" and body["rank"] == 8
              and body["version"] == 1, f"load {name}: {status} {body}")
    status, body = server.load("hf", "addy", "adapters/add")  # relative: under the model directory
    check(status == 200 and body.get("mode") == "add" and body.get("rank") == 4, f"load ADD: {status} {body}")
    status, body = server.request("GET", "/v1/adapters")
    listed = {(a["model"], a["name"]): a for a in body["data"]}
    check(status == 200 and set(listed) == {("lq", "a"), ("lq", "b"), ("lq", "swap"), ("hf", "addy")},
          f"GET /v1/adapters: {body}")
    check(all(isinstance(a["loaded_at"], (int, float)) and a["path"].endswith(os.path.basename(a["path"]))
              for a in body["data"]), "adapters have loaded_at and path")
    status, body = server.request("GET", "/v1/models")
    ids = [m["id"] for m in body["data"]]
    check("lq:a" in ids and "hf:addy" in ids and ids[:2] == ["lq", "hf"], f"/v1/models ids: {ids}")
    entry = [m for m in body["data"] if m["id"] == "lq:a"][0]
    check(entry.get("parent") == "lq" and entry.get("adapter", {}).get("version") == 1, f"entry: {entry}")
    status, body = server.request("GET", "/v1/models/lq:a")
    check(status == 200 and body["id"] == "lq:a", f"GET /v1/models/lq:a: {status} {body}")

    # ---- REPLACE: the adapter is the model with its L1, L2 replaced ----
    prompt = PROMPTS[0]
    status, base_text, _ = server.complete("lq", prompt, max_tokens=100)
    status, adapted, _ = server.complete("lq:a", prompt, max_tokens=100)
    direct = subprocess.run([LQD, "generate", "--model", os.path.join(tmp, "lq-replaced"), "--prompt", prompt,
                             "--max-tokens", "100", "--temperature", "0"], capture_output=True, text=True).stdout
    check(status == 200 and adapted == direct, f"lq:a vs lqd generate on the replaced model:\n{adapted!r}\n{direct!r}")
    check(adapted != base_text, "the REPLACE adapter changes the text")
    status, answer = server.request("POST", "/v1/chat/completions",
                                    {"model": "lq:a", "messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 20, "temperature": 0, "stream": False})
    check(status == 200 and answer["model"] == "lq:a" and answer["choices"][0]["message"]["content"],
          f"chat on lq:a: {status} {answer}")

    # ---- ADD: token for token the log-probabilities of NumPy's W + L1·L2 ----
    ids = [1, 403, 407, 261, 378]  # token ids: the server's prompt is exactly these
    status, text, server_logprobs = server.complete("hf:addy", ids, max_tokens=30, logprobs=1)
    reference = Reference(os.path.join(models, "hf"), add_pairs).greedy_logprobs(ids, 30)
    worst = max(abs(a - b) for a, b in zip(server_logprobs, reference)) if server_logprobs else 1
    check(status == 200 and len(server_logprobs) == len(reference) and worst < 2e-3,
          f"hf:addy vs NumPy W + L1·L2: {len(server_logprobs or [])} vs {len(reference)} tokens, worst {worst}")
    status, _, bare_logprobs = server.complete("hf", ids, max_tokens=30, logprobs=1)
    bare_reference = Reference(os.path.join(models, "hf")).greedy_logprobs(ids, 30)
    worst_bare = max(abs(a - b) for a, b in zip(bare_logprobs, bare_reference))
    check(len(bare_logprobs) == len(bare_reference) and worst_bare < 2e-3,
          f"the NumPy reference itself matches the bare model: worst {worst_bare}")
    check(bare_logprobs != server_logprobs, "the ADD adapter changes the log-probabilities")

    # ---- mixed concurrent: base and two adapters, greedy and seeded, equal their solo outputs ----
    jobs = []
    for i in range(18):
        model = ["lq", "lq:a", "lq:b"][i % 3]
        options = {"max_tokens": 40 + (i * 7) % 50, "logprobs": 1}
        if i % 2:
            options.update(temperature=0.8, seed=100 + i)
        jobs.append((model, PROMPTS[i % len(PROMPTS)], options))
    solo = [server.complete(m, p, **o) for m, p, o in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: server.complete(job[0], job[1], **job[2]), jobs))
    for i, (alone, mixed) in enumerate(zip(solo, together)):
        check(alone[0] == 200 and alone == mixed, f"mixed request {i} ({jobs[i][0]}) differs from solo:\n"
              f"{alone[1]!r}\n{mixed[1]!r}")
    check(len({s[1] for s in solo[:3]}) == 3, "base, a and b give three different texts")

    # ---- hot swap under 8 streams: zero failures, each stream all of one version ----
    expected_a = {p: server.complete("lq:a", p, max_tokens=200)[1] for p in PROMPTS}
    expected_b = {p: server.complete("lq:b", p, max_tokens=200)[1] for p in PROMPTS}
    results = [None] * len(PROMPTS)
    threads = [threading.Thread(target=server.stream, args=("lq:swap", p, results, i))
               for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    status, body = server.load("lq", "swap", os.path.join(adapters, "b"))
    swapped_at = time.time()
    check(status == 200 and body["version"] == 2, f"swap: {status} {body}")
    for t in threads:
        t.join()
    for i, p in enumerate(PROMPTS):
        status, text, ok, ended = results[i]
        check(status == 200 and ok, f"stream {i} failed: {results[i]}")
        check(text in (expected_a[p], expected_b[p]), f"stream {i} is not one version: {text[:80]!r}")
        check(text == expected_a[p], f"stream {i} started before the swap and finished on version 1")
    check(sum(r[3] > swapped_at for r in results) >= 4, "most streams were still running at the swap")
    check(server.complete("lq:swap", PROMPTS[0], max_tokens=200)[1] == expected_b[PROMPTS[0]],
          "after the swap lq:swap is version 2")

    # ---- refusals: 400, and the old adapter still serves ----
    for name, model, path, what in (("a", "lq", "rank4", "rank"), ("x", "hf", "wrong_shape", "shape"),
                                    ("x", "hf", "a", "replace on dense"), ("a", "lq", "corrupt", "corrupt")):
        status, body = server.load(model, name, os.path.join(adapters, path))
        check(status == 400 and error_shape(body), f"{what}: {status} {body}")
    status, body = server.request("GET", "/v1/adapters")
    a = [x for x in body["data"] if x["id"] == "lq:a"]
    check(len(a) == 1 and a[0]["version"] == 1, f"lq:a still version 1: {a}")
    check(server.complete("lq:a", PROMPTS[0], max_tokens=200)[1] == expected_a[PROMPTS[0]],
          "lq:a still serves version 1")
    status, body = server.load("nope", "a", os.path.join(adapters, "a"))
    check(status == 404 and error_shape(body), f"unknown model: {status} {body}")
    status, body = server.load("lq", "bad:name", os.path.join(adapters, "a"))
    check(status == 400 and error_shape(body), f"bad name: {status} {body}")
    status, body = server.load("lq", "x", "/etc")
    check(status == 403 and error_shape(body), f"outside the directories: {status} {body}")
    status, body = server.load("lq", "x", "no/such/adapter")
    check(status == 404 and error_shape(body), f"missing path: {status} {body}")

    # ---- STATE_DIR/adapters: where finetune jobs leave adapters, found by name ----
    shutil.copytree(os.path.join(adapters, "b"), os.path.join(server.state, "adapters", "from-state"))
    status, body = server.load("lq", "st", "from-state")
    check(status == 200 and body.get("path", "").endswith("/adapters/from-state"), f"state dir: {status} {body}")
    check(server.complete("lq:st", PROMPTS[1])[1] == server.complete("lq:b", PROMPTS[1])[1],
          "an adapter from STATE_DIR/adapters serves")

    # ---- unload: 404 afterwards ----
    status, body = server.request("POST", "/v1/adapters/unload", {"model": "lq", "name": "a"})
    check(status == 200 and body.get("deleted") is True and body.get("id") == "lq:a", f"unload: {status} {body}")
    status, body, _ = server.complete("lq:a", PROMPTS[0])
    check(status == 404 and error_shape(body) and body["error"]["code"] == "model_not_found",
          f"after unload: {status} {body}")
    status, body = server.request("POST", "/v1/adapters/unload", {"model": "lq", "name": "a"})
    check(status == 404 and error_shape(body), f"unload twice: {status} {body}")
    status, body, _ = server.complete("lq:zzz", PROMPTS[0])
    check(status == 404 and error_shape(body), f"unknown adapter: {status} {body}")
    status, body = server.request("GET", "/v1/models")
    check("lq:a" not in [m["id"] for m in body["data"]], "unloaded adapters leave /v1/models")
    # a swap of the base model takes its adapters along
    status, body = server.request("POST", "/v1/models/load", {"name": "lq", "path": os.path.join(models, "lq")})
    check(status == 200, f"reload lq: {status}")
    status, body = server.request("GET", "/v1/adapters")
    check([a["id"] for a in body["data"]] == ["hf:addy"], f"after reloading lq: {body['data']}")


main()
finish("test_adapters")
