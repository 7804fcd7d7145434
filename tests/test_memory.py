"""Bounded memory: a dense copy runs to completion inside a small memory cgroup (clone pods
run under a 600 MB limit and page cache has OOM-killed CDI's pods).  Needs root and a memory
cgroup (v2, or v1's memory controller)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import need, need_root
from layouts import sha256_prefix

LIMIT = 64 << 20          # far below the 600 MB of a clone pod: RSS and page cache together
# AddressSanitizer's shadow memory and quarantine come on top when the suite runs against the
# sanitizer build (CI's second run): the bound checked there is the same core under ASan.
if "libasan" in os.environ.get("LD_PRELOAD", ""):
    LIMIT = 192 << 20


def _own_cgroup_dir() -> tuple[Path, int] | None:
    """(directory of this process's memory cgroup, version) or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            if base.is_dir():
                return base / path.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::"):
            path = line[3:]
            for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                d = base / path.lstrip("/")
                if (d / "cgroup.controllers").exists() and "memory" in (
                        d / "cgroup.controllers").read_text().split():
                    return d, 2
    return None


@contextmanager
def memory_cgroup(limit: int) -> Iterator[tuple[Path, int]]:
    """A new child memory cgroup with LIMIT bytes (no swap); removed afterwards."""
    found = _own_cgroup_dir()
    need(found is not None, "needs a memory cgroup (v1 memory controller or v2)")
    assert found is not None
    parent, version = found
    cg = parent / f"cdimover-test-{uuid.uuid4().hex[:8]}"
    try:
        cg.mkdir()
    except OSError as e:
        need(False, f"cannot create a memory cgroup under {parent}: {e.strerror}")
    try:
        if version == 1:
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            swap = cg / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        else:
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        yield cg, version
    finally:
        cg.rmdir()


def _peak(cg: Path, version: int) -> int:
    name = "memory.max_usage_in_bytes" if version == 1 else "memory.peak"
    return int((cg / name).read_text())


def _oom_kills(cg: Path, version: int) -> int:
    if version == 1:
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0
    for line in (cg / "memory.events").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("preallocation", ["off", "full"])
def test_dense_copy_inside_a_small_memory_cgroup(tmp_path: Path, preallocation: str) -> None:
    need_root()
    src, dst = tmp_path / "dense.img", tmp_path / "copy.img"
    size = 512 << 20
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            f.write(block[i:] + block[:i])
    with memory_cgroup(LIMIT) as (cg, version):
        procs = cg / "cgroup.procs"

        def enter() -> None:
            procs.write_text(str(os.getpid()))

        r = subprocess.run(
            [sys.executable, "-c",
             "import sys, cdimover\n"
             f"cdimover.copy({str(src)!r}, {str(dst)!r}, reflink='never', "
             f"preallocation={preallocation!r})\n"],
            preexec_fn=enter, capture_output=True, text=True, timeout=300)
        peak, kills = _peak(cg, version), _oom_kills(cg, version)
    assert r.returncode == 0, f"copy failed inside {LIMIT >> 20} MiB: {r.stderr[-2000:]}"
    assert kills == 0
    assert peak <= LIMIT
    assert sha256_prefix(dst, size) == sha256_prefix(src, size)
