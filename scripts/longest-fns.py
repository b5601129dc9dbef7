#!/usr/bin/env python3
"""The longest functions in bootlace's non-test Rust code, by lines from `fn` to its closing brace.

usage: scripts/longest-fns.py [N]     (default 10)

Test code is left out: files under a `tests/` or `benches/` directory and `#[cfg(test)]` modules.
The brace matcher skips string, char and comment contents, which is enough for this code base.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"target", "tests", "benches", ".git", "fuzz_targets", "corpus"}
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip(line, state):
    """Code of a line with strings, chars and comments blanked; state carries block comments."""
    out = []
    i = 0
    while i < len(line):
        c = line[i]
        if state["block"]:
            if line.startswith("*/", i):
                state["block"] = False
                i += 2
            else:
                i += 1
            continue
        if state["str"]:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                state["str"] = False
            i += 1
            continue
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        m = re.match(r'r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == "_")):
            hashes = m.group(1)
            end = line.find('"' + hashes, i + len(m.group(0)))
            if end >= 0:
                i = end + 1 + len(hashes)
                continue
        if c == '"':
            state["str"] = True
            i += 1
            continue
        m = re.match(r"'(\\.|[^\\'])'", line[i:])
        if m:
            i += len(m.group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def functions(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    state = {"block": False, "str": False}
    code = [strip(l, state) for l in lines]
    skip_until = -1
    found = []
    for i, line in enumerate(code):
        if i <= skip_until:
            continue
        if line.strip().startswith("#[cfg(test)]"):
            skip_until = block_end(code, i + 1)
            continue
        m = FN.match(line)
        if not m:
            continue
        end = block_end(code, i)
        if end is None:
            continue
        found.append((end - i + 1, path, i + 1, m.group(7)))
    return found


def block_end(code, start):
    """Index of the line closing the first `{` block at or after `start` (None for `;` first)."""
    depth = 0
    opened = False
    for j in range(start, len(code)):
        for c in code[j]:
            if c == "{":
                depth += 1
                opened = True
            elif c == "}":
                depth -= 1
                if opened and depth == 0:
                    return j
            elif c == ";" and not opened and depth == 0:
                return None
    return None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    allf = []
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in files:
            if name.endswith(".rs"):
                allf.extend(functions(os.path.join(dirpath, name)))
    allf.sort(key=lambda f: -f[0])
    for length, path, line, name in allf[:n]:
        print(f"{length:5d}  {os.path.relpath(path, ROOT)}:{line}  {name}")


if __name__ == "__main__":
    main()
