"""Run one cdimover.convert() for bench/run.py and print its CopyResult as one JSON line.

    python3 bench/_cdm_convert.py SRC DST [--source-format auto|raw|qcow2]
                                  [--preallocation off|falloc|full] [--target-is-zero]
                                  [--threads N] [--request-size BYTES]

A subprocess of its own (like bench/_cdm_copy.py) so the runner can take wall time, CPU time
and peak RSS of the whole conversion, interpreter start-up included, with wait4.
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
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--source-format", default="auto", choices=["auto", "raw", "qcow2"])
    p.add_argument("--preallocation", default="off", choices=["off", "falloc", "full"])
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--request-size", type=int, default=0)
    a = p.parse_args(argv)
    t_import = time.monotonic() - T0
    r = cdimover.convert(a.source, a.target, source_format=a.source_format,
                         preallocation=a.preallocation, target_is_zero=a.target_is_zero,
                         threads=a.threads, request_size=a.request_size)
    out = dict(r.as_dict(), import_s=t_import, module=cdimover.__file__)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
