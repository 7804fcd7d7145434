"""Preallocation: copies, blank disks and preallocate() on ext4, xfs and loop devices.
Allocation is asserted (st_blocks, SEEK_DATA, the loop backing file), not assumed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cdimover
from cdimover import TargetTooSmallError
from cdimover.ops.prealloc import create_blank, preallocate
from cdimover.types import AllocMethod
from conftest import need_loop
from layouts import Layout, Segment, data_map, sha256_prefix, write_layout
from cdimover.io import loopdev

LAYOUT = Layout((Segment("data", 1 << 20), Segment("hole", 6 << 20), Segment("zero", 1 << 20),
                 Segment("data", 12288), Segment("hole", 3 << 20)), 21)


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


def fully_written(path: Path | str, size: int) -> bool:
    """SEEK_DATA finds no hole in [0, size): every block holds written data."""
    return data_map(path, 0, size) == [(0, size)]


@pytest.fixture(params=["tmp", "ext4", "xfs"])
def fsdir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "tmp":
        return tmp_path
    need_loop()
    mounted_fs = request.getfixturevalue("mounted_fs")
    return mounted_fs(request.param, 320 << 20)


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_copy_with_preallocation(tmp_path: Path, fsdir: Path, mode: str) -> None:
    src, dst = tmp_path / "src.img", fsdir / "disk.img"
    write_layout(src, LAYOUT)
    r = cdimover.copy(src, dst, preallocation=mode)
    assert r.preallocation == mode and r.preallocation_applied
    assert sha256_prefix(dst, LAYOUT.size) == sha256_prefix(src, LAYOUT.size)
    assert allocated(dst) >= LAYOUT.size
    assert not r.reflinked
    if mode == "full":
        assert fully_written(dst, LAYOUT.size)
        assert set(r.alloc_methods) & {AllocMethod.WRITE_ZEROES, AllocMethod.WRITE}
    else:
        assert AllocMethod.FALLOCATE in r.alloc_methods
    # Data was written once, not zeros-then-data: the data bytes, zeros not counted twice.
    assert r.bytes_written == (1 << 20) + 12288


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_target_size_grows_and_preallocates_tail(tmp_path: Path, mode: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "disk.img"
    write_layout(src, LAYOUT)
    grown = LAYOUT.size + (5 << 20)
    r = cdimover.copy(src, dst, preallocation=mode, target_size=grown)
    assert dst.stat().st_size == grown == r.target_size
    assert sha256_prefix(dst, LAYOUT.size) == sha256_prefix(src, LAYOUT.size)
    assert dst.read_bytes()[LAYOUT.size:] == bytes(5 << 20)
    if mode == "off":
        assert allocated(dst) <= (1 << 20) + 12288 + 4096
    else:
        assert allocated(dst) >= grown
    if mode == "full":
        assert fully_written(dst, grown)


def test_target_size_never_shrinks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "disk.img"
    write_layout(src, LAYOUT)
    r = cdimover.copy(src, dst, target_size=4096)
    assert dst.stat().st_size == LAYOUT.size == r.target_size


def test_preallocation_enospc_fails_fast(tmp_path: Path, mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 32 << 20)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:      # 64 MiB virtual, only 4 KiB of data: fits sparse
        f.truncate(64 << 20)
        f.write(b"d" * 4096)
    with pytest.raises(TargetTooSmallError) as ei:
        cdimover.copy(src, mnt / "disk.img", preallocation="falloc")
    assert "needs 64.0 MiB" in str(ei.value)
    assert ei.value.required == 64 << 20 and ei.value.available is not None
    assert ei.value.available < 64 << 20
    # Sparse, the same image fits.
    r = cdimover.copy(src, mnt / "disk.img")
    assert r.bytes_written == 4096


def test_create_blank_larger_than_the_filesystem(tmp_path: Path,
                                                 mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 32 << 20)
    with pytest.raises(TargetTooSmallError) as ei:
        create_blank(mnt / "blank.img", 1 << 30, preallocation="full")
    assert "needs 1.0 GiB" in str(ei.value)
    assert os.stat(mnt / "blank.img").st_blocks == 0, "nothing written before the check"


@pytest.mark.parametrize("mode", ["falloc", "full"])
@pytest.mark.parametrize("sector", [512, 4096])
def test_copy_to_loop_device_provisions_everything(tmp_path: Path, mode: str,
                                                    sector: int) -> None:
    need_loop()
    src, backing = tmp_path / "src.img", tmp_path / "backing.img"
    write_layout(src, LAYOUT)
    with open(backing, "wb") as f:
        f.truncate(LAYOUT.size + (1 << 20))
    with loopdev.attached(backing, sector_size=sector) as dev:
        r = cdimover.copy(src, dev, preallocation=mode, target_is_zero=True)
    assert sha256_prefix(backing, LAYOUT.size) == sha256_prefix(src, LAYOUT.size)
    # Every block of the copied range is allocated in the backing file; past it, nothing.
    assert allocated(backing) >= LAYOUT.size
    assert allocated(backing) < LAYOUT.size + (1 << 20)
    assert set(r.zero_methods) <= {cdimover.ZeroMethod.ZERO_RANGE,
                                   cdimover.ZeroMethod.BLKZEROOUT, cdimover.ZeroMethod.WRITE}
    assert r.bytes_zeroed == LAYOUT.size - (1 << 20) - 12288


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_create_blank_file(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "blank.img"
    p.write_bytes(os.urandom(1 << 20))          # replaced
    r = create_blank(p, 16 << 20, preallocation=mode)
    assert p.stat().st_size == 16 << 20
    with open(p, "rb") as f:
        assert f.read() == bytes(16 << 20)
    if mode == "off":
        assert allocated(p) == 0 and not r.preallocation_applied
    else:
        assert allocated(p) >= 16 << 20 and r.preallocation_applied
    if mode == "full":
        assert fully_written(p, 16 << 20)


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_create_blank_block_device(tmp_path: Path, mode: str) -> None:
    need_loop()
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(8 << 20))
    with loopdev.attached(backing, sector_size=4096) as dev:
        r = create_blank(dev, 6 << 20, preallocation=mode)
    data = backing.read_bytes()
    assert data[:6 << 20] == bytes(6 << 20)
    assert data[6 << 20:] != bytes(2 << 20), "bytes past the blank size were touched"
    if mode == "off":
        assert allocated(backing) <= (2 << 20) + 4096     # discarded: holes
    else:
        assert allocated(backing) >= 8 << 20
        assert r.alloc_methods and r.preallocation_applied


def test_preallocate_keeps_data(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    write_layout(p, LAYOUT)
    before = sha256_prefix(p, LAYOUT.size)
    r = preallocate(p, mode="full", size=LAYOUT.size + 65536)
    assert sha256_prefix(p, LAYOUT.size) == before
    assert p.stat().st_size == LAYOUT.size + 65536
    assert fully_written(p, LAYOUT.size + 65536)
    assert r.bytes_allocated >= LAYOUT.size - (1 << 20) - 12288 - (1 << 20)
    r2 = preallocate(p, mode="falloc")
    assert r2.size == LAYOUT.size + 65536


def test_bad_mode(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="preallocation"):
        cdimover.copy(src, tmp_path / "d", preallocation="metadata")
    with pytest.raises(ValueError, match="preallocation"):
        create_blank(tmp_path / "b", 4096, preallocation="sparse")
