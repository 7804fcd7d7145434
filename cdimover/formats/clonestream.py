"""cdimover's clone stream: a virtual disk as records in offset order, only its data on the
wire, every record checked, the whole disk digested, resumable at checkpoints.

The body of ``POST /v1beta1/clone-stream`` (see :mod:`cdimover.ops.clonestream`) is the
16-byte stream head (``CDMCLONE``, version, flags) and then records, each a 32-byte header
(little-endian) and a payload:

====  ==============  ======================================================================
type  name            meaning
====  ==============  ======================================================================
1     ``DATA``        ``length`` bytes at ``offset``; the payload is those bytes (``wire``
                      of them), or with flag ``ZSTD`` one zstd frame that decodes to them;
                      ``crc`` is the CRC-32C of the decoded bytes
2     ``ZERO``        ``length`` zero bytes at ``offset`` (holes and zeros read as data)
3     ``CHECKPOINT``  everything before ``offset`` was sent; the payload is the digest
                      chain's state there (32 bytes).  The target checks it, makes its
                      writes durable and may be resumed from ``offset``
4     ``END``         the disk is complete at ``offset`` (its size); the payload is the
                      disk digest (32 bytes), checked before the target reports success
====  ==============  ======================================================================

Records tile the disk: each starts where the one before ended, none passes the size, a
DATA record holds at most :data:`MAX_RECORD` bytes.  Anything else is a
:class:`CloneStreamError`.

**The disk digest** is defined by the disk's bytes alone (not by how they were sent): the
disk in blocks of :data:`DIGEST_BLOCK` (1 MiB, the last one shorter), ``H0 =
sha256("cdimover-disk-digest-v1" || size as u64 LE)``, ``Hi = sha256(Hi-1 ||
sha256(block i))``, the digest is ``Hn``.  Zero blocks cost one short hash each, so an empty
100 GiB disk digests in a fraction of a second; ``cdimover digest DISK`` computes it for any
disk, so a user can check a clone on either side.  The chain's state is 32 bytes, which is
what makes a resumed stream's digest continue where the durable part ended.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from .. import _native
from ..errors import ImageFormatError

__all__ = ["CloneStreamError", "DigestChain", "Record", "RecordParser", "DATA", "ZERO",
           "CHECKPOINT", "END", "ZSTD", "MAGIC", "VERSION", "HEAD", "RECORD", "MAX_RECORD",
           "DIGEST_BLOCK", "stream_head", "encode_data", "encode_zero", "encode_mark",
           "ZERO_BLOCK_DIGEST"]

MAGIC: Final = b"CDMCLONE"
VERSION: Final = 1
HEAD: Final = struct.Struct("<8sII")
RECORD: Final = struct.Struct("<BBHIQQQ")     # type, flags, 0, crc, offset, length, wire
DATA: Final = 1
ZERO: Final = 2
CHECKPOINT: Final = 3
END: Final = 4
ZSTD: Final = 1
"""Record flag: the DATA payload is one zstd frame."""
MAX_RECORD: Final = 16 << 20
"""The most bytes one DATA record carries (decoded)."""
DIGEST_BLOCK: Final = 1 << 20
_SEED: Final = b"cdimover-disk-digest-v1"
_ZERO_BLOCK: Final = memoryview(bytes(DIGEST_BLOCK))
ZERO_BLOCK_DIGEST: Final = hashlib.sha256(_ZERO_BLOCK).digest()


class CloneStreamError(ImageFormatError):
    """The clone stream is malformed, out of order, corrupted, or its digest is wrong."""


def stream_head(flags: int = 0) -> bytes:
    """The 16 bytes a stream starts with."""
    return HEAD.pack(MAGIC, VERSION, flags)


def encode_data(offset: int, data: bytes | bytearray | memoryview, *,
                compress: bool = False) -> tuple[bytes, bytes | memoryview]:
    """A DATA record for DATA at OFFSET: (header, payload).  With COMPRESS the payload is
    zstd when that is smaller."""
    n = len(data)
    crc = _native.crc32c(data)
    if compress:
        import cramjam      # here, not at the top: a pod that sends plain records never loads it

        packed = bytes(cramjam.zstd.compress(data, 1))
        if len(packed) < n:
            return RECORD.pack(DATA, ZSTD, 0, crc, offset, n, len(packed)), packed
    return RECORD.pack(DATA, 0, 0, crc, offset, n, n), memoryview(data)


def encode_zero(offset: int, length: int) -> bytes:
    """A ZERO record."""
    return RECORD.pack(ZERO, 0, 0, 0, offset, length, 0)


def encode_mark(kind: int, offset: int, digest: bytes) -> bytes:
    """A CHECKPOINT or END record with its 32-byte digest payload."""
    return RECORD.pack(kind, 0, 0, 0, offset, 0, len(digest)) + digest


class DigestChain:
    """The disk digest (see the module docstring) fed the disk's bytes in order:
    :meth:`data` and :meth:`zeros`; :attr:`state` is the chain at :attr:`offset` when that is
    a block boundary (or the end), and a chain can start from one (:meth:`resume`).  A block
    is hashed as its bytes arrive (nothing is copied); a block of zeros only is not hashed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.offset = 0
        self._state = hashlib.sha256(_SEED + struct.pack("<Q", size)).digest()
        self._fill = 0                  # bytes of the current block seen
        self._zeros = 0                 # of which the leading zeros not yet hashed
        self._hash: Any = None          # the current block's hasher, once it has data

    @classmethod
    def resume(cls, size: int, offset: int, state: bytes) -> DigestChain:
        """A chain continuing at OFFSET (a block boundary, or the end) from STATE."""
        if offset % DIGEST_BLOCK and offset != size or offset > size or len(state) != 32:
            raise CloneStreamError(f"cannot resume the disk digest at offset {offset}")
        c = cls(size)
        c.offset = offset
        c._state = bytes(state)
        return c

    @property
    def state(self) -> bytes:
        if self._fill:
            raise CloneStreamError(f"the digest chain is inside a block at {self.offset}")
        return self._state

    def _want(self) -> int:
        """Bytes the current block still needs."""
        start = self.offset - self._fill
        return min(DIGEST_BLOCK, self.size - start) - self._fill

    def _close_block(self) -> None:
        if self._hash is not None:
            block = self._hash.digest()
        elif self._fill == DIGEST_BLOCK:
            block = ZERO_BLOCK_DIGEST
        else:
            block = hashlib.sha256(_ZERO_BLOCK[:self._fill]).digest()
        self._state = hashlib.sha256(self._state + block).digest()
        self._fill = self._zeros = 0
        self._hash = None

    def data(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the disk."""
        mv = memoryview(data).cast("B")
        if self.offset + len(mv) > self.size:
            raise CloneStreamError("more bytes than the disk holds")
        while len(mv):
            take = min(len(mv), self._want())
            piece = mv[:take]
            if self._hash is None:
                if take == DIGEST_BLOCK and _native.is_zero(piece):
                    self._zeros += take
                else:
                    self._hash = hashlib.sha256(_ZERO_BLOCK[:self._zeros])
                    self._hash.update(piece)
            else:
                self._hash.update(piece)
            mv = mv[take:]
            self.offset += take
            self._fill += take
            if self._want() == 0:
                self._close_block()

    def zeros(self, length: int) -> None:
        """The next LENGTH bytes of the disk are zeros."""
        if self.offset + length > self.size:
            raise CloneStreamError("more bytes than the disk holds")
        while length:
            take = min(length, self._want())
            if self._hash is None:
                self._zeros += take
            else:
                for i in range(0, take, DIGEST_BLOCK):
                    self._hash.update(_ZERO_BLOCK[:min(DIGEST_BLOCK, take - i)])
            self.offset += take
            self._fill += take
            length -= take
            if self._want() == 0:
                self._close_block()

    def digest(self) -> bytes:
        """The disk digest; every byte must have been fed."""
        if self.offset != self.size:
            raise CloneStreamError(f"the disk digest covers {self.offset} of {self.size} bytes")
        return self.state


@dataclass(frozen=True, slots=True)
class Record:
    """One record: KIND, OFFSET, LENGTH (bytes of the disk), PAYLOAD (decoded data for
    DATA, the digest for CHECKPOINT and END, empty for ZERO)."""

    kind: int
    offset: int
    length: int
    payload: bytes | memoryview


class RecordParser:
    """Push parser of a stream that starts at START of a disk of SIZE bytes: :meth:`feed`
    bytes in any pieces and iterate the records each completes; every record is checked
    (order, bounds, CRC) before it is handed out.  A payload inside one piece is handed out
    as a view of it (no copy); one across pieces is gathered once.  A record is valid until
    the iteration goes on."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.position = start
        self.ended = False
        self.flags = 0
        self._head_seen = False
        self._hdr = bytearray()                 # a header (or the stream head) in pieces
        self._pending: tuple[int, int, int, int, int, int, int] | None = None
        self._body = bytearray()                # a payload in pieces
        self._body_fill = 0

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Record]:
        mv = memoryview(data).cast("B")
        while len(mv):
            if not self._head_seen:
                take = min(len(mv), HEAD.size - len(self._hdr))
                self._hdr += mv[:take]
                mv = mv[take:]
                if len(self._hdr) == HEAD.size:
                    self._stream_head(bytes(self._hdr))
                    self._hdr.clear()
                continue
            if self._pending is None:
                if not self._hdr and len(mv) >= RECORD.size:
                    fields = RECORD.unpack_from(mv, 0)
                    mv = mv[RECORD.size:]
                else:
                    take = min(len(mv), RECORD.size - len(self._hdr))
                    self._hdr += mv[:take]
                    mv = mv[take:]
                    if len(self._hdr) < RECORD.size:
                        continue
                    fields = RECORD.unpack_from(self._hdr, 0)
                    self._hdr.clear()
                kind, flags, _, crc, off, length, wire = fields
                self._check(kind, flags, off, length, wire)
                self._pending = fields
                self._body_fill = 0
                if wire == 0:
                    self._pending = None
                    yield self._record(kind, flags, crc, off, length, b"")
                    continue
            kind, flags, _, crc, off, length, wire = self._pending
            if self._body_fill == 0 and len(mv) >= wire:
                body: bytes | memoryview = mv[:wire]       # all of it here: no copy
                mv = mv[wire:]
            else:
                if self._body_fill == 0:
                    self._body = bytearray(wire)
                take = min(len(mv), wire - self._body_fill)
                self._body[self._body_fill:self._body_fill + take] = mv[:take]
                self._body_fill += take
                mv = mv[take:]
                if self._body_fill < wire:
                    continue
                body = memoryview(self._body)
            self._pending = None
            yield self._record(kind, flags, crc, off, length, body)

    def _stream_head(self, head: bytes) -> None:
        magic, version, self.flags = HEAD.unpack(head)
        if magic != MAGIC:
            raise CloneStreamError("not a cdimover clone stream (bad magic)")
        if version != VERSION:
            raise CloneStreamError(f"clone stream version {version} is not supported "
                                   f"(this server speaks {VERSION})")
        self._head_seen = True

    def _check(self, kind: int, flags: int, off: int, length: int, wire: int) -> None:
        if self.ended:
            raise CloneStreamError("records after the end record")
        if off != self.position:
            raise CloneStreamError(f"record at offset {off}, expected {self.position}")
        if kind == DATA:
            if not 0 < length <= MAX_RECORD or flags & ~ZSTD or wire > MAX_RECORD + 1024 or (
                    not flags & ZSTD and wire != length):
                raise CloneStreamError(f"bad data record at {off} ({length} bytes, "
                                       f"{wire} on the wire, flags {flags:#x})")
        elif kind == ZERO:
            if length == 0 or wire or flags:
                raise CloneStreamError(f"bad zero record at {off}")
        elif kind in (CHECKPOINT, END):
            if length or wire != 32 or flags:
                raise CloneStreamError(f"bad mark record at {off}")
            if kind == END and off != self.size:
                raise CloneStreamError(f"the stream ends at {off}, the disk has {self.size} "
                                       f"bytes")
        else:
            raise CloneStreamError(f"unknown record type {kind} at {off}")
        if length > self.size - off:
            raise CloneStreamError(f"record at {off} of {length} bytes passes the end of the "
                                   f"disk ({self.size} bytes)")

    def _record(self, kind: int, flags: int, crc: int, off: int, length: int,
                body: bytes | memoryview) -> Record:
        if kind == DATA:
            if flags & ZSTD:
                import cramjam

                try:
                    out = cramjam.zstd.decompress(body, output_len=length)
                    body = bytes(out)
                except Exception as e:
                    raise CloneStreamError(f"data record at {off}: bad zstd frame "
                                           f"({e})") from None
                if len(body) != length:
                    raise CloneStreamError(f"data record at {off}: decodes to {len(body)} "
                                           f"bytes, not {length}")
            if _native.crc32c(body) != crc:
                raise CloneStreamError(f"data record at {off} ({length} bytes): CRC-32C "
                                       f"mismatch, the bytes were corrupted on the way")
        self.position = off + length
        if kind == END:
            self.ended = True
        return Record(kind, off, length, body)

    def finish(self) -> None:
        """The body ended: it must have ended with the END record."""
        if not self.ended:
            raise CloneStreamError(f"the stream stopped at offset {self.position} of "
                                   f"{self.size} before its end record")
        if self._hdr:
            raise CloneStreamError("bytes after the end record")
