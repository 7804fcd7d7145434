"""Run one cdimover import_url() for bench/run.py and print its ImportResult as one JSON line.

    python3 bench/_cdm_import.py URL DST [--target-is-zero] [--threads N] [--request-size BYTES]

A subprocess of its own (like bench/_cdm_convert.py) so the runner can take wall time, CPU time
and peak RSS of the whole import, interpreter start-up included, with wait4.  The line holds the
copy's fields (elapsed, bytes_written, ...) and how the bytes were fetched: strategy ("ranges"
or "stream"), bytes_fetched, requests, retries, restarts, compression.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.monotonic()

import cdimover  # noqa: E402  (import time is part of what we measure)
from cdimover.ops.remote import import_url  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("target")
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--request-size", type=int, default=0)
    a = p.parse_args(argv)
    t_import = time.monotonic() - T0
    r = import_url(a.url, a.target, target_is_zero=a.target_is_zero, threads=a.threads,
                   request_size=a.request_size)
    out = dict(r.copy.as_dict(), import_s=t_import, module=cdimover.__file__,
               strategy=r.strategy, compression=r.compression, file_size=r.file_size,
               bytes_fetched=r.bytes_fetched, requests=r.requests, retries=r.retries,
               restarts=r.restarts, http_version=r.http_version, peak_held=r.peak_held)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
