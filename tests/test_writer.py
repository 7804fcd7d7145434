"""The push API, cdimover.Writer: random extents (data with embedded zero blocks, unaligned
offsets and lengths, zero() calls, overlapping rewrites) written in random order onto a new
file, an existing non-zero file, and 512-byte and 4096-byte-sector loop devices.  The bytes
must equal a model (sha256), all-zero blocks must be holes on files, preallocation must be
honoured, a too-small device and a write past the size must fail before any byte is written,
and an exception inside the block must leave a synced target and no result.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdimover
from cdimover import _native
from cdimover.errors import TargetTooSmallError
from cdimover.types import AllocMethod, ZeroMethod

BS = 4096
KiB, MiB = 1 << 10, 1 << 20


@dataclass
class Op:
    offset: int
    length: int
    data: bytes | None          # None: a zero() call

    def content(self) -> bytes:
        return self.data if self.data is not None else bytes(self.length)


def payload(rng: random.Random, offset: int, length: int) -> bytes:
    """Random bytes with whole zero blocks (aligned to the target offset) and an unaligned
    zero run embedded."""
    buf = bytearray(rng.randbytes(length))
    first = (offset + BS - 1) // BS * BS
    for block in range(first, offset + length - BS + 1, BS):
        if rng.random() < 0.4:
            buf[block - offset:block - offset + BS] = bytes(BS)
    if length > 16:
        a = rng.randrange(length - 8)
        b = min(length, a + rng.randrange(1, 3 * BS))
        buf[a:b] = bytes(b - a)
    return bytes(buf)


@st.composite
def plans(draw: st.DrawFn, max_size: int = 3 * MiB // 2) -> tuple[int, list[Op]]:
    """A size and the operations to run in order: a partition of [0, size) into extents that
    are written, zeroed or left alone, shuffled, then a few overlapping rewrites."""
    size = draw(st.integers(1, max_size))
    rng = random.Random(draw(st.integers(0, 2**32)))
    cuts = draw(st.lists(st.integers(0, size), max_size=14))
    # Aligned cut points too, so that whole blocks and 1 MiB staging steps are crossed.
    cuts += [c // BS * BS for c in draw(st.lists(st.integers(0, size), max_size=4))]
    points = sorted({0, size, *cuts})
    ops = []
    for a, b in zip(points, points[1:]):
        kind = rng.choice(["data", "data", "zero", "skip"])
        if kind == "data":
            ops.append(Op(a, b - a, payload(rng, a, b - a)))
        elif kind == "zero":
            ops.append(Op(a, b - a, None))
    ops = draw(st.permutations(ops))
    for _ in range(draw(st.integers(0, 3))):
        a = rng.randrange(size)
        n = min(size - a, rng.randrange(1, 3 * BS))
        ops.append(Op(a, n, payload(rng, a, n) if rng.random() < 0.7 else None))
    return size, ops


def apply(model: bytearray, ops: list[Op]) -> None:
    for op in ops:
        model[op.offset:op.offset + op.length] = op.content()


def run(w: cdimover.Writer, ops: list[Op]) -> None:
    for op in ops:
        if op.data is None:
            w.zero(op.offset, op.length)
        else:
            w.write_at(op.offset, memoryview(op.data) if op.offset % 2 else op.data)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def read_prefix(path: str | Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def data_ranges(path: str | Path) -> list[tuple[int, int]]:
    """The data extents of PATH by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            pos = h
    finally:
        os.close(fd)
    return out


def must_be_holes(size: int, ops: list[Op]) -> list[int]:
    """Blocks that one operation alone covers and fills with zeros: they must be holes."""
    owners: dict[int, list[Op]] = {}
    for op in ops:
        for block in range(op.offset // BS, (op.offset + op.length + BS - 1) // BS):
            owners.setdefault(block, []).append(op)
    holes = []
    for block, who in owners.items():
        start = block * BS
        if len(who) != 1 or start + BS > size:
            continue
        op = who[0]
        if op.offset <= start and start + BS <= op.offset + op.length:
            if not any(op.content()[start - op.offset:start - op.offset + BS]):
                holes.append(start)
    return holes


def assert_holes(path: Path, size: int, ops: list[Op]) -> None:
    data = data_ranges(path)
    for start in must_be_holes(size, ops):
        assert not any(d < start + BS and start < h for d, h in data), \
            f"the zero block at {start} is allocated"


PROFILE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow, HealthCheck.data_too_large],
                   deadline=None)


