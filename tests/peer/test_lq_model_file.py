"""An LQ model directory read by others: HuggingFace's `safetensors` package opens the file
(standard header, lqd metadata, every non-BF16 tensor), and NumPy alone rebuilds each matrix
as Q + lora_B @ lora_A close to the source weights with the configuration the metadata names."""
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, SKIP, Checks, require_numpy, run_lqd  # noqa: E402

require_numpy()
try:
    from safetensors import safe_open
except ImportError:
    print("the safetensors package is not installed (pip install safetensors): skipped")
    sys.exit(SKIP)
import numpy as np  # noqa: E402
import nf_reference as ref  # noqa: E402

checks = Checks()
SOURCE = os.path.join(ROOT, "models/stories260K-hf")
CONFIGS = "4,8,fp32,64,256;3,8,fp32,64,256;2,8,fp32,64,256;3,4,bf16,32,64;2,4,fp16,16,16;4,2,bf16,64,16"
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
RANK = 4

source, _ = ref.read_safetensors(os.path.join(SOURCE, "model.safetensors"))
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "lq")
    report = json.loads(run_lqd("compress", "--model", SOURCE, "--bits", "3", "--rank", str(RANK),
                                "--configs", CONFIGS, "--no-cache", "--out", out, "--quiet", "--json").stdout)
    path = os.path.join(out, "model.safetensors")
    info = {m["name"]: m for m in json.loads(run_lqd("inspect", out, "--json").stdout)["matrices"]}

    # --- the file layout, by hand: 8-byte length, JSON header, tensors back to back ----------
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    checks.check(spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - length, "tensors fill the data section")
    checks.check(all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "no gaps or overlaps")
    checks.check(set(header["__metadata__"].values()) and
                 all(isinstance(v, str) for v in header["__metadata__"].values()), "string metadata")

    # --- the safetensors package ----------------------------------------------------------------
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
        names = set(f.keys())
        checks.check(metadata.get("lqd.format") == "lq-v1", f"lqd.format {metadata.get('lqd.format')}")
        checks.check(metadata.get("lqd.bits") == "3" and metadata.get("lqd.rank") == str(RANK)
                     and metadata.get("lqd.grid") == "6", f"lqd metadata {metadata}")
        for name in ["model.embed_tokens.weight", "model.norm.weight",
                     "model.layers.4.post_attention_layernorm.weight"]:
            checks.check(name in names and np.array_equal(f.get_tensor(name), source[name]),
                         f"{name} kept in fp32, unchanged")
        checks.check("lm_head.weight" not in names, "tied head not stored twice")
        for name in names:
            if header[name]["dtype"] != "BF16":  # NumPy has no bfloat16
                tensor = f.get_tensor(name)
                checks.check(list(tensor.shape) == header[name]["shape"], f"{name} shape")

    # --- NumPy rebuilds W ~ Q + lora_B lora_A ----------------------------------------------------
    tensors, _ = ref.read_safetensors(path)
    total_error = 0.0
    for layer in range(5):
        for kind in KINDS:
            prefix = f"model.layers.{layer}.{kind}"
            w = source[prefix + ".weight"].astype(np.float64)
            config = metadata[prefix + ".lq_config"].split(",")
            config = (int(config[0]), int(config[1]), config[2], int(config[3]), int(config[4]))
            checks.check(metadata[prefix + ".lq_shape"] == f"{w.shape[0]},{w.shape[1]}"
                         and metadata[prefix + ".lq_rank"] == str(RANK), f"{prefix}: shape and rank")
            checks.check(list(config) == info[prefix]["config"], f"{prefix}: inspect shows {info[prefix]['config']}")
            q, *_ = ref.dequantize_stored(tensors, prefix, w.shape, config)
            lora_a, lora_b = tensors[prefix + ".lora_A"], tensors[prefix + ".lora_B"]
            checks.check(lora_a.shape == (RANK, w.shape[1]) and lora_b.shape == (w.shape[0], RANK),
                         f"{prefix}: PEFT orientation")
            lq = q + lora_b.astype(np.float64) @ lora_a.astype(np.float64)
            *_, plain = ref.quantize(w.astype(np.float32), *config)
            rel_lq = np.linalg.norm(w - lq) / np.linalg.norm(w)
            rel_plain = np.linalg.norm(w - plain) / np.linalg.norm(w)
            checks.check(rel_lq < rel_plain,
                         f"{prefix}: Q + L1 L2 error {rel_lq:.4f}, plain quantization {rel_plain:.4f}")
            total_error += np.linalg.norm(w - lq) ** 2
    # The allocation's objective, recomputed from the file alone.
    checks.check(abs(total_error - report["total_error"]) < 1e-5 * report["total_error"],
                 f"sum of squared errors {total_error:.8g}, lqd reports {report['total_error']:.8g}")

checks.finish()
