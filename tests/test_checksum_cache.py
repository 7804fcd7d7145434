"""The import's checksum pass leaves no page cache behind: a 256 MiB source hashed, then its
resident pages counted with mincore(2) on a mapping of the file."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import os
from pathlib import Path

from cdimover.pod.config import Checksum
from cdimover.pod.progress import Hasher as _Hasher
from conftest import need

MiB = 1 << 20
PAGE = mmap.PAGESIZE
SIZE = 256 * MiB

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: Path) -> int:
    """Bytes of PATH in the page cache: mincore(2) over a read-only shared mapping (mapping
    faults nothing in)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr != _MAP_FAILED, os.strerror(ctypes.get_errno())
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in bytes(vec)) * PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_hashing_drops_what_it_read_from_the_page_cache(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    h = hashlib.sha256()
    with open(source, "wb") as f:
        for i in range(SIZE // (16 * MiB)):
            chunk = os.urandom(16 * MiB)
            h.update(chunk)
            f.write(chunk)
    drop(source)
    need(resident_bytes(source) < 4 * MiB, "a filesystem whose clean pages can be dropped")
    # Plain reads do stay cached here, so the check below can tell the difference.
    with open(source, "rb") as f:
        f.read(32 * MiB)
    need(resident_bytes(source) >= 30 * MiB, "a page cache that keeps what was read")
    drop(source)

    done: list[int] = []
    hasher = _Hasher(str(source), Checksum("sha256", h.hexdigest()),
                     lambda n, total: done.append(n)).start()
    hasher.verify()   # raises on a mismatch
    assert done[-1] == SIZE
    assert resident_bytes(source) < 8 * MiB