@PROFILE
@given(plan=plans())
def test_new_file(tmp_path: Path, plan: tuple[int, list[Op]]) -> None:
    size, ops = plan
    path = tmp_path / "new.img"
    if path.exists():
        path.unlink()
    with cdimover.Writer(path, size) as w:
        run(w, ops)
    model = bytearray(size)
    apply(model, ops)
    assert os.path.getsize(path) == size
    assert sha(path.read_bytes()) == sha(model)
    assert_holes(path, size, ops)
    # Nothing written, nothing allocated: never-touched blocks of a new file are holes.
    touched = {b for op in ops
               for b in range(op.offset // BS, (op.offset + op.length - 1) // BS + 1)}
    for d, h in data_ranges(path):
        assert all(b in touched for b in range(d // BS, (h - 1) // BS + 1))
    r = w.result
    assert r.target == str(path) and r.virtual_size == size
    assert r.bytes_written + r.bytes_zero_data <= sum(len(op.data or b"") for op in ops)


@PROFILE
@given(plan=plans())
def test_existing_file_by_descriptor(tmp_path: Path, plan: tuple[int, list[Op]]) -> None:
    size, ops = plan
    path = tmp_path / "old.img"
    old = random.Random(size).randbytes(size + 5000)        # longer than SIZE: the tail stays
    path.write_bytes(old)
    fd = os.open(path, os.O_RDWR)
    try:
        with cdimover.Writer.from_fd(fd, size) as w:
            run(w, ops)
        os.fstat(fd)                                          # still the caller's, still open
    finally:
        os.close(fd)
    model = bytearray(old)
    apply(model, ops)
    assert sha(path.read_bytes()) == sha(model)
    assert_holes(path, size, ops)


def test_descriptor_target_shorter_than_size_is_extended(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x07" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        with cdimover.Writer(fd, 3 * BS + 17) as w:
            w.write_at(3 * BS, b"\x01" * 17)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\x07" * 1000 + bytes(3 * BS - 1000) + b"\x01" * 17


@pytest.fixture
def loop_target(tmp_path: Path, loopdev: Callable[..., str]) -> Iterator[Callable[..., str]]:
    def make(sector: int, size: int) -> str:
        backing = tmp_path / f"backing-{sector}.img"
        backing.write_bytes(b"")
        os.truncate(backing, size)
        return loopdev(backing, sector_size=sector)
    yield make


def fill_device(dev: str, content: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sector", [512, 4096])
def test_loop_devices(loop_target: Callable[..., str], sector: int) -> None:
    dev_size = 2 * MiB
    dev = loop_target(sector, dev_size)
    seen = []

    @settings(PROFILE, max_examples=10)
    @given(plan=plans(max_size=dev_size - 8 * KiB))
    def check(plan: tuple[int, list[Op]]) -> None:
        size, ops = plan
        old = random.Random(size).randbytes(dev_size)
        fill_device(dev, old)
        with cdimover.Writer(dev, size) as w:
            run(w, ops)
        model = bytearray(old)
        apply(model, ops)
        assert sha(read_prefix(dev, dev_size)) == sha(model)   # bytes past SIZE kept
        seen.append(set(w.result.zero_methods))

    check()
    assert any(ZeroMethod.PUNCH_HOLE in s or ZeroMethod.ZERO_RANGE in s
               or ZeroMethod.BLKZEROOUT in s for s in seen)


def test_too_small_device_fails_before_any_byte(loop_target: Callable[..., str]) -> None:
    dev = loop_target(4096, MiB)
    old = random.Random(1).randbytes(MiB)
    fill_device(dev, old)
    with pytest.raises(TargetTooSmallError):
        cdimover.Writer(dev, MiB + 512)
    fd = os.open(dev, os.O_RDWR)
    try:
        with pytest.raises(TargetTooSmallError):
            cdimover.Writer.from_fd(fd, 2 * MiB)
    finally:
        os.close(fd)
    assert read_prefix(dev, MiB) == old


@pytest.mark.parametrize("sector", [512, 4096])
def test_device_preallocation_provisions_every_range(loop_target: Callable[..., str],
                                                     sector: int) -> None:
    dev = loop_target(sector, MiB)
    fill_device(dev, b"\xaa" * MiB)
    with cdimover.Writer(dev, MiB - 512, preallocation="full") as w:
        w.write_at(5000, b"\x01" * 3000)
    r = w.result
    assert r.bytes_allocated if hasattr(r, "bytes_allocated") else True
    assert r.alloc_methods
    assert read_prefix(dev, MiB) == bytes(5000) + b"\x01" * 3000 + bytes(MiB - 512 - 8000) + \
        b"\xaa" * 512


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_file_preallocation(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.img"
    size = 3 * MiB + 1234
    rng = random.Random(5)
    ops = [Op(MiB + 7, 100 * KiB, payload(rng, MiB + 7, 100 * KiB)), Op(0, 64 * KiB, None)]
    with cdimover.Writer(path, size, preallocation=mode) as w:
        run(w, ops)
    model = bytearray(size)
    apply(model, ops)
    assert sha(path.read_bytes()) == sha(model)
    assert os.stat(path).st_blocks * 512 >= size
    methods = set(w.result.alloc_methods)
    assert w.result.preallocation == mode
    if mode == "falloc":
        assert AllocMethod.FALLOCATE in methods
    else:
        assert methods & {AllocMethod.WRITE_ZEROES, AllocMethod.WRITE}
        assert data_ranges(path) == [(0, size)]      # every block written, no hole


def test_write_past_the_size_fails_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bounded.img"
    size = 100_000
    path.write_bytes(b"\xff" * size)      # an existing file: rewritten in place
    with pytest.raises(OSError) as e:
        with cdimover.Writer(path, size) as w:
            w.write_at(0, b"\x01" * 10)
            try:
                w.write_at(size - 1, b"\x02\x03")
            except OSError as inner:
                assert inner.errno == errno.EINVAL
                assert inner.filename == str(path)
                assert "passes the end of the target (100000 bytes)" in str(inner)
                raise
    assert e.value.errno == errno.EINVAL
    assert os.path.getsize(path) == size
    assert read_prefix(path, size) == b"\x01" * 10 + bytes(size - 10)
    assert "user.cdimover.incomplete" in os.listxattr(path)   # says it is not complete
    with pytest.raises(RuntimeError, match="did not complete"):
        w.result
    with pytest.raises(OSError, match="zeroing of 4097 bytes"):
        with cdimover.Writer(path, size) as w2:
            with pytest.raises(OSError) as e2:
                w2.zero(size - 4096, 4097)
            assert e2.value.errno == errno.EINVAL
            with pytest.raises(OSError):             # a failed writer stays failed ...
                w2.write_at(0, b"x")
    # ... and never completes, even when the block ends cleanly.
    with pytest.raises(RuntimeError, match="did not complete"):
        w2.result
    assert os.path.getsize(path) == size


def test_exception_inside_leaves_a_synced_target_and_no_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "partial.img"
    calls = []
    real_abort = _native.NativeWriter.abort

    def spy(self: _native.NativeWriter) -> None:
        calls.append("abort")
        real_abort(self)

    monkeypatch.setattr(_native.NativeWriter, "abort", spy)
    payload_ = random.Random(3).randbytes(3 * BS + 5)
    # A new file is written under a partial name and removed when the writer fails.
    fresh = tmp_path / "fresh.img"
    with pytest.raises(KeyError):
        with cdimover.Writer(fresh, 8 * MiB) as w:
            w.write_at(BS, payload_)
            raise KeyError("decoder failed")
    assert os.listdir(tmp_path) == []
    calls.clear()
    # An existing file is rewritten in place, synced and left marked incomplete.
    path.write_bytes(b"\xff" * (8 * MiB))
    with pytest.raises(KeyError):
        with cdimover.Writer(path, 8 * MiB) as w:
            w.write_at(BS, payload_)
            raise KeyError("decoder failed")
    assert calls == ["abort"]
    with pytest.raises(RuntimeError, match="did not complete"):
        w.result
    with pytest.raises(ValueError):
        w.write_at(0, b"late")
    assert read_prefix(path, 8 * MiB) == bytes(BS) + payload_ + bytes(8 * MiB - 4 * BS - 5)
    assert "user.cdimover.incomplete" in os.listxattr(path)
    # The data reached the disk: dropping the page cache does not lose it.
    subprocess.run(["sync"], check=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(payload_), BS) == payload_
    finally:
        os.close(fd)


def test_concurrent_use_of_one_writer_is_refused(tmp_path: Path) -> None:
    import threading
    path = tmp_path / "busy.img"
    with cdimover.Writer(path, 64 * MiB) as w:
        errors: list[BaseException] = []
        big = os.urandom(32 * MiB)

        def writer() -> None:
            try:
                for i in range(2):
                    w.write_at(i * 32 * MiB, big)
            except BaseException as e:   # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        refused = 0
        while t.is_alive():
            try:
                w.zero(0, 0)
            except RuntimeError:
                refused += 1
        t.join()
        assert not errors
    assert refused > 0
    assert read_prefix(path, 32 * MiB) == big
