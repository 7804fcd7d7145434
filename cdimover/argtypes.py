"""The argparse types of every command (``cdimover ...`` and ``cdimover pod ...``): sizes as
Kubernetes quantities, and the tuning options checked against the native core's limits, so a
bad value is a usage error naming the option (exit 2), never a traceback or an errno."""

from __future__ import annotations

import argparse
from typing import Final

__all__ = ["size", "threads", "request_size", "sparse_size", "seconds", "REQUEST_ALIGN",
           "MAX_REQUEST", "DEFAULT_REQUEST", "MIN_SPARSE", "MAX_THREADS"]

# The core's limits on tuning (csrc/internal.h CDM_ALIGN, CDM_MAX_REQUEST,
# CDM_DEFAULT_REQUEST, CDM_MAX_THREADS, as the job driver checks them); tests/test_cli.py
# checks that the core accepts each bound and refuses one step beyond it.
REQUEST_ALIGN: Final = 4096
MAX_REQUEST: Final = 64 << 20
DEFAULT_REQUEST: Final = 4 << 20
MIN_SPARSE: Final = 512
MAX_THREADS: Final = 16


def size(text: str) -> int:
    """A byte count: a whole number or a Kubernetes quantity ("10Gi", "512M", "4096")."""
    from .sizing import parse_quantity

    try:
        return parse_quantity(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def threads(text: str) -> int:
    """--threads: 0 (the core's default, 4) to MAX_THREADS."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be between 0 (the default, 4) and "
                                         f"{MAX_THREADS}, got {n}")
    return n


def request_size(text: str) -> int:
    """--request-size: a multiple of 4096 from 4 KiB to 64 MiB."""
    n = size(text)
    if not (REQUEST_ALIGN <= n <= MAX_REQUEST and n % REQUEST_ALIGN == 0):
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {REQUEST_ALIGN} from 4 KiB to 64 MiB, got {n}")
    return n


def sparse_size(text: str) -> int:
    """--sparse-size: a power of two from 512 to 64 MiB (at most the request size, which the
    command checks once both are known)."""
    n = size(text)
    if not (MIN_SPARSE <= n <= MAX_REQUEST and n & (n - 1) == 0):
        raise argparse.ArgumentTypeError(
            f"must be a power of two from {MIN_SPARSE} to the request size, got {n}")
    return n


def seconds(text: str) -> float:
    """Seconds, 0 to 3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value
