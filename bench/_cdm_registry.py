"""Run one cdimover import_registry() for bench/run.py and print its result as one JSON line.

    python3 bench/_cdm_registry.py docker://HOST/REPO:TAG DST [--target-is-zero]
                                   [--insecure-registry HOST]

A subprocess of its own (like bench/_cdm_import.py) so the runner can take wall time, CPU time
and peak RSS of the whole import, interpreter start-up included, with wait4.  The line holds the
copy's fields (elapsed, bytes_written, ...) and what was pulled: layer, compression,
layers_pulled, bytes_fetched, retries, strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.monotonic()

import cdimover  # noqa: E402  (import time is part of what we measure)
from cdimover.ops.registry import import_registry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("target")
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--insecure-registry", action="append", default=[])
    a = p.parse_args(argv)
    t_import = time.monotonic() - T0
    r = import_registry(a.image, a.target, target_is_zero=a.target_is_zero,
                        insecure_registries=tuple(a.insecure_registry))
    out = dict(r.copy.as_dict(), import_s=t_import, module=cdimover.__file__,
               strategy=r.strategy, layer=r.layer, compression=r.compression,
               member=r.member, layers_pulled=r.layers_pulled, bytes_fetched=r.bytes_fetched,
               retries=r.retries, peak_held=r.peak_held, source_format=r.source_format)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
