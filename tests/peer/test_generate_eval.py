"""`lqd generate` and `lqd eval` on stories260K against llama2.c's and HF transformers' outputs:
greedy text equal to llama2.c's run.c, logits equal to transformers' to 1e-4, perplexity on
the TinyStories subset equal to the reference figure of ../shared/README.md."""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, Checks, require_numpy, run_lqd  # noqa: E402

require_numpy()
import numpy as np  # noqa: E402

checks = Checks()
BIN = os.path.join(ROOT, "models/stories260K/stories260K.bin")
TOK = os.path.join(ROOT, "models/stories260K/tok512.bin")
HF = os.path.join(ROOT, "models/stories260K-hf")
EXPECTED = open(os.path.join(ROOT, "models/stories260K/expected_run_t0_n200.txt")).read()
TINYSTORIES = os.path.join(ROOT, "..", "shared", "data", "tinystories_val_subset.txt")

# greedy generation equals llama2.c run.c -t 0 -n 200, from the .bin and the HF directory
for model in (BIN, HF):
    out = run_lqd("generate", "--model", model, "--tokenizer", TOK, "--prompt", "", "--max-tokens", "200",
                  "--temperature", "0").stdout
    checks.check(out.rstrip("\n") == EXPECTED.rstrip("\n"), f"{model}: greedy text\n{out!r}\nvs\n{EXPECTED!r}")

# a prompt continues it; sampling with a seed repeats; stop strings cut the text
prompted = run_lqd("generate", "--model", BIN, "--tokenizer", TOK, "--prompt", "Once upon a time,",
                   "--max-tokens", "30", "--temperature", "0").stdout
checks.check(EXPECTED.startswith("Once upon a time," + prompted[:20]), f"prompted continuation {prompted!r}")
sampled = [run_lqd("generate", "--model", BIN, "--tokenizer", TOK, "--max-tokens", "60", "--temperature", "0.9",
                   "--top-p", "0.9", "--seed", str(seed)).stdout for seed in (7, 7, 8)]
checks.check(sampled[0] == sampled[1] and sampled[0] != sampled[2], "same seed, same text; other seed, other text")
stopped = run_lqd("generate", "--model", BIN, "--tokenizer", TOK, "--max-tokens", "200", "--temperature", "0",
                  "--stop", "Lily").stdout
checks.check(stopped == EXPECTED[: EXPECTED.index("Lily")], f"stop string: {stopped!r}")

# logits of the reference ids equal HF transformers' (float32) to 1e-4
reference = json.load(open(os.path.join(HF, "ref_logits.json")))["greedy200"]["ids"]
expected_logits = np.load(os.path.join(HF, "ref_logits_greedy200.npy"))
with tempfile.TemporaryDirectory() as tmp:
    for model in (HF, BIN):
        out = os.path.join(tmp, "logits.npy")
        run_lqd("eval", "--model", model, "--tokens", ",".join(map(str, reference)), "--dump-logits", out)
        logits = np.load(out)
        worst = float(np.abs(logits - expected_logits).max())
        checks.check(logits.shape == (200, 512) and worst < 1e-4, f"{model}: logits differ by {worst}")

# perplexity: 4.844 +- 0.005 on the first 200,000 tokens (../shared/README.md)
if os.path.exists(TINYSTORIES):
    report = json.loads(run_lqd("eval", "--model", HF, "--tokenizer", TOK, "--ppl", TINYSTORIES,
                                "--max-tokens", "200000", "--json").stdout)
    checks.check(report["tokens"] == 200000, f"tokens {report['tokens']}")
    checks.check(abs(report["ppl"] - 4.844) <= 0.005, f"perplexity {report['ppl']}")
    for key in ("ppl", "nll", "tokens", "seconds"):
        checks.check(key in report, f"eval JSON has {key}")
else:
    print("../shared/data is absent: perplexity check skipped")

# an LQ directory: its logits equal those of a dense checkpoint holding Q + L1 L2 dequantized
# by NumPy (tests/peer/nf_reference.py), so the dequantizing matmul is checked independently
import shutil  # noqa: E402
import struct  # noqa: E402

