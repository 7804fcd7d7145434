"""Preallocation and blank disks: every block of a target reserved ("falloc") or physically
written ("full"), as a DataVolume's ``preallocation: true`` asks, on files and block devices.

"off" leaves holes; "falloc" reserves space without writing data (fallocate on files;
zero-range, BLKZEROOUT or zeros on devices); "full" writes every block (FALLOC_FL_WRITE_ZEROES
where the kernel and device offload it, else zeros).  A mode that cannot be honoured raises;
it never silently degrades.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from .. import _native
from .._native import Context
from ..io.endpoints import check_room, open_for_job
from ..io.fs import open_direct
from ..errors import TargetTooSmallError
from ..types import PREALLOCATION_MODES, AllocMethod, PreallocResult

__all__ = ["preallocate", "create_blank", "preallocation_mode"]


def preallocation_mode(mode: str | bool) -> str:
    """Normalise MODE: True means "falloc", False "off"; anything else must be a known name."""
    if mode is True:
        return "falloc"
    if mode is False:
        return "off"
    if mode not in PREALLOCATION_MODES:
        raise ValueError(f"preallocation={mode!r}: expected 'off', 'falloc' or 'full'")
    return mode


def _preallocate_fd(ctx: Context, path: str, fd: int, direct_fd: int, probe: _native.Probe,
                    offset: int, length: int, mode: str) -> tuple[int, int]:
    """Preallocate [OFFSET, OFFSET+LENGTH) of an open endpoint: (alloc mask, bytes)."""
    stats = _native.new_stats()
    _native.preallocate(ctx, fd, direct_fd, probe.is_blockdev, probe.logical_sector,
             offset, length, PREALLOCATION_MODES[mode], stats, paths=(path, path))
    return int(stats.alloc_methods), int(stats.bytes_allocated)


def preallocate(path: str | os.PathLike[str], *, mode: str = "falloc",
                size: int | None = None) -> PreallocResult:
    """Preallocate the existing file or block device PATH over [0, SIZE).

    SIZE defaults to the current size; a file is grown to SIZE first (never shrunk); a
    device must hold SIZE bytes.  Existing data is kept: only holes are allocated.
    """
    mode = preallocation_mode(mode)
    p = os.fspath(path)
    start = time.monotonic()
    fd = open_for_job(p)
    direct = -1
    try:
        with Context() as ctx:
            pr = _native.probe(ctx, fd, p)
            want = pr.size if size is None else size
            if want < 0:
                raise ValueError(f"size must not be negative: {want}")
            if pr.is_blockdev:
                if want > pr.size:
                    raise TargetTooSmallError.of(p, want, pr.size, what="the preallocation")
            else:
                if mode != "off":
                    check_room(fd, p, want, what="the preallocation")
                if want > pr.size:
                    os.ftruncate(fd, want)
            mask, allocated = 0, 0
            if mode != "off" and want > 0:
                direct = open_direct(fd, os.O_WRONLY)
                if pr.is_blockdev:
                    mask, allocated = _preallocate_fd(ctx, p, fd, direct, pr, 0, want, mode)
                elif mode == "falloc":
                    # fallocate keeps existing data: one call covers the file.
                    mask, allocated = _preallocate_fd(ctx, p, fd, direct, pr, 0, want, mode)
                else:
                    # Existing data stays: write only the holes (and unwritten extents).
                    for off, length, is_data in _native.scan_extents(ctx, fd, 0, want, path=p):
                        if not is_data:
                            m, a = _preallocate_fd(ctx, p, fd, direct, pr, off, length, mode)
                            mask |= m
                            allocated += a
            os.fsync(fd)
            return PreallocResult(
                path=p, size=want, mode=mode, preallocation_applied=mode != "off",
                alloc_methods=AllocMethod.from_mask(mask), bytes_allocated=allocated,
                target_allocated=None if pr.is_blockdev else os.fstat(fd).st_blocks * 512,
                elapsed=time.monotonic() - start)
    finally:
        if direct >= 0:
            os.close(direct)
        os.close(fd)


def create_blank(path: str | os.PathLike[str], size: int, *, preallocation: str | bool = "off",
                 file_mode: int = 0o644) -> PreallocResult:
    """A blank disk of SIZE bytes at PATH (CDI's blank DataVolume).

    A file is created or replaced (all holes, or preallocated); a block device must hold
    SIZE bytes and its first SIZE bytes are made to read as zeros (discarded where the device
    can, provisioned with preallocation).
    """
    mode = preallocation_mode(preallocation)
    p = os.fspath(path)
    if size < 0:
        raise ValueError(f"size must not be negative: {size}")
    try:
        st: os.stat_result | None = os.stat(p)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        start = time.monotonic()
        fd = open_for_job(p)
        direct = open_direct(fd, os.O_WRONLY)
        try:
            with Context() as ctx:
                pr = _native.probe(ctx, fd, p)
                if size > pr.size:
                    raise TargetTooSmallError.of(p, size, pr.size, what="the blank disk")
                stats = _native.new_stats()
                if mode == "off":
                    _native.zero_range(ctx, fd, True, pr.logical_sector, 0, size, stats,
                             paths=(p, p))
                    os.fsync(fd)
                    mask, allocated = 0, 0
                else:
                    mask, allocated = _preallocate_fd(ctx, p, fd, direct, pr, 0, size, mode)
                return PreallocResult(
                    path=p, size=size, mode=mode, preallocation_applied=mode != "off",
                    alloc_methods=AllocMethod.from_mask(mask), bytes_allocated=allocated,
                    target_allocated=None, elapsed=time.monotonic() - start)
        finally:
            if direct >= 0:
                os.close(direct)
            os.close(fd)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "target is not a regular file or a block device", p)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, file_mode)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return preallocate(p, mode=mode, size=size) if mode != "off" else _blank_result(p, size)


def _blank_result(path: str, size: int) -> PreallocResult:
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        blocks = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    return PreallocResult(path=path, size=size, mode="off", preallocation_applied=False,
                          alloc_methods=(), bytes_allocated=0, target_allocated=blocks,
                          elapsed=time.monotonic() - start)
