#!/usr/bin/env python3
"""Where a kernel's warps wait, instruction by instruction, from ncu's source page
(`ncu --section SourceCounters --page source --print-source sass --csv`, as
`tests/kernels/gpu_check.sh stalls` writes it): the instructions with the most warp-stall
samples, each with its main stall reasons, and the samples summed over stretches of the code
between barriers and waits (BAR, ACQBULK: griddepcontrol.wait), so that the kernel's phases
(staging, main loop, epilogue) can be told apart.

Usage: sass_stalls.py FILE.csv[.gz] [--top N]
"""
import csv
import gzip
import sys


def rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    reader = csv.reader(lines)
    header = None
    for row in reader:
        if row and row[0] == "Address":
            header = row
            continue
        if header and len(row) == len(header):
            yield dict(zip(header, row))


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30
    code = list(rows(sys.argv[1]))
    if not code:
        print(f"{sys.argv[1]}: no source-page rows")
        return 1
    stall_columns = [c for c in code[0] if c.startswith("stall_") and not c.endswith("_not_issued")]
    total = sum(number(r["Warp Stall Sampling (All Samples)"]) for r in code)
    executed = sum(number(r["Instructions Executed"]) for r in code)
    print(f"{len(code)} instructions, {executed:.0f} warp instructions executed, {total:.0f} samples")
    print(f"\ntop {top} by samples:")
    ranked = sorted(code, key=lambda r: -number(r["Warp Stall Sampling (All Samples)"]))
    for r in ranked[:top]:
        samples = number(r["Warp Stall Sampling (All Samples)"])
        reasons = sorted(((number(r[c]), c[6:]) for c in stall_columns), reverse=True)[:3]
        why = ", ".join(f"{name} {value:.0f}" for value, name in reasons if value > 0)
        print(f"  {r['Address']:>6} {100 * samples / total:5.1f}%  {r['Source'][:60]:60}  {why}")
    print("\nby stretch (ending at a barrier or a wait):")
    start, samples, count = code[0]["Address"], 0.0, 0.0
    for r in code:
        samples += number(r["Warp Stall Sampling (All Samples)"])
        count += number(r["Instructions Executed"])
        source = r["Source"]
        if source.lstrip().startswith(("BAR", "ACQBULK")) or " BAR." in source or r is code[-1]:
            print(f"  {start:>6} .. {r['Address']:>6}: {100 * samples / total:5.1f}% of samples, "
                  f"{100 * count / executed:5.1f}% of instructions  (ends: {source.strip()[:40]})")
            start, samples, count = r["Address"], 0.0, 0.0
    return 0


if __name__ == "__main__":
    sys.exit(main())
