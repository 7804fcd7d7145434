"""Tar extraction beneath a directory descriptor: every member created with ``*at`` calls, no
link ever followed, nothing written outside the destination.

``tarfile`` parses the archive (streaming mode ``r|*``: plain, gzip, bzip2 or xz, from any
readable stream, seekable or not); every filesystem write is made here, relative to a
directory descriptor the caller opened with :func:`open_dir_nofollow`:

- A member's path is walked one component at a time, each directory opened with
  ``O_DIRECTORY|O_NOFOLLOW`` relative to its parent's descriptor.  A path that goes through a
  symbolic link -- one that was there before or one the archive created -- is refused, so a
  chain of links (CVE-2025-4517) cannot lead a write anywhere; link targets are never
  resolved, by this code or by the kernel.
- Refused with :class:`~cdimover.errors.UnsafeArchiveError`: absolute names, a ``..``
  component, an empty name, NUL bytes, device nodes, FIFOs and unknown member types, hard
  links to anything but a regular file this archive extracted, and members beyond
  :class:`Limits`.  A malformed or truncated archive is refused the same way.
- Regular files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (an existing file or symlink
  of that name is unlinked first, never opened) and written sparse: 4 KiB blocks of zeros
  become holes.  GNU and PAX sparse members (``tar -S``) come out with their holes.
- Symbolic links are created as they are in the archive, whatever they point at; they are
  never followed while extracting.  A directory member replaces a file or symlink of its
  name; a file, link or symlink member whose name is an existing directory is an
  ``IsADirectoryError``.
- Ownership is never restored (``tar --no-same-owner``).  Permission bits are masked to
  ``0o777`` (no setuid, setgid or sticky bits), with at least ``0o600`` for a file's owner
  and ``0o700`` for a directory's owner (so that a later run, or the removal of a rejected
  import, can enter and replace what was extracted without privileges).  Modification times
  are restored; a directory's mode and time are applied after its content.
- Every file written and every directory modified is fsynced before :func:`extract_tar`
  returns: what it reports is durable.

The code depends on no extraction filter (``tarfile.data_filter``, ``filter=``): it behaves
the same on every Python the package supports.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, BinaryIO, Final, cast

from ..errors import UnsafeArchiveError
from .fs import open_dir, remove_beneath

__all__ = [
    "Limits",
    "ExtractResult",
    "extract_tar",
    "open_dir_nofollow",
    "remove_entries",
    "CheckedTarInfo",
]

_BLOCK: Final = 4096
_CHUNK: Final = 1 << 20
_ZERO: Final = bytes(_BLOCK)
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NS_MAX: Final = (1 << 63) - 1
# tarfile's stream reads: larger than its 10 KiB default for fewer calls on big members; not
# much larger, since it copies its buffer's remainder on every read of a small member.
_STREAM_BUFFER: Final = 64 << 10
# Header members tarfile reads whole into memory before it hands out the next member.
_HEADER_TYPES: Final = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                        tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one archive may create; a member beyond one is refused.

    ``max_members``: entries of any kind.  ``max_total_bytes``: the sum of the regular
    files' sizes (holes included).  ``max_path_length``: bytes of a member's name (and of a
    symlink's target).  ``max_depth``: components of a member's name.  ``max_header_bytes``:
    a PAX or GNU long-name header, which the parser holds in memory.
    """

    max_members: int = 1_000_000
    max_total_bytes: int = 1 << 44
    max_path_length: int = 4095
    max_depth: int = 128
    max_header_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What :func:`extract_tar` created.

    ``files``, ``dirs``, ``symlinks``, ``hardlinks``: entries created (directories include
    those made for a member's missing parents, not those that existed).  ``size``: the sum of
    the regular files' sizes; ``bytes_written``: the data written to them (holes excluded).
    ``entries``: the names, in the destination directory itself, that the archive created or
    replaced, in order -- what to remove to undo the extraction.  A directory that existed
    and was only extracted into is not listed.
    """

    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    size: int
    bytes_written: int
    entries: tuple[str, ...]


def open_dir_nofollow(path: str | os.PathLike[str]) -> int:
    """Open the directory PATH (``O_DIRECTORY|O_NOFOLLOW``) and return its descriptor, which
    the caller closes.  A symbolic link as PATH's last component is refused: ELOOP naming
    PATH; anything but a directory: NotADirectoryError."""
    return open_dir(os.fspath(path))


class _HeaderLimitedInfo(tarfile.TarInfo):
    """A TarInfo whose PAX and GNU long-name headers are refused above a size, before the
    parser reads them into memory, and for which a short or corrupt header is an error:
    tarfile would end the archive there, silently, after the members it has read."""

    max_header_bytes = Limits().max_header_bytes

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str,
                errors: str) -> _HeaderLimitedInfo:
        if len(buf) != tarfile.BLOCKSIZE:
            raise UnsafeArchiveError("truncated archive: it ends without an end-of-archive "
                                     "block, or inside a header")
        if buf.count(0) == tarfile.BLOCKSIZE:
            return super().frombuf(buf, encoding, errors)  # the end-of-archive block: raises
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as e:
            raise UnsafeArchiveError(f"malformed archive: a header is corrupt ({e})") from None

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > self.max_header_bytes:
            raise UnsafeArchiveError(
                f"an extended header of {self.size} bytes exceeds the limit of "
                f"{self.max_header_bytes}")
        return cast(tarfile.TarInfo,
                    tarfile.TarInfo._proc_member(self, tf))  # type: ignore[attr-defined]


class _CountingReader:
    """STREAM's read(), counting the bytes read."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.count += len(data)
        return data


CheckedTarInfo = _HeaderLimitedInfo
"""For ``tarfile.open(tarinfo=...)``: extended headers bounded, corrupt or short headers an
error (tarfile alone would end the archive there, silently)."""


def _refuse(name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"unsafe archive member {name!r}: {why}")


def _ns(seconds: float) -> int:
    """A member's mtime in nanoseconds, clamped to what utimensat accepts."""
    return min(max(int(seconds * 1_000_000_000), 0), _NS_MAX)


class _Extractor:
    """One extraction beneath ROOT (a directory descriptor, not owned)."""

    def __init__(self, root: int, limits: Limits) -> None:
        self.root = root
        self.limits = limits
        self.files = self.dirs = self.symlinks = self.hardlinks = 0
        self.members = 0
        self.size = 0
        self.bytes_written = 0
        self.entries: dict[str, None] = {}
        # Regular files of this archive, by (st_dev << 64 | st_ino): hard link targets.
        self._inodes: set[int] = set()
        # Directories whose entries changed (fsynced at the end), and directory members whose
        # mode and mtime are applied after their content.
        self._modified: set[tuple[str, ...]] = {()}
        self._dir_attrs: dict[tuple[str, ...], tuple[int, int]] = {}
        self._cached: tuple[tuple[str, ...], int] | None = None

    # -- paths ---------------------------------------------------------------------------

    def split(self, name: str, member: str, what: str = "name") -> tuple[str, ...]:
        """NAME (MEMBER's name, or its hard link target: WHAT says which) as components
        beneath the root: refused when absolute, empty, with a ``..`` or a NUL, or beyond
        the limits."""
        if name == "":
            raise _refuse(member, f"an empty {what}")
        if "\0" in name:
            raise _refuse(member, f"a NUL byte in the {what}")
        if name.startswith("/"):
            raise _refuse(member, f"an absolute {what}")
        if len(os.fsencode(name)) > self.limits.max_path_length:
            raise _refuse(member, f"the {what} is longer than {self.limits.max_path_length} "
                          f"bytes")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise _refuse(member, f"a '..' component in the {what}")
        if len(parts) > self.limits.max_depth:
            raise _refuse(member, f"the {what} is deeper than {self.limits.max_depth} "
                          f"components")
        return parts

    def open_dir(self, parts: tuple[str, ...], name: str, *, create: bool) -> int:
        """A new descriptor of the directory PARTS beneath the root, reached without
        following any link; missing directories are made when CREATE (mode 0755 less the
        umask, like tar), else FileNotFoundError.  NAME, the member, is for messages."""
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT),
                                      "/".join(parts[:i + 1])) from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._created(parts[:i], part)
                    self.dirs += 1
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[:i + 1])
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise _refuse(name, f"its path goes through the symbolic link "
                                      f"{where!r}, which is never followed") from None
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                             where) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, parts: tuple[str, ...], name: str) -> int:
        """The descriptor of the directory that holds PARTS[-1] (made when missing), kept
        until the next call; the caller does not close it."""
        key = parts[:-1]
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self.close()
        fd = self.open_dir(key, name, create=True)
        self._cached = (key, fd)
        return fd

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _created(self, dir_parts: tuple[str, ...], leaf: str) -> None:
        """Record that LEAF was created or replaced in the directory DIR_PARTS."""
        self._modified.add(dir_parts)
        if not dir_parts:
            self.entries[leaf] = None

    def clear(self, dfd: int, leaf: str, parts: tuple[str, ...],
              name: str) -> os.stat_result | None:
        """Make room for a non-directory member at LEAF in DFD: unlink a file or symlink
        there (never following it); IsADirectoryError for a directory.  The stat of what
        was there, or None."""
        try:
            st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way of the archive "
                                    "member", name)
        os.unlink(leaf, dir_fd=dfd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            self._inodes.discard(st.st_dev << 64 | st.st_ino)  # gone: its number may recur
        self._modified.add(parts[:-1])
        return st

    # -- members -------------------------------------------------------------------------

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo,
               progress: Callable[[], None] | None) -> None:
        """Create the member M (its data read from TF)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise _refuse(m.name, f"the archive has more than {self.limits.max_members} "
                          f"members")
        if m.ischr() or m.isblk():
            raise _refuse(m.name, "a device node")
        if m.isfifo():
            raise _refuse(m.name, "a FIFO")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise _refuse(m.name, f"an unsupported member type {m.type!r}")
        parts = self.split(m.name, m.name)
        if not parts:
            if m.isdir():
                return  # "./": the destination itself, whose mode and time are kept
            raise _refuse(m.name, "an empty name")
        try:
            if m.isdir():
                self.directory(parts, m)
            elif m.issym():
                self.symlink(parts, m)
            elif m.islnk():
                self.hardlink(parts, m)
            else:
                self.regular(tf, parts, m, progress)
        except OSError as e:
            if e.filename is None or e.filename == parts[-1]:
                raise OSError(e.errno, e.strerror, m.name) from e
            raise

    def directory(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        dfd = self.parent(parts, m.name)
        leaf = parts[-1]
        try:
            os.mkdir(leaf, 0o700, dir_fd=dfd)
        except FileExistsError:
            st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(leaf, dir_fd=dfd)
                os.mkdir(leaf, 0o700, dir_fd=dfd)
                self._created(parts[:-1], leaf)
                self.dirs += 1
        else:
            self._created(parts[:-1], leaf)
            self.dirs += 1
        self._dir_attrs[parts] = ((m.mode & 0o777) | 0o700, _ns(m.mtime))

    def symlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        target = m.linkname
        if target == "":
            raise _refuse(m.name, "a symbolic link with an empty target")
        if "\0" in target:
            raise _refuse(m.name, "a NUL byte in the symbolic link's target")
        if len(os.fsencode(target)) > self.limits.max_path_length:
            raise _refuse(m.name, f"a symbolic link target longer than "
                          f"{self.limits.max_path_length} bytes")
        dfd = self.parent(parts, m.name)
        leaf = parts[-1]
        self.clear(dfd, leaf, parts, m.name)
        os.symlink(target, leaf, dir_fd=dfd)
        self._created(parts[:-1], leaf)
        t = _ns(m.mtime)
        os.utime(leaf, ns=(t, t), dir_fd=dfd, follow_symlinks=False)
        self.symlinks += 1

    def hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        target = self.split(m.linkname, m.name, "hard link target")
        if not target:
            raise _refuse(m.name, "a hard link to the destination directory")
        try:
            tfd = self.open_dir(target[:-1], m.name, create=False)
        except FileNotFoundError:
            raise _refuse(m.name, f"a hard link to {m.linkname!r}, which this archive did "
                          f"not extract") from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode) or \
                    (st.st_dev << 64 | st.st_ino) not in self._inodes:
                raise _refuse(m.name, f"a hard link to {m.linkname!r}, which is not a "
                              f"regular file extracted from this archive")
            dfd = self.parent(parts, m.name)
            leaf = parts[-1]
            try:
                old: os.stat_result | None = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is None or (old.st_dev, old.st_ino) != (st.st_dev, st.st_ino):
                self.clear(dfd, leaf, parts, m.name)
                os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=dfd,
                        follow_symlinks=False)
        finally:
            os.close(tfd)
        self._created(parts[:-1], leaf)
        self.hardlinks += 1

    def regular(self, tf: tarfile.TarFile, parts: tuple[str, ...], m: tarfile.TarInfo,
                progress: Callable[[], None] | None) -> None:
        if self.size + m.size > self.limits.max_total_bytes:
            raise _refuse(m.name, f"the files' sizes add up to more than "
                          f"{self.limits.max_total_bytes} bytes")
        self.size += m.size
        dfd = self.parent(parts, m.name)
        leaf = parts[-1]
        self.clear(dfd, leaf, parts, m.name)
        fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=dfd)
        self._created(parts[:-1], leaf)
        try:
            src = tf.extractfile(m)
            if src is None:  # not reachable for a regular member
                raise _refuse(m.name, "no data")
            done = self._write_sparse(fd, src, m, progress)
            if done != m.size:
                raise UnsafeArchiveError(f"truncated archive: member {m.name!r} has "
                                         f"{done} of its {m.size} bytes")
            os.ftruncate(fd, m.size)
            os.fchmod(fd, (m.mode & 0o777) | 0o600)
            t = _ns(m.mtime)
            os.utime(fd, ns=(t, t))
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._inodes.add(st.st_dev << 64 | st.st_ino)
        self.files += 1

    def _write_sparse(self, fd: int, src: IO[bytes], m: tarfile.TarInfo,
                      progress: Callable[[], None] | None) -> int:
        """Copy SRC to FD, 4 KiB blocks of zeros left as holes; the bytes read."""
        pos = 0
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                return pos
            n = len(chunk)
            start = -1  # the first block of the data run being gathered
            for off in range(0, n, _BLOCK):
                end = min(off + _BLOCK, n)
                if chunk[off:end] == _ZERO[:end - off]:
                    if start >= 0:
                        self._pwrite(fd, chunk, start, off, pos)
                        start = -1
                elif start < 0:
                    start = off
            if start >= 0:
                self._pwrite(fd, chunk, start, n, pos)
            pos += n
            if progress is not None:
                progress()

    def _pwrite(self, fd: int, chunk: bytes, start: int, end: int, pos: int) -> None:
        view = memoryview(chunk)[start:end]
        at = pos + start
        while view:
            k = os.pwrite(fd, view, at)
            view = view[k:]
            at += k
            self.bytes_written += k

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """Apply the directory members' modes and times, deepest first, then fsync every
        directory modified."""
        self.close()
        for parts in sorted(self._dir_attrs, key=len, reverse=True):
            mode, t = self._dir_attrs[parts]
            fd = self.open_dir(parts, "/".join(parts), create=False)
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(t, t))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._modified.discard(parts)
        for parts in sorted(self._modified, key=len, reverse=True):
            fd = self.open_dir(parts, "/".join(parts), create=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def result(self) -> ExtractResult:
        return ExtractResult(files=self.files, dirs=self.dirs, symlinks=self.symlinks,
                             hardlinks=self.hardlinks, size=self.size,
                             bytes_written=self.bytes_written, entries=tuple(self.entries))


def extract_tar(stream: BinaryIO, dest_dir_fd: int, *, limits: Limits = Limits(),
                progress: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract the tar archive read from STREAM (plain, gzip, bzip2 or xz; read once, front
    to back, never seeked) beneath the directory DEST_DIR_FD (open it with
    :func:`open_dir_nofollow`; not closed here), as the module docstring says.

    PROGRESS, when given, is called with the number of bytes read from STREAM so far, after
    each member and each MiB of a file's data; an exception it raises stops the extraction.
    Returns what was created, all of it durable.  Raises UnsafeArchiveError for a refused
    member or a malformed archive (members before it stay extracted), OSError naming the
    member for a system failure (ENOSPC...)."""
    reader = _CountingReader(stream)
    ex = _Extractor(dest_dir_fd, limits)

    class _Info(_HeaderLimitedInfo):
        max_header_bytes = limits.max_header_bytes

    def counted() -> None:
        if progress is not None:
            progress(reader.count)
    report: Callable[[], None] | None = counted if progress is not None else None
    try:
        with tarfile.open(fileobj=cast(BinaryIO, reader), mode="r|*", tarinfo=_Info,
                          bufsize=_STREAM_BUFFER) as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                # Streaming: nothing refers back to earlier members, so none is kept.
                tf.members.clear()  # type: ignore[attr-defined]
                ex.member(tf, m, report)
                if report is not None:
                    report()
        ex.finish()
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchiveError(f"malformed archive: {e}") from e
    finally:
        ex.close()
    return ex.result()


def remove_entries(dir_fd: int, names: Iterable[str]) -> None:
    """Remove each of NAMES (single components) from the directory DIR_FD, a directory with
    everything beneath it, never following a symbolic link; names already gone are skipped.
    ValueError for a name that is not a single component."""
    for name in names:
        remove_beneath(dir_fd, name)
    os.fsync(dir_fd)
