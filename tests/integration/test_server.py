"""`lqd serve` end to end, over its real HTTP protocol, with the official OpenAI client and with
raw http.client: greedy text equal to llama2.c's run.c, streams that reassemble to it and end
with [DONE], 32 concurrent seeded requests equal to their sequential results, chat, n, stop,
logprobs, models, metrics, auth, a catalogue of bad requests (each a 4xx with OpenAI's error
shape, the daemon serving on), 429 from a full queue, a client leaving mid-stream freeing its
sequence, hot swap, and SIGTERM draining to exit 0.

Environment: LQD (the binary, default build/server/lqd), LQ_REPO_ROOT."""
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_util  # noqa: E402
from serve_util import LQD, ROOT, SKIP, check, failures, finish  # noqa: E402

EXPECTED = open(os.path.join(ROOT, "models/stories260K/expected_run_t0_n200.txt")).read().rstrip("\n")
KEY = "test-key-0123456789"
try:
    import openai
except ImportError:
    print("the openai package is not installed (tests/run.sh installs it in .venv): skipped")
    sys.exit(SKIP)





class Daemon(serve_util.Daemon):
    """lqd serve on 127.0.0.1 with its own state directory; stderr kept in a log file."""

    json_headers = True

    def __init__(self, *extra, key=KEY, pass_key=True):
        self.dir = tempfile.mkdtemp(prefix="lqd-serve-test-")
        args = [*extra, "--api-key", key] if key and pass_key else list(extra)
        super().__init__(os.path.join(self.dir, "state"), *args, key=key,
                         log_path=os.path.join(self.dir, "daemon.log"))
        self.model = self.json("GET", "/v1/models")[1]["data"][0]["id"]

    def metric(self, name):
        text = self.request("GET", "/metrics")[1].decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.key or "none",
                             max_retries=0, timeout=120)

    def stop(self, grace=15):
        return super().stop(grace)


def sse_events(daemon, body):
    """POSTs a streaming request with raw http.client; returns the list of data: payloads."""
    status, data, headers = daemon.request("POST", body.pop("_path", "/v1/completions"), body)
    check(status == 200 and headers.get("content-type", "").startswith("text/event-stream"),
          f"stream answered {status} {headers}")
    text = data.decode()
    check(text.endswith("data: [DONE]\n\n"), f"stream does not end with [DONE]: {text[-80:]!r}")
    return [event[len("data: "):] for event in text.split("\n\n") if event.startswith("data: ")]


def error_shape(body):
    return (isinstance(body, dict) and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("message"), str) and isinstance(body["error"].get("type"), str)
            and "code" in body["error"])


