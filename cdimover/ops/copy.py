"""RAW copies between regular files and block devices, in every direction.

The shape is source -> extents -> target: an open :class:`~cdimover.io.endpoints.Source`
knows its size and how to find its extents; a :class:`~cdimover.io.endpoints.Target` knows how
it may be written.  The native core moves the bytes between them; this module decides the
strategy (reflink, scan method, preallocation), checks the source did not change, and commits
the target.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .. import _native
from .._native import Context, ProgressFn
from ..io.detect import require_raw
from ..io.endpoints import Place, Scan, Source, Target, open_source, open_target
from ..types import PREALLOCATION_MODES, AllocMethod, CopyResult, ScanMethod, ZeroMethod
from .prealloc import preallocation_mode

__all__ = ["copy", "scan", "is_zero", "Tuning", "copy_endpoints"]

Reflink = Literal["auto", "never", "always"]

_REFLINK_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL,
                        errno.ENOTTY, errno.ENOSYS}


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


@dataclass(frozen=True)
class Tuning:
    """Knobs shared by copies and conversions (0 = the core's default)."""

    threads: int = 0
    request_size: int = 0
    sparse_size: int = 0
    detect_zeros: bool = True


def copy_opts(src: Source, dst: Target, *, scan_method: ScanMethod, target_is_zero: bool,
              preallocation: str, tuning: Tuning) -> Any:
    """The ``struct cdm_copy_opts`` for moving SRC's bytes onto DST."""
    opts = target_opts(dst, src.size, scan_method=scan_method, target_is_zero=target_is_zero,
                       preallocation=preallocation, tuning=tuning)
    opts.src_direct_fd = src.direct_fd
    opts.map_fd = src.map_fd
    opts.map_offset = src.map_offset
    return opts


def target_opts(dst: Target, size: int, *, scan_method: ScanMethod, target_is_zero: bool,
                preallocation: str, tuning: Tuning) -> Any:
    """The ``struct cdm_copy_opts`` for writing SIZE bytes onto DST from a source that is not
    a local file (no O_DIRECT twin, no extent map)."""
    opts = _native.new_copy_opts()
    opts.size = size
    opts.src_direct_fd = -1
    opts.dst_direct_fd = dst.direct_fd
    opts.map_fd = -1
    opts.scan_method = int(scan_method)
    opts.request_size = tuning.request_size
    opts.sparse_size = tuning.sparse_size
    opts.threads = tuning.threads
    flags = 0
    if dst.fresh or target_is_zero:
        flags |= _native.const("CDM_COPY_TARGET_IS_ZERO")
    if not tuning.detect_zeros:
        flags |= _native.const("CDM_COPY_NO_ZERO_DETECT")
    opts.flags = flags
    opts.target_sector = dst.probe.logical_sector
    opts.target_is_blockdev = int(dst.probe.is_blockdev)
    opts.preallocation = PREALLOCATION_MODES[preallocation]
    return opts


def final_size_for(virtual_size: int, target_size: int | None) -> int:
    """The size a file target ends with: TARGET_SIZE, never below VIRTUAL_SIZE."""
    if target_size is not None and target_size < 0:
        raise ValueError(f"target_size must not be negative: {target_size}")
    return max(virtual_size, target_size or 0)


def room_needed(final_size: int, preallocation: str, data: int | None) -> int | None:
    """The bytes a file target may come to occupy: FINAL_SIZE when preallocated, else the
    source's DATA allocation (None: unknown, no check)."""
    return final_size if preallocation != "off" else data


def check_target_size(dst: Target, target_size: int | None) -> None:
    """TARGET_SIZE applies to file targets only."""
    if target_size is not None and dst.probe.is_blockdev:
        raise ValueError(f"{dst.path}: target_size applies to file targets only")


def grow_target(ctx: Context, dst: Target, virtual_size: int, final_size: int,
                preallocation: str, stats: Any, paths: tuple[str, str]) -> None:
    """Grow a file target from VIRTUAL_SIZE to FINAL_SIZE, preallocating the tail."""
    if final_size <= virtual_size:
        return
    os.ftruncate(dst.fd, final_size)
    if preallocation != "off":
        _native.preallocate(ctx, dst.fd, dst.direct_fd, False, dst.probe.logical_sector,
                 virtual_size, final_size - virtual_size, PREALLOCATION_MODES[preallocation],
                 stats, paths=paths)
    else:
        os.fsync(dst.fd)


def finish_job(ctx: Context, src: Source, dst: Target, virtual_size: int, final_size: int,
               preallocation: str, stats: Any, paths: tuple[str, str],
               verify: Callable[[], object] | None) -> None:
    """The end of every job once the bytes are on the target: the source checked unchanged
    (also after a reflink, which the core's own check never sees), a file target grown to
    FINAL_SIZE, VERIFY called, and the target committed."""
    src.verify_unchanged(ctx)
    if dst.probe.is_regular:
        grow_target(ctx, dst, virtual_size, final_size, preallocation, stats, paths)
    if verify is not None:
        verify()
    dst.commit()


def make_result(src_path: str, dst: Target, stats: Any, *, source_format: str,
                virtual_size: int, start: float, scan_method: ScanMethod, preallocation: str,
                final_size: int, reflinked: bool = False, scan_note: str = "") -> CopyResult:
    """A CopyResult from the core's statistics."""
    return CopyResult(
        source=src_path, target=dst.path, source_format=source_format,
        virtual_size=virtual_size,
        bytes_read=stats.bytes_read, bytes_written=stats.bytes_written,
        bytes_zeroed=stats.bytes_zeroed, bytes_skipped=stats.bytes_skipped,
        bytes_zero_data=stats.bytes_zero_data,
        elapsed=time.monotonic() - start, scan_method=scan_method,
        zero_methods=ZeroMethod.from_mask(stats.zero_methods),
        zero_fallbacks=stats.zero_fallbacks,
        direct_read=bool(stats.direct_read), direct_write=bool(stats.direct_write),
        reflinked=reflinked, preallocation=preallocation,
        preallocation_applied=preallocation != "off",
        target_allocated=_allocated(dst.fd) if dst.probe.is_regular else None,
        scan_note=scan_note,
        alloc_methods=AllocMethod.from_mask(stats.alloc_methods),
        target_size=final_size if dst.probe.is_regular else None,
        read_seconds=stats.read_ns / 1e9, write_seconds=stats.write_ns / 1e9,
        sync_seconds=stats.sync_ns / 1e9)


def copy(source: str | os.PathLike[str] | Source, target: str | os.PathLike[str] | Place, *,
         preallocation: str | bool = "off", target_is_zero: bool = False,
         progress: ProgressFn | None = None, reflink: Reflink = "auto", scan: Scan = "auto",
         threads: int = 0, request_size: int = 0, sparse_size: int = 0,
         detect_zeros: bool = True, target_size: int | None = None,
         source_format: str = "auto", context: Context | None = None,
         verify: Callable[[], object] | None = None) -> CopyResult:
    """Copy the RAW disk SOURCE to TARGET, bit-exact, sparse and durable.

    - SOURCE: a path, or an open :class:`Source` (left open; its scan method is used).
    - TARGET: a path, or a :class:`Place` (an entry of an open directory, never followed);
      see :func:`open_target` for what happens to a missing file, an existing file and a
      block device.  The target is locked for the copy; a new file appears under its name
      only once complete, an existing one is marked incomplete until then.
    - PREALLOCATION: "off" keeps holes; "falloc" reserves every block of the target; "full"
      writes every block (see cdimover.prealloc).  Data is written once either way.
    - TARGET_SIZE: grow a file target to this size (never below the source's size); with
      preallocation the grown tail is preallocated too.
    - TARGET_IS_ZERO: the caller knows an existing block-device target reads as zeros (a fresh
      thin volume), so zero ranges need no zeroing.  New and replaced files always are.
    - PROGRESS: called as progress(done, total) at most once per request from this thread;
      returning a true value or raising cancels (CopyCancelled; a raised exception is its
      cause, KeyboardInterrupt and SystemExit propagate as they are).
    - REFLINK: "auto" shares extents (FICLONE) between files on one filesystem that supports
      it, "never" always copies the bytes, "always" fails if it cannot share.
    - SCAN: "auto" picks SEEK_DATA/SEEK_HOLE for files, the backing file's map for loop
      devices, a full read for other devices; "seek", "loop" and "full" force one.
    - SOURCE_FORMAT: "auto" probes the source (cdimover.detect) before the target is opened
      and raises UnsupportedImageError naming the format when it is QCOW2 (convert it with
      cdimover.convert) or a container cdimover does not convert (VMDK, VHD, gzip, ...);
      "raw" copies the bytes as they are, whatever they look like.
    - VERIFY: called once the data is durable, before the target is declared complete (a
      checksum comparison); if it raises, the copy fails as any other failure does.

    A source that changes size (or a loop source that changes its backing file) during the
    copy fails with OSError(EIO) naming it: what a concurrently written source gives is
    otherwise whatever the reads saw, as with any copy of a disk in use.
    """
    prealloc = preallocation_mode(preallocation)
    if reflink not in ("auto", "never", "always"):
        raise ValueError(f"reflink={reflink!r}: expected 'auto', 'never' or 'always'")
    if scan not in ("auto", "seek", "loop", "full"):
        raise ValueError(f"scan={scan!r}: expected 'auto', 'seek', 'loop' or 'full'")
    tuning = Tuning(threads, request_size, sparse_size, detect_zeros)
    start = time.monotonic()
    ctx = context or Context()
    try:
        if isinstance(source, Source):
            require_raw(source.fd, source.size, source.path, source_format)
            return copy_endpoints(ctx, source, target, prealloc=prealloc,
                                  target_size=target_size, reflink=reflink,
                                  target_is_zero=target_is_zero, progress=progress,
                                  tuning=tuning, start=start, verify=verify)
        with open_source(source, scan=scan, ctx=ctx) as src:
            require_raw(src.fd, src.size, src.path, source_format)
            return copy_endpoints(ctx, src, target, prealloc=prealloc,
                                  target_size=target_size, reflink=reflink,
                                  target_is_zero=target_is_zero, progress=progress,
                                  tuning=tuning, start=start, verify=verify)
    finally:
        if context is None:
            ctx.close()


def copy_endpoints(ctx: Context, src: Source, target: str | os.PathLike[str] | Place, *,
                   prealloc: str, target_size: int | None, reflink: Reflink,
                   target_is_zero: bool, progress: ProgressFn | None, tuning: Tuning,
                   start: float, verify: Callable[[], object] | None = None) -> CopyResult:
    """copy() once the source is open: open, fill and commit the target."""
    final_size = final_size_for(src.size, target_size)
    need = room_needed(final_size, prealloc, src.allocated)
    with open_target(target, src.size, source=src, ctx=ctx, need=need) as dst:
        check_target_size(dst, target_size)
        paths = (src.path, dst.path)
        stats = _native.new_stats()
        reflinked = False
        scan_method = src.scan_method
        if (reflink != "never" and prealloc == "off" and src.probe.is_regular
                and dst.probe.is_regular and src.probe.dev == dst.probe.dev):
            try:
                _native.reflink(ctx, src.fd, dst.fd, paths)
                reflinked = True
                scan_method = ScanMethod.REFLINK
            except OSError as e:
                if reflink == "always" or e.errno not in _REFLINK_UNSUPPORTED:
                    raise
        elif reflink == "always":
            raise OSError(errno.EXDEV, "reflink needs two files on one filesystem", dst.path)
        if not reflinked:
            opts = copy_opts(src, dst, scan_method=src.scan_method,
                             target_is_zero=target_is_zero, preallocation=prealloc,
                             tuning=tuning)
            _native.run_copy(ctx, src.fd, dst.fd, opts, stats, progress=progress,
                             paths=paths)
        finish_job(ctx, src, dst, src.size, final_size, prealloc, stats, paths, verify)
        return make_result(src.path, dst, stats, source_format="raw",
                           virtual_size=src.size, start=start, scan_method=scan_method,
                           preallocation=prealloc, final_size=final_size,
                           reflinked=reflinked, scan_note=src.scan_note)


def scan(path: str | os.PathLike[str], *, method: Scan = "auto") -> list[tuple[int, int, bool]]:
    """The extent map cdimover would use for PATH: (offset, length, is_data) tuples."""
    with Context() as ctx, open_source(path, scan=method, ctx=ctx) as src:
        if src.scan_method == ScanMethod.FULL_READ:
            return [(0, src.size, True)] if src.size else []
        fd = src.map_fd if src.map_fd >= 0 else src.fd
        return _native.scan_extents(ctx, fd, 0, src.size, map_offset=src.map_offset,
                                    path=src.path)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when DATA holds only zero bytes (the core's vectorised check)."""
    return _native.is_zero(data)
