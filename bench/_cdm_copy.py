"""Run one cdimover.copy() for bench/run.py and print its CopyResult as one JSON line.

    python3 bench/_cdm_copy.py SRC DST [--scan auto|seek|loop|full] [--reflink auto|never|always]
                               [--target-is-zero] [--threads N] [--request-size BYTES]
                               [--preallocation off|falloc|full]

A subprocess of its own so the runner can take wall time, CPU time and peak RSS of the whole
copy (interpreter start-up included, as a CLI would pay it) with os.wait4, like any peer.
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
    p.add_argument("--scan", default="auto", choices=["auto", "seek", "loop", "full"])
    p.add_argument("--reflink", default="auto", choices=["auto", "never", "always"])
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--request-size", type=int, default=0)
    p.add_argument("--preallocation", default="off", choices=["off", "falloc", "full"])
    a = p.parse_args(argv)
    t_import = time.monotonic() - T0
    r = cdimover.copy(a.source, a.target, target_is_zero=a.target_is_zero, reflink=a.reflink,
                      scan=a.scan, threads=a.threads, request_size=a.request_size,
                      preallocation=a.preallocation)
    out = {
        "import_s": t_import,
        "elapsed": r.elapsed,
        "read_seconds": r.read_seconds,
        "write_seconds": r.write_seconds,
        "sync_seconds": r.sync_seconds,
        "scan_method": r.scan_method.label,
        "scan_note": r.scan_note,
        "bytes_read": r.bytes_read,
        "bytes_written": r.bytes_written,
        "bytes_zeroed": r.bytes_zeroed,
        "bytes_skipped": r.bytes_skipped,
        "bytes_zero_data": r.bytes_zero_data,
        "zero_methods": [m.label for m in r.zero_methods],
        "zero_fallbacks": r.zero_fallbacks,
        "direct_read": r.direct_read,
        "direct_write": r.direct_write,
        "reflinked": r.reflinked,
        "target_allocated": r.target_allocated,
        "preallocation": r.preallocation,
        "alloc_methods": [m.label for m in r.alloc_methods],
        "module": cdimover.__file__,
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
