"""Zero-detection throughput: cdimover.is_zero against numpy on a 4 MiB buffer.

    pytest bench --benchmark-only

The all-zero buffer is the worst case (every byte must be looked at); the buffer with one
non-zero byte up front shows the early exit.  extra_info carries GiB/s from the mean time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import cdimover

SIZE = 4 << 20
ZERO = bytes(SIZE)
FIRST_NONZERO = b"\x01" + bytes(SIZE - 1)


def _numpy_u8(buf: bytes) -> bool:
    return not np.frombuffer(buf, dtype=np.uint8).any()


def _numpy_u64(buf: bytes) -> bool:
    return not np.frombuffer(buf, dtype=np.uint64).any()


IMPLS: dict[str, Callable[[bytes], bool]] = {
    "cdimover.is_zero": cdimover.is_zero,
    "numpy u8 not any()": _numpy_u8,
    "numpy u64 not any()": _numpy_u64,
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_is_zero_4mib_zero(benchmark: BenchmarkFixture, impl: str) -> None:
    fn = IMPLS[impl]
    benchmark.group = "is_zero 4 MiB all zero"
    assert benchmark(fn, ZERO) is True
    if benchmark.stats is not None:
        benchmark.extra_info["GiB/s"] = round(SIZE / benchmark.stats.stats.mean / (1 << 30),
                                              2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_is_zero_4mib_first_byte_set(benchmark: BenchmarkFixture, impl: str) -> None:
    fn = IMPLS[impl]
    benchmark.group = "is_zero 4 MiB, first byte non-zero"
    assert benchmark(fn, FIRST_NONZERO) is False
