"""CDI volumes and host-assisted clones between them, without tar, snappy or a network hop.

A CDI PersistentVolumeClaim reaches a pod either as a **Filesystem** volume (a mounted directory
whose disk is ``disk.img`` at its root) or as a **Block** volume (the raw device).
:meth:`Volume.open` tells the two apart and measures what a clone needs: the disk's virtual size
and the room a target offers (a device's size; for a directory, CDI's usable space after the
filesystem overhead). :func:`clone` copies one volume into another for all four mode pairs:

- ``content_type="kubevirt"`` copies the disk: ``disk.img`` or the device, sparse, through
  :func:`cdimover.copy.copy`. Volume modes may differ.
- ``content_type="archive"`` (Filesystem to Filesystem only) copies the whole volume tree, as
  CDI's clone source does with ``tar cv -S`` over every root entry but ``lost+found`` and its
  upload server with ``tar x --no-same-owner``: regular files sparse, directories, symlinks as
  symlinks (never followed), permission bits and mtimes, hard links; special files are skipped.

Every rule is checked before a byte is written: CDI's volume-mode and content-type rules (the
wording of :func:`cdimover.k8s.validate_clone`), the size rule (the target's usable capacity
must hold the source's virtual size), and that the source is idle: a block device that is
mounted or held open with ``O_EXCL``, or a disk locked by a running QEMU
(:func:`cdimover.locks.qemu_lock_holder`), is refused with
:class:`~cdimover.errors.SourceInUseError` unless ``force=True``.

Volumes hold tenants' data, so nothing in them is trusted to stay put: :meth:`Volume.open`
records the identity of the volume and of its disk, never following a symbolic link, and
:func:`clone` reopens them by descriptor (``O_NOFOLLOW`` on every component), checks they are
the ones inspected (:class:`~cdimover.errors.UnsafeVolumeError` otherwise) and hands
descriptors, not paths, to the copy.  An archive clone walks both trees the same way.

The target is locked for the job (:mod:`cdimover.locks`): a Block target is claimed with
``O_EXCL`` (a mounted device, or one another job writes, is refused), a file target carries an
exclusive OFD lock.  A new ``disk.img`` is written as ``disk.img.cdimover-partial`` and renamed
once complete and durable; an existing one is replaced in place and carries the
``user.cdimover.incomplete`` xattr until then.  So a failed or killed clone never leaves a disk
that looks complete: a re-run takes the leftovers over, and a disk marked incomplete is refused
as a clone source.  ``disk.img`` is created with mode 0660 whatever the umask, as CDI creates
it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Final, Literal, Union

from .._native import ProgressFn
from ..io.fs import check_name, fsync_dir, kind, open_beneath, open_dir, remove_beneath, reopen
from ..io.endpoints import PARTIAL_SUFFIX, Place, Source, incomplete_marker, open_source
from ..ops.copy import copy as copy_disk
from ..errors import CloneValidationError, SourceInUseError, TargetTooSmallError, \
    UnsafeVolumeError
from ..io.locks import qemu_lock_holder
from .k8s import ARCHIVE, BLOCK, FILESYSTEM, KUBEVIRT, CloneRequest, SourceInfo, \
    validate_clone
from ..sizing import DEFAULT_OVERHEAD, Overhead, format_size, parse_overhead, parse_quantity, \
    usable_space
from ..types import CopyResult

__all__ = [
    "FILESYSTEM",
    "BLOCK",
    "KUBEVIRT",
    "ARCHIVE",
    "DISK_IMAGE",
    "DISK_IMAGE_MODE",
    "Volume",
    "CloneResult",
    "clone",
    "check_not_in_use",
]

log = logging.getLogger(__name__)

DISK_IMAGE: Final = "disk.img"
"""The disk's name at the root of a Filesystem volume."""
DISK_IMAGE_MODE: Final = 0o660
"""The mode CDI gives ``disk.img``."""

_LOST_FOUND: Final = "lost+found"
_CONTENT_TYPES: Final = (KUBEVIRT, ARCHIVE)

VolumeMode = Literal["Filesystem", "Block"]


