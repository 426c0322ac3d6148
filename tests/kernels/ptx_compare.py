#!/usr/bin/env python3
"""Compare the kernels of two PTX files, ignoring names that a refactoring may change.

Usage:
    python3 tests/kernels/ptx_compare.py BEFORE.ptx AFTER.ptx [--rename OLD=NEW ...] [--show N]

Make the two files with the exact nvcc command meson uses for one source file (from
build/compile_commands.json), with `-c SRC -o X.o` replaced by `-ptx -o FILE.ptx SRC`, once before
and once after a change. The script pairs every __global__ kernel (`.entry`) of BEFORE with the kernel
of the same (normalized) name in AFTER and compares their bodies instruction by instruction; device
functions that stay out of line (`.func`) are compared through the calls that reach them, so their
names may change. Exit status: 0 when every kernel is the same, 1 when any differs or is missing from
one side, 2 on bad input.

What it normalizes before comparing, so that only names can differ:
  - comments (`//`, `/* */`) and blank lines; runs of spaces and tabs become one space;
  - the hash in the names nvcc gives to anonymous namespaces and static functions
    (`47_GLOBAL__N__ab28f76e_14_sample_cuda_cu_ba099be4`, `48_INTERNAL_1f887e72_17_..._cecdee7c`),
    which depends on the file's content;
  - virtual registers, per function and per class by order of first use (`%rd260` -> `%rd0`),
    including the counts in their `.reg` declarations;
  - branch labels (`$L__BB3_12` -> `$L0`) per function by order of first appearance;
  - the function's own name inside its body and parameter names (`NAME_param_3` -> `param_3`);
  - variables (`.shared`, `.global`, `.const`, `.local`, in the body or at file level, demoted or not)
    by order of first use (`$v0`); what they are declared as (state space, alignment, type, size,
    initializer) is still compared, a file-level one as part of each function that uses it;
  - names of called `.func` functions (`$call0`); the callee bodies are then compared in pairs.
What it does not normalize: every opcode, type, modifier, immediate, address offset and the order of
instructions. A kernel whose PTX differs only in what is listed above runs the same instructions.
It is strict on purpose: commuted operands (`mul.f32 a, b` against `b, a`) or independent
instructions in another order (four zeroing movs, hence a vector load's registers permuted) count
as differences; judge those by hand or undo the change.

--rename OLD=NEW pairs a kernel whose name changed on purpose (names as printed by the script).
--show N prints up to N lines of unified diff per differing function (default 40).
"""

import argparse
import difflib
import re
import sys

REGISTER = re.compile(r"(?<![\w$.])%(rd|rs|rq|fd|hh|r|f|h|p)(\d+)\b")
REGISTER_DECL = re.compile(r"^\.reg (\.\w+) %(rd|rs|rq|fd|hh|r|f|h|p)<(\d+)>;$")
LABEL = re.compile(r"\$L__\w+")
IDENT = re.compile(r"[A-Za-z_$][\w$]*")
VAR_DECL = re.compile(
    r"^(?:\.(?:visible|extern|weak)\s+)*\.(?:shared|global|const|local)\b.*?([A-Za-z_$][\w$]*)\s*(\[[^\]]*\])?\s*(=.*)?;$"
)
FUNC_HEAD = re.compile(
    r"^(?:\.(?:visible|extern|weak)\s+)*\.(entry|func)\s*(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)"
)
LENGTH_PREFIXED = re.compile(r"(\d+)(_GLOBAL__N__|_INTERNAL_)")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.split("\n"))


def drop_file_hashes(text):
    """Replaces each length-prefixed anonymous-namespace or internal name by its length-free stem."""
    out, pos = [], 0
    for match in LENGTH_PREFIXED.finditer(text):
        if match.start() < pos:
            continue
        length = int(match.group(1))
        start = match.start(2)
        name = text[start : start + length]
        # The name is <tag><hash>_<len>_<file>_<hash>: keep <tag><file> so two files stay apart.
        parts = name.split("_")
        stem = "_".join(p for p in parts[:-1] if p and not re.fullmatch(r"[0-9a-f]{8}|\d+", p))
        out.append(text[pos : match.start()])
        out.append("$%s$" % stem)
        pos = start + length
    out.append(text[pos:])
    return "".join(out)


class Function:
    def __init__(self, kind, name, header, body):
        self.kind, self.name, self.header, self.body = kind, name, header, body


