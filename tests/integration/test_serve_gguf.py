"""The daemon serving a GGUF file directly (issue 7): `lqd serve --model smollm2=FILE.gguf`
loads SmolLM2-135M-Instruct with the tokenizer and chat template from the file's metadata.
/v1/models reports the ChatML format and the template's default system message; a greedy chat
completion equals a plain completion of the prompt that jinja2 renders from the file's own
template (same text, same prompt token count, finish_reason "stop" at <|im_end|>), for a
conversation without and with a system message. Skipped without the model
(tests/models/fetch_smollm2.sh; $LQD_SMOLLM2) or jinja2.
Environment: LQD (the binary), LQ_REPO_ROOT, LQD_SMOLLM2."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import ROOT, SKIP, JsonDaemon, check, finish  # noqa: E402

MODEL = os.environ.get("LQD_SMOLLM2", os.path.join(ROOT, ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
try:
    import gguf
    import jinja2
except ImportError as missing:
    print(f"{missing.name} is not installed: skipped")
    sys.exit(SKIP)
if not os.path.exists(MODEL):
    print(f"{MODEL} is missing (tests/models/fetch_smollm2.sh fetches it): skipped")
    sys.exit(SKIP)

field = gguf.GGUFReader(MODEL).fields["tokenizer.chat_template"]
template = jinja2.Environment().from_string(bytes(field.parts[field.data[0]]).decode())
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour."}],
]

with tempfile.TemporaryDirectory() as tmp:
    daemon = JsonDaemon(os.path.join(tmp, "state"), "--model", "smollm2=" + MODEL,
                        log_path=os.path.join(tmp, "daemon.log"))
    status, models = daemon.json("GET", "/v1/models")
    entry = next((m for m in (models or {}).get("data", []) if m.get("id") == "smollm2"), {})
    check(status == 200 and entry.get("chat_format") == "chatml" and
          "SmolLM" in (entry.get("chat_default_system") or ""),
          f"/v1/models: {status} {entry}")
    for messages in CONVERSATIONS:
        prompt = template.render(messages=messages, add_generation_prompt=True)
        status, chat = daemon.json("POST", "/v1/chat/completions", {
            "model": "smollm2", "messages": messages, "max_tokens": 24, "temperature": 0})
        status2, plain = daemon.json("POST", "/v1/completions", {
            "model": "smollm2", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        ok = status == 200 and status2 == 200
        check(ok, f"chat {status}, completion {status2}: {chat} {plain}")
        if not ok:
            continue
        content = chat["choices"][0]["message"]["content"]
        check(content and content == plain["choices"][0]["text"],
              f"chat answered {content!r}, the rendered prompt {plain['choices'][0]['text']!r}")
        check(chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"],
              f"prompt tokens: chat {chat['usage']}, rendered {plain['usage']}")
        check(chat["choices"][0]["finish_reason"] == "stop",
              f"finish_reason {chat['choices'][0]['finish_reason']} (expected stop at <|im_end|>)")
        print(f"{messages[-1]['content']!r} -> {content!r} ({chat['usage']['prompt_tokens']} "
              "prompt tokens)")

finish("test_serve_gguf")