def _available_bytes(fd: int) -> int:
    """Bytes free for an unprivileged writer on the filesystem holding FD (CDI's
    ``GetAvailableSpace``: f_bavail blocks of the fragment size)."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def _inspect_disk(dir_fd: int, disk: str) -> tuple[int | None, int, tuple[int, int] | None,
                                                    str | None]:
    """``disk.img`` of the volume open as DIR_FD, never followed: (virtual size or None,
    bytes a clone would free by replacing it and a leftover partial file, identity or None,
    the incomplete mark in words or None).  CloneValidationError when it is not a regular
    file."""
    freed = 0
    try:
        part = os.stat(DISK_IMAGE + PARTIAL_SUFFIX, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(part.st_mode):
            freed += part.st_blocks * 512
    except FileNotFoundError:
        pass
    try:
        st = os.stat(DISK_IMAGE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None, freed, None, None
    if not stat.S_ISREG(st.st_mode):
        raise CloneValidationError(
            f"{disk}: {kind(st.st_mode)}, not a regular file: not a CDI disk image")
    fd = open_beneath(dir_fd, DISK_IMAGE, os.O_RDONLY, path=disk)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise UnsafeVolumeError(f"{disk}: changed while it was inspected")
        mark = incomplete_marker(fd)
    finally:
        os.close(fd)
    incomplete = None
    if mark is not None:
        who = f"process {mark.get('pid', '?')} on {mark.get('host', '?')}"
        incomplete = f"a cdimover job ({who}) writing it did not finish"
    return fst.st_size, freed + fst.st_blocks * 512, (fst.st_dev, fst.st_ino), incomplete


def _device_size(fd: int) -> int:
    """The size of the block device open as FD (an O_PATH descriptor is reopened)."""
    dev = reopen(fd, os.O_RDONLY)
    try:
        return os.lseek(dev, 0, os.SEEK_END)
    finally:
        os.close(dev)


def _open_volume_path(path: str, follow: bool) -> int:
    """An O_PATH descriptor of volume PATH, its last component not followed unless FOLLOW."""
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(path, flags)


@dataclass(frozen=True, slots=True)
class Volume:
    """A CDI volume as a pod sees it.

    - ``mode``: ``"Filesystem"`` (a directory) or ``"Block"`` (a block device).
    - ``path``: the directory or the device.
    - ``disk_path``: ``<path>/disk.img`` or the device.
    - ``capacity``: what an image on the volume may occupy: the device's size, or for a
      directory CDI's usable space of ``available`` with ``filesystem_overhead`` applied.
    - ``virtual_size``: the size of the disk present (``disk.img``'s size, the device's size),
      None when a Filesystem volume has no ``disk.img``.
    - ``available``: the raw bytes ``capacity`` was computed from: the filesystem's free space
      plus the allocation of an existing ``disk.img`` (which a clone replaces); the device size
      for a Block volume.
    - ``filesystem_overhead``: the overhead applied (as given), None for a Block volume.

    Build one with :meth:`open`; the values are a snapshot taken then.
    """

    mode: VolumeMode
    path: str
    disk_path: str
    capacity: int
    virtual_size: int | None
    available: int
    filesystem_overhead: str | None = None
    identity: tuple[int, int] | None = None
    disk_identity: tuple[int, int] | None = None
    incomplete: str | None = None
    follow_symlinks: bool = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], filesystem_overhead: Overhead = 0.06, *,
             follow_symlinks: bool = False) -> Volume:
        """Inspect PATH: a directory is a Filesystem volume, a block device a Block volume.

        PATH itself is not followed if it is a symbolic link (UnsafeVolumeError) unless
        FOLLOW_SYMLINKS (a path the user typed, such as ``/dev/disk/by-id/...``); ``disk.img``
        is never followed.  The identities (device and inode) of the volume and its disk are
        recorded: :func:`clone` refuses a volume that changed in between.

        Raises CloneValidationError for anything else (a regular file, a fifo...), for a
        ``disk.img`` that is not a regular file, and for an invalid FILESYSTEM_OVERHEAD;
        OSError naming the path when it cannot be inspected (FileNotFoundError,
        PermissionError...).  ``incomplete`` describes the unfinished job that left the disk
        marked incomplete, if any.
        """
        p = os.fspath(path)
        fd = _open_volume_path(p, follow_symlinks)
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeVolumeError(f"{p}: a symbolic link; a volume path is never "
                                        f"followed")
            if stat.S_ISBLK(st.st_mode):
                size = _device_size(fd)
                return cls(mode=BLOCK, path=p, disk_path=p, capacity=size, virtual_size=size,
                           available=size, identity=(st.st_rdev, 0),
                           follow_symlinks=follow_symlinks)
            if not stat.S_ISDIR(st.st_mode):
                raise CloneValidationError(
                    f"{p}: {kind(st.st_mode)} is not a volume: expected a directory "
                    f"(Filesystem volume) or a block device (Block volume)")
            try:
                overhead = parse_overhead(filesystem_overhead)
            except ValueError as e:
                raise CloneValidationError(f"{p}: {e}") from None
            disk = os.path.join(p, DISK_IMAGE)
            virtual_size, allocated, disk_id, incomplete = _inspect_disk(fd, disk)
            available = _available_bytes(fd) + allocated
            return cls(mode=FILESYSTEM, path=p, disk_path=disk,
                       capacity=usable_space(available, overhead), virtual_size=virtual_size,
                       available=available, filesystem_overhead=str(filesystem_overhead),
                       identity=(st.st_dev, st.st_ino), disk_identity=disk_id,
                       incomplete=incomplete, follow_symlinks=follow_symlinks)
        finally:
            os.close(fd)

    def open_dir(self) -> int:
        """A directory descriptor of this Filesystem volume, checked to be the directory
        inspected (UnsafeVolumeError otherwise); the caller closes it."""
        fd = open_dir(self.path, follow=self.follow_symlinks)
        st = os.fstat(fd)
        if self.identity is not None and (st.st_dev, st.st_ino) != self.identity:
            os.close(fd)
            raise UnsafeVolumeError(f"{self.path}: the volume changed since it was inspected")
        return fd

    def open_disk(self) -> int:
        """A read-only descriptor of this volume's disk (``disk.img`` reached without
        following links, or the device), checked to be the disk inspected; the caller closes
        it.  UnsafeVolumeError when it changed, CloneValidationError when there is none."""
        if self.mode == BLOCK:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC |
                         (0 if self.follow_symlinks else os.O_NOFOLLOW))
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or (
                    self.identity is not None and st.st_rdev != self.identity[0]):
                os.close(fd)
                raise UnsafeVolumeError(f"{self.path}: the device changed since it was "
                                        f"inspected")
            return fd
        dir_fd = self.open_dir()
        try:
            try:
                fd = open_beneath(dir_fd, DISK_IMAGE, os.O_RDONLY, path=self.disk_path)
            except FileNotFoundError:
                raise CloneValidationError(f"{self.disk_path}: no disk image (the Filesystem "
                                           f"volume has no {DISK_IMAGE})") from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UnsafeVolumeError(f"{self.disk_path}: a symbolic link, not a disk "
                                            f"image; never followed") from None
                raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (
                self.disk_identity is not None
                and (st.st_dev, st.st_ino) != self.disk_identity):
            os.close(fd)
            raise UnsafeVolumeError(f"{self.disk_path}: the disk image changed since it was "
                                    f"inspected")
        return fd

    def describe_capacity(self) -> str:
        """The capacity in words, for messages."""
        if self.mode == BLOCK:
            return f"{format_size(self.capacity)} ({self.capacity} bytes) Block volume"
        return (f"{format_size(self.capacity)} ({self.capacity} bytes) usable of "
                f"{format_size(self.available)} ({self.available} bytes) available with "
                f"filesystem overhead {self.filesystem_overhead}")


@dataclass(frozen=True, slots=True)
class CloneResult:
    """What :func:`clone` did.

    ``source_path``/``target_path`` are the volumes' paths; ``virtual_size`` the disk's size
    (kubevirt) or the apparent size of the regular files copied (archive). ``bytes_written``
    and ``bytes_zeroed`` add up every copy made. ``copy`` is the disk copy's
    :class:`~cdimover.types.CopyResult` (None for archive clones); ``files`` the number of
    entries an archive clone created (directories, regular files, hard links, symlinks; 0 for
    kubevirt) and ``skipped`` the special files it left out. ``disk_size`` is the target
    ``disk.img``'s final size (after ``target_size`` growth), None for a Block target or an
    archive clone.
    """

    source_mode: str
    target_mode: str
    source_path: str
    target_path: str
    virtual_size: int
    bytes_written: int
    bytes_zeroed: int
    preallocation_applied: bool
    elapsed: float
    copy: CopyResult | None
    files: int
    content_type: str = KUBEVIRT
    disk_size: int | None = None
    skipped: tuple[str, ...] = ()


PathOrVolume = Union[str, "os.PathLike[str]", Volume]
"""A volume given as its path or as an opened :class:`Volume`."""


# ---------------------------------------------------------------------------------------------
# In-use detection


def _check_unlocked(fd: int, path: str) -> None:
    """Raise SourceInUseError when another process holds a lock on QEMU's bytes of open FD."""
    holder = qemu_lock_holder(fd)
    if holder is None:
        return
    start, pid = holder
    who = f"process {pid}" if pid > 0 else "another process"
    raise SourceInUseError(
        f"{path}: locked by {who} (a running QEMU?): byte {start} is locked; power the VM off "
        f"first, or pass force=True")


