"""Run one cdimover import_url() (or import_registry() for a docker:// image) for bench/run.py
and print its result as one JSON line.

    python3 bench/_cdm_import.py URL DST [--target-is-zero] [--threads N] [--request-size BYTES]
                                 [--insecure-registry HOST:PORT]

A subprocess of its own (like bench/_cdm_convert.py) so the runner can take wall time, CPU time
and peak RSS of the whole import, interpreter start-up included, with wait4.  The line holds the
copy's fields (elapsed, bytes_written, ...) and how the bytes were fetched: strategy ("ranges",
"stream" or "scratch"), bytes_fetched, retries, compression; for HTTP also requests, restarts
and the HTTP version, for a registry the layer and the layers pulled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.monotonic()

import cdimover  # noqa: E402  (import time is part of what we measure)
from cdimover.io.imageref import is_registry_url  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("target")
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--request-size", type=int, default=0)
    p.add_argument("--insecure-registry", action="append", default=[])
    a = p.parse_args(argv)
    # Only the module the URL needs, as the pod's importer loads it: the registry client's
    # urllib, ssl and email modules are not part of an HTTP import.
    registry = is_registry_url(a.url)
    if registry:
        from cdimover.ops.registry import import_registry
    else:
        from cdimover.ops.remote import import_url
    t_import = time.monotonic() - T0
    common = dict(import_s=t_import, module=cdimover.__file__)
    if registry:
        g = import_registry(a.url, a.target, target_is_zero=a.target_is_zero,
                            insecure_registries=tuple(a.insecure_registry))
        out = dict(g.copy.as_dict(), **common, strategy=g.strategy, layer=g.layer,
                   compression=g.compression, member=g.member, layers_pulled=g.layers_pulled,
                   bytes_fetched=g.bytes_fetched, retries=g.retries, peak_held=g.peak_held)
    else:
        r = import_url(a.url, a.target, target_is_zero=a.target_is_zero, threads=a.threads,
                       request_size=a.request_size)
        out = dict(r.copy.as_dict(), **common, strategy=r.strategy, compression=r.compression,
                   file_size=r.file_size, bytes_fetched=r.bytes_fetched, requests=r.requests,
                   retries=r.retries, restarts=r.restarts, http_version=r.http_version,
                   peak_held=r.peak_held)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
