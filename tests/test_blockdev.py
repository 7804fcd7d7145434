"""RAW copies in all four directions on real loop devices (512 and 4096-byte logical
sectors), targets pre-filled with random bytes: bytes by sha256, allocation through the loop
backing files, scan methods, target-size rules and ENOSPC.  Needs root."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cdimover
from cdimover import ScanMethod, TargetTooSmallError, ZeroMethod
from cdimover.io import loopdev
from conftest import need_loop
from layouts import (
    Layout,
    Segment,
    allocated_blocks,
    layouts,
    nonzero_blocks,
    sha256_prefix,
    write_layout,
)

pytestmark = pytest.mark.blockdev


@pytest.fixture(autouse=True)
def _need_loop() -> None:
    need_loop()


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


@contextmanager
def device_over(path: Path, sector: int) -> Iterator[str]:
    with loopdev.attached(path, sector_size=sector) as dev:
        yield dev


def check_sparse_target(src: Path, backing: Path, size: int) -> None:
    extra = allocated_blocks(backing, 0, size) - nonzero_blocks(src, size)
    assert not extra, f"zero blocks allocated on the target: {sorted(extra)[:10]}"


SECTORS = st.sampled_from([512, 4096])


@given(layouts(align=4096, max_len=512 << 10), SECTORS, st.booleans())
def test_block_to_file(tmp_path: Path, layout: Layout, sector: int, full: bool) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, layout)
    with device_over(src, sector) as dev:
        r = cdimover.copy(dev, dst, scan="full" if full else "auto")
    assert r.scan_method is (ScanMethod.FULL_READ if full else ScanMethod.LOOP_BACKING)
    assert sha256_prefix(dst, layout.size) == sha256_prefix(src, layout.size)
    assert dst.stat().st_size == layout.size
    check_sparse_target(src, dst, layout.size)
    if not full:
        # Only the backing file's data extents were read, not the holes.
        holes = sum(s.length for s in layout.segments if s.kind == "hole")
        assert r.bytes_read <= layout.size - holes + 2 * 4096 * len(layout.segments)


@given(layouts(align=1, max_len=512 << 10), SECTORS, st.integers(0, 3))
def test_file_to_block_prefilled(tmp_path: Path, layout: Layout, sector: int,
                                 spare_blocks: int) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    write_layout(src, layout)
    dev_size = -(-layout.size // sector) * sector + spare_blocks * 4096
    random_file(tgt, dev_size)
    tail = tgt.read_bytes()[layout.size:]
    with device_over(tgt, sector) as dev:
        r = cdimover.copy(src, dev)
    data = tgt.read_bytes()
    assert sha256_prefix(tgt, layout.size) == sha256_prefix(src, layout.size)
    assert data[layout.size:] == tail, "bytes past the source size were touched"
    # Zero blocks of the source are zeroed on the device, and deallocated where aligned.
    aligned = layout.size - layout.size % sector
    check_sparse_target(src, tgt, aligned - aligned % 4096)
    n_blocks = -(-layout.size // 4096)
    if len(nonzero_blocks(src, layout.size)) < n_blocks:
        assert r.bytes_zeroed > 0
        assert ZeroMethod.PUNCH_HOLE in r.zero_methods or ZeroMethod.WRITE in r.zero_methods


@given(layouts(align=4096, max_len=512 << 10), SECTORS, SECTORS, st.booleans())
def test_block_to_block_prefilled(tmp_path: Path, layout: Layout, s_sector: int,
                                  t_sector: int, target_zero: bool) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    write_layout(src, layout)
    if target_zero:
        with open(tgt, "wb") as f:
            f.truncate(layout.size)
    else:
        random_file(tgt, layout.size)
    with ExitStack() as stack:
        sdev = stack.enter_context(device_over(src, s_sector))
        tdev = stack.enter_context(device_over(tgt, t_sector))
        r = cdimover.copy(sdev, tdev, target_is_zero=target_zero)
    assert r.scan_method is ScanMethod.LOOP_BACKING
    assert sha256_prefix(tgt, layout.size) == sha256_prefix(src, layout.size)
    check_sparse_target(src, tgt, layout.size)
    if target_zero:
        assert r.bytes_zeroed == 0


@given(layouts(align=4096, max_len=512 << 10), SECTORS)
def test_block_to_file_mapping_with_offset(tmp_path: Path, layout: Layout, sector: int) -> None:
    # A loop device that starts 1 MiB into its backing file: the map must be shifted.
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_layout(src, layout)
    whole = tmp_path / "whole.img"
    with open(whole, "wb") as f:
        f.truncate((1 << 20) + layout.size)
        f.seek(0)
        f.write(os.urandom(1 << 20))   # data before the device's window
    with open(whole, "r+b") as f:
        f.seek(1 << 20)
        f.write(src.read_bytes())
    subprocess.run(["fallocate", "--dig-holes", str(whole)], check=True)
    with loopdev.attached(whole, sector_size=sector, offset=1 << 20,
                          sizelimit=layout.size) as dev:
        r = cdimover.copy(dev, dst)
    assert r.scan_method is ScanMethod.LOOP_BACKING
    assert sha256_prefix(dst, layout.size) == sha256_prefix(src, layout.size)
    check_sparse_target(src, dst, layout.size)


def test_loop_map_sees_unflushed_writes(tmp_path: Path) -> None:
    # Data written through the device and still in its page cache must be copied: the
    # device is flushed before its backing file is mapped.
    backing, dst = tmp_path / "b.img", tmp_path / "dst.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    payload = os.urandom(65536)
    with loopdev.attached(backing) as dev:
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 3 << 20)
        finally:
            os.close(fd)
        r = cdimover.copy(dev, dst)
    assert r.scan_method is ScanMethod.LOOP_BACKING
    assert dst.read_bytes()[3 << 20:(3 << 20) + 65536] == payload


def test_target_device_too_small(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(2 << 20))
    random_file(tgt, 1 << 20)
    before = tgt.read_bytes()
    with device_over(tgt, 512) as dev:
        with pytest.raises(TargetTooSmallError) as ei:
            cdimover.copy(src, dev)
    assert "1.0 MiB" in str(ei.value) and "2.0 MiB" in str(ei.value)
    assert ei.value.required == 2 << 20 and ei.value.available == 1 << 20
    assert tgt.read_bytes() == before, "nothing may be written before the size check"


def test_a_copy_that_cannot_fit_fails_before_writing(tmp_path: Path, mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 16 << 20)
    src = tmp_path / "src.img"
    write_layout(src, Layout((Segment("data", 32 << 20),), 11))
    with pytest.raises(cdimover.TargetTooSmallError) as ei:
        cdimover.copy(src, mnt / "disk.img")
    assert ei.value.required == 32 << 20
    assert str(mnt / "disk.img") in str(ei.value)
    assert sorted(os.listdir(mnt)) == ["lost+found"]


def test_enospc_on_a_tiny_filesystem(tmp_path: Path, mounted_fs, loopdev) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 16 << 20)
    src = tmp_path / "src.img"
    write_layout(src, Layout((Segment("data", 32 << 20),), 11))
    dev = loopdev(src)
    # A device read in full has no allocation to check up front: the copy meets ENOSPC.
    with pytest.raises(OSError) as ei:
        cdimover.copy(dev, mnt / "disk.img", scan="full")
    assert ei.value.errno == errno.ENOSPC
    assert ei.value.filename == str(mnt / "disk.img")
    assert "No space left on device" in str(ei.value)
    # The partial file is gone: nothing that looks like a disk is left.
    assert sorted(os.listdir(mnt)) == ["lost+found"]


def test_file_to_file_on_xfs_reflinks(tmp_path: Path, mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("xfs", 320 << 20)
    src = mnt / "src.img"
    write_layout(src, Layout((Segment("data", 1 << 20), Segment("hole", 4 << 20),
                              Segment("data", 8192)), 12))
    r = cdimover.copy(src, mnt / "dst.img")
    assert r.reflinked and r.scan_method is ScanMethod.REFLINK
    assert r.bytes_read == 0
    assert sha256_prefix(mnt / "dst.img", src.stat().st_size) == sha256_prefix(
        src, src.stat().st_size)
    r2 = cdimover.copy(src, mnt / "dst2.img", reflink="never")
    assert not r2.reflinked and r2.bytes_read > 0


def test_reflink_always_fails_across_filesystems(tmp_path: Path, mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 32 << 20)
    src = tmp_path / "src.img"
    src.write_bytes(b"r" * 8192)
    with pytest.raises(OSError) as ei:
        cdimover.copy(src, mnt / "dst.img", reflink="always")
    assert ei.value.errno == errno.EXDEV


def test_loop_with_deleted_backing_file_falls_back_to_full_read(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    lay = Layout((Segment("data", 65536), Segment("hole", 1 << 20), Segment("zero", 65536)), 31)
    write_layout(src, lay)
    expected = sha256_prefix(src, lay.size)
    with device_over(src, 512) as dev:
        src.unlink()
        r = cdimover.copy(dev, dst)
    assert r.scan_method is ScanMethod.FULL_READ
    assert "deleted" in r.scan_note
    assert r.bytes_read == lay.size
    assert sha256_prefix(dst, lay.size) == expected
    assert dst.stat().st_blocks * 512 == 65536


def test_loop_backing_path_hidden_by_another_file_is_not_trusted(tmp_path: Path) -> None:
    # The path the kernel reports opens another file (here a bind mount over it, as a
    # different mount namespace would): the inode check must refuse it as the map.
    src, dst, decoy = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "decoy.img"
    lay = Layout((Segment("hole", 1 << 20), Segment("data", 65536)), 32)
    write_layout(src, lay)
    expected = sha256_prefix(src, lay.size)
    with open(decoy, "wb") as f:            # all holes: a map from it would lose the data
        f.truncate(lay.size)
    with device_over(src, 512) as dev:
        subprocess.run(["mount", "--bind", str(decoy), str(src)], check=True)
        try:
            r = cdimover.copy(dev, dst)
        finally:
            subprocess.run(["umount", str(src)], check=True)
    assert r.scan_method is ScanMethod.FULL_READ
    assert "not the file behind" in r.scan_note
    assert sha256_prefix(dst, lay.size) == expected


def test_forced_loop_scan_on_a_plain_file_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="loop device"):
        cdimover.copy(src, tmp_path / "dst.img", scan="loop")
