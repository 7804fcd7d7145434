"""RAW copies between regular files and block devices, in every direction.

The shape is source -> extents -> target: a :class:`Source` knows its size and how to find its
extents (SEEK_DATA/SEEK_HOLE, a loop device's backing file, or a full read with zero
detection); a :class:`Target` knows how it may be written (fresh file, existing device,
O_DIRECT twin, sector size).  The native core moves the bytes between them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Final, Literal

from . import _native
from ._native import Context, LoopStatus, Probe, ProgressFn, lib
from ._os import fsync_dir, kind, open_beneath, open_dir, open_direct
from .detect import require_raw
from .errors import SourceInUseError, TargetInUseError, TargetTooSmallError
from .locks import claim_device, lock_job, qemu_lock_holder
from .prealloc import preallocation_mode
from .types import PREALLOCATION_MODES, AllocMethod, CopyResult, ScanMethod, ZeroMethod

__all__ = ["copy", "Source", "Target", "Place", "open_source", "open_target", "scan",
           "is_zero", "PARTIAL_SUFFIX", "INCOMPLETE_XATTR", "incomplete_marker"]

log = logging.getLogger(__name__)

Scan = Literal["auto", "seek", "loop", "full"]
Reflink = Literal["auto", "never", "always"]

PARTIAL_SUFFIX: Final = ".cdimover-partial"
"""A file target that did not exist is written as ``NAME.cdimover-partial`` beside it and
renamed to NAME only once complete and durable."""
INCOMPLETE_XATTR: Final = "user.cdimover.incomplete"
"""Set on an existing file target while a job rewrites it; removed once the job succeeded."""

_REFLINK_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL,
                        errno.ENOTTY, errno.ENOSYS}
_NO_DEVICE: Final = "no such device (a new file is never created under /dev)"
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.ENOSYS}


_EMPTY_PROBE: Final = Probe(size=0, dev=0, ino=0, rdev=0, blocks=0, logical_sector=512,
                            physical_sector=512, fs_block=4096, is_blockdev=False,
                            is_regular=False)


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

    @property
    def allocated(self) -> int | None:
        """Bytes the source's data may take on a target at most (its allocation, or its loop
        backing file's), None when unknown (a device read in full)."""
        if self.probe.is_regular:
            return min(self.size, self.probe.blocks * 512)
        if self.map_fd >= 0:
            return min(self.size, os.fstat(self.map_fd).st_blocks * 512)
        return None

    def verify_unchanged(self, ctx: Context) -> None:
        """Raise OSError(EIO) when the source changed size, or a loop source changed its
        backing file, since it was opened: a copy that ran meanwhile is not the source."""
        size = _native.probe(ctx, self.fd, self.path).size
        if size != self.size:
            raise OSError(errno.EIO, f"the source changed size during the copy ({self.size} "
                          f"bytes at the start, {size} at the end)", self.path)
        if self.loop is not None:
            now = _native.loop_status(ctx, self.fd)
            if now is None or (now.backing_dev, now.backing_ino, now.offset) != (
                    self.loop.backing_dev, self.loop.backing_ino, self.loop.offset):
                raise OSError(errno.EIO, "the loop device's backing file changed during the "
                              "copy", self.path)

    def close(self) -> None:
        for fd in (self.map_fd, self.direct_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = self.map_fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Place:
    """Where a target is: entry NAME of the directory open as DIR_FD, never followed if it is
    a symbolic link.  PATH names it in messages.  A missing entry becomes a new file with MODE
    (exactly MODE, whatever the umask, when EXACT_MODE); an existing regular file is replaced;
    a block device node is written in place.  DIR_FD stays the caller's."""

    dir_fd: int
    name: str
    path: str
    mode: int = 0o644
    exact_mode: bool = False


@dataclass
class Target:
    """An open copy target, locked for the job.

    A file the job creates is written as ``NAME.cdimover-partial`` and renamed into place by
    :meth:`commit`; an existing file carries the ``user.cdimover.incomplete`` xattr until
    :meth:`commit`.  Leaving the ``with`` block without a commit removes a partial file and
    leaves an existing one marked incomplete.
    """

    path: str
    fd: int
    probe: Probe
    direct_fd: int = -1
    fresh: bool = False          # created or truncated by us: reads as zeros
    created: bool = False
    dir_fd: int = -1             # the directory holding a file target (ours to close)
    name: str = ""               # the final name in dir_fd
    partial: str = ""            # the name being written, until commit()
    marked: bool = False         # INCOMPLETE_XATTR set, until commit()
    claim_fd: int = -1           # O_EXCL claim of a block device
    committed: bool = False

    def commit(self) -> None:
        """Declare the target complete (its data is already durable): rename a partial file
        into place and sync its directory, or clear the incomplete mark."""
        if self.partial:
            os.rename(self.partial, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            self.partial = ""
            fsync_dir(self.dir_fd)
        if self.marked:
            try:
                os.removexattr(self.fd, INCOMPLETE_XATTR)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise OSError(e.errno, e.strerror, self.path) from None
            os.fsync(self.fd)
            self.marked = False
        self.committed = True

    def discard(self) -> None:
        """After a failed job: remove the partial file this job created (an existing target
        keeps its incomplete mark)."""
        if self.partial and self.dir_fd >= 0:
            try:
                os.unlink(self.partial, dir_fd=self.dir_fd)
            except OSError as e:
                log.warning("%s: cannot remove the partial target %s: %s", self.path,
                            self.partial, e.strerror)
            self.partial = ""

    def close(self) -> None:
        if not self.committed:
            self.discard()
        for fd in (self.direct_fd, self.claim_fd, self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = self.claim_fd = self.dir_fd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def incomplete_marker(fd: int) -> dict[str, object] | None:
    """The incomplete mark of file FD (who started rewriting it, when), None when absent."""
    try:
        raw = os.getxattr(fd, INCOMPLETE_XATTR)
    except OSError:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"raw": raw.decode(errors="replace")}


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


def _open_readable(path: str) -> int:
    """Open PATH for reading; a FIFO or other special file never blocks the open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def _choose_scan(c: Context, src: Source, scan: Scan) -> None:
    """Pick SRC's scan method for SCAN (and open a loop device's backing map)."""
    p, pr = src.path, src.probe
    if pr.is_regular:
        if scan == "loop":
            raise ValueError(f"{p}: scan='loop' needs a loop device")
        src.scan_method = ScanMethod.FULL_READ if scan == "full" else ScanMethod.SEEK_HOLE
        return
    src.loop = _native.loop_status(c, src.fd)
    if scan in ("auto", "loop") and src.loop is not None:
        # Flush the device so the backing file is current before mapping it.
        os.fsync(src.fd)
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


def open_source(path: str | os.PathLike[str], *, scan: Scan = "auto",
                ctx: Context | None = None, fd: int | None = None) -> Source:
    """Open PATH (a regular file or block device) for copying and choose its scan method.

    FD: an open descriptor of the source to use instead of opening PATH (PATH then only names
    it); the Source works on its own duplicate.  The O_DIRECT twin is a reopen of the same
    open file, never of the path.  A regular file gets cdimover's shared job lock:
    SourceInUseError when another job is writing it."""
    p = _fspath(path)
    own = ctx is None
    c = ctx or Context()
    fd = _open_readable(p) if fd is None else os.dup(fd)
    src: Source | None = None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, f"the source is {kind(mode)}, not a regular file or "
                          f"a block device", p)
        pr = _native.probe(c, fd, p)
        src = Source(path=p, fd=fd, probe=pr)
        if pr.is_regular and not lock_job(fd, exclusive=False):
            raise SourceInUseError(f"{p}: another cdimover job is writing this file")
        src.direct_fd = open_direct(fd, os.O_RDONLY)
        _choose_scan(c, src, scan)
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


def _place_of(target: str | os.PathLike[str] | Place, mode: int) -> tuple[Place, bool]:
    """TARGET as a Place with a directory descriptor of our own: (place, owned).  A path's
    symbolic links are resolved first (a path given by the caller is the caller's choice);
    the entry itself is then opened without following."""
    if isinstance(target, Place):
        return target, False
    p = _fspath(target)
    real = os.path.realpath(p)
    parent, name = os.path.split(real)
    if not name:
        raise IsADirectoryError(errno.EISDIR, "target is a directory", p)
    try:
        dir_fd = open_dir(parent or "/", follow=True)
    except FileNotFoundError:
        if real.startswith("/dev/"):
            raise FileNotFoundError(errno.ENOENT, _NO_DEVICE, p) from None
        raise
    return Place(dir_fd=dir_fd, name=name, path=p, mode=mode), True


def _holder(fd: int) -> str:
    """Who holds the job lock of FD, in words, from its incomplete mark when there is one."""
    mark = incomplete_marker(fd)
    if mark and "pid" in mark:
        return f"cdimover process {mark['pid']} on {mark.get('host', '?')}"
    return "another cdimover job"


def _check_room(fd: int, path: str, need: int | None, freed: int) -> None:
    """TargetTooSmallError when the filesystem of FD lacks room for NEED bytes (FREED: what
    replacing the old content gives back); no check when NEED is None."""
    if need is None:
        return
    st = os.fstatvfs(fd)
    available = st.f_bavail * st.f_frsize + freed
    if need > available:
        from .sizing import format_size
        raise TargetTooSmallError(
            f"{path}: target holds {format_size(available)} ({available} bytes free) but "
            f"the image needs {format_size(need)} ({need} bytes)",
            required=need, available=available)


def _check_file_size(dir_fd: int, size: int, path: str) -> None:
    """OSError(EFBIG) naming PATH when the filesystem of DIR_FD cannot hold a file of SIZE
    bytes, found on an unnamed O_TMPFILE so that no existing file is touched."""
    try:
        probe = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError:
        return      # no O_TMPFILE here: the truncation below reports it instead
    try:
        os.ftruncate(probe, size)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.EINVAL):
            raise OSError(errno.EFBIG, f"File too large: the filesystem cannot hold a "
                          f"{size}-byte file; the existing file was left as it was",
                          path) from None
    finally:
        os.close(probe)


def _mark_incomplete(fd: int, path: str) -> bool:
    """Set INCOMPLETE_XATTR on FD; False where the filesystem has no user xattrs."""
    value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": round(time.time())}).encode()
    try:
        os.setxattr(fd, INCOMPLETE_XATTR, value)
    except OSError as e:
        if e.errno in _NO_XATTR:
            log.debug("%s: no incomplete mark (%s)", path, e.strerror)
            return False
        raise OSError(e.errno, e.strerror, path) from None
    return True


def _same_file(st: os.stat_result, source: Source | None) -> bool:
    if source is None:
        return False
    sp = source.probe
    return (stat.S_ISREG(st.st_mode) and sp.is_regular and st.st_dev == sp.dev
            and st.st_ino == sp.ino) or (
        stat.S_ISBLK(st.st_mode) and sp.is_blockdev and st.st_rdev == sp.rdev)


def _device_read_only(rdev: int) -> bool:
    try:
        with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/ro", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False


def _open_device_target(c: Context, t: Target, size: int) -> Target:
    """Finish opening block device target T: refuse it when read-only, mounted or claimed,
    claim it for the job, check that it holds SIZE bytes."""
    p = t.path
    st = os.fstat(t.fd)
    if _device_read_only(st.st_rdev):
        raise OSError(errno.EROFS, "the block device is read-only", p)
    try:
        t.claim_fd = claim_device(t.fd)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise TargetInUseError(
                f"{p}: the block device is in use (mounted, or claimed by another process or "
                f"cdimover job); nothing was written") from None
        raise OSError(e.errno, e.strerror, p) from None
    t.probe = _native.probe(c, t.fd, p)
    if t.probe.size < size:
        from .sizing import format_size
        raise TargetTooSmallError(
            f"{p}: target holds {format_size(t.probe.size)} ({t.probe.size} bytes) but the "
            f"image needs {format_size(size)} ({size} bytes)",
            required=size, available=t.probe.size)
    t.direct_fd = open_direct(t.fd, os.O_WRONLY)
    return t


def _open_file_target(c: Context, t: Target, place: Place, size: int,
                      need: int | None) -> Target:
    """Finish opening existing regular file T: refuse it when QEMU or another job holds it,
    check that SIZE bytes fit, mark it incomplete, then replace its content."""
    p = t.path
    holder = qemu_lock_holder(t.fd)
    if holder is not None:
        raise TargetInUseError(f"{p}: locked by a running QEMU (byte {holder[0]} is locked); "
                               f"power the VM off first; nothing was written")
    if not lock_job(t.fd, exclusive=True):
        raise TargetInUseError(f"{p}: in use by {_holder(t.fd)}; nothing was written")
    _check_file_size(t.dir_fd, size, p)
    _check_room(t.fd, p, need, os.fstat(t.fd).st_blocks * 512)
    if incomplete_marker(t.fd) is not None:
        log.info("%s: an earlier job did not finish; replacing its output", p)
    t.marked = _mark_incomplete(t.fd, p)
    if place.exact_mode:
        os.fchmod(t.fd, place.mode)
    # Replace: drop the old content so the target reads as zeros, then set the size.
    os.ftruncate(t.fd, 0)
    os.ftruncate(t.fd, size)
    t.probe = _native.probe(c, t.fd, p)
    t.fresh = True
    t.direct_fd = open_direct(t.fd, os.O_WRONLY)
    return t


def _create_file_target(c: Context, t: Target, place: Place, size: int,
                        need: int | None) -> Target:
    """Create the new file target T as NAME.cdimover-partial in PLACE's directory (taking over
    a partial file a killed job left, once its lock is free)."""
    p = t.path
    if os.path.realpath(p).startswith("/dev/"):
        raise FileNotFoundError(errno.ENOENT, _NO_DEVICE, p)
    partial = place.name + PARTIAL_SUFFIX
    where = os.path.join(os.path.dirname(p), partial)
    try:
        t.fd = open_beneath(place.dir_fd, partial, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                            place.mode, path=where)
    except FileExistsError:
        t.fd = open_beneath(place.dir_fd, partial, os.O_RDWR, path=where)
        if not stat.S_ISREG(os.fstat(t.fd).st_mode):
            raise OSError(errno.EINVAL, "a partial target of another kind is in the way",
                          where) from None
        if not lock_job(t.fd, exclusive=True):
            raise TargetInUseError(f"{p}: being written by {_holder(t.fd)}") from None
        log.info("%s: replacing the partial target an earlier job left", where)
    else:
        t.partial = partial
        if not lock_job(t.fd, exclusive=True):   # a new file: nobody can hold it
            raise TargetInUseError(f"{p}: being written by another cdimover job")
    t.partial = partial
    t.created = True
    if place.exact_mode:
        os.fchmod(t.fd, place.mode)
    _check_room(t.fd, p, need, os.fstat(t.fd).st_blocks * 512)
    os.ftruncate(t.fd, 0)
    try:
        os.ftruncate(t.fd, size)
    except OSError as e:
        raise OSError(e.errno, e.strerror, p) from None
    t.probe = _native.probe(c, t.fd, p)
    t.fresh = True
    t.direct_fd = open_direct(t.fd, os.O_WRONLY)
    return t


def open_target(target: str | os.PathLike[str] | Place, size: int, *,
                source: Source | None = None, ctx: Context | None = None, mode: int = 0o644,
                need: int | None = None) -> Target:
    """Open TARGET (a path, or a :class:`Place`) for writing SIZE bytes, locked for the job.

    - A missing entry becomes a new regular file, written as ``NAME.cdimover-partial`` and
      renamed by :meth:`Target.commit`; a missing path under ``/dev`` is an error.
    - An existing regular file is replaced in place (its size becomes SIZE) once it is known
      to fit (EFBIG, and NEED bytes of free space when NEED is given), marked incomplete
      until the commit.  TargetInUseError when QEMU or another cdimover job holds it.
    - A block device must hold SIZE bytes (TargetTooSmallError) and keeps its bytes past
      SIZE; it is refused when read-only, mounted or claimed, and claimed for the job.
    Nothing is written to an existing file or device before every check passed.
    """
    own = ctx is None
    c = ctx or Context()
    place, own_dir = _place_of(target, mode)
    t = Target(path=place.path, fd=-1, probe=_EMPTY_PROBE,
               dir_fd=place.dir_fd if own_dir else -1, name=place.name)
    try:
        try:
            t.fd = open_beneath(place.dir_fd, place.name, os.O_WRONLY, path=place.path)
        except FileNotFoundError:
            if t.dir_fd < 0:
                t.dir_fd = os.dup(place.dir_fd)
            return _create_file_target(c, t, place, size, need)
        except IsADirectoryError:
            raise IsADirectoryError(errno.EISDIR, "target is a directory", place.path) from None
        except OSError as e:
            if e.errno == errno.ENXIO:      # a FIFO without a reader, a socket
                st = os.stat(place.name, dir_fd=place.dir_fd, follow_symlinks=False)
                raise OSError(errno.EINVAL, f"target is {kind(st.st_mode)}, not a regular "
                              f"file or a block device", place.path) from None
            raise
        st = os.fstat(t.fd)
        if _same_file(st, source):
            raise OSError(errno.EINVAL, "source and target are the same", place.path)
        if stat.S_ISBLK(st.st_mode):
            return _open_device_target(c, t, size)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"target is {kind(st.st_mode)}, not a regular file "
                          f"or a block device", place.path)
        if t.dir_fd < 0:
            t.dir_fd = os.dup(place.dir_fd)
        return _open_file_target(c, t, place, size, need)
    except BaseException:
        t.close()
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
                ctx.call(lib.cdm_reflink, src.fd, dst.fd, paths=paths)
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
            ctx.call(lib.cdm_copy, src.fd, dst.fd, opts, stats, progress=progress,
                     paths=paths)
        src.verify_unchanged(ctx)
        if dst.probe.is_regular:
            grow_target(ctx, dst, src.size, final_size, prealloc, stats, paths)
        if verify is not None:
            verify()
        dst.commit()
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
