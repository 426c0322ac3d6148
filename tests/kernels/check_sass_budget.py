#!/usr/bin/env python3
"""The one-token tensor-core decode kernel's instruction budget, read from its SASS (no GPU).

Usage: python3 tests/kernels/check_sass_budget.py BUILD_DIR

Nsight Compute showed the one-token decode kernels bound by their instruction chains (v1: 6.5
instructions per code, 23% of HBM's peak; README, "The GPU"). v6 (kernels/cuda/
gemv_mma1_kernel.h) was written to need far fewer, and how many its main loop takes is a
property of the compiled code: tests/bench/sass_loop.py reads it from cuobjdump's SASS. This
test keeps it from creeping back: for every instance of lq_gemv_mma1_kernel<b0, blocks per
chunk, shared scales, CTAs per SM, staged codes> it checks the main loop's instructions per
code (a full tile's pass: 64 codes a thread) against a budget a little above what the code
takes now, that each pair lookup is one LDS with a register address (32 a pass) whose address
came from one LOP3 (the pair table's alignment; an IADD per lookup would add 32 integer
instructions a pass, which the budget also catches), and, at 2 and 3 CTAs per SM, that every
global load of the pass comes before its first lookup: the next tile's words are asked for
before this one is decoded (the compiler had moved half of them down next to their use, and the
warps waited out HBM's latency there: tests/bench/sass_stalls.py on the H100); staged, that
goes for the copies (LDGSTS) too.

Skips (exit 77) where the CUDA backend was not built or no cuobjdump is at hand (CUDA's bin/,
or the PyPI package nvidia-cuda-cuobjdump from tests/requirements.txt). The budgets hold for the
compiler they were measured with (CALIBRATED); with another nvcc release the counts are printed
and the test skips, saying so: the budgets are then to be measured again, not failed on.
"""

import glob
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import sass_loop  # noqa: E402

# (b0, blocks per chunk, shared scales): the most instructions per code the main loop may take.
# Measured with nvcc 13.0 when this was written, at 3 (and 2) CTAs per SM: 2.61 2.64 2.72
# (shared; 2.58 2.64 2.70), 2.86 2.95 3.05 (B0 = 32; 2.84 2.91 2.97), 3.05 3.16 3.23 (B0 = 16;
# 3.05 3.09 3.16) for b0 = 2, 3, 4. (With the pair table built before x's staging the loops
# at 3 CTAs took 0.03-0.1 more, nothing in them changed: see lq_m1_body.) The loop of two
# tiles a pass before took 2.47-2.90, and lost the difference and more to the loads its
# second tile waited for.
BUDGET = {
    (2, 1, 1): 2.64, (3, 1, 1): 2.67, (4, 1, 1): 2.75,
    (2, 1, 0): 2.89, (3, 1, 0): 2.98, (4, 1, 0): 3.08,
    (2, 2, 0): 3.08, (3, 2, 0): 3.19, (4, 2, 0): 3.26,
}
# Staged codes (the template's last argument; 2 and 3 CTAs per SM): the words come from the
# warp's ring in shared memory, and each pass also issues its share of the copies of the tile 4
# on (LDGSTS, each with three never-executed LDS), waits for the next one's (DEPBAR) and passes
# the warp's barrier. Measured with nvcc 13.0 when this was written, at 3 (and 2) CTAs per SM:
# 2.91 3.02 3.16 (shared; 2.89 3.00 3.12), 3.14 3.33 3.39 (B0 = 32; 3.16 3.28 3.41), 3.34 3.53
# 3.59 (B0 = 16; 3.33 3.50 3.61) for b0 = 2, 3, 4.
BUDGET_STAGED = {
    (2, 1, 1): 2.94, (3, 1, 1): 3.05, (4, 1, 1): 3.2,
    (2, 1, 0): 3.22, (3, 1, 0): 3.36, (4, 1, 0): 3.48,
    (2, 2, 0): 3.44, (3, 2, 0): 3.56, (4, 2, 0): 3.69,
}
# The instances with the projection in the kernel (the template's last argument; 2 and 3 CTAs
# per SM, staged or not; LQ_CUDA_MMA1_INLINE_T=1): its work before the main loop changes the
# compiler's choices at the register cap, nothing in the loop. This much over the others'.
BUDGET_PROJECT = 0.3
# The 4-CTAs-per-SM instances (64 registers, LQ_CUDA_MMA1_CTAS=4: 2.83 2.89 2.95, 3.08 3.06
# 3.14, 3.30 3.34 3.34 when this was written) spill and have some of their loads still late
# (too few registers to hold a tile ahead): budgets this much more, no load-order check.
BUDGET_4_CTAS = 0.25
CODES_PER_PASS = 64  # one k-tile of 2 rows x 32 codes per lane
LOOKUPS_PER_PASS = 32
CALIBRATED = "release 13.0"  # nvcc --version of the measurements above


def nvcc_release():
    """nvcc's 'release X.Y' (CUDA's bin/ or PATH), or None."""
    for nvcc in ("/usr/local/cuda/bin/nvcc", "nvcc"):
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        except OSError:
            continue
        for word in out.replace(",", " ").split("release ")[1:2]:
            return "release " + word.split()[0]
    return None


