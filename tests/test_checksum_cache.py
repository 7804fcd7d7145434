"""The import's checksum pass leaves no page cache behind: a 256 MiB source hashed, then its
resident pages counted with mincore(2) on a mapping of the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cdimover.pod.config import Checksum
from cdimover.pod.progress import Hasher as _Hasher
from conftest import need
from pagecache import drop, resident_bytes

MiB = 1 << 20
SIZE = 256 * MiB


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