def _check_not_exclusive(fd: int, device: str) -> None:
    """Raise SourceInUseError when block device FD (named DEVICE) is mounted or held with
    O_EXCL.  The O_EXCL probe is closed at once: the copy never holds a source exclusively."""
    try:
        probe = reopen(fd, os.O_RDONLY | os.O_EXCL)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise SourceInUseError(
                f"{device}: the block device is in use (mounted, or held open exclusively by "
                f"another process); power the VM off first, or pass force=True") from None
        raise
    os.close(probe)


def _check_disk_not_in_use(vol: Volume, fd: int) -> None:
    """The in-use checks of VOL's disk, open as FD."""
    if vol.mode == BLOCK:
        _check_not_exclusive(fd, vol.disk_path)
    _check_unlocked(fd, vol.disk_path)


def check_not_in_use(volume: PathOrVolume) -> None:
    """Raise SourceInUseError when VOLUME (a Volume or a path) is in use as a clone source.

    A Block volume is in use when its device is mounted or held open with O_EXCL, or locked by
    QEMU; a Filesystem volume when its ``disk.img`` is locked by QEMU (a running VM, qemu-nbd,
    qemu-img...). A Filesystem volume without ``disk.img`` is never in use. OSError (with the
    path) when the check itself fails.
    """
    vol = volume if isinstance(volume, Volume) else Volume.open(volume)
    if vol.mode == FILESYSTEM and vol.virtual_size is None:
        return
    fd = vol.open_disk()
    try:
        _check_disk_not_in_use(vol, fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Rules


def _check_rules(src: Volume, dst: Volume, content_type: str) -> None:
    """CDI's content-type and volume-mode rules, worded by cdimover.k8s.validate_clone."""
    request = CloneRequest(source_namespace="local", source_name=src.path,
                           target_namespace="local", target_name=dst.path, size=None,
                           volume_mode=dst.mode, content_type=content_type)
    info = SourceInfo(volume_mode=src.mode, virtual_size=src.virtual_size or 0,
                      content_type=content_type)
    problems = validate_clone(request, info)
    if problems:
        raise CloneValidationError(f"{src.path} -> {dst.path}: {'; '.join(problems)}")


def _check_distinct(src: Volume, dst: Volume, *, nested: bool) -> None:
    """Refuse a clone of a volume onto itself and, when NESTED (archive clones copy trees), of a
    directory into or around its own tree."""
    s, d = os.stat(src.path), os.stat(dst.path)
    if src.mode == BLOCK and dst.mode == BLOCK and s.st_rdev == d.st_rdev:
        raise CloneValidationError(f"{src.path} -> {dst.path}: source and target are the same "
                                   f"device")
    if src.mode == FILESYSTEM and dst.mode == FILESYSTEM:
        if (s.st_dev, s.st_ino) == (d.st_dev, d.st_ino):
            raise CloneValidationError(f"{src.path} -> {dst.path}: source and target are the "
                                       f"same directory")
        a, b = os.path.realpath(src.path), os.path.realpath(dst.path)
        if nested and os.path.commonpath([a, b]) in (a, b):
            raise CloneValidationError(f"{src.path} -> {dst.path}: one volume lies inside the "
                                       f"other")


def _too_small(dst: Volume, needed: int, what: str, where: str) -> TargetTooSmallError:
    return TargetTooSmallError.of(where, needed, dst.capacity, what=what,
                                  detail=dst.describe_capacity())


def _resolve_target_size(target_size: int | str | None, source_size: int,
                         dst: Volume) -> int | None:
    """TARGET_SIZE in bytes, checked: Filesystem targets only, never below SOURCE_SIZE
    (CloneValidationError), within the target's capacity (TargetTooSmallError)."""
    if target_size is None:
        return None
    if dst.mode != FILESYSTEM:
        raise CloneValidationError(f"{dst.path}: target_size applies to Filesystem targets "
                                   f"only (a Block volume has the size of its device)")
    try:
        size = parse_quantity(target_size)
    except ValueError as e:
        raise CloneValidationError(f"target_size: {e}") from None
    if size < source_size:
        raise CloneValidationError(
            f"target_size {format_size(size)} ({size} bytes) is smaller than the source's "
            f"virtual size {format_size(source_size)} ({source_size} bytes); a clone never "
            f"shrinks the disk")
    if size > dst.capacity:
        raise _too_small(dst, size, "the requested target_size", dst.disk_path)
    return size


# ---------------------------------------------------------------------------------------------
# Target disk image


def _preallocation_arg(preallocation: bool) -> str:
    return "falloc" if preallocation else "off"


# ---------------------------------------------------------------------------------------------
# clone()


def _as_volume(v: PathOrVolume, overhead: Overhead) -> Volume:
    return v if isinstance(v, Volume) else Volume.open(v, overhead)


def clone(source: PathOrVolume, target: PathOrVolume, *, content_type: str = KUBEVIRT,
          preallocation: bool = False, filesystem_overhead: Overhead = 0.06,
          target_size: int | str | None = None, force: bool = False,
          progress: ProgressFn | None = None, threads: int = 0,
          request_size: int = 0) -> CloneResult:
    """Clone volume SOURCE into volume TARGET (each a path or a :class:`Volume`).

    - CONTENT_TYPE ``"kubevirt"`` copies the disk (``disk.img`` or the device) between any two
      volume modes; ``"archive"`` copies the whole tree of a Filesystem volume into another.
    - PREALLOCATION: reserve every block of the target (``preallocation="falloc"`` for
      :func:`cdimover.copy.copy`); ``preallocation_applied`` reports it.
    - FILESYSTEM_OVERHEAD: CDI's overhead for Filesystem volumes given as paths (a Volume
      carries its own capacity).
    - TARGET_SIZE: grow a Filesystem target's ``disk.img`` to this size (bytes, or a Kubernetes
      quantity such as ``"10Gi"``); never below the source size, within the target's capacity.
    - FORCE: skip the in-use checks of the source.
    - PROGRESS: ``progress(done, total)`` in bytes, as for :func:`cdimover.copy.copy`; a true
      return value cancels (CopyCancelled).
    - THREADS, REQUEST_SIZE: the copy's worker threads and bytes per request (0: defaults).

    Raises, before writing anything: CloneValidationError for a broken rule (content type,
    volume modes, archive with a Block volume, missing source disk, bad TARGET_SIZE, source and
    target the same volume), TargetTooSmallError (with ``required`` and ``available``) when the
    target's usable capacity cannot hold the source's virtual size, SourceInUseError when the
    source is in use. OSError (with the path) and CopyCancelled can come from the copy itself;
    re-running the clone then replaces what was partially written.
    """
    start = time.monotonic()
    if content_type not in _CONTENT_TYPES:
        raise CloneValidationError(
            f"ContentType not one of: kubevirt, archive (got {content_type!r})")
    if not isinstance(preallocation, bool):
        raise TypeError(f"preallocation must be a bool, not {type(preallocation).__name__}")
    try:
        parse_overhead(filesystem_overhead)     # the same rule whether volumes or paths
    except ValueError as e:
        raise CloneValidationError(f"filesystem_overhead: {e}") from None
    src = _as_volume(source, filesystem_overhead)
    dst = _as_volume(target, filesystem_overhead)
    _check_rules(src, dst, content_type)
    _check_distinct(src, dst, nested=content_type == ARCHIVE)
    if content_type == ARCHIVE:
        if target_size is not None:
            raise CloneValidationError("target_size applies to kubevirt clones only")
        return _clone_archive(src, dst, preallocation=preallocation, force=force,
                              progress=progress, start=start)

    if src.virtual_size is None:
        raise CloneValidationError(f"{src.disk_path}: no disk image to clone (the Filesystem "
                                   f"volume has no {DISK_IMAGE})")
    if src.incomplete is not None:
        raise CloneValidationError(f"{src.disk_path}: incomplete: {src.incomplete}; run that "
                                   f"job again before cloning the disk")
    size = src.virtual_size
    if size > dst.capacity:
        raise _too_small(dst, size, "the image", dst.disk_path)
    grow_to = _resolve_target_size(target_size, size, dst)
    src_fd = src.open_disk()
    try:
        if not force:
            _check_disk_not_in_use(src, src_fd)
        with open_source(src.disk_path, fd=src_fd) as opened:
            result = _copy_to_volume(opened, dst, preallocation=preallocation,
                                     progress=progress, grow_to=grow_to, threads=threads,
                                     request_size=request_size)
    finally:
        os.close(src_fd)
    disk_size = result.target_size if dst.mode == FILESYSTEM else None
    return CloneResult(
        source_mode=src.mode, target_mode=dst.mode, source_path=src.path, target_path=dst.path,
        virtual_size=result.virtual_size, bytes_written=result.bytes_written,
        bytes_zeroed=result.bytes_zeroed, preallocation_applied=result.preallocation_applied,
        elapsed=time.monotonic() - start, copy=result, files=0, content_type=KUBEVIRT,
        disk_size=disk_size)


def target_place(dst: Volume) -> tuple[Place, int]:
    """Where a disk goes on volume DST: (place, directory descriptor to close).  On a
    Filesystem volume ``disk.img`` in the volume's directory (checked to be the one
    inspected), created with mode 0660 whatever the umask, never followed; on a Block volume
    the device node, not followed unless the volume was opened following links."""
    if dst.mode == FILESYSTEM:
        dir_fd = dst.open_dir()
        return Place(dir_fd=dir_fd, name=DISK_IMAGE, path=dst.disk_path, mode=DISK_IMAGE_MODE,
                     exact_mode=True), dir_fd
    path = os.path.realpath(dst.path) if dst.follow_symlinks else dst.path
    parent, name = os.path.split(path)
    dir_fd = open_dir(parent or "/", follow=True)
    return Place(dir_fd=dir_fd, name=check_name(name), path=dst.path), dir_fd


def _copy_to_volume(source: Source, dst: Volume, *, preallocation: bool,
                    progress: ProgressFn | None, grow_to: int | None, threads: int,
                    request_size: int) -> CopyResult:
    """Copy the open SOURCE onto volume DST's disk."""
    place, dir_fd = target_place(dst)
    try:
        return copy_disk(source, place, source_format="raw",
                         preallocation=_preallocation_arg(preallocation),
                         progress=progress,
                         target_size=grow_to if dst.mode == FILESYSTEM else None,
                         threads=threads, request_size=request_size)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# Archive clones


def _root_entries(root_fd: int) -> list[str]:
    """The names of the entries of directory ROOT_FD an archive clone copies: all but
    ``lost+found``, sorted."""
    return sorted(n for n in os.listdir(root_fd) if n != _LOST_FOUND)


def _walk_at(dir_fd: int, names: list[str]) -> list[tuple[str, os.stat_result]]:
    """Every entry under NAMES of directory DIR_FD (each included), never following a
    symlink: (relative path, lstat) pairs in pre-order.  Directories are entered by
    descriptor (``O_NOFOLLOW``), one open at a time per level."""
    out: list[tuple[str, os.stat_result]] = []
    # Each frame: the directory's descriptor (ours to close, or DIR_FD), its relative path,
    # and the names still to visit, reversed.
    stack: list[tuple[int, str, list[str]]] = [(dir_fd, "", list(reversed(names)))]
    try:
        while stack:
            fd, rel, todo = stack[-1]
            if not todo:
                stack.pop()
                if fd != dir_fd:
                    os.close(fd)
                continue
            name = todo.pop()
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            path = os.path.join(rel, name)
            out.append((path, st))
            if stat.S_ISDIR(st.st_mode):
                sub = open_dir(name, dir_fd=fd)
                stack.append((sub, path, sorted(os.listdir(sub), reverse=True)))
    finally:
        for fd, _, _ in stack:
            if fd != dir_fd:
                os.close(fd)
    return out


def _tree_sizes(entries: list[tuple[str, os.stat_result]]) -> tuple[int, int]:
    """Apparent and allocated bytes of the regular files among ENTRIES, each inode once."""
    seen: set[tuple[int, int]] = set()
    apparent = allocated = 0
    for _, st in entries:
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


def _freed_by_replacing(entries: list[tuple[str, os.stat_result]]) -> int:
    """Bytes that deleting ENTRIES (target entries about to be replaced) gives back: the
    allocation of regular files with no other name, and of directories."""
    return sum(st.st_blocks * 512 for _, st in entries
               if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1))


