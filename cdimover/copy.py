"""RAW copies between regular files and block devices, in every direction.

The shape is source -> extents -> target: a :class:`Source` knows its size and how to find its
extents (SEEK_DATA/SEEK_HOLE, a loop device's backing file, or a full read with zero
detection); a :class:`Target` knows how it may be written (fresh file, existing device,
O_DIRECT twin, sector size).  The native core moves the bytes between them.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Literal

from . import _native
from ._native import Context, LoopStatus, Probe, ProgressFn, lib
from ._os import open_direct
from .detect import require_raw
from .errors import TargetTooSmallError
from .prealloc import check_capacity, preallocation_mode
from .types import PREALLOCATION_MODES, AllocMethod, CopyResult, ScanMethod, ZeroMethod

__all__ = ["copy", "Source", "Target", "open_source", "open_target", "scan", "is_zero"]

Scan = Literal["auto", "seek", "loop", "full"]
Reflink = Literal["auto", "never", "always"]

_REFLINK_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL,
                        errno.ENOTTY, errno.ENOSYS}


def _fspath(p: str | os.PathLike[str]) -> str:
    return os.fspath(p)


@dataclass
class Source:
    """An open copy source.  Close it (or use it as a context manager) when done."""

    path: str
    fd: int
    probe: Probe
    direct_fd: int = -1
    map_fd: int = -1
    map_offset: int = 0
    scan_method: ScanMethod = ScanMethod.FULL_READ
    scan_note: str = ""
    loop: LoopStatus | None = None

    @property
    def size(self) -> int:
        return self.probe.size

    def close(self) -> None:
        for fd in (self.map_fd, self.direct_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = self.map_fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Target:
    """An open copy target."""

    path: str
    fd: int
    probe: Probe
    direct_fd: int = -1
    fresh: bool = False          # created or truncated by us: reads as zeros
    created: bool = False

    def close(self) -> None:
        for fd in (self.direct_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loop_backing(ctx: Context, src: Source) -> tuple[int, str]:
    """Open the backing file of loop device SRC for its extent map: (fd, note) or (-1, why)."""
    st = src.loop
    if st is None:
        return -1, "not a loop device"
    rdev = src.probe.rdev
    sysfs = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/loop/backing_file"
    try:
        with open(sysfs, encoding="utf-8", errors="surrogateescape") as f:
            backing = f.read().rstrip("\n")
    except OSError as e:
        return -1, f"loop backing file not visible ({sysfs}: {e.strerror})"
    if backing.endswith(" (deleted)"):
        return -1, f"loop backing file {backing!r} was deleted"
    try:
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        return -1, f"loop backing file {backing} not reachable ({e.strerror})"
    fst = os.fstat(fd)
    same_dev = fst.st_dev == st.backing_dev or (
        os.major(fst.st_dev) == os.major(st.backing_dev)
        and os.minor(fst.st_dev) == os.minor(st.backing_dev))
    if not (stat.S_ISREG(fst.st_mode) and same_dev and fst.st_ino == st.backing_ino):
        os.close(fd)
        return -1, f"{backing} is not the file behind {src.path} (mount namespace?)"
    return fd, f"extent map from loop backing file {backing} at offset {st.offset}"


def open_source(path: str | os.PathLike[str], *, scan: Scan = "auto",
                ctx: Context | None = None) -> Source:
    """Open PATH (a regular file or block device) for copying and choose its scan method."""
    p = _fspath(path)
    own = ctx is None
    c = ctx or Context()
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    src: Source | None = None
    try:
        pr = _native.probe(c, fd, p)
        src = Source(path=p, fd=fd, probe=pr)
        src.direct_fd = open_direct(p, os.O_RDONLY)
        if pr.is_regular:
            if scan == "full":
                src.scan_method = ScanMethod.FULL_READ
            elif scan == "loop":
                raise ValueError(f"{p}: scan='loop' needs a loop device")
            else:
                src.scan_method = ScanMethod.SEEK_HOLE
        else:
            src.loop = _native.loop_status(c, fd)
            if scan in ("auto", "loop") and src.loop is not None:
                # Flush the device so the backing file is current before mapping it.
                os.fsync(fd)
                src.map_fd, note = _loop_backing(c, src)
                if src.map_fd >= 0:
                    src.scan_method = ScanMethod.LOOP_BACKING
                    src.map_offset = src.loop.offset
                    src.scan_note = note
                elif scan == "loop":
                    raise OSError(errno.ENOENT, note, p)
                else:
                    src.scan_note = f"full read: {note}"
            elif scan == "loop":
                raise ValueError(f"{p}: not a loop device")
            else:
                src.scan_method = ScanMethod.FULL_READ
                if src.loop is None and scan == "auto":
                    src.scan_note = "full read: not a loop device"
            if scan == "seek":
                src.scan_method = ScanMethod.SEEK_HOLE
        return src
    except BaseException:
        if src is not None:
            src.close()
        else:
            os.close(fd)
        raise
    finally:
        if own:
            c.close()


def open_target(path: str | os.PathLike[str], size: int, *, source: Source | None = None,
                ctx: Context | None = None, mode: int = 0o644) -> Target:
    """Open PATH for writing SIZE bytes.

    A missing path becomes a new regular file; an existing regular file is replaced (its
    apparent size becomes SIZE, its old content is gone); a block device must hold SIZE bytes
    (TargetTooSmallError otherwise) and keeps its bytes past SIZE.
    """
    p = _fspath(path)
    own = ctx is None
    c = ctx or Context()
    try:
        try:
            st: os.stat_result | None = os.stat(p)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "target is a directory", p)
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OSError(errno.EINVAL, "target is not a regular file or a block device", p)
        if source is not None and st is not None:
            sp = source.probe
            same = (stat.S_ISREG(st.st_mode) and sp.is_regular and st.st_dev == sp.dev
                    and st.st_ino == sp.ino) or (
                stat.S_ISBLK(st.st_mode) and sp.is_blockdev and st.st_rdev == sp.rdev)
            if same:
                raise OSError(errno.EINVAL, "source and target are the same", p)

        if st is not None and stat.S_ISBLK(st.st_mode):
            fd = os.open(p, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pr = _native.probe(c, fd, p)
                if pr.size < size:
                    from .sizing import format_size
                    raise TargetTooSmallError(
                        f"{p}: target holds {format_size(pr.size)} ({pr.size} bytes) but the "
                        f"image needs {format_size(size)} ({size} bytes)",
                        required=size, available=pr.size)
                return Target(path=p, fd=fd, probe=pr,
                              direct_fd=open_direct(p, os.O_WRONLY), fresh=False)
            except BaseException:
                os.close(fd)
                raise

        created = st is None
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            # Replace: drop the old content so the target reads as zeros, then set the size.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            pr = _native.probe(c, fd, p)
            return Target(path=p, fd=fd, probe=pr, direct_fd=open_direct(p, os.O_WRONLY),
                          fresh=True, created=created)
        except BaseException:
            os.close(fd)
            raise
    finally:
        if own:
            c.close()


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
    opts = _native.new_copy_opts()
    opts.size = src.size
    opts.src_direct_fd = src.direct_fd
    opts.dst_direct_fd = dst.direct_fd
    opts.map_fd = src.map_fd
    opts.map_offset = src.map_offset
    opts.scan_method = int(scan_method)
    opts.request_size = tuning.request_size
    opts.sparse_size = tuning.sparse_size
    opts.threads = tuning.threads
    flags = 0
    if dst.fresh or target_is_zero:
        flags |= lib.CDM_COPY_TARGET_IS_ZERO
    if not tuning.detect_zeros:
        flags |= lib.CDM_COPY_NO_ZERO_DETECT
    opts.flags = flags
    opts.target_sector = dst.probe.logical_sector
    opts.target_is_blockdev = int(dst.probe.is_blockdev)
    opts.preallocation = PREALLOCATION_MODES[preallocation]
    return opts


def final_target_size(dst: Target, virtual_size: int, target_size: int | None,
                      preallocation: str) -> int:
    """The size a file target ends with (never below VIRTUAL_SIZE); checks, before anything
    is written, that a preallocated file fits its filesystem."""
    if target_size is not None and target_size < 0:
        raise ValueError(f"target_size must not be negative: {target_size}")
    if target_size is not None and dst.probe.is_blockdev:
        raise ValueError(f"{dst.path}: target_size applies to file targets only")
    final = max(virtual_size, target_size or 0)
    if preallocation != "off" and dst.probe.is_regular:
        check_capacity(dst.path, dst.fd, final)
    return final


def grow_target(ctx: Context, dst: Target, virtual_size: int, final_size: int,
                preallocation: str, stats: Any, paths: tuple[str, str]) -> None:
    """Grow a file target from VIRTUAL_SIZE to FINAL_SIZE, preallocating the tail."""
    if final_size <= virtual_size:
        return
    os.ftruncate(dst.fd, final_size)
    if preallocation != "off":
        ctx.call(lib.cdm_preallocate, dst.fd, dst.direct_fd, 0, dst.probe.logical_sector,
                 virtual_size, final_size - virtual_size, PREALLOCATION_MODES[preallocation],
                 stats, paths=paths)
    else:
        os.fsync(dst.fd)


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
        target_size=final_size if dst.probe.is_regular else None)


def copy(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
         preallocation: str | bool = "off", target_is_zero: bool = False,
         progress: ProgressFn | None = None, reflink: Reflink = "auto", scan: Scan = "auto",
         threads: int = 0, request_size: int = 0, sparse_size: int = 0,
         detect_zeros: bool = True, target_size: int | None = None,
         source_format: str = "auto", context: Context | None = None) -> CopyResult:
    """Copy the RAW disk SOURCE to TARGET, bit-exact, sparse and durable.

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
        with open_source(source, scan=scan, ctx=ctx) as src:
            require_raw(src.fd, src.size, src.path, source_format)
            with open_target(target, src.size, source=src, ctx=ctx) as dst:
                paths = (src.path, dst.path)
                final_size = final_target_size(dst, src.size, target_size, prealloc)
                stats = _native.new_stats()
                reflinked = False
                scan_method = src.scan_method
                if (reflink != "never" and prealloc == "off" and src.probe.is_regular
                        and dst.probe.is_regular and src.probe.dev == dst.probe.dev):
                    try:
                        ctx.call(lib.cdm_reflink, src.fd, dst.fd, paths=paths)
                        reflinked = True
                        scan_method = ScanMethod.REFLINK
                    except OSError as e:
                        if reflink == "always" or e.errno not in _REFLINK_UNSUPPORTED:
                            raise
                elif reflink == "always":
                    raise OSError(errno.EXDEV, "reflink needs two files on one filesystem",
                                  dst.path)
                if not reflinked:
                    opts = copy_opts(src, dst, scan_method=src.scan_method,
                                     target_is_zero=target_is_zero, preallocation=prealloc,
                                     tuning=tuning)
                    ctx.call(lib.cdm_copy, src.fd, dst.fd, opts, stats, progress=progress,
                             paths=paths)
                grow_target(ctx, dst, src.size, final_size, prealloc, stats, paths)
                return make_result(src.path, dst, stats, source_format="raw",
                                   virtual_size=src.size, start=start, scan_method=scan_method,
                                   preallocation=prealloc, final_size=final_size,
                                   reflinked=reflinked, scan_note=src.scan_note)
    finally:
        if context is None:
            ctx.close()


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
