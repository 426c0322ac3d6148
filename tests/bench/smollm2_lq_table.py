"""Benchmark (issue 7): SmolLM2-135M-Instruct compressed by lqd with LQ at 2.5 / 2.75 / 3.0 /
3.5 / 4.0 bits and ranks 16 and 64 (ILP over the paper's Table 1 grid), against plain NF3 and
NF4 (QLoRA-style: one configuration everywhere, no low-rank part) and the uncompressed model.
Prints a Markdown table: perplexity on WikiText-2's test split under the stream protocol
(lqd eval --documents stream --context 2048, first --ppl-tokens predicted tokens), bits/param
of the quantized part, effective bits (L1 L2 at fp32 as stored, and at 16 bits), and compress
time split into error table / ILP / final decompositions. Also writes table.json and one
`lqd inspect --svg` picture per LQ model into --out-dir.

The source is the GGUF (Q4_1 weights dequantized: the full-precision source lqd sees), made
an HF directory by `lqd import` first so the LQ directories carry its tokenizer. Each rank's
error table is computed once and cached; the other budgets reuse it.

    python3 tests/bench/smollm2_lq_table.py --gguf .models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --wiki ../shared/data/wiki.test.raw --device cuda --out-dir /tmp/smol-table
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BUDGETS = (2.5, 2.75, 3.0, 3.5, 4.0)
RANKS = (16, 64)
UNIFORM = (("NF3", "3,8,fp32,64,256", 3.127), ("NF4", "4,8,fp32,64,256", 4.127))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lqd", default="build/server/lqd")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ppl-tokens", type=int, default=100_000)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--work-dir", help="where the models are written (default: a temp dir)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--grid", help="--configs of the LQ runs (default: Table 1; a small "
                        "grid makes a quick smoke test)")
    parser.add_argument("--skip-uniform", action="store_true", help="no NF3 / NF4 rows")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    def lqd(*argv):
        result = subprocess.run([args.lqd, *argv], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"lqd {' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def ppl(model):
        started = time.time()
        report = json.loads(lqd("eval", "--model", model, "--ppl", args.wiki, "--documents",
                                "stream", "--context", "2048", "--max-tokens",
                                str(args.ppl_tokens), "--device", args.device, "--json"))
        print(f"  eval {os.path.basename(model)}: ppl {report['ppl']:.4f} over "
              f"{report['tokens']} tokens, {time.time() - started:.1f} s", flush=True)
        return report["ppl"]

    work = args.work_dir or tempfile.mkdtemp(prefix="smol-table-")
    os.makedirs(work, exist_ok=True)
    source = os.path.join(work, "smollm2-hf")
    started = time.time()
    if not os.path.exists(os.path.join(source, "config.json")):  # a rerun reuses it
        lqd("import", "--model", args.gguf, "--out", source, "--force")
    print(f"import: {time.time() - started:.1f} s", flush=True)
    cache = os.path.join(work, "cache")
    rows = []

    def compress(name, bits, rank, configs=None):
        out = os.path.join(work, name)
        argv = ["compress", "--model", source, "--bits", str(bits), "--rank", str(rank), "--out",
                out, "--cache-dir", cache, "--device", args.device, "--quiet", "--force", "--json"]
        if configs or args.grid:
            argv += ["--configs", configs or args.grid]
        started = time.time()
        report = json.loads(lqd(*argv))
        wall = time.time() - started
        info = json.loads(lqd("inspect", out, "--json"))
        if not configs:
            lqd("inspect", out, "--svg", os.path.join(args.out_dir, f"{name}.svg"))
        seconds = report["seconds"]
        print(f"{name}: {wall:.1f} s (table {seconds['table']:.1f}, ilp {seconds['ilp']:.2f}, "
              f"final {seconds['final']:.1f}; {report['decompositions']} decompositions)",
              flush=True)
        row = {"name": name, "bits": bits, "rank": rank, "configs": configs or "table1",
               "bits_per_param": info["bits_per_param"], "effective_bits": info["effective_bits"],
               "effective_bits_16": info["effective_bits_16"], "memory_bytes": info["memory_bytes"],
               "wall_seconds": wall, "seconds": seconds,
               "decompositions": report["decompositions"], "ppl": ppl(out)}
        rows.append(row)
        save()

    def save():  # after every row: a run stopped midway keeps what it measured
        meta = {"gguf": os.path.basename(args.gguf), "device": args.device,
                "ppl_tokens": args.ppl_tokens, "source": base, "rows": rows}
        path = os.path.join(args.out_dir, "table.json")
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)

    base = {"name": "source", "bits": 32, "rank": 0, "ppl": ppl(source)}
    for name, configs, bits in () if args.skip_uniform else UNIFORM:
        compress(name, bits, 0, configs)
    for rank in (int(r) for r in args.ranks.split(",")):
        for bits in (float(b) for b in args.budgets.split(",")):
            compress(f"lq-{bits}-r{rank}", bits, rank)

    print(f"\n| model | bits/param (Q) | effective bits (fp32 / 16-bit L1 L2) | compress s (table + "
          f"ILP + final) | wiki ppl ({args.ppl_tokens} tokens) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| SmolLM2-135M source (Q4_1 GGUF dequantized, fp32) | 32 | - | - | {base['ppl']:.3f} |")
    for r in rows:
        label = (f"{r['name']} ({r['configs']}), no low-rank part" if r["rank"] == 0 else
                 f"LQ {r['bits']} bits, rank {r['rank']}")
        s = r["seconds"]
        print(f"| {label} | {r['bits_per_param']:.3f} | {r['effective_bits']:.3f} / "
              f"{r['effective_bits_16']:.3f} | {r['wall_seconds']:.1f} ({s['table']:.1f} + "
              f"{s['ilp']:.2f} + {s['final']:.1f}) | {r['ppl']:.3f} |")


main()
