"""Operating-system helpers shared by the modules that open endpoints: descriptors instead of
paths.

Volumes belong to tenants, so a path inside one is resolved once, relative to a directory
descriptor, never following a symbolic link (``O_NOFOLLOW`` on every component opened), and
what was opened is used by descriptor from then on.  A second descriptor of the same file
(the ``O_DIRECT`` twin, an exclusive claim) is made by reopening ``/proc/self/fd/N``, which
names the open file itself, never a path that could have been swapped in between.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "open_direct",
    "reopen",
    "open_dir",
    "open_beneath",
    "check_name",
    "remove_beneath",
    "fsync_dir",
    "kind",
]

_NOFOLLOW_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def reopen(fd: int, flags: int) -> int:
    """A new open file description of the file FD refers to, with FLAGS (``O_CLOEXEC``
    added).  Goes through ``/proc/self/fd/FD``: the file FD has open, whatever its path now
    names.  OSError when /proc is not mounted or the flags are refused."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def open_direct(fd: int, flags: int) -> int:
    """An ``O_DIRECT`` twin of open descriptor FD opened with FLAGS, or -1 where the
    filesystem refuses ``O_DIRECT`` (tmpfs and others) or /proc is missing: the core then
    uses the buffered descriptor alone."""
    try:
        return reopen(fd, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            return -1
        raise


def check_name(name: str, what: str = "name") -> str:
    """NAME if it is one path component (no ``/``, not empty, ``.`` or ``..``); else
    ValueError."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"{what} {name!r} is not a single path component")
    return name


def open_dir(path: str, *, dir_fd: int | None = None, follow: bool = False) -> int:
    """Open directory PATH (relative to DIR_FD when given) for use as a ``dir_fd``.  Its last
    component is not followed unless FOLLOW: a symlink raises OSError(ELOOP) or
    NotADirectoryError, naming PATH."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP or (
                e.errno == errno.ENOTDIR and not follow
                and stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)):
            raise OSError(errno.ELOOP, "is a symbolic link, which is never followed here",
                          path) from None
        raise


def open_beneath(dir_fd: int, name: str, flags: int, mode: int = 0o600, *,
                 path: str | None = None) -> int:
    """Open NAME, one component inside directory DIR_FD, with FLAGS plus ``O_NOFOLLOW`` and
    ``O_CLOEXEC``; a FIFO never blocks the open (``O_NONBLOCK`` is used for the open and
    cleared after).  PATH names the file in errors.  A symlink raises OSError(ELOOP)."""
    check_name(name)
    fd = -1
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=dir_fd)
    except OSError as e:
        where = path or name
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, which is never followed here",
                          where) from None
        raise OSError(e.errno, e.strerror, where) from None
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def remove_beneath(dir_fd: int, name: str) -> None:
    """Remove entry NAME of DIR_FD whatever it is, never following a symlink; a directory is
    removed with its whole tree, depth first with an explicit stack (no recursion limit), each
    level opened with ``O_NOFOLLOW``.  A missing entry is not an error."""
    check_name(name)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        return
    fd = open_dir(name, dir_fd=dir_fd)
    # Frames: (parent descriptor, name in it, the directory's descriptor, children left).
    stack: list[tuple[int, str, int, list[str]]] = [(dir_fd, name, fd, os.listdir(fd))]
    try:
        while stack:
            pfd, pname, dfd, children = stack[-1]
            if not children:
                stack.pop()
                os.close(dfd)
                os.rmdir(pname, dir_fd=pfd)
                continue
            child = children.pop()
            try:
                cst = os.stat(child, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(cst.st_mode):
                cfd = open_dir(child, dir_fd=dfd)
                stack.append((dfd, child, cfd, os.listdir(cfd)))
            else:
                os.unlink(child, dir_fd=dfd)
    finally:
        for _, _, dfd, _ in stack:
            os.close(dfd)


def fsync_dir(dir_fd: int) -> None:
    """fsync directory DIR_FD so a rename or creation in it is durable; filesystems that
    cannot sync a directory (EINVAL) are ignored."""
    try:
        os.fsync(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):
            raise


def kind(mode: int) -> str:
    """The file type of MODE in words, for messages."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"
