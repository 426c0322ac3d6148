#!/usr/bin/env python3
"""Where a batch-1 decode step's GPU time goes, from Nsight Compute's per-kernel durations.

On the GPU machine (ncu there; no nsys):
    LQ_CUDA_GRAPHS=0 ncu --csv --metrics gpu__time_duration.sum --cache-control all \\
        --clock-control none build/tests/bench_cuda --decode-profile --layers 2 > ncu.csv
    python3 tests/bench/ncu_decode_summary.py ncu.csv --layers 2

bench_cuda --decode-profile runs a 64-token prefill and two decode steps at batch 1; a decode
step starts with the embedding kernel, so the kernels after the last `embed_rows` launch are one
step. ncu runs each kernel alone with cold caches (--cache-control all), so the durations are
each kernel's own, without the overlap a real step has between neighbours (programmatic
dependent launch) and without launch gaps. Prints each kernel's count and time per step, scaled
from the profiled layers to 32, against the step's bytes at the copy bandwidth.
"""
import argparse
import csv
import re
import sys
from collections import OrderedDict


def short_name(name):
    """The kernel's template name without argument lists: lq_decode_kernel<3, 1, 1, false>."""
    name = re.sub(r"\(.*\)$", "", name.strip())
    return name[:90]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --csv output")
    parser.add_argument("--layers", type=int, default=2, help="layers of the profiled model")
    parser.add_argument("--scale-to", type=int, default=32, help="layers to scale the step to")
    args = parser.parse_args()

    kernels = []  # (id, name, microseconds)
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "")
        scale_to_us = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                       "ms": 1e3, "second": 1e6, "s": 1e6}
        if unit not in scale_to_us:
            sys.exit("unknown unit %r for gpu__time_duration.sum" % unit)
        us = value * scale_to_us[unit]
        kernels.append((int(row["ID"]), row["Kernel Name"], us))
    if not kernels:
        sys.exit("no gpu__time_duration.sum rows in %s" % args.csv)
    kernels.sort()
    starts = [i for i, k in enumerate(kernels) if "embed" in k[1]]
    if not starts:
        sys.exit("no embedding kernel found: not a bench_cuda --decode-profile run?")
    step = kernels[starts[-1]:]
    per_name = OrderedDict()
    for _, name, us in step:
        entry = per_name.setdefault(short_name(name), [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total = sum(us for _, _, us in step)
    scale = args.scale_to / args.layers
    # the head follows the last layer's residual add (fused with the final norm), or, where the
    # decode kernels add the residual themselves (LQ_CUDA_FUSE), the final norm: not per layer
    adds = [i for i, k in enumerate(step) if "add_elements" in k[1] or "add_rmsnorm" in k[1]]
    norms = [i for i, k in enumerate(step) if short_name(k[1]).endswith("::rmsnorm_rows")]
    tail_from = adds[-1] + 1 if adds else norms[-1] if norms else len(step)
    tail = sum(us for _, _, us in step[tail_from:])
    print("one decode step at batch 1: %d kernels, %.1f us on %d layers" % (len(step), total, args.layers))
    print("%-92s %6s %10s %10s" % ("kernel", "count", "us/step", "us x%d/%d" % (args.scale_to, args.layers)))
    for name, (count, us) in sorted(per_name.items(), key=lambda item: -item[1][1]):
        print("%-92s %6d %10.1f %10.1f" % (name, count, us, us * scale))
    print("(the us x%d/%d column scales every kernel, the head's too)" % (args.scale_to, args.layers))
    print("step scaled to %d layers (embedding and layers scaled, the head's %.1f us not): "
          "%.2f ms of kernel time" % (args.scale_to, tail, ((total - tail) * scale + tail) / 1e3))


if __name__ == "__main__":
    main()
