"""Result types and the enums that mirror the C core's constants."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from ._native import const

__all__ = ["ScanMethod", "ZeroMethod", "AllocMethod", "Extent", "CopyResult", "PreallocResult",
           "PREALLOCATION_MODES"]

PREALLOCATION_MODES = {"off": const("CDM_PREALLOC_OFF"), "falloc": const("CDM_PREALLOC_FALLOC"),
                       "full": const("CDM_PREALLOC_FULL")}


_M = TypeVar("_M", bound="_Method")


class _Method(enum.IntEnum):
    """A C enum of strategies: a label for people and JSON, and the decoding of the core's
    bit masks (bit 1 << value for each strategy used)."""

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_mask(cls: type[_M], mask: int) -> tuple[_M, ...]:
        return tuple(m for m in cls if m.value != 0 and mask & (1 << m.value))


class ScanMethod(_Method):
    """How the source's extents were found."""

    NONE = const("CDM_SCAN_NONE")
    SEEK_HOLE = const("CDM_SCAN_SEEK_HOLE")
    LOOP_BACKING = const("CDM_SCAN_LOOP_BACKING")
    FULL_READ = const("CDM_SCAN_FULL_READ")
    REFLINK = const("CDM_SCAN_REFLINK")
    QCOW2 = const("CDM_SCAN_QCOW2")


class ZeroMethod(_Method):
    """How zero ranges were made on the target."""

    NONE = const("CDM_ZERO_NONE")
    PUNCH_HOLE = const("CDM_ZERO_PUNCH_HOLE")
    ZERO_RANGE = const("CDM_ZERO_ZERO_RANGE")
    BLKZEROOUT = const("CDM_ZERO_BLKZEROOUT")
    WRITE = const("CDM_ZERO_WRITE")


class AllocMethod(_Method):
    """How preallocation reserved or wrote the target's blocks."""

    NONE = const("CDM_ALLOC_NONE")
    FALLOCATE = const("CDM_ALLOC_FALLOCATE")
    WRITE_ZEROES = const("CDM_ALLOC_WRITE_ZEROES")
    ZERO_RANGE = const("CDM_ALLOC_ZERO_RANGE")
    BLKZEROOUT = const("CDM_ALLOC_BLKZEROOUT")
    WRITE = const("CDM_ALLOC_WRITE")


@dataclass(frozen=True, slots=True)
class Extent:
    """A guest range that is data or a hole."""

    offset: int
    length: int
    data: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What a copy or conversion did.

    ``bytes_written`` counts data written; ``bytes_zeroed`` bytes explicitly zeroed on the
    target; ``bytes_skipped`` zero ranges left alone because the target already read as zeros;
    ``bytes_zero_data`` zeros found by content inside the source's data.  ``read_seconds``
    and ``write_seconds`` are the time spent inside source reads and inside target writes and
    zeroing, summed over the workers (so up to threads x ``elapsed``): the side whose figure is
    near threads x ``elapsed`` is the one that bounds the job.  ``sync_seconds`` is the final
    fdatasync.
    """

    source: str
    target: str
    source_format: str
    virtual_size: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int
    bytes_zero_data: int
    elapsed: float
    scan_method: ScanMethod
    zero_methods: tuple[ZeroMethod, ...]
    zero_fallbacks: int
    direct_read: bool
    direct_write: bool
    reflinked: bool
    preallocation: str
    preallocation_applied: bool
    target_allocated: int | None
    scan_note: str = ""
    alloc_methods: tuple[AllocMethod, ...] = ()
    target_size: int | None = None
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    sync_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready mapping (enums as their labels)."""
        return {
            "source": self.source,
            "target": self.target,
            "source_format": self.source_format,
            "virtual_size": self.virtual_size,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "bytes_zeroed": self.bytes_zeroed,
            "bytes_skipped": self.bytes_skipped,
            "bytes_zero_data": self.bytes_zero_data,
            "elapsed": round(self.elapsed, 6),
            "scan_method": self.scan_method.label,
            "zero_methods": [m.label for m in self.zero_methods],
            "zero_fallbacks": self.zero_fallbacks,
            "direct_read": self.direct_read,
            "direct_write": self.direct_write,
            "reflinked": self.reflinked,
            "preallocation": self.preallocation,
            "preallocation_applied": self.preallocation_applied,
            "target_allocated": self.target_allocated,
            "scan_note": self.scan_note,
            "alloc_methods": [m.label for m in self.alloc_methods],
            "target_size": self.target_size,
            "read_seconds": round(self.read_seconds, 6),
            "write_seconds": round(self.write_seconds, 6),
            "sync_seconds": round(self.sync_seconds, 6),
        }


@dataclass(frozen=True, slots=True)
class PreallocResult:
    """What preallocate() or create_blank() did."""

    path: str
    size: int
    mode: str
    preallocation_applied: bool
    alloc_methods: tuple[AllocMethod, ...]
    bytes_allocated: int
    target_allocated: int | None
    elapsed: float

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self.size,
            "mode": self.mode,
            "preallocation_applied": self.preallocation_applied,
            "alloc_methods": [m.label for m in self.alloc_methods],
            "bytes_allocated": self.bytes_allocated,
            "target_allocated": self.target_allocated,
            "elapsed": round(self.elapsed, 6),
        }