def skip(why):
    print(f"check_sass_budget: skipped: {why}")
    sys.exit(77)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    objects = [glob.glob(os.path.join(sys.argv[1], "kernels", "liblq_cuda.a.p", pattern))
               for pattern in ("*linear_cuda.cu.o", "*gemv_mma1_project_cuda.cu.o")]
    if not all(objects):
        skip("the CUDA backend was not built")
    objects = [found[0] for found in objects]
    tool = sass_loop.find_cuobjdump(required=False)
    if not tool:
        skip("no cuobjdump (CUDA's bin/, or pip install nvidia-cuda-cuobjdump)")
    kernels = {}
    for obj in objects:
        sass = subprocess.run([tool, "-sass", obj], check=True, capture_output=True,
                              text=True).stdout
        if "arch = sm_90" not in sass:
            skip("the budgets are for sm_90 code (meson option gpu_arch=90)")
        kernels.update(sass_loop.parse(sass))
    failures, seen = [], 0
    cases = [(key, ctas, 0, 0, round(budget + (BUDGET_4_CTAS if ctas == 4 else 0.0), 2))
             for key, budget in sorted(BUDGET.items()) for ctas in (2, 3, 4)]
    cases += [(key, ctas, 1, 0, budget)
              for key, budget in sorted(BUDGET_STAGED.items()) for ctas in (2, 3)]
    cases += [(key, ctas, stage, 1, round(budget + BUDGET_PROJECT, 2))
              for stage, budgets in ((0, BUDGET), (1, BUDGET_STAGED))
              for key, budget in sorted(budgets.items()) for ctas in (2, 3)]
    for (bits, bpc, share), ctas, stage, project, budget in cases:
        name = (f"_Z19lq_gemv_mma1_kernelILi{bits}ELi{bpc}ELi{share}ELi{ctas}ELi{stage}"
                f"ELi{project}EEv10lq_m1_args")
        code = kernels.get(name)
        if code is None:
            failures.append(f"{name}: not in {' or '.join(objects)}")
            continue
        seen += 1
        # the main loop: the one with the tensor-core steps
        passes = [[c for c in sass_loop.path(code, head, back) if c[2] != "NOP"]
                  for head, back in sass_loop.loops(code)]
        passes = [p for p in passes if any(c[2].startswith("HMMA") for c in p)]
        if not passes:
            failures.append(f"{name}: no loop with HMMA")
            continue
        path = passes[0]
        per_code = len(path) / CODES_PER_PASS
        # Lookups: 32-bit shared loads whose address a LOP3 in the loop wrote (the pair bits
        # OR the lane's address). Unstaged, every 32-bit shared load must be one; staged, b0 = 3
        # reads its words with 32-bit loads too (addressed otherwise), and each LDGSTS comes
        # with never-executed (@!PT) ones.
        writer, lookups, others = {}, [], []
        for index, (address, predicate, opcode, text) in enumerate(path):
            if opcode == "LDS" and predicate != "@!PT":
                register = text.split("[")[1].split("]")[0].split("+")[0].strip()
                if writer.get(register, "").startswith("LOP3"):
                    lookups.append(index)
                else:
                    others.append((address, writer.get(register, "nothing in the loop")))
            operands = text.split(None, 1)[1] if " " in text else ""
            destination = operands.split(",")[0].strip()
            if destination.startswith("R"):
                writer[destination] = opcode
        first = lookups[0] if lookups else len(path)
        late = [c for c in path[first:] if c[2].startswith("LDG")]
        print(f"b0 {bits}, {bpc} block(s) per chunk, {'shared' if share else 'own'} scales, "
              f"{ctas} CTAs per SM{', staged' if stage else ''}"
              f"{', projecting' if project else ''}: "
              f"{per_code:.2f} instructions per code (budget {budget}), {len(lookups)} lookups, "
              f"{len(late)} global loads after the first")
        if per_code > budget:
            failures.append(f"{name}: {per_code:.2f} instructions per code, budget {budget}")
        if len(lookups) != LOOKUPS_PER_PASS:
            failures.append(f"{name}: {len(lookups)} lookups a pass, expected {LOOKUPS_PER_PASS}")
        words = 2 * bits if stage and bits == 3 else 0
        if len(others) != words:
            address, by = others[0] if others else (0, "")
            failures.append(f"{name}: {len(others)} 32-bit shared loads that are not lookups "
                            f"(expected {words}), the first at 0x{address:x} addressed by {by}")
        if ctas != 4 and late:
            failures.append(f"{name}: {len(late)} global loads after the pass's first lookup "
                            f"(at 0x{late[0][0]:x}): the next tile's words must go out first")
    release = nvcc_release()
    if release != CALIBRATED:
        skip(f"the budgets were measured with nvcc {CALIBRATED}, this is {release}: "
             f"{len(failures)} over budget above; measure them again")
    for failure in failures:
        print("FAIL:", failure)
    print(f"{seen} kernels checked, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
