"""RAW copies between regular files: bytes (sha256), allocation (SEEK_DATA), statistics,
target semantics and error paths."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given

import cdimover
from cdimover import CopyCancelled, ScanMethod
from layouts import (
    Layout,
    Segment,
    allocated_blocks,
    layouts,
    nonzero_blocks,
    sha256_prefix,
    write_layout,
)


def assert_copy_exact_and_sparse(src: Path | str, dst: Path | str, size: int) -> None:
    assert os.stat(dst).st_size == size
    assert sha256_prefix(dst, size) == sha256_prefix(src, size)
    # Every allocated 4 KiB block of the target holds a non-zero byte of the source.
    extra = allocated_blocks(dst, 0, size) - nonzero_blocks(src, size)
    assert not extra, f"zero blocks allocated on the target: {sorted(extra)[:10]}"


@given(layouts(align=1))
def test_file_to_file_any_layout(tmp_path: Path, layout: Layout) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, layout)
    if dst.exists():
        dst.unlink()
    r = cdimover.copy(src, dst, reflink="never")
    assert_copy_exact_and_sparse(src, dst, layout.size)
    assert r.virtual_size == layout.size
    assert r.scan_method is ScanMethod.SEEK_HOLE
    data = sum(s.length for s in layout.segments if s.kind == "data")
    assert data <= r.bytes_written
    assert r.bytes_skipped + r.bytes_written == layout.size
    assert r.target_allocated == os.stat(dst).st_blocks * 512


@given(layouts(align=512, max_len=256 << 10))
def test_full_read_scan_detects_every_zero(tmp_path: Path, layout: Layout) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, layout)
    r = cdimover.copy(src, dst, reflink="never", scan="full", request_size=65536,
                      sparse_size=4096, threads=3)
    assert_copy_exact_and_sparse(src, dst, layout.size)
    assert r.scan_method is ScanMethod.FULL_READ
    assert r.bytes_read == layout.size


def test_zeros_written_as_data_become_holes(tmp_path: Path) -> None:
    lay = Layout((Segment("data", 1 << 20), Segment("zero", 8 << 20), Segment("data", 4096)), 7)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, lay)
    r = cdimover.copy(src, dst, reflink="never")
    assert r.bytes_zero_data == 8 << 20
    assert r.bytes_written == (1 << 20) + 4096
    assert os.stat(dst).st_blocks * 512 == (1 << 20) + 4096
    assert_copy_exact_and_sparse(src, dst, lay.size)


def test_busy_times_count_the_reads_writes_and_sync_done(tmp_path: Path) -> None:
    """read/write/sync_seconds are the time inside those calls: a source of holes onto a
    target known to read as zeros does none of them; 32 MiB of data does all three, each
    within threads x the elapsed time."""
    holes, data = tmp_path / "holes.img", tmp_path / "data.img"
    with open(holes, "wb") as f:
        f.truncate(64 << 20)
    with open(data, "wb") as f:
        f.write(os.urandom(32 << 20))
    out = tmp_path / "out.img"
    with open(out, "wb") as f:
        f.truncate(64 << 20)
    r = cdimover.copy(holes, out, target_is_zero=True, threads=2)
    assert (r.bytes_read, r.bytes_written) == (0, 0)
    assert r.read_seconds == 0 and r.write_seconds == 0
    assert r.sync_seconds > 0

    r = cdimover.copy(data, tmp_path / "out2.img", threads=2, reflink="never")
    assert r.bytes_written == 32 << 20
    for busy in (r.read_seconds, r.write_seconds):
        assert 0 < busy <= 2 * r.elapsed
    assert 0 < r.sync_seconds <= r.elapsed
    d = r.as_dict()
    assert (d["read_seconds"], d["write_seconds"]) == (round(r.read_seconds, 6),
                                                        round(r.write_seconds, 6))


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("hole", 1 << 20), Segment("data", 8192)), 1))
    dst.write_bytes(os.urandom(5 << 20))          # larger, full of garbage
    cdimover.copy(src, dst, reflink="never")
    assert dst.stat().st_size == src.stat().st_size
    assert_copy_exact_and_sparse(src, dst, src.stat().st_size)


def test_new_file_honours_umask_and_mode(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(b"z" * 4096)
    old = os.umask(0o022)
    try:
        cdimover.copy(src, dst)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644


def test_empty_source(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(b"")
    r = cdimover.copy(src, dst, reflink="never")
    assert r.virtual_size == 0 and dst.stat().st_size == 0


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as ei:
        cdimover.copy(tmp_path / "nope", tmp_path / "dst")
    assert ei.value.filename == str(tmp_path / "nope")
    assert not (tmp_path / "dst").exists()


def test_source_is_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError) as ei:
        cdimover.copy(tmp_path, tmp_path / "dst")
    assert ei.value.errno == errno.EINVAL
    assert ei.value.filename == str(tmp_path)


def test_target_is_directory(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"a" * 512)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        cdimover.copy(src, tmp_path / "d")


def test_same_file_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"keep me" * 1000)
    with pytest.raises(OSError, match="same") as ei:
        cdimover.copy(src, src)
    assert ei.value.errno == errno.EINVAL
    assert src.read_bytes() == b"keep me" * 1000


def test_unwritable_target(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"a" * 4096)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        # root ignores mode bits: use a path below a regular file instead
        target = src / "child"
        with pytest.raises(NotADirectoryError):
            cdimover.copy(src, target)
    else:
        with pytest.raises(PermissionError) as ei:
            cdimover.copy(src, ro / "dst")
        assert ei.value.filename == str(ro / "dst")


def test_bad_options(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"a" * 4096)
    with pytest.raises(ValueError, match="preallocation"):
        cdimover.copy(src, tmp_path / "d", preallocation="full-ish")
    with pytest.raises(ValueError, match="reflink"):
        cdimover.copy(src, tmp_path / "d", reflink="maybe")  # type: ignore[arg-type]
    with pytest.raises(OSError, match="sparse size"):
        cdimover.copy(src, tmp_path / "d", sparse_size=3000)
    with pytest.raises(OSError, match="request size"):
        cdimover.copy(src, tmp_path / "d", request_size=1000)


def test_progress_is_monotonic_and_complete(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout(tuple(Segment(k, 1 << 20) for k in ["data", "hole"] * 8), 3))
    seen: list[tuple[int, int]] = []
    cdimover.copy(src, dst, reflink="never", request_size=256 << 10,
                  progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (16 << 20, 16 << 20)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones)
    # at most one report per request (64 data requests + 8 holes) plus the final one
    assert len(seen) <= 64 + 8 + 1


def test_cancel_by_return_value(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("data", 8 << 20),), 4))
    with pytest.raises(CopyCancelled):
        cdimover.copy(src, dst, reflink="never", request_size=65536, threads=1,
                      progress=lambda d, t: d > 0)
    # The target exists, is not reported complete, and a re-run replaces it.
    r = cdimover.copy(src, dst, reflink="never")
    assert r.bytes_written == 8 << 20
    assert sha256_prefix(dst, 8 << 20) == sha256_prefix(src, 8 << 20)


def test_cancel_by_exception_keeps_cause(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("data", 4 << 20),), 5))

    def boom(done: int, total: int) -> None:
        raise RuntimeError("stop here")

    with pytest.raises(CopyCancelled) as ei:
        cdimover.copy(src, dst, reflink="never", request_size=65536, progress=boom)
    assert isinstance(ei.value.__cause__, RuntimeError)


def test_keyboard_interrupt_propagates(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("data", 4 << 20),), 5))

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cdimover.copy(src, dst, reflink="never", request_size=65536, progress=interrupt)


def test_cancel_from_another_thread(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("data", 32 << 20),), 6))
    ctx = cdimover.Context()
    started = threading.Event()

    def progress(done: int, total: int) -> None:
        started.set()
        threading.Event().wait(0.01)   # slow the copy so the cancel lands mid-way

    t = threading.Thread(target=lambda: (started.wait(5), ctx.cancel()))
    t.start()
    with pytest.raises(CopyCancelled):
        cdimover.copy(src, dst, reflink="never", request_size=65536, threads=1,
                      progress=progress, context=ctx)
    t.join()


def test_other_threads_run_during_a_copy(tmp_path: Path) -> None:
    # cffi releases the GIL: a Python thread keeps counting while the core copies.
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, Layout((Segment("data", 48 << 20),), 8))
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        cdimover.copy(src, dst, reflink="never", threads=1, request_size=65536)
    finally:
        stop.set()
        t.join()
    assert ticks > 1000


def test_reflink_never_on_ext4_copies_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(65536))
    r = cdimover.copy(src, dst, reflink="auto")
    assert dst.read_bytes() == src.read_bytes()
    # On a filesystem without reflinks "auto" falls back to a copy; with them it shares.
    assert r.reflinked == (r.scan_method is ScanMethod.REFLINK)
