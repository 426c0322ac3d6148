"""`lqd decompose` end to end, checked with NumPy: the JSON report, the stored Q + L1 L2
against the reported errors, Fisher weighting, and clear failures on bad input."""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import STORIES, Checks, decompose_json, require_numpy, run_lqd  # noqa: E402

require_numpy()
import numpy as np  # noqa: E402
import nf_reference as ref  # noqa: E402

checks = Checks()
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.2.mlp.down_proj.weight"
stories, _ = ref.read_safetensors(STORIES)

with tempfile.TemporaryDirectory() as tmp:
    # --- the report and the stored decomposition agree with NumPy ---------------------------
    for name, config, rank in [(Q_PROJ, (3, 8, "fp32", 64, 256), 8), (DOWN, (2, 4, "bf16", 16, 64), 16)]:
        spec = ",".join(str(v) for v in config)
        out = os.path.join(tmp, "lq.safetensors")
        report = decompose_json("--tensor", f"{STORIES}:{name}", "--config", spec, "--rank", str(rank),
                                "--out", out)
        for key in ["rel_error", "quant_rel_error", "iters", "bits_per_param", "seconds"]:
            checks.check(key in report, f"{name}: key {key} in the JSON report")
        w = stories[name].astype(np.float32)
        tensors, metadata = ref.read_safetensors(out)
        q, *_ = ref.dequantize_stored(tensors, name, w.shape, config)
        lora_a, lora_b = tensors[name + ".lora_A"], tensors[name + ".lora_B"]
        checks.check(lora_a.shape == (rank, w.shape[1]) and lora_b.shape == (w.shape[0], rank),
                     f"{name}: lora_A {lora_a.shape}, lora_B {lora_b.shape}")
        approx = q + lora_b.astype(np.float64) @ lora_a.astype(np.float64)
        rel = np.linalg.norm(w - approx) / np.linalg.norm(w)
        checks.check(abs(rel - report["rel_error"]) < 1e-5, f"{name}: stored Q + L1 L2 gives {rel}, report {report['rel_error']}")
        if not report["best_is_half_step"]:
            _, _, _, _, q_numpy = ref.quantize((w - lora_b @ lora_a).astype(np.float32), *config)
            agree = float(np.mean(np.isclose(q, q_numpy, rtol=0, atol=1e-6)))
            checks.check(agree > 0.999, f"{name}: {agree:.4%} of Q equals NumPy's Quantize(W - L1 L2)")
        # One step from Q = 0: L1 L2 is the rank-r SVD of W (Eckart-Young) and Q is NumPy's own
        # quantization of W - L1 L2 (L1 L2 rounded differently: nearly all codes agree).
        one = decompose_json("--tensor", f"{STORIES}:{name}", "--config", spec, "--rank", str(rank),
                             "--iters", "1", "--out", out)
        tensors, _ = ref.read_safetensors(out)
        q1, *_ = ref.dequantize_stored(tensors, name, w.shape, config)
        l1l2 = tensors[name + ".lora_B"].astype(np.float64) @ tensors[name + ".lora_A"]
        u, s, vt = np.linalg.svd(w.astype(np.float64))
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        checks.check(np.abs(l1l2 - best).max() < 1e-4 * np.abs(best).max(), f"{name}: step 1 is the SVD of W")
        _, _, _, _, q_numpy = ref.quantize((w - l1l2).astype(np.float32), *config)
        agree = float(np.mean(np.isclose(q1, q_numpy, rtol=0, atol=1e-6)))
        checks.check(agree > 0.999, f"{name}: {agree:.4%} of Q equals NumPy's Quantize(W - L1 L2)")
        checks.check(one["iters"] == 1 and one["rel_error"] >= report["rel_error"], f"{name}: more steps help")
        _, _, _, _, plain = ref.quantize(w, *config)
        plain_rel = np.linalg.norm(w - plain) / np.linalg.norm(w)
        checks.check(abs(plain_rel - report["quant_rel_error"]) < 1e-6, f"{name}: quant_rel_error")
        checks.check(report["rel_error"] < report["quant_rel_error"], f"{name}: LQ beats plain quantization")
        # L1 = U sqrt(S), L2 = sqrt(S) V^T: both Gram matrices are the same diagonal
        gram_b, gram_a = lora_b.T.astype(np.float64) @ lora_b, lora_a.astype(np.float64) @ lora_a.T
        checks.check(np.allclose(gram_b, gram_a, atol=1e-4 * np.abs(gram_a).max()), f"{name}: balanced factors")
        checks.check(np.allclose(gram_a, np.diag(np.diag(gram_a)), atol=1e-4 * np.abs(gram_a).max()),
                     f"{name}: orthogonal factors")
        bits = config[0] + config[1] / config[3] + {"fp32": 32, "fp16": 16, "bf16": 16}[config[2]] / (config[3] * config[4])
        checks.check(report["bits_per_param"] == bits, f"{name}: bits/param {report['bits_per_param']} vs Eq. 3 {bits}")
        checks.check(1 <= report["best_iter"] <= report["iters"] <= 20, f"{name}: iteration counts")
        checks.check(min(report["error_history"]) >= report["rel_error"] - 1e-7, f"{name}: best step kept")

    # NF4 double quantization is 4.127 bits/param
    nf4 = decompose_json("--tensor", f"{STORIES}:{Q_PROJ}", "--config", "4,8,fp32,64,256", "--rank", "0")
    checks.check(abs(nf4["bits_per_param"] - 4.126953125) < 1e-12, "NF4 = 4.127 bits/param")

    # error falls with rank; same seed, same result
    errors = [decompose_json("--tensor", f"{STORIES}:{DOWN}", "--config", "3,8,fp32,64,256", "--rank", str(r))["rel_error"]
              for r in (0, 4, 16, 32)]
    checks.check(all(a >= b for a, b in zip(errors, errors[1:])), f"error vs rank {errors}")
    big = (np.random.default_rng(5).standard_normal((400, 300)) * 0.02).astype(np.float32)
    ref.write_safetensors(os.path.join(tmp, "big.safetensors"), {"w": ("F32", big.shape, big.tobytes())})
    args = ["--tensor", f"{tmp}/big.safetensors:w", "--config", "3,8,fp32,64,256", "--rank", "16", "--svd", "randomized", "--seed", "9"]
    first, second = decompose_json(*args), decompose_json(*args)
    checks.check(first["rel_error"] == second["rel_error"] and first["svd"] == "randomized", "seeded runs repeat")

    # --- Fisher weighting: the weighted error is lower than the unweighted run's ----------------
    w = stories[DOWN].astype(np.float32)
    rows = np.where(np.arange(w.shape[0]) % 8 == 0, 100.0, 1.0)
    cols = np.where(np.arange(w.shape[1]) % 5 == 0, 30.0, 1.0)
    fisher = (np.outer(rows, cols) * np.random.default_rng(2).uniform(0.5, 1.5, w.shape)).astype(np.float32)
    ref.write_safetensors(os.path.join(tmp, "fisher.safetensors"), {"f": ("F32", fisher.shape, fisher.tobytes())})
    common = ["--tensor", f"{STORIES}:{DOWN}", "--config", "2,8,fp32,64,256", "--rank", "8"]
    plain_out, fisher_out = os.path.join(tmp, "plain.safetensors"), os.path.join(tmp, "fisher_lq.safetensors")
    decompose_json(*common, "--out", plain_out)
    weighted = decompose_json(*common, "--fisher", f"{tmp}/fisher.safetensors:f", "--out", fisher_out)

    def weighted_error(path):
        tensors, _ = ref.read_safetensors(path)
        q, *_ = ref.dequantize_stored(tensors, DOWN, w.shape, (2, 8, "fp32", 64, 256))
        approx = q + tensors[DOWN + ".lora_B"].astype(np.float64) @ tensors[DOWN + ".lora_A"]
        return np.sqrt((fisher * (w - approx) ** 2).sum() / (fisher * w ** 2).sum())

    checks.check(abs(weighted_error(fisher_out) - weighted["fisher_rel_error"]) < 1e-5, "reported Fisher error")
    checks.check(weighted_error(fisher_out) < weighted_error(plain_out),
                 f"Fisher-weighted error {weighted_error(fisher_out)} below the unweighted run's {weighted_error(plain_out)}")

    # --- bad input: a clear message and a non-zero exit, no file written ------------------------
    def fails(expect_code, expect_text, *args):
        result = run_lqd(*args, check=False)
        checks.check(result.returncode == expect_code and expect_text in result.stderr,
                     f"lqd {' '.join(args)}: exit {result.returncode}, stderr {result.stderr!r}")

    fails(1, "no tensor named 'nope'", "decompose", "--tensor", f"{STORIES}:nope", "--config", "3,8,fp32,64,256", "--rank", "4")
    fails(1, "rank 65", "decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "3,8,fp32,64,256", "--rank", "65")
    fails(1, "1 dimensions", "decompose", "--tensor", f"{STORIES}:model.norm.weight", "--config", "3,8,fp32,64,256", "--rank", "4")
    fails(1, "missing.safetensors", "decompose", "--tensor", f"{tmp}/missing.safetensors:w", "--config", "3,8,fp32,64,256", "--rank", "4")
    fails(2, "b0 = 5", "decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "5,8,fp32,64,256", "--rank", "4")
    fails(2, "--rank R is required", "decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "3,8,fp32,64,256")
    fails(2, "--iters", "decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "3,8,fp32,64,256", "--rank", "4", "--iters", "0")
    fails(2, "--tensor FILE.safetensors:NAME is required", "decompose", "--config", "3,8,fp32,64,256", "--rank", "4")
    fails(1, "expected FILE.safetensors:TENSOR_NAME", "decompose", "--tensor", STORIES, "--config", "3,8,fp32,64,256", "--rank", "4")
    fails(1, "Fisher tensor is", "decompose", *common[:2], "--config", "2,8,fp32,64,256", "--rank", "4",
          "--fisher", f"{STORIES}:{Q_PROJ}")
    fails(2, "unknown command", "frobnicate")
    garbage = os.path.join(tmp, "garbage.safetensors")
    with open(garbage, "wb") as f:
        f.write(b"\xff" * 64)
    fails(1, "garbage.safetensors", "decompose", "--tensor", f"{garbage}:w", "--config", "3,8,fp32,64,256", "--rank", "4")
    target = os.path.join(tmp, "no-such-dir", "out.safetensors")
    fails(1, "no-such-dir", "decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "3,8,fp32,64,256", "--rank", "4", "--out", target)
    checks.check(not os.path.exists(os.path.dirname(target)), "failed write leaves nothing")

    # --- help -----------------------------------------------------------------------------------
    for args in (["--help"], ["decompose", "--help"], ["help", "decompose"], ["version"]):
        result = run_lqd(*args, check=False)
        checks.check(result.returncode == 0 and len(result.stdout) > 40, f"lqd {' '.join(args)}")
    text = run_lqd("decompose", "--tensor", f"{STORIES}:{Q_PROJ}", "--config", "3,8,fp32,64,256", "--rank", "8").stdout
    checks.check("LQ error" in text and "quantize error" in text and "3.126953 bits/param" in text, "text report")

checks.finish()
