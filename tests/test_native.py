"""The native core's boundary: ABI, enums mirrored from C, the error translator, is_zero,
extent scans and the zeroing cascade, tested directly."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cdimover
from cdimover import _native
from cdimover._native import Context, ffi, lib
from cdimover.types import ScanMethod, ZeroMethod
from layouts import data_map


def test_abi_version_matches() -> None:
    assert lib.CDM_ABI_VERSION == _native.ABI_VERSION


def test_enums_mirror_c_constants() -> None:
    assert ZeroMethod.PUNCH_HOLE == lib.CDM_ZERO_PUNCH_HOLE
    assert ZeroMethod.WRITE == lib.CDM_ZERO_WRITE
    assert ScanMethod.LOOP_BACKING == lib.CDM_SCAN_LOOP_BACKING
    assert ZeroMethod.from_mask((1 << lib.CDM_ZERO_PUNCH_HOLE) | (1 << lib.CDM_ZERO_WRITE)) == (
        ZeroMethod.PUNCH_HOLE, ZeroMethod.WRITE)


@given(st.binary(min_size=0, max_size=9000), st.integers(0, 8999))
def test_is_zero_agrees_with_python(data: bytes, flip: int) -> None:
    zero = bytes(len(data))
    assert cdimover.is_zero(zero)
    assert cdimover.is_zero(data) == (data.count(0) == len(data))
    if data:
        i = flip % len(data)
        b = bytearray(zero)
        b[i] = 1
        assert not cdimover.is_zero(b)


def test_context_refuses_concurrent_use() -> None:
    ctx = Context()
    assert ctx._lock.acquire()
    try:
        with pytest.raises(RuntimeError, match="one operation at a time"):
            ctx.call(lib.cdm_is_zero, ffi.NULL, 0)
    finally:
        ctx._lock.release()
    ctx.close()
    with pytest.raises(ValueError, match="closed"):
        ctx.ptr


def test_check_maps_errno_to_oserror_with_path(tmp_path: Path) -> None:
    ctx = Context()
    # A directory fd is neither a file nor a block device: -EINVAL with the path.
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            _native.probe(ctx, fd, str(tmp_path))
        assert ei.value.errno == errno.EINVAL
        assert ei.value.filename == str(tmp_path)
        assert "not a regular file" in str(ei.value)
    finally:
        os.close(fd)


def test_scan_extents_matches_seek_data(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(10 << 20)
        for off in (0, 3 << 20, (10 << 20) - 4096):
            f.seek(off)
            f.write(b"x" * 4096)
    ext = cdimover.scan(p)
    assert sum(n for _, n, _ in ext) == 10 << 20
    assert [(o, o + n) for o, n, d in ext if d] == data_map(p)
    # Extents alternate and tile the file.
    pos = 0
    for o, n, _ in ext:
        assert o == pos
        pos += n


def test_scan_extents_small_capacity_resumes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
        for i in range(0, 4 << 20, 256 << 10):
            f.seek(i)
            f.write(b"y" * 4096)
    ctx = Context()
    fd = os.open(p, os.O_RDONLY)
    try:
        small = _native.scan_extents(ctx, fd, 0, 4 << 20, cap=3)
        big = _native.scan_extents(ctx, fd, 0, 4 << 20)
    finally:
        os.close(fd)
    assert small == big


def test_zero_range_punches_holes_in_files(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 20))
    ctx = Context()
    stats = _native.new_stats()
    fd = os.open(p, os.O_RDWR)
    try:
        ctx.call(lib.cdm_zero_range, fd, 0, 512, 65536, 131072, stats)
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert data[65536:65536 + 131072] == bytes(131072)
    assert ZeroMethod.from_mask(stats.zero_methods) == (ZeroMethod.PUNCH_HOLE,)
    assert (65536, 65536 + 131072) not in data_map(p)
    assert all(not (a < 65536 + 131072 and b > 65536) for a, b in data_map(p))


def test_zero_range_hard_error_is_not_taken_for_unsupported(tmp_path: Path) -> None:
    # On a read-only fd every method fails with EBADF: a hard error, reported as such, not a
    # reason to try the next method.
    p = tmp_path / "f"
    p.write_bytes(b"a" * 8192)
    ctx = Context()
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            ctx.call(lib.cdm_zero_range, fd, 0, 512, 0, 8192, ffi.NULL)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert p.read_bytes() == b"a" * 8192


_CURL_PROBE = """
import socket, sys
import cdimover
from cdimover.errors import CdimoverError
from cdimover.io.http import HttpSource
from cdimover.ops.remote import import_url

def curl_mapped():
    with open("/proc/self/maps") as f:
        return any("libcurl" in line for line in f)

src, out, out2 = sys.argv[1:4]
cdimover.copy(src, out)
cdimover.convert(src, out2, source_format="raw")
print("after-local", curl_mapped())
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()                   # nothing listens there: the open is refused
try:
    import_url(HttpSource(f"http://127.0.0.1:{port}/disk.img", retries=0), out2)
except (CdimoverError, OSError) as e:
    print("open-failed", type(e).__name__)
print("after-http", curl_mapped())
"""


def test_libcurl_is_loaded_by_the_first_http_source_only(tmp_path: Path) -> None:
    """Local copies and conversions never map libcurl (nor the libraries it pulls in: page
    cache charged to the job's memory cgroup and start-up time); the first HTTP source loads
    it, and a refused connection is then an ordinary error."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(1 << 20))
    r = subprocess.run([sys.executable, "-c", _CURL_PROBE, str(src), str(tmp_path / "a.img"),
                        str(tmp_path / "b.img")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert "after-local False" in lines, r.stdout
    assert "after-http True" in lines, r.stdout
    assert any(line.startswith("open-failed ") for line in lines), r.stdout
    assert (tmp_path / "a.img").read_bytes() == src.read_bytes()
