"""Who else is using a disk: QEMU's image locks, exclusive block-device claims, and the locks
cdimover's own jobs hold while they run.

**QEMU.**  QEMU's ``file-posix`` driver takes shared OFD locks on single bytes from
``RAW_LOCK_PERM_BASE`` (100, one byte per permission it holds) and ``RAW_LOCK_SHARED_BASE``
(200, one byte per permission it does not share) of an image (``raw_apply_lock_bytes`` in
``block/file-posix.c``).  A write-lock probe with ``F_OFD_GETLK`` over those bytes finds them
without taking a lock: :func:`qemu_lock_holder`.

**Block devices.**  Opening a block device with ``O_EXCL`` claims it for the whole kernel: it
fails with EBUSY while the device is mounted, part of an active device-mapper or MD device, or
claimed by another exclusive opener.  A job's *target* device is claimed for the whole job, so
a mounted device is never written and two jobs never write one device; a *source* device is
only probed (two clones may read one golden volume at once).

**cdimover's own jobs.**  A job takes an OFD lock on byte :data:`JOB_LOCK_BYTE` of each file it
uses -- shared on a source, exclusive on a target -- for as long as the descriptor is open
(an OFD lock belongs to the open file description: it is released when the job closes the
file or its process dies, never leaked by a kill).  Two jobs writing one file, or one writing
a file another reads, fail at once instead of interleaving.  The byte lies far past QEMU's, so
it never looks like a running VM to QEMU or to :func:`qemu_lock_holder`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

from .fs import reopen

__all__ = [
    "RAW_LOCK_PERM_BASE",
    "RAW_LOCK_SHARED_BASE",
    "JOB_LOCK_BYTE",
    "qemu_lock_holder",
    "lock_job",
    "claim_device",
]

RAW_LOCK_PERM_BASE: Final = 100
RAW_LOCK_SHARED_BASE: Final = 200
JOB_LOCK_BYTE: Final = 0x43444D00   # "CDM\0": past any lock byte QEMU uses
_LOCK_SPAN: Final = 64              # QEMU's permission mask fits in 64 bits

# From <fcntl.h> on Linux (the fcntl module has them from Python 3.9 on some builds only).
_F_OFD_GETLK: Final = int(getattr(fcntl, "F_OFD_GETLK", 36))
_F_OFD_SETLK: Final = int(getattr(fcntl, "F_OFD_SETLK", 37))
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid, padded
# to the alignment of off_t ("0q").
_FLOCK: Final = struct.Struct("@hhqqi0q")
# Errors meaning "this filesystem or kernel cannot answer a lock query": no verdict, no refusal.
NO_LOCK_INFO: Final = frozenset({errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP,
                                 errno.ENOSYS, errno.EBADF})


def qemu_lock_holder(fd: int) -> tuple[int, int] | None:
    """Probe QEMU's lock bytes of open FD with F_OFD_GETLK: (first locked byte, l_pid) of a
    conflicting lock, or None when none is found or the system cannot tell.  l_pid is -1 for
    OFD locks (QEMU's), a process id for classic POSIX locks."""
    for base in (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE):
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, base, _LOCK_SPAN, 0)
        try:
            answer = fcntl.fcntl(fd, _F_OFD_GETLK, query)
        except OSError as e:
            if e.errno in NO_LOCK_INFO:
                return None
            raise
        l_type, _whence, l_start, _len, l_pid = _FLOCK.unpack(answer)
        if l_type != fcntl.F_UNLCK:
            return l_start, l_pid
    return None


def lock_job(fd: int, *, exclusive: bool) -> bool:
    """Take cdimover's job lock on FD without waiting: exclusive for a target, shared for a
    source.  True when taken, False when another job holds a conflicting lock; True too when
    the filesystem has no locks (nothing to honour there).  OSError for other failures."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, JOB_LOCK_BYTE, 1, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in NO_LOCK_INFO:
            return True
        raise
    return True


def claim_device(fd: int, flags: int = os.O_RDONLY) -> int:
    """A new descriptor (opened with FLAGS) of the block device FD refers to, claiming the
    device exclusively (``O_EXCL``) for as long as it stays open.  OSError(EBUSY) when the
    device is mounted or claimed already."""
    return reopen(fd, flags | os.O_EXCL)
