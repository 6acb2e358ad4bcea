#!/usr/bin/env python3
"""The agent's link-time function order: which functions go first and together.

The agent's idle RSS is mostly its own code: the kernel maps a binary's pages in 64 KiB windows
around each page fault, so a few hundred functions spread over 9 MiB of text make most of it
resident. Placed together (lld's --symbol-ordering-file), the same functions take a third of that.

    symbol_order.py names OUT CALLGRIND_OUT...   the functions of the spiffed binary that ran in
                                                 these callgrind profiles (valgrind --tool=callgrind
                                                 --demangle=no), demangled and without the crate and
                                                 symbol hashes, sorted, into OUT (what
                                                 packaging/symbol-order-train.sh writes to
                                                 packaging/symbol-order.txt)
    symbol_order.py map LIST BINARY OUT          the symbols of BINARY whose names (demangled, no
                                                 hashes) are in LIST, mangled, into OUT: lld's
                                                 ordering file for a link of the same build
                                                 (packaging/build-ordered.sh)

Names are kept without hashes because the hashes change with the toolchain, the cargo profile and
every dependency; the names of the functions do not. A generic function in a crate that uses
legacy mangling has no type arguments in its name: every instance of it is listed.
Needs binutils (nm, c++filt with Rust demangling).
"""

import os
import re
import subprocess
import sys

HASHES = re.compile(r"\[[0-9a-f]{1,16}\]|::h[0-9a-f]{16}$")
# A list this much smaller than it was (or a binary this different from the one profiled)
# orders little: say so.
STALE_BELOW = 0.6


def die(msg):
    print(f"symbol_order.py: {msg}", file=sys.stderr)
    sys.exit(1)


def demangle(names):
    """Demangled names without hashes, in the order given (c++filt, one name per line)."""
    if not names:
        return []
    try:
        out = subprocess.run(
            ["c++filt", "--format=rust"],
            input="\n".join(names) + "\n",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as e:
        die(f"c++filt failed ({e}): install binutils")
    if len(out) < len(names):
        die("c++filt printed fewer lines than it was given")
    return [HASHES.sub("", n) for n in out[: len(names)]]


def profiled_functions(path, binary_name):
    """Mangled names of the functions of the object named binary_name that have a cost in one
    callgrind output file (names and objects are compressed: `fn=(7) name`, then `fn=(7)`)."""
    objects, functions = {}, {}
    current_object = None
    found = set()
    define = re.compile(r"^(c?ob|c?fn)=\((\d+)\)(?: (.*))?$")
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        die(f"cannot read the callgrind profile {path}: {e}")
    with f:
        for line in f:
            if not (line.startswith(("ob=", "fn=", "cob=", "cfn="))):
                continue
            m = define.match(line.rstrip("\n"))
            if not m:
                continue
            kind, ident, name = m.groups()
            table = objects if kind.endswith("ob") else functions
            if name is not None:
                table[ident] = name
            if kind == "ob":
                current_object = objects.get(ident)
            elif kind == "fn" and current_object and os.path.basename(current_object) == binary_name:
                fn = functions.get(ident)
                # Not a symbol: an address or a pseudo-function such as "(below main)".
                if fn and not fn.startswith(("0x", "(")):
                    # A recursive call's frame is named with its depth: name'2.
                    found.add(re.sub(r"'\d+$", "", fn))
    return found


def cmd_names(out, profiles):
    # Which profiles each function ran in: the functions that ran in every profile come first,
    # then those of each combination of profiles together (standalone's, agent mode's), so that
    # each situation's code is contiguous, not interleaved with code the other never runs.
    seen_in = {}
    for i, p in enumerate(profiles):
        got = profiled_functions(p, "spiffed")
        if not got:
            die(f"{p}: no function of a binary named spiffed in this callgrind profile")
        for fn in got:
            seen_in.setdefault(fn, set()).add(i)
    mangled = sorted(seen_in)
    groups = {}
    for fn, name in zip(mangled, demangle(mangled)):
        groups.setdefault(name, set()).update(seen_in[fn])
    names = sorted(groups, key=lambda n: (-len(groups[n]), sorted(groups[n]), n))
    header = (
        "# The functions spiffed runs while it starts and serves, demangled, without hashes, one\n"
        "# per line, those of every situation profiled first: the link order of its own code\n"
        "# (crates/spiffed/build.rs). Generated by\n"
        "# packaging/symbol-order-train.sh; regenerate it when the code the agent runs changed a lot\n"
        "# (packaging/build-ordered.sh says how much of the list it found).\n"
    )
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header)
        f.writelines(n + "\n" for n in names)
    os.replace(tmp, out)
    print(f"symbol_order.py: {len(names)} functions from {len(profiles)} profile(s) into {out}", file=sys.stderr)


def binary_text_symbols(binary):
    try:
        out = subprocess.run(
            ["nm", "--defined-only", binary], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        die(f"nm {binary} failed ({e})")
    syms = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in ("t", "T", "w", "W"):
            syms.append(parts[2])
    if not syms:
        die(f"{binary} has no symbol table (built with strip = \"symbols\"?)")
    return syms


def cmd_map(listing, binary, out):
    try:
        with open(listing, encoding="utf-8") as f:
            wanted = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]
    except OSError as e:
        die(f"cannot read the list {listing}: {e}")
    if not wanted:
        die(f"{listing} lists no function")
    syms = binary_text_symbols(binary)
    by_name = {}
    for mangled, name in zip(syms, demangle(syms)):
        by_name.setdefault(name, []).append(mangled)
    ordered, found = [], 0
    for name in wanted:
        hits = by_name.get(name)
        if hits:
            found += 1
            ordered.extend(hits)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(s + "\n" for s in ordered)
    os.replace(tmp, out)
    share = found / len(wanted)
    print(
        f"symbol order: {found} of {len(wanted)} listed functions found in {binary} "
        f"({len(ordered)} symbols) -> {out}",
        file=sys.stderr,
    )
    if share < STALE_BELOW:
        print(
            f"symbol order: only {share:.0%} of {listing} is in this binary: the list is stale, "
            "regenerate it with packaging/symbol-order-train.sh",
            file=sys.stderr,
        )


def main(argv):
    if len(argv) >= 3 and argv[0] == "names":
        cmd_names(argv[1], argv[2:])
    elif len(argv) == 4 and argv[0] == "map":
        cmd_map(argv[1], argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
