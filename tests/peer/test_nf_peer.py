"""lqd's NF quantization and bit packing against an independent NumPy implementation
(tests/peer/nf_reference.py): codes, block-scale codes, group scales and the offset must
agree bit for bit on shapes with partial blocks and groups, for every code width and b2,
and for F32, F16 and BF16 inputs."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import Checks, require_numpy, run_lqd  # noqa: E402

require_numpy()
import numpy as np  # noqa: E402
import nf_reference as ref  # noqa: E402

checks = Checks()

# NF tables from the paper's construction vs the values in ../shared/README.md.
expected = {
    2: [-1, 0, 0.3379151, 1],
    3: [-1, -0.4786291, -0.2171418, 0, 0.1609301, 0.3379151, 0.5626169, 1],
}
for bits, values in expected.items():
    checks.check(np.allclose(ref.nf_table(bits), values, atol=1e-6), f"reference NF{bits} table")

cases = [
    ((172, 64), (3, 8, "fp32", 64, 256), "F32"),   # stories260K's MLP shape: partial group
    ((7, 13), (2, 3, "bf16", 4, 3), "F32"),        # partial block and group
    ((64, 64), (4, 8, "fp16", 16, 16), "F16"),
    ((33, 31), (8, 4, "bf16", 16, 4), "BF16"),
    ((50, 40), (4, 2, "fp32", 32, 64), "BF16"),
    ((128, 96), (2, 4, "fp16", 64, 16), "F32"),
]
rng = np.random.default_rng(1234)
with tempfile.TemporaryDirectory() as tmp:
    for shape, config, dtype in cases:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w[0, 0] = 0.3  # an outlier, as real weights have
        if dtype == "F16":
            w = w.astype(np.float16).astype(np.float32)
            raw = w.astype(np.float16).tobytes()
        elif dtype == "BF16":
            w = ref.round_bf16(w)
            raw = ref.bf16_bytes(w)
        else:
            raw = w.tobytes()
        source = os.path.join(tmp, "w.safetensors")
        ref.write_safetensors(source, {"w": (dtype, shape, raw)})
        out = os.path.join(tmp, "q.safetensors")
        spec = ",".join(str(v) for v in config)
        result = run_lqd("decompose", "--tensor", f"{source}:w", "--config", spec, "--rank", "0",
                         "--out", out, "--json")
        tensors, metadata = ref.read_safetensors(out)
        label = f"{shape} {spec} {dtype}"
        checks.check(metadata.get("w.lq_config") == spec, f"{label}: config metadata")
        values, codes, scale_codes, group_scales, offset = ref.dequantize_stored(tensors, "w", shape, config)
        r_codes, r_scale_codes, r_group_scales, r_offset, r_values = ref.quantize(w, *config)
        checks.check(offset == r_offset, f"{label}: offset {offset} vs {r_offset}")
        checks.check(np.array_equal(group_scales, r_group_scales), f"{label}: group scales")
        checks.check(np.array_equal(scale_codes, r_scale_codes), f"{label}: block-scale codes")
        mismatched = int((codes != r_codes.reshape(-1)).sum())
        checks.check(mismatched == 0, f"{label}: {mismatched} of {codes.size} codes differ")
        checks.check(np.array_equal(values, r_values), f"{label}: dequantized values")
        # lqd's reported plain-quantization error is NumPy's
        import json
        report = json.loads(result.stdout)
        rel = float(np.linalg.norm(w - r_values) / np.linalg.norm(w))
        checks.check(abs(report["quant_rel_error"] - rel) <= 1e-6 * max(rel, 1e-12),
                     f"{label}: quant_rel_error {report['quant_rel_error']} vs {rel}")
        checks.check(abs(report["rel_error"] - rel) <= 1e-6 * max(rel, 1e-12), f"{label}: rank 0 rel_error")
        packed_bytes = tensors["w.q_codes"].size
        checks.check(packed_bytes == -(-shape[0] * shape[1] * config[0] // 8),
                     f"{label}: packed codes take {packed_bytes} bytes")

checks.finish()
