"""`lqd compress --fisher` end to end on stories260K (LQ-LoRA §3.3): the Fisher file round trip
(saved, read back by NumPy, reloaded with --fisher-load), the weighted objective checked by
NumPy on the written model (Q dequantized independently, errors weighted by the saved F), the
weighted run beating the unweighted one on that objective, the error-table cache kept apart
from the unweighted one, a deterministic draw, and bad input that fails clearly."""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from peer_util import ROOT, Checks, require_numpy, run_lqd  # noqa: E402

require_numpy()
import numpy as np  # noqa: E402
import nf_reference as ref  # noqa: E402

checks = Checks()
SOURCE = os.path.join(ROOT, "models/stories260K-hf")
TEXT = os.path.join(ROOT, "tests", "data", "tinystories_val_subset.txt")
GRID = "4,8,fp32,64,256;3,8,fp32,64,256;2,8,fp32,64,256;3,4,bf16,32,64;2,4,fp16,16,16;4,2,bf16,64,16"
N_CONFIGS = 6
NF3 = "3,8,fp32,64,256"
N_MATRICES = 35
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NAMES = [f"model.layers.{layer}.{kind}" for layer in range(5) for kind in KINDS]
SAMPLES, SEQ_LEN = 48, 96
weights, _ = ref.read_safetensors(os.path.join(SOURCE, "model.safetensors"))


def compress(out, bits, *extra, configs=GRID, check=True):
    result = run_lqd("compress", "--model", SOURCE, "--bits", str(bits), "--rank", "4", "--configs", configs,
                     "--out", out, "--json", *extra, check=check)
    return json.loads(result.stdout) if check else result


def fisher_args(seed=0):
    return ["--fisher", calibration, "--fisher-samples", str(SAMPLES), "--fisher-seq-len", str(SEQ_LEN),
            "--fisher-seed", str(seed)]


def weighted_errors(directory, fisher):
    """NumPy's ||sqrt(F) * (W - Q - L1 L2)||^2 and ||sqrt(F) * W||^2 of every matrix of an LQ
    directory, Q dequantized by nf_reference (not by lqd)."""
    tensors, metadata = ref.read_safetensors(os.path.join(directory, "model.safetensors"))
    errors, norms = [], []
    for name in NAMES:
        w = weights[name + ".weight"].astype(np.float64)
        b0, b1, b2, B0, B1 = metadata[name + ".lq_config"].split(",")
        q, *_ = ref.dequantize_stored(tensors, name, w.shape, (int(b0), int(b1), b2, int(B0), int(B1)))
        lowrank = tensors[name + ".lora_B"].astype(np.float64) @ tensors[name + ".lora_A"].astype(np.float64)
        f = fisher[name + ".weight"].astype(np.float64)
        errors.append(float((f * (w - q - lowrank) ** 2).sum()))
        norms.append(float((f * w * w).sum()))
    return np.array(errors), np.array(norms), metadata


def close(a, b, tolerance=1e-3):
    return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-30)


