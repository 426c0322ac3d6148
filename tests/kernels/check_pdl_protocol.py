#!/usr/bin/env python3
"""Static check of the programmatic-dependent-launch rule (kernels/cuda/pdl_cuda.cuh).

A kernel launched with the programmatic stream serialization attribute may start while the
kernel before it still runs; unless it waits (griddepcontrol.wait) it could also end before that
kernel, and the kernel after it would then find unfinished writes. So every kernel that may be
launched with the attribute must wait. The attribute is set only through cudaLaunchKernelEx
(lq_launch_pdl and the launches that build their own config); a <<<...>>> launch never sets it.

The script reads kernels/cuda/*.cu, *.cuh and *.h (comments removed) and takes as "may get the
attribute" every __global__ kernel named in a function that calls cudaLaunchKernelEx or
lq_launch_pdl, or in the functions those call (the *_for and *_pick helpers that return
kernels): an over-approximation, the safe side; a kernel launched by name with <<<...>>> and
named inside no such call's arguments is left out. Each of them must call lq_pdl_wait or
lq_pdl_enter (lq_m1_wait_prerequisite counts: it is lq_pdl_wait), directly or through the device
functions it calls.

Usage: check_pdl_protocol.py [REPO_ROOT]   (exit 1 and the kernels that break the rule)
"""
import os
import re
import sys

WAITS = {"lq_pdl_wait", "lq_pdl_enter", "lq_m1_wait_prerequisite"}


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def closing(text, start, open_char, close_char):
    """The index of the bracket that closes the one at text[start] (len(text) if none)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_char:
            depth += 1
        elif text[i] == close_char:
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def bodies(text):
    """(name, is_kernel, body) of every function definition with a body."""
    out = []
    for m in re.finditer(r"([A-Za-z_][A-Za-z_0-9]*)\s*\(", text):
        name = m.group(1)
        if name in ("if", "for", "while", "switch", "return", "sizeof", "defined", "catch"):
            continue
        # the parameter list, then '{' (possibly after qualifiers) makes a definition
        i = closing(text, m.end() - 1, "(", ")")
        j = i + 1
        while j < len(text) and text[j] in " \t\n":
            j += 1
        if j >= len(text) or text[j] != "{":
            continue
        head = text[max(0, m.start() - 300):m.start()]
        head = head[head.rfind(";") + 1:] if ";" in head else head
        head = head[head.rfind("}") + 1:] if "}" in head else head
        k = closing(text, j, "{", "}")
        out.append((name, "__global__" in head, text[j:k + 1]))
    return out


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..")
    folder = os.path.join(root, "kernels", "cuda")
    text = ""
    for name in sorted(os.listdir(folder)):
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(folder, name)) as f:
                text += strip_comments(f.read()) + "\n"
    functions = bodies(text)
    calls = {}
    kernels = set()
    for name, is_kernel, body in functions:
        called = set(re.findall(r"([A-Za-z_][A-Za-z_0-9]*)\s*(?:<[^<>;{}()]*>)?\s*\(", body))
        calls.setdefault(name, set()).update(called)
        if is_kernel:
            kernels.add(name)
    waiting = set(WAITS)
    changed = True
    while changed:  # the functions that wait, directly or through what they call
        changed = False
        for name, called in calls.items():
            if name not in waiting and called & waiting:
                waiting.add(name)
                changed = True
    # The kernels an attribute-capable launch can start: every kernel named in the function
    # around a cudaLaunchKernelEx or lq_launch_pdl call, or in what that function calls (the
    # *_for and *_pick helpers return kernels). An over-approximation, which is the safe side.
    by_name = {}
    for name, is_kernel, body in functions:
        if not is_kernel:
            by_name.setdefault(name, []).append(body)
    launchers = set()
    for name, is_kernel, body in functions:
        if not is_kernel and re.search(r"\b(lq_launch_pdl|cudaLaunchKernelEx)\s*\(", body):
            launchers.add(name)
    launchers.discard("lq_launch_pdl")
    reachable, frontier = set(), set(launchers)
    while frontier:
        name = frontier.pop()
        if name in reachable:
            continue
        reachable.add(name)
        for called in calls.get(name, ()):
            if called in by_name and called not in reachable:
                frontier.add(called)
    named = set()
    for name in reachable:
        for body in by_name.get(name, ()):
            named.update(k for k in kernels if re.search(r"\b%s\b" % re.escape(k), body))
    # a kernel launched by name with <<<...>>> and never named inside a launch call with the
    # attribute's arguments (e.g. lq_to_half_kernel beside the prefill GEMM it feeds) is left out
    chevron = set(re.findall(r"\b([A-Za-z_][A-Za-z_0-9]*)\s*(?:<[^<>;{}()]*>)?\s*<<<", text))
    in_calls = set()
    for m in re.finditer(r"\b(?:lq_launch_pdl|cudaLaunchKernelEx)\s*\(", text):
        arguments = text[m.end():closing(text, m.end() - 1, "(", ")")]
        in_calls.update(k for k in kernels if re.search(r"\b%s\b" % re.escape(k), arguments))
    named = {k for k in named if k not in chevron or k in in_calls}
    checked, broken = len(named), sorted(k for k in named if k not in waiting)
    print("%d kernels may be launched with the attribute; %d of them do not wait" % (checked, len(broken)))
    for kernel in broken:
        print("  %s: may be launched with the attribute and never waits" % kernel)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
