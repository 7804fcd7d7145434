"""Disk layouts for tests: segments of data, zeros written as data, and holes; builders for
files and oracles for bytes and allocation."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from hypothesis import strategies as st

BLOCK = 4096


@dataclass(frozen=True)
class Segment:
    kind: str      # "data" | "zero" | "hole"
    length: int


@dataclass(frozen=True)
class Layout:
    segments: tuple[Segment, ...]
    seed: int

    @property
    def size(self) -> int:
        return sum(s.length for s in self.segments)


def layouts(max_segments: int = 12, max_len: int = 1 << 20, align: int = 1,
            min_size: int = 1) -> st.SearchStrategy[Layout]:
    """Layouts whose segment lengths are multiples of ALIGN (1 = any byte count)."""
    seg = st.builds(
        Segment,
        st.sampled_from(["data", "zero", "hole"]),
        st.integers(1, max(1, max_len // align)).map(lambda n: n * align)
        | st.sampled_from([BLOCK, 2 * BLOCK, 65536]).map(lambda n: max(align, n)),
    )
    return st.builds(Layout, st.lists(seg, min_size=1, max_size=max_segments).map(tuple),
                     st.integers(0, 2**32 - 1)).filter(lambda lay: lay.size >= min_size)


def write_layout(path: str | os.PathLike[str], layout: Layout, *, fd: int | None = None) -> None:
    """Write LAYOUT into a new file at PATH (or over the first bytes of open FD)."""
    rng = random.Random(layout.seed)
    own = fd is None
    if own:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, layout.size)
    assert fd is not None
    try:
        pos = 0
        for s in layout.segments:
            if s.kind == "data":
                data = bytearray(rng.randbytes(s.length))
                # Keep every 512-byte piece non-zero so "data" never reads as zeros.
                for i in range(0, s.length, 512):
                    data[i] = data[i] | 1
                os.pwrite(fd, bytes(data), pos)
            elif s.kind == "zero" or not own:
                os.pwrite(fd, bytes(s.length), pos)
            pos += s.length
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of the whole file at PATH, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_prefix(path: str | os.PathLike[str], size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    assert left == 0, f"{path} is shorter than {size} bytes"
    return h.hexdigest()


def data_map(path: str | os.PathLike[str], start: int = 0,
             end: int | None = None) -> list[tuple[int, int]]:
    """Allocated (SEEK_DATA) ranges of a regular file within [START, END)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if end is None else min(end, size)
        out = []
        pos = start
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if d >= end:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
            out.append((d, h))
            pos = h
        return out
    finally:
        os.close(fd)


def nonzero_blocks(path: str | os.PathLike[str], size: int, block: int = BLOCK) -> set[int]:
    """Indices of BLOCK-sized blocks of PATH's first SIZE bytes that hold a non-zero byte."""
    out = set()
    with open(path, "rb") as f:
        i = 0
        while i * block < size:
            chunk = f.read(min(block, size - i * block))
            if chunk.count(0) != len(chunk):
                out.add(i)
            i += 1
    return out


def allocated_blocks(path: str | os.PathLike[str], start: int, size: int,
                     block: int = BLOCK) -> set[int]:
    """Block indices (relative to START) of PATH allocated within [START, START+SIZE)."""
    out = set()
    for a, b in data_map(path, start, start + size):
        first = (a - start) // block
        last = (b - start - 1) // block
        out.update(range(first, last + 1))
    return out
