#!/usr/bin/env python3
"""Instructions per code in a decode kernel's main loop, read from its SASS (no GPU needed).

Usage:
    python3 tests/bench/sass_loop.py OBJECT KERNEL [--codes N] [--loop K] [--show]

OBJECT is a CUDA object or cubin (build/kernels/liblq_cuda.a.p/cuda_linear_cuda.cu.o); KERNEL a
regular expression matched against the mangled names of its kernels (each match is reported).
The SASS comes from `cuobjdump -sass`: from CUDA's bin/ when it has one, else from the PyPI
package nvidia-cuda-cuobjdump (`pip install nvidia-cuda-cuobjdump`; it holds nothing but the
tool).

Why: Nsight Compute showed the one-token decode kernels bound by their instruction chains, not by
HBM (v1: 6.5 instructions per code). Issue rate on an H100 at ~1.75 GHz is about 3·10¹³
thread-instructions a second, and 70% of 3.0 TB/s at 3.127 bits a code is 5.4·10¹² codes a
second, so a kernel needs well under 5.5 instructions per code before anything else matters.
That count can be read off the compiled code here, without a GPU.

What it prints, for each loop of the kernel (a backward branch to an earlier address; the
largest first, or the K-th with --loop):
  - static: the instructions between the loop head and its back branch, NOPs left out;
  - path: the instructions executed by one pass of the loop when every conditional forward
    branch inside it falls through (unconditional ones are followed). In these kernels a
    conditional branch inside the main loop skips work for an invalid row or chunk, or leaves the
    loop, so the fall-through path is the pass over a full tile;
  - the path's instructions by kind (LDG, LDS, HMMA, SHFL, integer, float, ...);
  - with --codes N (codes one thread decodes in a pass), path instructions per code.
--show prints the path's instructions.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNCTION = re.compile(r"Function : (\S+)")
TARGET = re.compile(r"\b0x([0-9a-f]+)\b")

KINDS = [
    ("global load", re.compile(r"^LDG")),
    ("global store", re.compile(r"^(STG|RED|ATOM)")),
    ("L2 prefetch", re.compile(r"^CCTL")),
    ("shared load", re.compile(r"^LDS")),
    ("shared store", re.compile(r"^STS")),
    ("tensor core", re.compile(r"^HMMA")),
    ("shuffle", re.compile(r"^SHFL")),
    ("float", re.compile(r"^(FFMA|FADD|FMUL|FSEL|FSET|FSETP|FMNMX|HADD2|HFMA2|HMUL2|F2F|I2F|F2I)")),
    ("shift/logic", re.compile(r"^(SHF|LOP3|PRMT|BFE|BFI|SGXT|LEA)")),
    ("integer", re.compile(r"^(IMAD|IADD|VIADD|IABS|IMNMX|ISETP|SEL|MOV|CS2R|P2R|R2P|PLOP3|UIADD|UMOV|ULDC|LDC|S2R|S2UR|USHF|ULOP|ULEA|UISETP|USEL)")),
    ("branch", re.compile(r"^(BRA|BSSY|BSYNC|WARPSYNC|EXIT|CALL|RET)")),
]


def find_cuobjdump(required=True):
    """CUDA's cuobjdump, or the PyPI package's (executable bits restored: wheels may drop
    them); None when there is none and not required."""
    for candidate in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    # this interpreter's packages, then the repository's .venv (tests/run.sh installs it there)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = glob.glob(os.path.join(repo, ".venv", "lib", "python3*", "site-packages"))
    for path in sys.path + sorted(venv):
        for sub in ("cu13", "cu12", "cuda_cuobjdump"):
            candidate = os.path.join(path, "nvidia", sub, "bin", "cuobjdump")
            if os.path.isfile(candidate):
                if not os.access(candidate, os.X_OK):
                    try:
                        os.chmod(candidate, 0o755)
                    except OSError:
                        continue
                return candidate
    if required:
        sys.exit("sass_loop: no cuobjdump (CUDA's bin/, or `pip install nvidia-cuda-cuobjdump`)")
    return None


def parse(sass):
    """{kernel: [(address, predicate, opcode, text)]}"""
    kernels, current = {}, None
    for raw in sass.splitlines():
        m = FUNCTION.search(raw)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = LINE.search(raw)
        if not m or current is None:
            continue
        text = m.group(2).strip()
        predicate = ""
        if text.startswith("@"):
            predicate, text = text.split(None, 1)
        current.append((int(m.group(1), 16), predicate, text.split()[0], text))
    return kernels


def loops(code):
    """(head, back_branch_address) for every conditional backward branch, largest first. An
    unconditional one is left out: the compiler's warp-divergence handlers (placed after the
    kernel's exit, reached by BRA.DIV) jump back into the code that way."""
    found = []
    for address, predicate, opcode, text in code:
        if opcode.startswith("BRA") and predicate:
            targets = [int(t, 16) for t in TARGET.findall(text)]
            if targets and targets[-1] < address:
                found.append((targets[-1], address))
    return sorted(found, key=lambda loop: loop[0] - loop[1])