def write_slow_model(directory):
    """A random LLaMA (dim 256, 6 layers, context 4096) with stories260K's tokenizer: slow enough
    on a CPU that a client can leave while its sequence still runs."""
    import numpy as np
    from safetensors.numpy import save_file
    dim, hidden, layers, heads, vocab = 256, 768, 6, 8, 512
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, dim)).astype(np.float32),
               "model.norm.weight": np.ones(dim, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (dim, dim), "self_attn.v_proj": (dim, dim),
                  "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (hidden, dim), "mlp.up_proj": (hidden, dim),
                  "mlp.down_proj": (dim, hidden)}
        for name, shape in shapes.items():
            tensors[p + name + ".weight"] = rng.normal(0, 0.05, shape).astype(np.float32)
        tensors[p + "input_layernorm.weight"] = np.ones(dim, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(dim, np.float32)
    os.makedirs(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    config = json.load(open(os.path.join(ROOT, "models/stories260K-hf/config.json")))
    config.update(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, head_dim=dim // heads, max_position_embeddings=4096)
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    with open(os.path.join(ROOT, "models/stories260K-hf/tokenizer.bin"), "rb") as source:
        open(os.path.join(directory, "tokenizer.bin"), "wb").write(source.read())


# ---------------------------------------------------------------- the main daemon
models_dir = tempfile.mkdtemp(prefix="lqd-models-")
main = Daemon("--models-dir", models_dir, "--models-dir", os.path.join(ROOT, "models"))
client = main.client()
model = main.model

# greedy completion from an empty prompt equals llama2.c run.c -t 0 -n 200
completion = client.completions.create(model=model, prompt="", max_tokens=200, temperature=0)
check(completion.choices[0].text == EXPECTED, f"greedy text\n{completion.choices[0].text!r}\nvs\n{EXPECTED!r}")
check(completion.id.startswith("cmpl-") and completion.object == "text_completion" and completion.created > 0,
      f"completion envelope {completion.id} {completion.object}")
check(completion.choices[0].finish_reason == "length", f"finish_reason {completion.choices[0].finish_reason}")
check(completion.usage.prompt_tokens == 1 and completion.usage.completion_tokens == 200
      and completion.usage.total_tokens == 201, f"usage {completion.usage}")

# streaming reassembles to the same text: the client, and raw SSE ending with [DONE]
pieces = [chunk.choices[0].text for chunk in client.completions.create(
    model=model, prompt="", max_tokens=200, temperature=0, stream=True) if chunk.choices]
check("".join(pieces) == EXPECTED and len(pieces) > 10, f"streamed text ({len(pieces)} chunks) {''.join(pieces)!r}")
events = sse_events(main, {"model": model, "prompt": "", "max_tokens": 200, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
chunks = [json.loads(e) for e in events if e != "[DONE]"]
text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
check(text == EXPECTED, f"raw SSE text {text!r}")
check(chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 200, f"usage chunk {chunks[-1]}")
check([c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length", "stream finish_reason")

# 32 concurrent seeded requests each equal their sequential result
def sample(seed):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=64, temperature=0.9,
                                  top_p=0.95, seed=seed)
    return r.choices[0].text


sequential = [sample(1000 + i) for i in range(32)]
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    concurrent_results = list(pool.map(sample, [1000 + i for i in range(32)]))
check(concurrent_results == sequential, "concurrent results differ from sequential ones: " + str(
    [i for i in range(32) if concurrent_results[i] != sequential[i]]))
check(len(set(sequential)) > 16, f"seeds barely change the text ({len(set(sequential))} distinct of 32)")

# chat completions, plain and streamed
chat = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Tell a story."},
                                                             {"role": "user", "content": "Once upon a time"}],
                                      max_tokens=40, temperature=0)
message = chat.choices[0].message
check(chat.id.startswith("chatcmpl-") and chat.object == "chat.completion", f"chat envelope {chat.id}")
check(message.role == "assistant" and isinstance(message.content, str) and len(message.content) > 0,
      f"chat message {message}")
check(chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 40, f"chat {chat}")
streamed = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Tell a story."},
                                                                 {"role": "user", "content": "Once upon a time"}],
                                          max_tokens=40, temperature=0, stream=True)
deltas = [c.choices[0].delta for c in streamed if c.choices]
check(deltas[0].role == "assistant", "first chat delta carries the role")
check("".join(d.content or "" for d in deltas) == message.content, "streamed chat equals the reply")

# n = 2: two choices, the second with seed + 1
two = client.completions.create(model=model, prompt="Once", max_tokens=30, temperature=1, seed=7, n=2)
one = client.completions.create(model=model, prompt="Once", max_tokens=30, temperature=1, seed=8)
check(sorted(c.index for c in two.choices) == [0, 1], "n=2 indexes")
check(two.choices[1].text == one.choices[0].text, "choice 1 of n=2 uses seed + 1")
check(two.usage.prompt_tokens == one.usage.prompt_tokens and 0 < two.usage.completion_tokens <= 60,
      f"n=2 usage {two.usage}")
multi = main.json("POST", "/v1/completions", {"model": model, "prompt": ["Once", "Tom"], "n": 2, "max_tokens": 5,
                                             "temperature": 0})[1]
check(len(multi["choices"]) == 4 and multi["choices"][0]["text"] == multi["choices"][1]["text"],
      f"2 prompts x n=2 {multi}")

# stop strings end the text before them
stopped = client.completions.create(model=model, prompt="", max_tokens=200, temperature=0, stop=["Lily"])
check(stopped.choices[0].text == EXPECTED[:EXPECTED.index("Lily")] and stopped.choices[0].finish_reason == "stop",
      f"stop: {stopped.choices[0].text!r} {stopped.choices[0].finish_reason}")
stopped = client.completions.create(model=model, prompt="", max_tokens=200, temperature=0, stop=["zzz", "park."],
                                    stream=True)
text = "".join(c.choices[0].text for c in stopped if c.choices)
check(text == EXPECTED[:EXPECTED.index("park.")], f"streamed stop: {text!r}")

# logprobs: one per token, the tokens spell the text, all <= 0
lp = client.completions.create(model=model, prompt="", max_tokens=50, temperature=0, logprobs=1)
choice = lp.choices[0]
check("".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.tokens) == lp.usage.completion_tokens,
      f"logprob tokens {choice.logprobs.tokens[:5]}")
check(all(x <= 0 for x in choice.logprobs.token_logprobs) and choice.logprobs.text_offset[0] == 0, "logprob values")
chat_lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=1)
content = chat_lp.choices[0].logprobs.content
check(len(content) > 0 and all(t.logprob <= 0 and len(t.top_logprobs) == 1 for t in content), "chat logprobs")

