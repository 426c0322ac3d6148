"""lqd's GGUF reader against the gguf Python package (ggml's own gguf-py).

Files are written with gguf.GGUFWriter: metadata of every value type, and tensors of every
type lqd reads, quantized by gguf.quants.quantize where the package implements it and as
random raw blocks (finite fp16 scales) for every type, K-quants included. lqd's
dequantization (tests/peer/gguf_tool.c dump) must equal gguf.quants.dequantize bit for bit;
the metadata (gguf_tool meta) and tensor infos (gguf_tool tensors) must equal what was written
and what gguf.GGUFReader reads back."""
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_util import SKIP, Checks, require_numpy  # noqa: E402

require_numpy()
try:
    import gguf  # noqa: E402
    import gguf.quants  # noqa: E402
except ImportError:
    print("gguf is not installed (tests/run.sh installs it in a venv): skipped")
    sys.exit(SKIP)
import numpy as np  # noqa: E402

TOOL = os.environ.get("LQ_GGUF_TOOL", "build/tests/gguf_tool")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
READABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the fp16 scale fields in each block (d, and dmin/m where there is one).
HALF_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
               Q.Q6_K: [208]}


def tool(*args):
    return subprocess.run([TOOL, *args], capture_output=True, text=True, timeout=300)


def random_halves(rng, n):
    """Finite fp16 values across the range, subnormals and zero included."""
    magnitude = 10.0 ** rng.uniform(-7, 4, n)
    values = (rng.choice([-1.0, 1.0], n) * magnitude).astype(np.float16)
    values[rng.random(n) < 0.05] = 0
    assert np.isfinite(values).all()
    return values.view(np.uint16)


