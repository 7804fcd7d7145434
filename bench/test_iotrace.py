"""bench/iotrace.py on hand-written strace logs: joined unfinished/resumed calls, the
queue-depth profile and the per-call rates.

    python3 -m pytest -q bench/test_iotrace.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import iotrace  # noqa: E402

MiB = 1 << 20

LOG = f"""\
100 10:00:00.000000 pread64(4, "..."..., {4 * MiB}, 0) = {4 * MiB} <0.100000>
101 10:00:00.050000 pread64(4,  <unfinished ...>
100 10:00:00.100000 pwrite64(7, "..."..., {4 * MiB}, 0 <unfinished ...>
101 10:00:00.150000 <... pread64 resumed>"..."..., {4 * MiB}, {4 * MiB}) = {4 * MiB} <0.100000>
100 10:00:00.300000 <... pwrite64 resumed>) = {4 * MiB} <0.200000>
101 10:00:00.300000 pread64(4, "..."..., 4096, 0) = 4096 <0.000010>
100 10:00:00.310000 fdatasync(7) = 0 <0.090000>
"""


def test_parse_joins_unfinished_calls() -> None:
    calls = iotrace.parse(LOG.splitlines())
    names = [(c.name, c.pid, c.length, c.offset) for c in calls]
    assert names == [("pread64", 100, 4 * MiB, 0), ("pread64", 101, 4 * MiB, 4 * MiB),
                     ("pwrite64", 100, 4 * MiB, 0), ("pread64", 101, 4096, 0),
                     ("fdatasync", 100, 0, 0)]
    second = calls[1]
    assert second.start == pytest.approx(36000.05)      # the unfinished line's time
    assert second.duration == pytest.approx(0.1)
    assert calls[2].fd == 7 and calls[2].end == pytest.approx(36000.3)


def test_depth_profile_counts_overlap() -> None:
    calls = iotrace.parse(LOG.splitlines())
    reads = [c for c in calls if c.name == "pread64" and c.length >= 65536]
    prof = iotrace.depth_profile(reads, 36000.0, 36000.3)
    # [0, 0.05) one read, [0.05, 0.1) two, [0.1, 0.15) one, [0.15, 0.3) none
    assert prof == pytest.approx({0: 0.15, 1: 0.1, 2: 0.05})
    assert sum(prof.values()) == pytest.approx(0.3)


def test_report_rates_and_slow_calls() -> None:
    out = iotrace.report(iotrace.parse(LOG.splitlines()), min_bytes=65536, bin_s=0.1)
    assert "data I/O span 0.300 s, 3 calls" in out
    read_row = next(line for line in out.splitlines() if line.startswith("pread64 "))
    # 8 MiB in 0.2 s of calls: 40 MiB/s per call; over the 0.3 s span: 27 MiB/s
    assert read_row.split()[2:] == ["2", "8", "0.200", "100.0", "40", "27"]
    assert "pwrite64 in flight (mean 0.67)" in out
    assert "fdatasync(fd 7) took 0.090s" in out
    assert "pwrite64(fd 7, 4096 KiB at 0 MiB) took 0.200s" in out     # >= 50 ms
    assert "4096 KiB at 0 MiB) took 0.100s" in out