# /v1/models and the allocation picture
status, listing, _ = main.json("GET", "/v1/models")
entry = listing["data"][0]
check(listing["object"] == "list" and entry["object"] == "model" and entry["owned_by"] == "lqd", f"models {entry}")
check(entry["context_length"] == 512 and entry["memory_bytes"] > 0 and "bits_per_param" in entry
      and "effective_bits_per_param" in entry and entry["quantization"] in ("lq", "none"), f"model fields {entry}")
check(client.models.retrieve(model).id == model, "models.retrieve")
status, svg, headers = main.request("GET", f"/v1/models/{model}/allocation.svg")
check(status == 200 and headers["content-type"] == "image/svg+xml" and b"<svg" in svg and svg.rstrip().endswith(b"</svg>"),
      f"allocation.svg {status} {headers.get('content-type')}")

# /metrics counters move
before_requests = main.metric('lqd_http_requests_total{route="/v1/completions",method="POST",status="200"}')
before_tokens = main.metric("lqd_completion_tokens_total")
before_ttft = main.metric("lqd_time_to_first_token_seconds_count")
client.completions.create(model=model, prompt="Once", max_tokens=20, temperature=0)
check(main.metric('lqd_http_requests_total{route="/v1/completions",method="POST",status="200"}') == before_requests + 1,
      "request counter")
check(main.metric("lqd_completion_tokens_total") == before_tokens + 20, "completion token counter")
check(main.metric("lqd_time_to_first_token_seconds_count") == before_ttft + 1, "TTFT histogram count")
metrics_text = main.request("GET", "/metrics")[1].decode()
for name in ("lqd_time_per_output_token_seconds_bucket", "lqd_queue_depth", "lqd_running_sequences",
             "lqd_model_memory_bytes", "lqd_prompt_tokens_total", "lqd_admissions_deferred_total"):
    check(name in metrics_text, f"/metrics lacks {name}")
# the CPU has no memory limit: no admission ever waits for memory
check(main.metric("lqd_admissions_deferred_total") == 0, "lqd_admissions_deferred_total is 0 on the CPU")

# auth: 401 without a key or with a wrong one, on every route but /health
for path in ("/v1/models", "/ready", "/metrics", f"/v1/models/{model}"):
    for key in ("", "wrong"):
        status, body, headers = main.json("GET", path, key=key)
        check(status == 401 and error_shape(body) and body["error"]["code"] == "invalid_api_key",
              f"GET {path} with key {key!r}: {status}")
status, body, _ = main.json("POST", "/v1/completions", {"model": model, "prompt": "x"}, key="wrong")
check(status == 401, f"completion with a wrong key: {status}")
check(main.request("GET", "/health", key="")[0] == 200, "/health is open")
try:
    openai.OpenAI(base_url=f"http://127.0.0.1:{main.port}/v1", api_key="wrong", max_retries=0).models.list()
    check(False, "the client with a wrong key was not refused")
except openai.AuthenticationError:
    pass