with tempfile.TemporaryDirectory() as tmp:
    os.environ["LQD_CACHE_DIR"] = os.path.join(tmp, "cache")  # never the user's cache
    calibration = os.path.join(tmp, "calibration.txt")
    with open(TEXT) as f:
        lines = [line for line in f.read().split("\n") if line.strip()][:300]
    with open(calibration, "w") as f:
        f.write("\n\n".join(lines) + "\n")  # blank lines between documents, as the source has
    fisher_path = os.path.join(tmp, "fisher.safetensors")

    # --- unweighted first, then weighted: the weighted run must not reuse the table ------------
    plain = compress(os.path.join(tmp, "plain"), 3)
    checks.check(plain["weighting"] == "none" and plain["fisher"] is None, f"unweighted: {plain['weighting']}")
    weighted = compress(os.path.join(tmp, "weighted"), 3, *fisher_args(), "--fisher-save", fisher_path)
    key = weighted["weighting"]
    checks.check(key.startswith("fisher-") and len(key) == 23 and all(c in "0123456789abcdef" for c in key[7:]),
                 f"weighting {key!r} is fisher-<16 hex digits>")
    checks.check(weighted["decompositions"] == N_MATRICES * N_CONFIGS and weighted["cells_cached"] == 0,
                 f"the weighted table is computed, not read from the unweighted one: "
                 f"{weighted['decompositions']} decompositions, {weighted['cells_cached']} cached")
    checks.check(weighted["cache"] != plain["cache"], "weighted and unweighted tables live in separate files")
    fisher_info = weighted["fisher"] or {}
    checks.check(fisher_info.get("samples") == SAMPLES and fisher_info.get("seq_len") == SEQ_LEN
                 and 2 * SAMPLES <= fisher_info.get("tokens", 0) <= SAMPLES * SEQ_LEN
                 and fisher_info.get("documents") == len(lines), f"fisher summary {fisher_info}")
    checks.check(weighted["bits_per_param"] <= 3.0, "the weighted run keeps the budget")
    again = compress(os.path.join(tmp, "plain-again"), 3.5)
    checks.check(again["weighting"] == "none" and again["decompositions"] == 0,
                 "an unweighted run after the weighted one still reads its own table")

    # --- the Fisher file: NumPy reads it; names, shapes, values, metadata ----------------------
    fisher, fisher_metadata = ref.read_safetensors(fisher_path)
    checks.check(sorted(fisher) == sorted(n + ".weight" for n in NAMES), f"{len(fisher)} tensors, one per matrix")
    for name in NAMES:
        f = fisher.get(name + ".weight")
        ok = (f is not None and f.dtype == np.float32 and f.shape == weights[name + ".weight"].shape
              and np.isfinite(f).all() and (f >= 0).all() and (f > 0).any())
        checks.check(ok, f"{name}: F32, the weight's shape, finite, >= 0, not all zero")
    checks.check(fisher_metadata.get("lqd.fisher_samples") == str(SAMPLES), f"metadata {fisher_metadata}")
    checks.check(f"{SAMPLES} sequences" in fisher_metadata.get("lqd.fisher_source", ""),
                 f"lqd.fisher_source says how F was drawn: {fisher_metadata}")

    # --- the reported errors are the Fisher-weighted ones: NumPy agrees -------------------------
    errors, norms, metadata = weighted_errors(os.path.join(tmp, "weighted"), fisher)
    reported = weighted["matrices"]
    checks.check([m["name"] for m in reported] == NAMES, "report matrices in the model's order")
    bad = [n for n, m, e, w in zip(NAMES, reported, errors, norms)
           if not (close(m["error"], e) and close(m["norm"], w))]
    checks.check(not bad, f"reported weighted error and norm match NumPy's for every matrix: {bad[:3]}")
    checks.check(close(weighted["total_error"], errors.sum()), "total = sum of weighted errors")
    checks.check(metadata.get("lqd.weighting") == key, f"lqd.weighting {metadata.get('lqd.weighting')}")
    plain_errors, plain_norms, plain_metadata = weighted_errors(os.path.join(tmp, "plain"), fisher)
    checks.check(plain_metadata.get("lqd.weighting") == "none", "unweighted model says so")
    # The ILP minimises the weighted total over the weighted table: the weighted run wins.
    checks.check(errors.sum() < plain_errors.sum(),
                 f"weighted objective: Fisher run {errors.sum():.4g} < unweighted run {plain_errors.sum():.4g}")
    print(f"  Table grid, 3 bits: weighted error {errors.sum():.4g} (Fisher) vs {plain_errors.sum():.4g} (none)")

    # --- one configuration for all: the same allocation, so compare matrix by matrix ------------
    nf3_plain = compress(os.path.join(tmp, "nf3-plain"), 3.2, configs=NF3)
    nf3_weighted = compress(os.path.join(tmp, "nf3-weighted"), 3.2, "--fisher-load", fisher_path, configs=NF3)
    checks.check(nf3_weighted["weighting"] == key, "--fisher-load gives the same key as the estimate")
    a, _, _ = weighted_errors(os.path.join(tmp, "nf3-weighted"), fisher)
    b, _, _ = weighted_errors(os.path.join(tmp, "nf3-plain"), fisher)
    better = int((a <= b * (1 + 1e-6)).sum())
    checks.check(better >= 0.8 * N_MATRICES, f"NF3 everywhere: weighted error lower for {better}/35 matrices")
    checks.check(a.sum() < b.sum(), f"NF3 everywhere: total {a.sum():.4g} < {b.sum():.4g}")
    print(f"  NF3 everywhere: the Fisher run has the lower weighted error on {better}/35 matrices")

    # --- --fisher-load reuses the weighted table; the same draw gives the same F ----------------
    loaded = compress(os.path.join(tmp, "loaded"), 3.5, "--fisher-load", fisher_path)
    checks.check(loaded["weighting"] == key and loaded["decompositions"] == 0
                 and loaded["cells_cached"] == N_MATRICES * N_CONFIGS,
                 f"--fisher-load: cache hit ({loaded['decompositions']} decompositions)")
    checks.check(loaded["fisher"].get("file") == fisher_path and loaded["fisher"].get("samples") == SAMPLES,
                 f"--fisher-load summary {loaded['fisher']}")
    checks.check(loaded["total_error"] < weighted["total_error"], "more bits, less weighted error")
    repeat_path = os.path.join(tmp, "fisher-again.safetensors")
    repeat = compress(os.path.join(tmp, "repeat"), 3, *fisher_args(), "--fisher-save", repeat_path)
    repeated, _ = ref.read_safetensors(repeat_path)
    checks.check(all(np.array_equal(repeated[k], fisher[k]) for k in fisher),
                 "the same text, samples, length and seed give the same F, bit for bit")
    checks.check(repeat["weighting"] == key and repeat["decompositions"] == 0, "and the same cache key")
    other = compress(os.path.join(tmp, "other-seed"), 3, *fisher_args(seed=7))
    checks.check(other["weighting"] not in (key, "none") and other["decompositions"] == N_MATRICES * N_CONFIGS,
                 f"another seed draws other lines: another key {other['weighting']}")
    text = run_lqd("compress", "--model", SOURCE, "--bits", "3", "--rank", "4", "--configs", GRID, "--out",
                   os.path.join(tmp, "text"), *fisher_args()).stdout
    checks.check("Fisher-weighted" in text and f"{SAMPLES} sequences" in text, f"text report: {text}")

    # --- bad input: a clear message, a non-zero exit, nothing left behind ----------------------
    few = os.path.join(tmp, "few.txt")
    with open(few, "w") as f:
        f.write("One short line.\n\n   \nAnother one.\n")
    empty = os.path.join(tmp, "empty.txt")
    open(empty, "w").close()
    negative = os.path.join(tmp, "negative.safetensors")  # the weights themselves: not >= 0
    missing_tensor = os.path.join(tmp, "missing-tensor.safetensors")
    zero = os.path.join(tmp, "zero.safetensors")
    nan = os.path.join(tmp, "nan.safetensors")

    def f32(array):
        return ("F32", array.shape, np.ascontiguousarray(array, dtype=np.float32).tobytes())

    ref.write_safetensors(negative, {k: f32(weights[k]) for k in fisher})
    ref.write_safetensors(missing_tensor, {k: f32(v) for k, v in fisher.items() if "layers.2.mlp.up" not in k})
    ref.write_safetensors(zero, {k: f32(v * 0 if "layers.3.self_attn.v" in k else v) for k, v in fisher.items()})
    poisoned = {k: v.copy() for k, v in fisher.items()}
    poisoned["model.layers.1.mlp.down_proj.weight"][2, 3] = np.nan
    ref.write_safetensors(nan, {k: f32(v) for k, v in poisoned.items()})
    lq_source = os.path.join(tmp, "plain")
    cases = [
        (["--fisher", os.path.join(tmp, "nowhere.txt"), "--fisher-samples", "4"], 1, "nowhere.txt"),
        (["--fisher", few, "--fisher-samples", "5"], 1, "too few"),
        (["--fisher", empty, "--fisher-samples", "1"], 1, "too few"),
        (["--fisher", calibration], 2, "--fisher-samples"),
        (["--fisher-samples", "8"], 2, "--fisher FILE"),
        (["--fisher-save", os.path.join(tmp, "f.safetensors")], 2, "--fisher FILE"),
        (["--fisher", calibration, "--fisher-samples", "0"], 2, "--fisher-samples"),
        (["--fisher", calibration, "--fisher-samples", "4", "--fisher-seq-len", "1"], 2, "--fisher-seq-len"),
        (["--fisher", calibration, "--fisher-samples", "4", "--fisher-load", fisher_path], 2, "exclude"),
        (["--fisher-load", os.path.join(tmp, "nowhere.safetensors")], 1, "nowhere.safetensors"),
        (["--fisher-load", negative], 1, ">= 0"),
        (["--fisher-load", missing_tensor], 1, "model.layers.2.mlp.up_proj.weight"),
        (["--fisher-load", zero], 1, "all zero"),
        (["--fisher-load", nan], 1, "model.layers.1.mlp.down_proj.weight"),
        (["--fisher", calibration, "--fisher-samples", "4", "--model", lq_source], 1, "full-precision"),
        (["--fisher-load", fisher_path, "--model", lq_source], 1, "already LQ-compressed"),
        (["--fisher", calibration, "--fisher-samples", "4", "--bits", "1.5"], 1, "smallest feasible"),
    ]
    bad_out = os.path.join(tmp, "bad")
    for args, code, needle in cases:
        result = run_lqd("compress", "--model", SOURCE, "--bits", "3", "--rank", "4", "--configs", GRID,
                         "--out", bad_out, *args, check=False)
        checks.check(result.returncode == code, f"{args}: exit {result.returncode}, expected {code}")
        checks.check(needle in result.stderr and result.stderr.startswith("lqd compress"),
                     f"{args}: message names {needle!r}: {result.stderr.strip()[-300:]}")
        checks.check(not os.path.exists(bad_out), f"{args}: no output directory")
    infeasible = run_lqd("compress", "--model", SOURCE, "--bits", "1.5", "--rank", "4", "--configs", GRID,
                         "--out", bad_out, "--fisher", calibration, "--fisher-samples", "4", check=False)
    checks.check("Fisher information from" not in infeasible.stderr,
                 "an infeasible budget is refused before the Fisher estimate")

checks.finish()