def random_blocks(rng, qtype, rows, cols):
    """rows x (cols / block) random raw blocks of qtype with finite scales, as uint8."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block
    raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        raw[:, at:at + 2] = random_halves(rng, blocks).view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // block * size)


def tensor_cases(rng):
    """(name, qtype, uint8 bytes shaped (rows, row_bytes) or float array, numpy shape)."""
    cases = []
    for qtype in READABLE:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 3, max(2, 512 // block) * block
        data = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        data[0, :7] = [0, -0.0, 1e-8, -3.5, 1e4, 65504, 1e-30]
        try:
            quantized = gguf.quants.quantize(data, qtype)
            cases.append((f"quantized.{qtype.name}", qtype, quantized, (rows, cols)))
        except NotImplementedError:
            pass
        if qtype in HALF_FIELDS:
            cases.append((f"random.{qtype.name}", qtype, random_blocks(rng, qtype, rows, cols),
                          (rows, cols)))
    # More dims: [2, 3, 64] and [2, 1, 2, 256] (NumPy order).
    cases.append(("blk.0.dims3", Q.Q8_0, random_blocks(rng, Q.Q8_0, 6, 64), (2, 3, 64)))
    cases.append(("blk.0.dims4", Q.Q4_K, random_blocks(rng, Q.Q4_K, 4, 256), (2, 1, 2, 256)))
    return cases


def as_bytes(array):
    return np.ascontiguousarray(array).view(np.uint8).reshape(array.shape[0], -1)


def write_file(path, cases, metadata, alignment=None):
    writer = gguf.GGUFWriter(path, arch="llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, qtype, array, shape in cases:
        if qtype in (Q.F32, Q.F16) and array.dtype != np.uint8:
            writer.add_tensor(name, array.reshape(shape))
        else:
            raw = as_bytes(array)
            byte_shape = (*shape[:-1], raw.size // int(np.prod(shape[:-1])))
            writer.add_tensor(name, raw.reshape(byte_shape), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def metadata_cases():
    """(key, value, type, element type) for every value type, with boundary values."""
    s = [
        ("t.uint8", 255, V.UINT8, None), ("t.int8", -128, V.INT8, None),
        ("t.uint16", 65535, V.UINT16, None), ("t.int16", -32768, V.INT16, None),
        ("t.uint32", 2**32 - 1, V.UINT32, None), ("t.int32", -2**31, V.INT32, None),
        ("t.float32", 0.1, V.FLOAT32, None), ("t.float32_inf", float("-inf"), V.FLOAT32, None),
        ("t.bool_true", True, V.BOOL, None), ("t.bool_false", False, V.BOOL, None),
        ("t.string", "héllo wörld ✓", V.STRING, None), ("t.string_empty", "", V.STRING, None),
        ("t.uint64", 2**64 - 1, V.UINT64, None), ("t.int64", -2**63, V.INT64, None),
        ("t.float64", -1e300, V.FLOAT64, None), ("t.float64_tiny", 5e-324, V.FLOAT64, None),
    ]
    arrays = [
        ("a.uint8", [0, 1, 255], V.UINT8), ("a.int8", [-128, 0, 127], V.INT8),
        ("a.uint16", [0, 65535], V.UINT16), ("a.int16", [-32768, 32767], V.INT16),
        ("a.uint32", [0, 2**32 - 1], V.UINT32), ("a.int32", [1, -2, 3], V.INT32),
        ("a.float32", [0.5, -1e-40, 3.4e38], V.FLOAT32), ("a.bool", [True, False, True], V.BOOL),
        ("a.uint64", [2**64 - 1, 0], V.UINT64), ("a.int64", [-2**63, 2**63 - 1], V.INT64),
        ("a.float64", [1.0 / 3, -0.0], V.FLOAT64),
        ("tokenizer.ggml.tokens", ["<unk>", "<s>", "", "▁the", "\n", "日本"], V.STRING),
    ]
    return s + [(k, v, V.ARRAY, t) for k, v, t in arrays]


def expected_scalar(value, vtype):
    if vtype == V.FLOAT32:
        return format(struct.unpack("<I", struct.pack("<f", value))[0], "08x")
    if vtype == V.FLOAT64:
        return format(struct.unpack("<Q", struct.pack("<d", value))[0], "016x")
    if vtype == V.BOOL:
        return "1" if value else "0"
    if vtype == V.STRING:
        return value.encode("utf-8").hex()
    return str(value)


TYPE_NAMES = {V.UINT8: "uint8", V.INT8: "int8", V.UINT16: "uint16", V.INT16: "int16",
              V.UINT32: "uint32", V.INT32: "int32", V.FLOAT32: "float32", V.BOOL: "bool",
              V.STRING: "string", V.ARRAY: "array", V.UINT64: "uint64", V.INT64: "int64",
              V.FLOAT64: "float64"}


def expected_line(key, value, vtype, sub_type):
    if vtype == V.ARRAY:
        items = ",".join(expected_scalar(v, sub_type) for v in value)
        return f"{key}\tarray\tarray:{TYPE_NAMES[sub_type]} {items}"
    return f"{key}\t{TYPE_NAMES[vtype]}\t{expected_scalar(value, vtype)}"


def check_file(checks, path, cases, metadata, alignment):
    # Metadata: every line as written (general.* keys first, as the writer orders them).
    result = tool("meta", path)
    checks.check(result.returncode == 0, f"gguf_tool meta: {result.stderr}")
    lines = result.stdout.splitlines()
    wanted = [expected_line(*m) for m in metadata]
    for line in wanted:
        checks.check(line in lines, f"metadata line missing or different: {line!r}")
    checks.check(f"general.architecture\tstring\t{b'llama'.hex()}" in lines, "architecture")
    if alignment:
        checks.check(f"general.alignment\tuint32\t{alignment}" in lines, "alignment key")
    checks.check(len(lines) == len(wanted) + 1 + (1 if alignment else 0),
                 f"{len(lines)} metadata lines")

    # Tensor infos against gguf.GGUFReader.
    reader = gguf.GGUFReader(path)
    result = tool("tensors", path)
    checks.check(result.returncode == 0, f"gguf_tool tensors: {result.stderr}")
    ours = [line.split("\t") for line in result.stdout.splitlines()]
    checks.check(len(ours) == len(reader.tensors), "tensor count")
    for mine, theirs in zip(ours, reader.tensors):
        name, type_name, dims, offset, nbytes = mine
        checks.check(name == theirs.name, f"tensor name {name} vs {theirs.name}")
        checks.check(type_name == theirs.tensor_type.name, f"{name}: type {type_name}")
        checks.check(dims == ",".join(str(int(d)) for d in theirs.shape), f"{name}: dims {dims}")
        checks.check(int(offset) + reader.data_offset == theirs.data_offset, f"{name}: offset")
        checks.check(int(offset) % (alignment or 32) == 0, f"{name}: offset alignment")
        checks.check(int(nbytes) == theirs.n_bytes, f"{name}: nbytes {nbytes}")

    # Dequantization, bit for bit.
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "values.f32")
        for name, qtype, array, shape in cases:
            result = tool("dump", path, name, out)
            if not checks.check_ok(result.returncode == 0, f"dump {name}: {result.stderr}"):
                continue
            mine = np.fromfile(out, dtype=np.float32)
            if qtype in (Q.F32, Q.F16) and array.dtype != np.uint8:
                theirs = array.astype(np.float32).reshape(-1)
            else:
                theirs = gguf.quants.dequantize(as_bytes(array), qtype).reshape(-1)
            same = mine.shape == theirs.shape and mine.view(np.uint32).tobytes() == \
                theirs.astype(np.float32).view(np.uint32).tobytes()
            if not same and mine.shape == theirs.shape:
                bad = np.nonzero(mine.view(np.uint32) != theirs.view(np.uint32))[0]
                print(f"{name}: {bad.size} values differ, first at {bad[0]}: "
                      f"{mine[bad[0]]!r} vs {theirs[bad[0]]!r}")
            checks.check(same, f"{name} ({qtype.name}) dequantizes bit for bit like gguf-py")


class PeerChecks(Checks):
    def check_ok(self, condition, message):
        self.check(condition, message)
        return condition


def main():
    checks = PeerChecks()
    rng = np.random.default_rng(7)
    metadata = metadata_cases()
    cases = tensor_cases(rng)
    covered = {qtype for _, qtype, _, _ in cases}
    checks.check(covered == set(READABLE), f"types covered: {sorted(q.name for q in covered)}")
    with tempfile.TemporaryDirectory() as tmp:
        for alignment in (None, 64):
            path = os.path.join(tmp, f"model-{alignment}.gguf")
            write_file(path, cases, metadata, alignment)
            check_file(checks, path, cases, metadata, alignment)

        # A type lqd does not read is refused by name, while the file itself opens.
        path = os.path.join(tmp, "q2k.gguf")
        raw = rng.integers(0, 256, (2, 84), dtype=np.uint8)
        write_file(path, [("blk.0.attn_q.weight", Q.Q2_K, raw, (2, 256))], [], None)
        result = tool("dump", path, "blk.0.attn_q.weight", os.path.join(tmp, "x"))
        checks.check(result.returncode == 1 and
                     "tensor blk.0.attn_q.weight: ggml type Q2_K is not supported" in
                     result.stderr, f"Q2_K refusal: {result.stderr!r}")
        checks.check(tool("tensors", path).stdout.startswith("blk.0.attn_q.weight\tQ2_K\t256,2"),
                     "Q2_K tensor info")

        # Truncating the file anywhere in the tensor data is refused with a message.
        path = os.path.join(tmp, "model-None.gguf")
        data = open(path, "rb").read()
        cut = os.path.join(tmp, "cut.gguf")
        with open(cut, "wb") as f:
            f.write(data[:-100])
        result = tool("tensors", cut)
        checks.check(result.returncode == 1 and "runs past the end of the file" in result.stderr,
                     f"truncated file: {result.stderr!r}")
    checks.finish()


if __name__ == "__main__":
    main()
