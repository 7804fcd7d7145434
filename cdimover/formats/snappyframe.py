"""The snappy framing format (``framing_format.txt`` of google/snappy), decoded as it arrives:
the body of CDI's host-assisted clones (``x-cdi-content-type: blockdevice-clone`` and
``filesystem-clone``, written by Go's ``snappy.NewBufferedWriter``).

A stream is a sequence of chunks, each a 4-byte header (type, then a 24-bit little-endian
length) and its data:

- ``0xff`` stream identifier, ``sNaPpY``: first, and allowed again later;
- ``0x00`` compressed data: a masked CRC-32C of the uncompressed bytes, then one raw snappy
  block of at most 64 KiB once decompressed (``cramjam.snappy.decompress_raw``);
- ``0x01`` uncompressed data: the same CRC, then at most 64 KiB as they are;
- ``0xfe`` padding and ``0x80``-``0xfd``: skipped; ``0x02``-``0x7f``: refused.

Every data chunk's CRC-32C is verified (the core's ``cdm_crc32c``): a flipped bit anywhere is
a :class:`FramingError`, never data written.  Memory is bounded: one data chunk (at most
``_MAX_CHUNK`` bytes) is held at a time, skippable chunks are dropped as they pass, and
:meth:`FrameDecoder.feed` hands its output out in batches of about ``batch`` bytes.
cramjam's own ``snappy.Decompressor`` decodes only whole buffers, so the container is parsed
here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from .. import _native
from ..errors import ImageFormatError

__all__ = ["FrameDecoder", "FramingError", "frame_crc"]

_IDENT: Final = b"sNaPpY"
_MAX_DATA: Final = 1 << 16
# The largest raw block a 64 KiB chunk compresses to (snappy's MaxCompressedLength), + CRC.
_MAX_CHUNK: Final = 4 + 32 + _MAX_DATA + _MAX_DATA // 6
_HEADER: Final = struct.Struct("<I")


class FramingError(ImageFormatError):
    """The body is not a valid snappy-framed stream (bad chunk, CRC mismatch, truncated)."""


def frame_crc(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC-32C the framing format stores for DATA."""
    c = _native.crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


class FrameDecoder:
    """Push decoder: :meth:`feed` the stream's bytes in any pieces, iterate what each returns
    (decoded bytes, in order), then :meth:`finish`."""

    def __init__(self, batch: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._skip = 0            # bytes of a skippable chunk still to drop
        self._started = False
        self._batch = batch
        self.bytes_in = 0
        self.bytes_out = 0
        self.chunks = 0

    def _fail(self, why: str) -> FramingError:
        return FramingError(f"snappy framing: {why} (chunk {self.chunks}, after "
                            f"{self.bytes_in} bytes received)")

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Decode DATA (the next bytes of the stream); yields the decoded bytes in batches."""
        view = memoryview(data)
        self.bytes_in += len(view)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        self._buf += view
        buf = self._buf
        pos = 0
        out: list[bytes] = []
        held = 0
        try:
            while len(buf) - pos >= 4:
                (word,) = _HEADER.unpack_from(buf, pos)
                kind, length = word & 0xFF, word >> 8
                if not self._started and kind != 0xFF:
                    raise self._fail("the stream does not start with the stream identifier")
                if kind >= 0x80 and kind != 0xFF:           # padding, reserved skippable
                    have = min(length, len(buf) - pos - 4)
                    self._skip = length - have
                    pos += 4 + have
                    self.chunks += 1
                    continue
                if kind not in (0x00, 0x01, 0xFF):
                    raise self._fail(f"reserved unskippable chunk type 0x{kind:02x}")
                if kind == 0xFF and length != len(_IDENT):
                    raise self._fail("a stream identifier of the wrong length")
                if kind != 0xFF and not 4 <= length <= _MAX_CHUNK:
                    raise self._fail(f"a data chunk of {length} bytes")
                if len(buf) - pos - 4 < length:
                    break
                body = memoryview(buf)[pos + 4:pos + 4 + length]
                try:
                    if kind == 0xFF:
                        if bytes(body) != _IDENT:
                            raise self._fail("a stream identifier that is not sNaPpY")
                        self._started = True
                    else:
                        piece = self._data(kind, body)
                        out.append(piece)
                        held += len(piece)
                finally:
                    body.release()
                pos += 4 + length
                self.chunks += 1
                if held >= self._batch:
                    yield b"".join(out)
                    out, held = [], 0
        finally:
            del buf[:pos]
        if out:
            yield b"".join(out)

    def _data(self, kind: int, body: memoryview) -> bytes:
        (stored,) = _HEADER.unpack_from(body, 0)
        if kind == 0x01:
            piece = bytes(body[4:])
            if len(piece) > _MAX_DATA:
                raise self._fail(f"an uncompressed chunk of {len(piece)} bytes")
        else:
            import cramjam      # imported with the first compressed chunk

            try:
                piece = bytes(cramjam.snappy.decompress_raw(body[4:]))
            except cramjam.DecompressionError as e:
                raise self._fail(f"a compressed chunk does not decode ({e})") from None
            if len(piece) > _MAX_DATA:
                raise self._fail(f"a compressed chunk decodes to {len(piece)} bytes")
        if frame_crc(piece) != stored:
            raise self._fail("CRC-32C mismatch: the data was corrupted on the way")
        self.bytes_out += len(piece)
        return piece

    def finish(self) -> None:
        """The stream ended: FramingError if it ended inside a chunk or before any."""
        if self._buf or self._skip:
            raise self._fail("the stream ends inside a chunk (truncated)")
        if not self._started:
            raise self._fail("an empty stream (no stream identifier)")