def path(code, head, back):
    """The fall-through pass from head to the back branch (unconditional branches followed)."""
    at = {address: i for i, (address, *_rest) in enumerate(code)}
    i, seen, out = at[head], set(), []
    while i < len(code):
        address, predicate, opcode, text = code[i]
        if address in seen:
            break  # an inner loop's back branch: counted once
        seen.add(address)
        if address == back:
            out.append(code[i])
            break
        out.append(code[i])
        if opcode.startswith("BRA") and not predicate and "BRA.DIV" not in text:
            target = int(TARGET.findall(text)[-1], 16)
            if target not in at or target <= address:
                break
            i = at[target]
            continue
        i += 1
    return out


def kind(opcode):
    for name, pattern in KINDS:
        if pattern.match(opcode):
            return name
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("object")
    parser.add_argument("kernel")
    parser.add_argument("--codes", type=int, default=0, help="codes a thread decodes per pass")
    parser.add_argument("--loop", type=int, default=0, help="which loop, largest first (0)")
    parser.add_argument("--show", action="store_true")
    args = parser.parse_args()
    sass = subprocess.run([find_cuobjdump(), "-sass", args.object], check=True,
                          capture_output=True, text=True).stdout
    kernels = {name: code for name, code in parse(sass).items() if re.search(args.kernel, name)}
    if not kernels:
        sys.exit(f"sass_loop: no kernel of {args.object} matches {args.kernel!r}")
    for name in sorted(kernels):
        code = kernels[name]
        found = loops(code)
        print(f"{name}: {len(code)} instructions, {len(found)} loops")
        if args.loop >= len(found):
            print("  (no such loop)")
            continue
        head, back = found[args.loop]
        static = [c for c in code if head <= c[0] <= back and c[2] != "NOP"]
        walked = [c for c in path(code, head, back) if c[2] != "NOP"]
        counts = {}
        for c in walked:
            counts[kind(c[2])] = counts.get(kind(c[2]), 0) + 1
        branches = sum(1 for c in walked if c[2].startswith("BRA") and c[1])
        print(f"  loop {args.loop}: 0x{head:x}..0x{back:x}, static {len(static)}, "
              f"path {len(walked)} ({branches} conditional branches fall through)")
        print("  path by kind: " + ", ".join(f"{k} {n}" for k, n in
                                             sorted(counts.items(), key=lambda kv: -kv[1])))
        if args.codes:
            print(f"  path instructions per code: {len(walked) / args.codes:.2f} "
                  f"({args.codes} codes a thread per pass)")
        if args.show:
            for address, predicate, _, text in walked:
                print(f"    {address:05x}  {predicate:5s} {text}")


if __name__ == "__main__":
    main()