# the bad-input catalogue: each a 4xx with the error shape, and the daemon keeps serving
long_prompt = "Once upon a time there was a little girl. " * 200
bad = [
    ("/v1/completions", b"{", 400), ("/v1/completions", b"", 400), ("/v1/completions", b"[1,2]", 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400), ("/v1/completions", b'{"model": "m"} trailing', 400),
    ("/v1/completions", b"[" * 5000 + b"]" * 5000, 400),
    ("/v1/completions", {"prompt": "x"}, 400), ("/v1/completions", {"model": 5, "prompt": "x"}, 400),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("/v1/completions", {"model": model}, 400), ("/v1/completions", {"model": model, "prompt": 5}, 400),
    ("/v1/completions", {"model": model, "prompt": []}, 400),
    ("/v1/completions", {"model": model, "prompt": [[]]}, 400),
    ("/v1/completions", {"model": model, "prompt": [1, 99999]}, 400),
    ("/v1/completions", {"model": model, "prompt": long_prompt}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1e12}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 600}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1.5}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "temperature": 1e308}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "top_p": 2}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "top_k": 1e30}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "seed": 1.5}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "n": 1000000}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "stop": 5}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "stop": ""}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "stop": ["a"] * 9}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "logprobs": 10}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "frequency_penalty": 1}, 400),
    ("/v1/completions", {"model": model, "prompt": "x", "echo": True, "logprobs": 1}, 400),
    ("/v1/chat/completions", {"model": model}, 400),
    ("/v1/chat/completions", {"model": model, "messages": []}, 400),
    ("/v1/chat/completions", {"model": model, "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long_prompt}]}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400),
    ("/v1/models/load", {"path": "../etc"}, 403), ("/v1/models/load", {"path": "/etc"}, 403),
    ("/v1/models/load", {"path": "no-such-dir"}, 404), ("/v1/models/load", {"name": "../x", "path": "x"}, 400),
    ("/v1/models/load", {}, 400), ("/v1/models/unload", {"name": "no-such-model"}, 404),
    ("/v1/models/unload", {"name": 5}, 400),
]
for path, body, expected in bad:
    status, response, _ = main.json("POST", path, body)
    check(status == expected and error_shape(response),
          f"POST {path} {str(body)[:80]}: {status} (expected {expected}) {response}")
# a body over --max-body (1 MiB) is refused from its Content-Length, before it is sent
with socket.create_connection(("127.0.0.1", main.port), timeout=30) as raw:
    raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n\r\n".encode() + b"{" * 1000)
    reply = b""
    while b"}}" not in reply:
        data = raw.recv(65536)
        if not data:
            break
        reply += data
head, _, payload = reply.partition(b"\r\n\r\n")
check(head.startswith(b"HTTP/1.1 413") and error_shape(json.loads(payload[payload.index(b"{"):])),
      f"2 MiB body: {head[:40]!r}")
status, response, _ = main.json("GET", "/v1/no-such-route")
check(status == 404 and error_shape(response), f"unknown route: {status}")
status, response, _ = main.json("GET", "/v1/completions")
check(status == 405 and error_shape(response), f"wrong method: {status}")
status, response, _ = main.json("GET", "/v1/models/no-such-model/allocation.svg")
check(status == 404 and error_shape(response), f"picture of an unknown model: {status}")
try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    check(False, "the client's bad request was not refused")
except openai.BadRequestError as error:
    check(error.status_code == 400, "client sees 400")
check(main.request("GET", "/health")[0] == 200 and main.process.poll() is None, "daemon alive after bad input")
check(client.completions.create(model=model, prompt="", max_tokens=200, temperature=0).choices[0].text == EXPECTED,
      "daemon still serves the same text after bad input")

# hot swap: load under the existing name (same weights), then a new model from --models-dir
status, body, _ = main.json("POST", "/v1/models/load", {"name": model, "path": "stories260K-hf"})
check(status == 200 and body["id"] == model, f"hot swap: {status} {body}")
check(client.completions.create(model=model, prompt="", max_tokens=200, temperature=0).choices[0].text == EXPECTED,
      "same text after a hot swap")
slow_dir = os.path.join(models_dir, "slow")
write_slow_model(slow_dir)
status, body, _ = main.json("POST", "/v1/models/load", {"path": "slow"})
check(status == 200 and body["id"] == "slow" and body["context_length"] == 4096, f"load slow: {status} {body}")
# an LQ variant: compressed to 3 bits/param, loaded, listed with its bits, drawn as lqd inspect draws it
grid = "4,8,fp32,64,256;3,8,fp32,64,256;2,8,fp32,64,256;3,4,bf16,32,64;2,4,fp16,16,16;2,2,bf16,64,256"
lq_dir = os.path.join(models_dir, "stories-3bit")
subprocess.run([LQD, "compress", "--model", os.path.join(ROOT, "models/stories260K-hf"), "--bits", "3", "--rank", "4",
                "--configs", grid, "--out", lq_dir, "--no-cache", "--quiet"], check=True, capture_output=True)
subprocess.run([LQD, "inspect", lq_dir, "--svg", os.path.join(models_dir, "inspect.svg")], check=True,
               capture_output=True)
status, body, _ = main.json("POST", "/v1/models/load", {"path": "stories-3bit"})
check(status == 200 and body["id"] == "stories-3bit" and body["quantization"] == "lq"
      and 2 < body["bits_per_param"] <= 3.0001 and body["effective_bits_per_param"] > body["bits_per_param"],
      f"LQ variant: {status} {body}")
status, svg, _ = main.request("GET", "/v1/models/stories-3bit/allocation.svg")
check(status == 200 and svg == open(os.path.join(models_dir, "inspect.svg"), "rb").read(),
      "allocation.svg equals lqd inspect --svg")
lq_text = client.completions.create(model="stories-3bit", prompt="", max_tokens=20, temperature=0).choices[0].text
check(len(lq_text) > 0, "the LQ variant generates")
listed = [m["id"] for m in main.json("GET", "/v1/models")[1]["data"]]
check(listed[0] == model and "stories-3bit" in listed and "slow" in listed, f"models listed in load order {listed}")
os.symlink("/etc", os.path.join(models_dir, "escape"))
status, body, _ = main.json("POST", "/v1/models/load", {"path": "escape"})
check(status == 403 and error_shape(body), f"symlink escape: {status} {body}")

# a client leaving mid-stream frees its sequence
tokens_before = main.metric("lqd_completion_tokens_total")
connection = http.client.HTTPConnection("127.0.0.1", main.port, timeout=60)
connection.request("POST", "/v1/completions", json.dumps(
    {"model": "slow", "prompt": "Once", "max_tokens": 4000, "temperature": 1, "seed": 1, "stream": True}),
    {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
response = connection.getresponse()
first = response.read1(65536)
check(first.startswith(b"data: "), f"stream started: {first[:40]!r}")
time.sleep(0.2)
check(main.metric("lqd_running_sequences") == 1, "the slow sequence runs")
connection.sock.shutdown(socket.SHUT_RDWR)
connection.close()
deadline = time.time() + 10
while time.time() < deadline and main.metric("lqd_running_sequences") != 0:
    time.sleep(0.05)
check(main.metric("lqd_running_sequences") == 0 and main.metric("lqd_queue_depth") == 0,
      "running sequences back to 0 after the client left")
generated = main.metric("lqd_completion_tokens_total") - tokens_before
check(generated < 3000, f"the abandoned sequence was cancelled early ({generated:.0f} of 4000 tokens)")
status, body, _ = main.json("POST", "/v1/models/unload", {"name": "slow"})
check(status == 200 and body["deleted"] is True, f"unload: {status} {body}")
check(main.json("POST", "/v1/completions", {"model": "slow", "prompt": "x"})[0] == 404, "unloaded model is gone")
check(main.stop() == 0, "main daemon exit status")

# ---------------------------------------------------------------- 429 from a full queue
small = Daemon("--max-running", "1", "--max-queued", "1", key=None)
statuses, retry_after, shapes = [], [], []


def flood(_):
    status, body, headers = small.json("POST", "/v1/completions", {"model": small.model, "prompt": "Once",
                                                                  "max_tokens": 400, "temperature": 0})
    if status == 429:
        retry_after.append(headers.get("retry-after"))
        shapes.append(error_shape(body) and body["error"]["code"] == "rate_limit_exceeded")
    return status


for _ in range(10):
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses += list(pool.map(flood, range(24)))
    if 429 in statuses:
        break
check(429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, f"flood statuses {sorted(set(statuses))}")
check(all(r is not None and r.isdigit() for r in retry_after) and all(shapes), f"429 details {retry_after[:3]}")
check(small.metric('lqd_requests_rejected_total{reason="queue_full"}') == statuses.count(429), "rejections counted")
check(small.json("POST", "/v1/completions", {"model": small.model, "prompt": "", "max_tokens": 200,
                                             "temperature": 0})[1]["choices"][0]["text"] == EXPECTED,
      "serves normally after the flood")

# ---------------------------------------------------------------- SIGTERM drains, exit 0
results = {}


def long_stream():
    results["events"] = sse_events(small, {"model": small.model, "prompt": "", "max_tokens": 500,
                                           "temperature": 0, "stream": True})


thread = threading.Thread(target=long_stream)
thread.start()
time.sleep(0.05)
started = time.time()
small.process.send_signal(signal.SIGTERM)
try:
    code = small.process.wait(15)
except subprocess.TimeoutExpired:
    code = None
elapsed = time.time() - started
thread.join(30)
check(code == 0 and elapsed < 10, f"SIGTERM: exit {code} after {elapsed:.1f} s (grace 10 s)")
check(results.get("events", [""])[-1] == "[DONE]", "the stream in flight finished during the drain")
try:
    small.request("GET", "/health", timeout=2)
    check(False, "still accepting after SIGTERM")
except OSError:
    pass
small.stop()
log = open(small.log_path).read()
check("draining" in log and "stopped" in log, "drain logged")

# ---------------------------------------------------------------- configuration
check(subprocess.run([LQD, "serve", "--help"], capture_output=True).returncode == 0, "serve --help exits 0")
check(subprocess.run([LQD, "serve", "--port", "70000"], capture_output=True).returncode == 2, "bad --port exits 2")
check(subprocess.run([LQD, "serve", "--no-such-flag"], capture_output=True).returncode == 2, "unknown flag exits 2")
config_dir = tempfile.mkdtemp(prefix="lqd-config-")
key_file = os.path.join(config_dir, "keys")
open(key_file, "w").write("# keys\nfile-key\n")
config_file = os.path.join(config_dir, "lqd.conf")
open(config_file, "w").write(f"# lqd serve settings\nmodel = tiny={ROOT}/models/stories260K-hf\nmax_queued = 3\n"
                             f"api-key-file = {key_file}\nlog-format = text\n")
os.environ.update(LQD_LOG_FORMAT="json", LQD_MAX_QUEUED="5")
try:
    configured = Daemon("--config", config_file, "--log-format", "json", key="file-key", pass_key=False)
finally:
    del os.environ["LQD_LOG_FORMAT"], os.environ["LQD_MAX_QUEUED"]
check(configured.json("GET", "/v1/models")[1]["data"][0]["id"] == "tiny", "model NAME=PATH from the config file")
check(configured.request("GET", "/v1/models", key="")[0] == 401, "key from --api-key-file required")
taken = subprocess.run([LQD, "serve", "--port", str(configured.port), "--state-dir", os.path.join(config_dir, "s")],
                       capture_output=True, text=True, timeout=60)
check(taken.returncode == 1 and "cannot listen" in taken.stderr, f"a port in use: exit {taken.returncode}")
check(configured.stop() == 0, "configured daemon exit status")
lines = [line for line in open(configured.log_path) if line.strip()]
check(all(json.loads(line).get("level") for line in lines), "--log-format json writes JSON lines")
check(any(json.loads(line).get("msg") == "listening" for line in lines), "JSON log has the listening line")

if failures():
    print("--- main daemon log (tail) ---\n" + "".join(open(main.log_path).readlines()[-20:]))
for daemon in (main, small, configured):
    shutil.rmtree(daemon.dir, ignore_errors=True)
shutil.rmtree(models_dir, ignore_errors=True)
shutil.rmtree(config_dir, ignore_errors=True)

finish("test_server")