def _file_mode(st: os.stat_result) -> int:
    """The mode bits to restore. Ownership is not restored (tar --no-same-owner), so a regular
    file loses set-user-ID and set-group-ID, as POSIX asks of pax in that case; directories keep
    their bits (set-group-ID and sticky there grant no identity)."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return mode


def _open_parent(root_fd: int, rel: str) -> tuple[int, str]:
    """The directory holding relative path REL under ROOT_FD, each component opened without
    following links: (descriptor to close, last component)."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            sub = open_dir(part, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


class _ArchiveCopier:
    """One archive clone's state: the two roots, hard links seen, counters, progress."""

    def __init__(self, src: Volume, src_root: int, dst_root: int, preallocation: bool,
                 progress: ProgressFn | None) -> None:
        self.src = src
        self.src_root = src_root
        self.dst_root = dst_root
        self.total = 0
        self.preallocation = preallocation
        self.progress = progress
        self.done = 0
        self.files = 0
        self.bytes_written = 0
        self.bytes_zeroed = 0
        self.apparent = 0
        self.prealloc_ok = True
        self.links: dict[tuple[int, int], str] = {}
        self.skipped: list[str] = []

    def _file_progress(self) -> ProgressFn | None:
        outer = self.progress
        if outer is None:
            return None
        base, total = self.done, self.total

        def report(done: int, _total: int) -> object:
            return outer(base + done, total)

        return report

    def _link(self, first: str, dfd: int, name: str) -> bool:
        """Make NAME in DFD a hard link to the copy FIRST (relative to the target root)."""
        pfd, pname = _open_parent(self.dst_root, first)
        try:
            os.link(pname, name, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
            return True
        except OSError as e:  # EMLINK, EPERM (protected hardlinks)...: copy instead
            log.debug("%s: hard link to %s failed (%s); copying", name, first, e)
            return False
        finally:
            os.close(pfd)

    def copy_file(self, sfd: int, dfd: int, name: str, rel: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links and self._link(self.links[key], dfd, name):
            self.files += 1
            return
        where = os.path.join(self.src.path, rel)
        fd = open_beneath(sfd, name, os.O_RDONLY, path=where)
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != key or not stat.S_ISREG(fst.st_mode):
                raise UnsafeVolumeError(f"{where}: changed during the clone")
            with open_source(where, fd=fd) as opened:
                result = copy_disk(
                    opened, Place(dir_fd=dfd, name=name, path=rel, mode=_file_mode(st),
                                  exact_mode=True),
                    source_format="raw", reflink="auto",
                    preallocation=_preallocation_arg(self.preallocation),
                    progress=self._file_progress())
        finally:
            os.close(fd)
        os.utime(name, dir_fd=dfd, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        self.bytes_written += result.bytes_written
        self.bytes_zeroed += result.bytes_zeroed
        self.prealloc_ok = self.prealloc_ok and result.preallocation_applied
        self.apparent += st.st_size
        self.done += st.st_size
        if st.st_nlink > 1:
            self.links[key] = rel
        self.files += 1

    def skip(self, rel: str, st: os.stat_result) -> None:
        """Leave out the special file REL (fifo, socket, device), with a warning."""
        path = os.path.join(self.src.path, rel)
        log.warning("%s: skipped %s (an archive clone copies no special files)", path,
                    kind(st.st_mode))
        self.skipped.append(path)

    def _enter(self, sfd: int, dfd: int, name: str) -> tuple[int, int]:
        """Create directory NAME in DFD (private until finished) and open both sides."""
        os.mkdir(name, 0o700, dir_fd=dfd)
        self.files += 1
        sub_s = open_dir(name, dir_fd=sfd)
        try:
            return sub_s, open_dir(name, dir_fd=dfd)
        except BaseException:
            os.close(sub_s)
            raise

    def _one(self, sfd: int, dfd: int, name: str, rel: str,
             st: os.stat_result) -> None:
        """Copy the non-directory entry NAME (REL from the root) from SFD to DFD."""
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            os.utime(name, dir_fd=dfd, ns=(st.st_atime_ns, st.st_mtime_ns),
                     follow_symlinks=False)
            self.files += 1
        elif stat.S_ISREG(st.st_mode):
            self.copy_file(sfd, dfd, name, rel, st)
        else:
            self.skip(rel, st)

    def copy_tree(self, name: str) -> None:
        """Copy root entry NAME, depth first, by descriptors, never following symlinks;
        directory modes and times are set after their children are in place."""
        st = os.stat(name, dir_fd=self.src_root, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            self._one(self.src_root, self.dst_root, name, name, st)
            return
        # Frames: (source fd, target fd, relative path, lstat, names left reversed).
        sfd, dfd = self._enter(self.src_root, self.dst_root, name)
        stack = [(sfd, dfd, name, st, sorted(os.listdir(sfd), reverse=True))]
        try:
            while stack:
                sfd, dfd, rel, dst_st, todo = stack[-1]
                if not todo:
                    stack.pop()
                    os.fchmod(dfd, _file_mode(dst_st))
                    os.utime(dfd, ns=(dst_st.st_atime_ns, dst_st.st_mtime_ns))
                    os.close(sfd)
                    os.close(dfd)
                    continue
                child = todo.pop()
                crel = os.path.join(rel, child)
                cst = os.stat(child, dir_fd=sfd, follow_symlinks=False)
                if stat.S_ISDIR(cst.st_mode):
                    a, b = self._enter(sfd, dfd, child)
                    stack.append((a, b, crel, cst, sorted(os.listdir(a), reverse=True)))
                else:
                    self._one(sfd, dfd, child, crel, cst)
        finally:
            for sfd, dfd, _, _, _ in stack:
                os.close(sfd)
                os.close(dfd)


def _clone_archive(src: Volume, dst: Volume, *, preallocation: bool, force: bool,
                   progress: ProgressFn | None, start: float) -> CloneResult:
    """The archive clone of Filesystem volume SRC into Filesystem volume DST, by
    descriptors: both roots are opened once (and checked to be the volumes inspected) and
    every entry is reached from them without following a link."""
    src_root = src.open_dir()
    try:
        dst_root = dst.open_dir()
        try:
            return _clone_archive_at(src, dst, src_root, dst_root, preallocation=preallocation,
                                     force=force, progress=progress, start=start)
        finally:
            os.close(dst_root)
    finally:
        os.close(src_root)


def _clone_archive_at(src: Volume, dst: Volume, src_root: int, dst_root: int, *,
                      preallocation: bool, force: bool, progress: ProgressFn | None,
                      start: float) -> CloneResult:
    copier = _ArchiveCopier(src, src_root, dst_root, preallocation, progress)
    names = []
    for name in _root_entries(src_root):
        st = os.stat(name, dir_fd=src_root, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            names.append(name)
        else:
            copier.skip(name, st)   # and the target's entry stays
    entries = _walk_at(src_root, names)
    apparent, allocated = _tree_sizes(entries)
    needed = apparent if preallocation else allocated
    existing = set(os.listdir(dst_root))
    old = _walk_at(dst_root, [n for n in names if n in existing])
    # Volume.capacity already counts an existing disk.img's allocation; count the rest.
    freed = _freed_by_replacing([(p, st) for p, st in old if p != DISK_IMAGE])
    room = dst
    if freed:
        overhead = dst.filesystem_overhead or DEFAULT_OVERHEAD
        available = dst.available + freed
        room = Volume(mode=dst.mode, path=dst.path, disk_path=dst.disk_path,
                      capacity=usable_space(available, overhead), virtual_size=dst.virtual_size,
                      available=available, filesystem_overhead=overhead)
    if needed > room.capacity:
        raise _too_small(room, needed, "the volume tree", dst.path)
    if not force:
        check_not_in_use(src)

    copier.total = apparent
    for name in names:
        remove_beneath(dst_root, name)
        copier.copy_tree(name)
    fsync_dir(dst_root)
    return CloneResult(
        source_mode=src.mode, target_mode=dst.mode, source_path=src.path, target_path=dst.path,
        virtual_size=copier.apparent, bytes_written=copier.bytes_written,
        bytes_zeroed=copier.bytes_zeroed,
        preallocation_applied=preallocation and copier.prealloc_ok,
        elapsed=time.monotonic() - start, copy=None, files=copier.files, content_type=ARCHIVE,
        skipped=tuple(copier.skipped))
