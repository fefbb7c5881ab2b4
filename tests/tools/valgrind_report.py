"""Reads valgrind's XML reports (``make valgrind``) and fails on every error with a qie frame in its stack.

Python, numpy and ORT raise thousands of reports of their own under memcheck (CPython's allocator
tricks, MLAS's vector loads past the end of aligned buffers, ...); none of them is qie's to fix, so only
errors whose stack passes through one of qie's libraries (``libqie_ort.so``, ``libqie_ep.so``,
``libqie_testing.so``) count. Each is printed with its stack.

    python tests/tools/valgrind_report.py build/valgrind/vg-*.xml
"""
from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET

LIB = "libqie_"  # libqie_ort.so, libqie_ep.so, libqie_testing.so


def frames(err) -> list[str]:
    out = []
    for f in err.iter("frame"):
        where = f.findtext("fn") or f.findtext("ip") or "?"
        src = f"{f.findtext('file')}:{f.findtext('line')}" if f.findtext("file") else (f.findtext("obj") or "")
        out.append(f"{where} ({src})")
    return out


def main(paths: list[str]) -> int:
    if not paths:
        sys.exit("usage: valgrind_report.py REPORT.xml...")
    ours, others, runs = [], collections.Counter(), 0
    for p in paths:
        try:
            root = ET.parse(p).getroot()
        except ET.ParseError as e:  # a run killed before valgrind closed its report
            print(f"{p}: unreadable ({e}): the run under valgrind did not finish", file=sys.stderr)
            return 1
        runs += 1
        for err in root.findall("error"):
            kind = err.findtext("kind")
            if any(LIB in (f.findtext("obj") or "") for f in err.iter("frame")):
                what = err.findtext("what") or (err.find("xwhat").findtext("text") if err.find("xwhat") is not None else "")
                ours.append((kind, what, frames(err)))
            else:
                others[kind] += 1
    print(f"valgrind: {runs} report(s); {len(ours)} error(s) in qie; {sum(others.values())} elsewhere (not qie's: "
          + (", ".join(f"{k} x{v}" for k, v in others.most_common()) or "none") + ")")
    for kind, what, stack in ours:
        print(f"\n{kind}: {what}\n  " + "\n  ".join(stack[:12]))
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
