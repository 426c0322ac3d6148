"""An independent NumPy implementation of LQ-LoRA's NormalFloat quantizer, written from
the paper (§2.2, §3.2) and ../shared/docs/LQ-REFERENCE.md, to check lqd against.
Arithmetic is float32 in the same order the reference describes, so codes agree bit for bit."""
import json
import struct
from statistics import NormalDist

import numpy as np

OUTER = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)


def nf_table(bits):
    """NF-k code values: Gaussian quantiles, 2^(k-1) positive, 2^(k-1)-1 negative, and 0."""
    ppf = NormalDist().inv_cdf
    half = 2 ** (bits - 1)
    positive = [ppf(p) for p in np.linspace(OUTER, 0.5, half + 1)[:-1]]
    negative = [-ppf(p) for p in np.linspace(OUTER, 0.5, half)[:-1]]
    values = np.array(sorted(positive + negative + [0.0]), dtype=np.float64)
    return (values / values.max()).astype(np.float32)


def round_bf16(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded.astype(np.uint32) << 16).view(np.float32)


def cast_b2(x, b2):
    x = np.asarray(x, dtype=np.float32)
    if b2 == "fp32":
        return x
    if b2 == "fp16":
        return x.astype(np.float16).astype(np.float32)
    return round_bf16(x)


def quantize(w, b0, b1, b2, B0, B1):
    """Returns (codes, scale_codes, group_scales (float32, already cast), offset, dequantized)."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    n = flat.size
    n_blocks = -(-n // B0)
    n_groups = -(-n_blocks // B1)
    padded = np.zeros(n_blocks * B0, dtype=np.float32)
    padded[:n] = flat
    absmax = np.abs(padded).reshape(n_blocks, B0).max(axis=1).astype(np.float32)
    offset = np.float32(absmax.min())
    shifted = (absmax - offset).astype(np.float32)
    levels = np.float32(2 ** b1 - 1)
    group_padded = np.zeros(n_groups * B1, dtype=np.float32)
    group_padded[:n_blocks] = shifted
    group_scales = cast_b2(group_padded.reshape(n_groups, B1).max(axis=1), b2)
    a = np.repeat(group_scales, B1)[:n_blocks]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((shifted * levels) / a).astype(np.float32)
    q = np.where(a > 0, q, 0)
    scale_codes = np.clip(q, 0, levels).astype(np.uint8)
    scale_hat = (offset + (scale_codes.astype(np.float32) * a) / levels).astype(np.float32)

    table = nf_table(b0)
    midpoints = ((table[:-1] + table[1:]) * np.float32(0.5)).astype(np.float32)
    per_value_scale = np.repeat(scale_hat, B0)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = (flat / per_value_scale).astype(np.float32)
    # nearest code = number of midpoints strictly below: ties take the lower code
    codes = np.searchsorted(midpoints, normalized, side="left").astype(np.uint8)
    codes = np.where(per_value_scale == 0, 2 ** (b0 - 1) - 1, codes).astype(np.uint8)
    dequantized = (table[codes] * per_value_scale).astype(np.float32)
    return codes, scale_codes, group_scales, offset, dequantized.reshape(w.shape)


def unpack_bits(packed, count, bits):
    """Inverse of lqd's LSB-first dense bit packing."""
    as_bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    as_bits = as_bits[: count * bits].reshape(count, bits).astype(np.uint32)
    return (as_bits << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint8)


def dequantize_stored(tensors, prefix, shape, config):
    """Dequantizes lqd's stored Q (see core/lq_store.h) with NumPy alone."""
    b0, b1, b2, B0, B1 = config
    n = shape[0] * shape[1]
    n_blocks = -(-n // B0)
    codes = unpack_bits(tensors[prefix + ".q_codes"], n, b0)
    scale_codes = unpack_bits(tensors[prefix + ".q_scale_codes"], n_blocks, b1)
    group_scales = np.asarray(tensors[prefix + ".q_group_scales"], dtype=np.float32)
    offset = np.float32(tensors[prefix + ".q_scale_offset"][0])
    a = np.repeat(group_scales, B1)[:n_blocks]
    scale_hat = (offset + (scale_codes.astype(np.float32) * a) / np.float32(2 ** b1 - 1)).astype(np.float32)
    values = nf_table(b0)[codes] * np.repeat(scale_hat, B0)[:n]
    return values.astype(np.float32).reshape(shape), codes, scale_codes, group_scales, offset


def read_safetensors(path):
    """Minimal safetensors reader (F32/F16/BF16/U8), independent of lqd and of the
    safetensors package, so BF16 needs no torch."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = body[begin:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype={"F32": np.float32, "F16": np.float16, "U8": np.uint8}[dtype])
        tensors[name] = array.reshape(info["shape"])
    return tensors, header.get("__metadata__", {})


def write_safetensors(path, tensors):
    """Writes {name: (dtype, shape, raw bytes)} by hand (BF16 included)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def bf16_bytes(array):
    bits = round_bf16(array).view(np.uint32) >> 16
    return bits.astype(np.uint16).tobytes()
