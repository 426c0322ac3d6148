#!/usr/bin/env python3
"""Reference figures for SmolLM2-135M-Instruct (Q4_1 GGUF) computed by HF transformers, which
loads the GGUF itself (its GGUF support dequantizes every tensor with the gguf package and
converts the tokenizer metadata). Writes smollm2_reference.npz beside this script; the peer
test tests/peer/test_smollm2_peer.py compares lqd against it. torch + transformers are too
heavy for CI (~5 GB), hence a committed fixture and this script that made it:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers accelerate gguf
    /tmp/ref/bin/python tests/peer/reference/make_smollm2_reference.py \
        --gguf .models/SmolLM2-135M-Instruct.Q4_1.gguf --wiki ../shared/data/wiki.test.raw

Contents (fp32 model, CPU):
  prompts / prompt_ids: three prompts and their ids (transformers' tokenizer, no BOS: the
      GGUF says add_bos_token false)
  last_logits[p]: the full logits row at each prompt's last position
  logit_columns, column_logits[p]: every position's logits at 1024 fixed vocabulary columns
  greedy_ids[p]: 32 greedy tokens after each prompt (model.generate, do_sample False)
  wiki_ids, wiki_offsets: every line of wiki.test.raw (split on '\\n', a trailing '\\r'
      removed) tokenized alone
  ppl_window_nll, ppl_window_tokens: perplexity protocol "stream" (lqd eval --documents
      stream --context 2048 --max-tokens 100000): the whole file as one token sequence, cut
      into consecutive 2048-token windows, each evaluated from position 0, its first token not
      predicted; summed nll (float64) and predicted tokens per window, up to 100,000 tokens.
  own_ppl_window_nll, own_ppl_window_tokens: the same with the file tokenized by SmolLM2's
      own pipeline (Digits(individual) then ByteLevel, as its tokenizer.json and llama.cpp
      have it, run by the tokenizers package on the GGUF's vocabulary and merges), which
      transformers' GGUF conversion drops: the two token streams differ where whitespace meets
      a digit (" \r\n 1"), so this is the model compared on lqd's own ids.
  --ppl-only adds the own_ppl entries to an existing file.
"""
import argparse
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from smollm2_tokenizer import own_tokenizer  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n    ",
]
CONTEXT = 2048
PPL_TOKENS = 100_000


def stream_nll(model, stream):
    """Summed nll and predicted tokens of each CONTEXT-token window, up to PPL_TOKENS."""
    nlls, counts, total = [], [], 0
    for start in range(0, len(stream) - 1, CONTEXT):
        window = stream[start:start + CONTEXT]
        predicted = min(len(window) - 1, PPL_TOKENS - total)
        if predicted <= 0:
            break
        logits = model(torch.tensor([window[:predicted]])).logits[0].double()
        targets = torch.tensor(window[1:predicted + 1])
        nlls.append(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item())
        counts.append(predicted)
        total += predicted
        print(f"window {len(nlls)}: {predicted} tokens, ppl so far "
              f"{np.exp(sum(nlls) / total):.4f}", flush=True)
    return nlls, counts


def add_perplexities(out, model, tokenizer, text, gguf_path, keys=("ppl", "own_ppl")):
    for key in keys:
        stream = (tokenizer(text)["input_ids"] if key == "ppl" else
                  own_tokenizer(gguf_path).encode(text).ids)
        nlls, counts = stream_nll(model, stream)
        out[f"{key}_window_nll"] = np.array(nlls, dtype=np.float64)
        out[f"{key}_window_tokens"] = np.array(counts, dtype=np.int64)
        print(f"{key}: perplexity {np.exp(sum(nlls) / sum(counts)):.6f} over {sum(counts)} "
              "tokens", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--ppl-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "smollm2_reference.npz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    if args.ppl_only:
        text = open(args.wiki, encoding="utf-8", newline="").read()
        out = dict(np.load(args.out))
        with torch.no_grad():
            add_perplexities(out, model, tokenizer, text, args.gguf, ("own_ppl",))
        save(out, args.out)
        return
    out = {"prompts": np.array(PROMPTS)}
    rng = np.random.default_rng(0)
    columns = np.sort(rng.choice(model.config.vocab_size, 1024, replace=False)).astype(np.int32)
    out["logit_columns"] = columns
    with torch.no_grad():
        for p, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt)["input_ids"]
            out[f"prompt_ids_{p}"] = np.array(ids, dtype=np.int32)
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            out[f"last_logits_{p}"] = logits[-1]
            out[f"column_logits_{p}"] = logits[:, columns]
            generated = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            out[f"greedy_ids_{p}"] = generated[0, len(ids):].numpy().astype(np.int32)
            print(prompt, "->", repr(tokenizer.decode(generated[0, len(ids):])), flush=True)

        # the file's exact text: wiki.test.raw has CRLF line ends, which text mode would drop
        text = open(args.wiki, encoding="utf-8", newline="").read()
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        flat, offsets = [], [0]
        for line in lines:
            flat.extend(tokenizer(line)["input_ids"])
            offsets.append(len(flat))
        out["wiki_ids"] = np.array(flat, dtype=np.int32)
        out["wiki_offsets"] = np.array(offsets, dtype=np.int64)
        print(f"wiki: {len(lines)} lines, {len(flat)} tokens", flush=True)

        add_perplexities(out, model, tokenizer, text, args.gguf)
    save(out, args.out)


def save(out, path):
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
