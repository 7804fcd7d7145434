"""Endpoints: the source and target of a job, opened once, by descriptor, and locked.

A :class:`Source` is a regular file or block device open for reading, with the way its extents
are found (SEEK_DATA/SEEK_HOLE, a loop device's backing file, or a full read with zero
detection).  A :class:`Target` is a file or block device open for writing, locked for the job
(:mod:`cdimover.io.locks`), with its O_DIRECT twin and sector size.  :class:`Place` names where
a target goes as an entry of an open directory, so that a tenant's volume is never reached
through a path that could be swapped.

**The target rule.**  A file the job creates is written as ``NAME.cdimover-partial`` and
renamed to NAME by :meth:`Target.commit` once complete and durable; a job that fails removes
it, and one that is killed leaves it under that name, taken over by the next run.  An existing
file is replaced in place only after the checks (in use, EFBIG, free space) passed, and carries
the ``user.cdimover.incomplete`` xattr until the commit.  A block device is refused when
read-only, mounted or claimed, and is claimed (``O_EXCL``) for the job.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Final, Literal

from .. import _native
from .._native import Context, LoopStatus, Probe
from ..errors import SourceInUseError, TargetInUseError, TargetTooSmallError
from .fs import fsync_dir, kind, open_beneath, open_dir, open_direct
from .locks import claim_device, lock_job, qemu_lock_holder
from ..types import ScanMethod

__all__ = ["Source", "Target", "Place", "Scan", "open_source", "open_target", "open_for_job",
           "check_room",
           "PARTIAL_SUFFIX", "INCOMPLETE_XATTR", "incomplete_marker"]

log = logging.getLogger(__name__)

Scan = Literal["auto", "seek", "loop", "full"]
PARTIAL_SUFFIX: Final = ".cdimover-partial"
"""A file target that did not exist is written as ``NAME.cdimover-partial`` beside it and
renamed to NAME only once complete and durable."""
INCOMPLETE_XATTR: Final = "user.cdimover.incomplete"
"""Set on an existing file target while a job rewrites it; removed once the job succeeded."""

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
        for fd in (self.direct_fd, self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = self.dir_fd = -1

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
    import json     # only where a mark is read or written

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


def check_room(fd: int, path: str, need: int | None, *, freed: int | None = None,
               what: str = "the image") -> None:
    """TargetTooSmallError when the filesystem of regular file FD lacks room for NEED bytes;
    FREED is what replacing the file's content gives back (default: all it holds now).  No
    check when NEED is None."""
    if need is None:
        return
    st = os.fstatvfs(fd)
    if freed is None:
        freed = os.fstat(fd).st_blocks * 512
    available = st.f_bavail * st.f_frsize + freed
    if need > available:
        raise TargetTooSmallError.of(path, need, available, what=what, room="free")


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
    import json

    value = json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
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
    # The descriptor the job writes through holds the claim itself: the kernel then lets
    # its zeroing (discard, zero-out) drop the device's cache, which it refuses to a
    # descriptor when another one holds the device exclusively.
    try:
        claimed = claim_device(t.fd, os.O_WRONLY)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise TargetInUseError(
                f"{p}: the block device is in use (mounted, or claimed by another process or "
                f"cdimover job); nothing was written") from None
        raise OSError(e.errno, e.strerror, p) from None
    os.close(t.fd)
    t.fd = claimed
    t.probe = _native.probe(c, t.fd, p)
    if t.probe.size < size:
        raise TargetTooSmallError.of(p, size, t.probe.size)
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
    check_room(t.fd, p, need)
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
    check_room(t.fd, p, need)
    os.ftruncate(t.fd, 0)
    try:
        os.ftruncate(t.fd, size)
    except OSError as e:
        raise OSError(e.errno, e.strerror, p) from None
    t.probe = _native.probe(c, t.fd, p)
    t.fresh = True
    t.direct_fd = open_direct(t.fd, os.O_WRONLY)
    return t


def open_for_job(path: str) -> int:
    """Open the existing file or block device PATH for writing in place, locked as a job's
    target: a block device claimed (``O_EXCL`` on the returned descriptor: a mounted or claimed
    device is refused), a file under cdimover's exclusive job lock and not locked by QEMU.
    TargetInUseError otherwise; OSError naming PATH when it cannot be opened."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            try:
                claimed = claim_device(fd, os.O_WRONLY)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise TargetInUseError(f"{path}: the block device is in use (mounted, or "
                                           f"claimed by another process or cdimover job); "
                                           f"nothing was written") from None
                raise OSError(e.errno, e.strerror, path) from None
            os.close(fd)
            return claimed
        if qemu_lock_holder(fd) is not None:
            raise TargetInUseError(f"{path}: locked by a running QEMU; power the VM off "
                                   f"first; nothing was written")
        if not lock_job(fd, exclusive=True):
            raise TargetInUseError(f"{path}: in use by {_holder(fd)}; nothing was written")
        return fd
    except BaseException:
        os.close(fd)
        raise


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