import nf_reference as ref  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    lq_dir = os.path.join(tmp, "lq")
    run_lqd("compress", "--model", HF, "--tokenizer", TOK, "--bits", "3.5", "--rank", "8", "--out", lq_dir,
            "--configs", "4,8,fp32,64,256;3,4,bf16,16,64;2,8,fp16,32,16", "--no-cache", "--quiet")
    tensors, metadata = ref.read_safetensors(os.path.join(lq_dir, "model.safetensors"))
    dense = {}
    for name, array in tensors.items():
        if name.endswith(".q_codes"):
            prefix = name[: -len(".q_codes")]
            b0, b1, b2, B0, B1 = metadata[prefix + ".lq_config"].split(",")
            shape = tuple(int(v) for v in metadata[prefix + ".lq_shape"].split(","))
            q, *_ = ref.dequantize_stored(tensors, prefix, shape, (int(b0), int(b1), b2, int(B0), int(B1)))
            weight = q + tensors[prefix + ".lora_B"].astype(np.float64) @ tensors[prefix + ".lora_A"]
            dense[prefix + ".weight"] = weight.astype(np.float32)
        elif not any(name.endswith(s) for s in (".q_scale_codes", ".q_group_scales", ".q_scale_offset",
                                                 ".lora_A", ".lora_B")):
            dense[name] = np.asarray(tensors[name], dtype=np.float32)
    dense_dir = os.path.join(tmp, "dense")
    os.makedirs(dense_dir)
    shutil.copy(os.path.join(HF, "config.json"), dense_dir)
    ref.write_safetensors(os.path.join(dense_dir, "model.safetensors"),
                          {k: ("F32", v.shape, np.ascontiguousarray(v).tobytes()) for k, v in dense.items()})
    ids = ",".join(map(str, reference[:120]))
    # the exact kernels (LQ_CPU_KERNEL=avx2, or the portable one where AVX2 is absent) and the
    # default one (the integer kernel where the CPU has AVX-512: int16 codes and activations,
    # not exact, within ~1e-4 of the logits' scale; kernels/cpu/int_gemv.h), both with the fp32
    # head (an LQ model's default on such CPUs is the int8 head: its perplexity is checked below)
    for kernel, tolerance in (("avx2", 1e-3), (None, 2e-2)):
        env = {"LQ_CPU_HEAD": "fp32"}
        if kernel:
            env["LQ_CPU_KERNEL"] = kernel
        outs = []
        for model in (lq_dir, dense_dir):
            out = os.path.join(tmp, os.path.basename(model) + ".npy")
            run_lqd("eval", "--model", model, "--tokens", ids, "--dump-logits", out, env=env)
            outs.append(np.load(out))
        worst = float(np.abs(outs[0] - outs[1]).max())
        checks.check(worst < tolerance,
                     f"LQ directory logits vs NumPy-dequantized dense ({kernel or 'default'} kernel): {worst}")
    # the exact decode path (1 token per step) of the LQ directory gives the same greedy text
    exact = {"LQ_CPU_KERNEL": "avx2", "LQ_CPU_HEAD": "fp32"}
    text_lq = run_lqd("generate", "--model", lq_dir, "--max-tokens", "60", "--temperature", "0", env=exact).stdout
    text_dense = run_lqd("generate", "--model", dense_dir, "--tokenizer", TOK, "--max-tokens", "60",
                         "--temperature", "0", env=exact).stdout
    checks.check(text_lq == text_dense and len(text_lq) > 100, f"LQ greedy text {text_lq!r} vs {text_dense!r}")
    if os.path.exists(TINYSTORIES):
        lq_ppl = json.loads(run_lqd("eval", "--model", lq_dir, "--ppl", TINYSTORIES, "--max-tokens", "20000",
                                    "--json").stdout)["ppl"]
        fp_ppl = json.loads(run_lqd("eval", "--model", HF, "--tokenizer", TOK, "--ppl", TINYSTORIES,
                                    "--max-tokens", "20000", "--json").stdout)["ppl"]
        checks.check(fp_ppl < lq_ppl < fp_ppl * 1.15, f"LQ perplexity {lq_ppl} vs fp32 {fp_ppl}")

# bad input
for args, text in [
    (["generate", "--model", "/nonexistent"], "/nonexistent"),
    (["generate", "--model", BIN, "--tokenizer", "/nonexistent.bin"], "/nonexistent.bin"),
    (["eval", "--model", HF, "--tokenizer", TOK, "--ppl", "/nonexistent.txt"], "/nonexistent.txt"),
    (["eval", "--model", BIN, "--tokens", "1,999", "--dump-logits", "/tmp/x.npy"], "999"),
    (["generate", "--model", BIN, "--tokenizer", TOK, "--temperature", "-1"], "--temperature"),
]:
    result = run_lqd(*args, check=False)
    checks.check(result.returncode != 0 and text in result.stderr, f"lqd {' '.join(args)}: {result.stderr!r}")

checks.finish()
