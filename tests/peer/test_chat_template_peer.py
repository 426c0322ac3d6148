"""lqd's chat renders against the templates themselves, run by jinja2 (issue 7). lqd does not run
Jinja: it recognises a template's format and default system message (core/chat_template.h) and
renders them itself. Each conversation (one user message; system and user; user, assistant,
user; a final assistant message, which lqd continues as transformers' continue_final_message
does) is rendered by tests/tokenize_tool --chat and by jinja2 with transformers' settings
(trim_blocks, lstrip_blocks); the jinja2 text is tokenized by SmolLM2's own pipeline (the
`tokenizers` package on the GGUF's vocabulary and merges, its special pieces recognised), and
the ids must be lqd's. Templates: SmolLM2-135M-Instruct's own (read by lqd from the GGUF),
Qwen2.5-Instruct's, a ChatML one with no default, and Llama 3's (whose pieces SmolLM2's vocabulary
lacks, so they are text on both sides; its bos_token is empty as SmolLM2's tokenizer adds no BOS).
Skipped without the SmolLM2 GGUF (tests/models/fetch_smollm2.sh, LQD_SMOLLM2)."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks  # noqa: E402

try:
    import gguf
    import jinja2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
except ImportError as missing:
    print(f"{missing.name} is not installed (tests/requirements.txt): skipped")
    sys.exit(SKIP)

MODEL = os.environ.get("LQD_SMOLLM2", os.path.join(ROOT, ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TOOL = os.environ.get("LQ_TOKENIZE_TOOL", "build/tests/tokenize_tool")
for needed in (MODEL, TOOL):
    if not os.path.exists(needed):
        print(f"{needed} is missing (tests/models/fetch_smollm2.sh fetches the model): skipped")
        sys.exit(SKIP)

SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat_template (tokenizer_config.json, JSON-decoded): '\n' inside its string
# literals is Jinja's escape, the line breaks between statements are real.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# ChatML with no default system message (the common "chatml" template).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")

# Meta-Llama-3-8B-Instruct's chat_template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = "
          "bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Name 3 colours,\nplease."}],
    "continued": [{"role": "user", "content": "Write a haiku."},
                  {"role": "assistant", "content": "Autumn moonlight"}],
}


def gguf_strings(fields, key):
    field = fields[key]
    return [bytes(field.parts[i]).decode() for i in field.data]


fields = gguf.GGUFReader(MODEL).fields
SMOLLM2 = bytes(fields["tokenizer.chat_template"].parts[fields["tokenizer.chat_template"].data[0]]
                ).decode()
vocab = {piece: i for i, piece in enumerate(gguf_strings(fields, "tokenizer.ggml.tokens"))}
merges = [tuple(m.split(" ", 1)) for m in gguf_strings(fields, "tokenizer.ggml.merges")]
tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
tokenizer.decoder = decoders.ByteLevel()
tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # ids 0, 1, 2


def jinja_render(template, messages):
    """transformers' apply_chat_template text: a generation prompt after a user message, a final
    assistant message continued (the render cut after its content)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    continued = messages[-1]["role"] == "assistant"
    text = env.from_string(template).render(messages=messages, bos_token="", eos_token="",
                                            add_generation_prompt=not continued)
    if continued:
        final = messages[-1]["content"].strip()
        text = text[:text.rindex(final) + len(final)]
    return text


def lqd_render(template, messages):
    """lqd's ids and its (format, default system message), from tokenize_tool --chat."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        document = {"messages": messages}
        if template is not None:
            document["chat_template"] = template
        json.dump(document, f)
    try:
        out = subprocess.run([TOOL, "--chat", f.name, MODEL], capture_output=True, text=True,
                             timeout=60)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise AssertionError(f"tokenize_tool --chat exited {out.returncode}: {out.stderr}")
    ids_line, style_line = out.stdout.split("\n")[:2]
    format_name, _, default = style_line.partition(" ")
    return [int(x) for x in ids_line.split()], format_name, default


checks = Checks()
# (name, template given to lqd or None for the GGUF's own, the jinja2 template, format, default)
CASES = [("SmolLM2 (GGUF)", None, SMOLLM2, "chatml", SMOLLM2_DEFAULT),
         ("Qwen2.5", QWEN25, QWEN25, "chatml", QWEN25_DEFAULT),
         ("ChatML", CHATML, CHATML, "chatml", ""),
         ("Llama 3", LLAMA3, LLAMA3, "llama3", "")]
for name, given, template, expected_format, expected_default in CASES:
    for label, messages in CONVERSATIONS.items():
        ids, format_name, default = lqd_render(given, messages)
        checks.check(format_name == expected_format and default == expected_default,
                     f"{name}: style ({format_name!r}, {default!r}), expected "
                     f"({expected_format!r}, {expected_default!r})")
        text = jinja_render(template, messages)
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        checks.check(ids == expected,
                     f"{name} / {label}: lqd's ids differ from jinja2's render {text!r}:\n"
                     f"  lqd    {ids}\n  jinja2 {expected}\n"
                     f"  lqd's text {tokenizer.decode(ids, skip_special_tokens=False)!r}")
        if expected_default and messages[0]["role"] != "system":
            checks.check(expected_default in text and ids[:2] == [1, vocab["system"]],
                         f"{name} / {label}: no default system message first")
checks.finish()
