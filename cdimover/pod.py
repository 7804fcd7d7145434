"""Pod mode: ``cdimover pod clone`` and ``cdimover pod import``, configured from the
environment as CDI configures its clone and import pods, reporting through a termination
message and a Prometheus progress endpoint."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
             common: argparse.ArgumentParser) -> None:
    """Add the ``pod`` command to the CLI's subparsers SUB (COMMON: shared options)."""
    p = sub.add_parser("pod", parents=[common], help="run as a CDI clone or import pod",
                       description="Run as a clone or import pod, configured from the "
                       "environment (not implemented yet).")
    p.set_defaults(func=lambda args: 1)
