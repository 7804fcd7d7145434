"""Run one cdimover.create_blank() or preallocate() for bench/run.py; print its PreallocResult
as one JSON line.

    python3 bench/_cdm_prealloc.py blank PATH SIZE [--preallocation off|falloc|full]
    python3 bench/_cdm_prealloc.py preallocate PATH [--mode falloc|full] [--size SIZE]

A subprocess of its own (like bench/_cdm_copy.py) so the runner can take wall time, CPU time
and peak RSS of the whole call, interpreter start-up included, with wait4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.monotonic()

import cdimover  # noqa: E402  (import time is part of what we measure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blank")
    b.add_argument("path")
    b.add_argument("size", type=int)
    b.add_argument("--preallocation", default="off", choices=["off", "falloc", "full"])
    q = sub.add_parser("preallocate")
    q.add_argument("path")
    q.add_argument("--mode", default="falloc", choices=["falloc", "full"])
    q.add_argument("--size", type=int, default=None)
    a = p.parse_args(argv)
    t_import = time.monotonic() - T0
    if a.cmd == "blank":
        r = cdimover.create_blank(a.path, a.size, preallocation=a.preallocation)
    else:
        r = cdimover.preallocate(a.path, mode=a.mode, size=a.size)
    out = dict(r.as_dict(), import_s=t_import, module=cdimover.__file__)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