def parse(path):
    """Returns (functions by name, file-level variable declarations by name) of one PTX file."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        sys.exit("ptx_compare: %s: %s" % (path, err.strerror))
    lines = [re.sub(r"\s+", " ", line).strip() for line in drop_file_hashes(strip_comments(text)).split("\n")]
    lines = [line for line in lines if line]
    functions, variables = {}, {}
    i = 0
    while i < len(lines):
        line = lines[i]
        head = FUNC_HEAD.match(line)
        if head:
            kind, name = head.group(1), head.group(2)
            header = []
            while i < len(lines) and "{" not in lines[i] and not lines[i].endswith(";"):
                header.append(lines[i])
                i += 1
            if i >= len(lines) or lines[i].endswith(";"):  # a prototype, no body
                i += 1
                continue
            body, depth = [], 0
            while i < len(lines):
                depth += lines[i].count("{") - lines[i].count("}")
                body.append(lines[i])
                i += 1
                if depth == 0:
                    break
            functions[name] = Function(kind, name, header, body)
            continue
        var = VAR_DECL.match(line)
        if var:
            variables[var.group(1)] = line
        i += 1
    return functions, variables


def canonical(function, functions, variables):
    """Returns (lines, callee names in order of first call) of one function with names normalized."""
    counters, registers = {}, {}

    def register(match):
        key = match.group(0)
        if key not in registers:
            number = counters.get(match.group(1), 0)
            counters[match.group(1)] = number + 1
            registers[key] = "%%%s%d" % (match.group(1), number)
        return registers[key]

    labels = {}

    def label(match):
        return labels.setdefault(match.group(0), "$L%d" % len(labels))

    local_vars = {}
    for line in function.body:
        var = VAR_DECL.match(line)
        if var:
            local_vars[var.group(1)] = line
    names, callees, used_globals = {}, [], []

    def ident(match):
        word = match.group(0)
        if word == function.name:
            return "$self"
        if word.startswith(function.name + "_param_"):
            return word[len(function.name) + 1 :]
        if word in local_vars or word in variables:
            if word not in names:
                names[word] = "$v%d" % len(names)
                if word not in local_vars:
                    used_globals.append(word)
            return names[word]
        if word in functions:
            if word not in callees:
                callees.append(word)
            return "$call%d" % callees.index(word)
        return word

    out = []
    for line in function.header + function.body:
        line = LABEL.sub(label, line)
        decl = REGISTER_DECL.match(line)
        if decl:
            out.append(".reg %s %%%s<N>;" % (decl.group(1), decl.group(2)))
            continue
        line = REGISTER.sub(register, line)
        out.append(IDENT.sub(ident, line))
    for word in used_globals:
        out.append(IDENT.sub(lambda m: names.get(m.group(0), m.group(0)), variables[word]))
    return out, callees


def compare(before, after, show):
    """Compares the kernels of two parsed files; returns the number of kernels that differ."""
    (funcs_a, vars_a), (funcs_b, vars_b), renames = before, after, show["renames"]
    kernels_a = sorted(n for n, f in funcs_a.items() if f.kind == "entry")
    kernels_b = {n for n, f in funcs_b.items() if f.kind == "entry"}
    failures, checked = 0, set()
    for name in kernels_a:
        other = renames.get(name, name)
        if other not in kernels_b:
            print("MISSING  %s: no kernel of this name after the change" % name)
            failures += 1
            continue
        kernels_b.discard(other)
        pending, ok = [(name, other)], True
        while pending:
            left, right = pending.pop()
            if (left, right) in checked:
                continue
            checked.add((left, right))
            if left not in funcs_a or right not in funcs_b:
                ok = False
                print("DIFFERS  %s: calls %s before, %s after" % (name, left, right))
                continue
            lines_a, callees_a = canonical(funcs_a[left], funcs_a, vars_a)
            lines_b, callees_b = canonical(funcs_b[right], funcs_b, vars_b)
            if lines_a != lines_b:
                ok = False
                where = name if left == name else "%s (via %s)" % (name, left)
                print("DIFFERS  %s: %d lines before, %d after" % (where, len(lines_a), len(lines_b)))
                diff = list(difflib.unified_diff(lines_a, lines_b, "before", "after", lineterm="", n=2))
                for line in diff[: show["lines"]]:
                    print("    " + line)
                continue
            pending.extend(zip(callees_a, callees_b))
        if ok:
            print("SAME     %s (%d lines)" % (name, len(canonical(funcs_a[name], funcs_a, vars_a)[0])))
        else:
            failures += 1
    for name in sorted(kernels_b):
        print("NEW      %s: no kernel of this name before the change" % name)
        failures += 1
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    parser.add_argument("--show", type=int, default=40, metavar="N")
    args = parser.parse_args()
    renames = {}
    for pair in args.rename:
        if "=" not in pair:
            parser.error("--rename wants OLD=NEW, got %r" % pair)
        old, new = pair.split("=", 1)
        renames[old] = new
    before, after = parse(args.before), parse(args.after)
    if not any(f.kind == "entry" for f in before[0].values()):
        sys.exit("ptx_compare: %s: no kernels (.entry) found" % args.before)
    failures = compare(before, after, {"renames": renames, "lines": args.show})
    print("%s: %d kernel(s) differ or are unmatched" % ("FAIL" if failures else "OK", failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
