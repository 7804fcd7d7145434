"""Both ends of cdimover's clone stream (the format: :mod:`cdimover.formats.clonestream`).

**Sending** (:class:`StreamProducer`): the source disk's extent map (SEEK_DATA/SEEK_HOLE of a
file, a loop device's backing file, or a full read of any other device) gives the data
spans, widened to the digest's 1 MiB blocks; only those are read (O_DIRECT where the source
allows it, in windows of :data:`WINDOW` bytes).  Inside a window every 64 KiB piece of zeros
becomes part of a ZERO record, the rest DATA records (zstd-compressed on request); the holes
between spans are ZERO records that cost 32 bytes whatever their length.  A CHECKPOINT
record follows every :data:`CHECKPOINT_BYTES` of data sent.  Reading, digesting and encoding
run in a thread of their own, at most :data:`BUFFERS` windows ahead of the sender.

**Receiving** (:class:`CloneReceiver`): records are checked (order, bounds, CRC-32C) before
they are written through the push :class:`~cdimover.ops.writer.Writer` (zeros inside data
become holes); at a CHECKPOINT the digest chain must match the source's, the target is
synced, and that offset becomes the resume point.  The END record's digest must equal the
chain's before the writer commits.  A failed request keeps the receiver: the source asks for
:meth:`CloneReceiver.resume_point` and sends from there.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from .. import _native
from .._native import Context
from ..errors import TargetTooSmallError
from ..formats.clonestream import CHECKPOINT, DATA, DIGEST_BLOCK, END, ZERO, ZSTD, \
    CloneStreamError, DigestChain, Record, RecordParser, encode_data, encode_mark, \
    encode_zero, stream_head
from ..io.endpoints import Place, Source, open_source
from ..types import ScanMethod
from .writer import Writer

__all__ = ["StreamProducer", "CloneReceiver", "ReceiveResult", "disk_digest", "WINDOW",
           "CHECKPOINT_BYTES", "BUFFERS", "PIECE"]

log = logging.getLogger("cdimover")

WINDOW: Final = 4 << 20
"""Bytes read at a time (a multiple of the digest block)."""
BUFFERS: Final = 3
"""Windows held at once (being read, queued, being sent)."""
PIECE: Final = 64 << 10
"""Zero-detection granularity on the wire (the target detects zeros at 4 KiB again)."""
CHECKPOINT_BYTES: Final = 16 << 20
"""Data bytes between checkpoints: the most a resumed stream sends twice."""
RECORD_BYTES: Final = 1 << 20
"""The most data one DATA record carries (what the receiver holds of a record at once)."""
_SCAN_STEP: Final = 1 << 30
Piece = bytes | memoryview


def _align_down(v: int, a: int) -> int:
    return v - v % a


def data_spans(ctx: Context, src: Source, start: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) from START (a block boundary) to the end of SRC, data
    widened to whole digest blocks; the map is read a gigabyte at a time."""
    size = src.size
    if src.scan_method == ScanMethod.FULL_READ:
        if size > start:
            yield start, size - start, True
        return
    fd = src.map_fd if src.map_fd >= 0 else src.fd
    pos = start            # everything before POS has been yielded
    run_start, run_end = -1, -1
    scan = start
    while scan < size:
        step = min(_SCAN_STEP, size - scan)
        for off, length, is_data in _native.scan_extents(ctx, fd, scan, step,
                                                         map_offset=src.map_offset,
                                                         path=src.path):
            if not is_data:
                continue
            a = max(_align_down(off, DIGEST_BLOCK), start)
            b = min(_align_down(off + length + DIGEST_BLOCK - 1, DIGEST_BLOCK), size)
            if run_end >= a:
                run_end = max(run_end, b)
                continue
            if run_start >= 0:
                if run_start > pos:
                    yield pos, run_start - pos, False
                yield run_start, run_end - run_start, True
                pos = run_end
            run_start, run_end = max(a, pos), b
        scan += step
    if run_start >= 0 and run_end > run_start:
        if run_start > pos:
            yield pos, run_start - pos, False
        yield run_start, run_end - run_start, True
        pos = run_end
    if size > pos:
        yield pos, size - pos, False


class _Reader:
    """Aligned reads of SRC into page-aligned windows: O_DIRECT when the source allows."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.fd = src.direct_fd if src.direct_fd >= 0 else src.fd
        self.read_bytes = 0

    def read(self, buf: mmap.mmap, offset: int, length: int) -> memoryview:
        mv = memoryview(buf)
        want = min(len(buf), (length + 4095) // 4096 * 4096)
        got = 0
        while got < length:
            try:
                n = os.preadv(self.fd, [mv[got:want]], offset + got)
            except OSError as e:
                if e.errno != errno.EINVAL or self.fd == self.src.fd:
                    raise OSError(e.errno, f"cannot read the source: {e.strerror}",
                                  self.src.path) from None
                log.info("%s: O_DIRECT read refused; reading through the page cache",
                         self.src.path)
                self.fd = self.src.fd
                continue
            if n == 0:
                raise OSError(errno.EIO, f"the source ended at {offset + got}, before its "
                              f"size ({self.src.size})", self.src.path)
            got += n
        self.read_bytes += length
        return mv[:length]


@dataclass
class SendCounters:
    """What a producer sent: disk bytes covered, data bytes and bytes on the wire (before
    TLS and HTTP framing), records and checkpoints."""

    covered: int = 0
    data: int = 0
    wire: int = 0
    records: int = 0
    checkpoints: int = 0
    read: int = 0


class StreamProducer:
    """The stream of SRC (an open Source) from START (a block boundary, 0 for a new clone)
    with the digest chain continuing from STATE (None at 0): iterate :meth:`pieces` and send
    each piece in order; :meth:`close` whatever happens.  COMPRESS: zstd DATA payloads where
    they shrink.  PROGRESS(offset) after each window."""

    def __init__(self, ctx: Context, src: Source, *, start: int = 0, state: bytes | None = None,
                 compress: bool = False, checkpoint_bytes: int = CHECKPOINT_BYTES,
                 progress: Callable[[int], object] | None = None) -> None:
        self._ctx = ctx
        self._src = src
        self.start = start
        self.chain = (DigestChain(src.size) if state is None
                      else DigestChain.resume(src.size, start, state))
        self._compress = compress
        self._checkpoint_bytes = checkpoint_bytes
        self._progress = progress
        self.counters = SendCounters()
        self.digest = b""
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, WINDOW))
        self._out: queue.Queue[tuple[list[Piece], mmap.mmap | None] | BaseException | None] = \
            queue.Queue(BUFFERS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdimover-clone-read",
                                        daemon=True)
        self._started = False

    def pieces(self) -> Iterator[Piece]:
        """The stream's bytes, in order."""
        if not self._started:
            self._started = True
            self._thread.start()
        yield stream_head(ZSTD if self._compress else 0)
        while True:
            item = self._out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            parts, buf = item
            for p in parts:
                self.counters.wire += len(p)
                yield p
            if buf is not None:
                self._free.put(buf)

    def close(self) -> None:
        """Stop the reading thread (after a failure, or at the end)."""
        self._stop.set()
        if self._started:
            while self._thread.is_alive():
                try:
                    item = self._out.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, tuple) and item[1] is not None:
                    self._free.put(item[1])
            self._thread.join()

    def _put(self, item: tuple[list[Piece], mmap.mmap | None] | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _take_buffer(self) -> mmap.mmap | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as e:          # handed to the sender, which raises it
            self._put(e)

    def _produce(self) -> None:
        reader = _Reader(self._src)
        c = self.counters
        since_mark = 0
        pos = self.start
        for off, length, is_data in data_spans(self._ctx, self._src, self.start):
            if not is_data:
                self.chain.zeros(length)
                c.covered += length
                c.records += 1
                if not self._put(([encode_zero(off, length)], None)):
                    return
                pos = off + length
                continue
            end = off + length
            while pos < end:
                n = min(WINDOW, end - pos)
                buf = self._take_buffer()
                if buf is None:
                    return
                view = reader.read(buf, pos, n)
                parts, sent = self._encode(pos, view)
                self.chain.data(view)
                since_mark += sent
                pos += n
                c.covered += n
                if since_mark >= self._checkpoint_bytes and pos < self._src.size:
                    parts.append(encode_mark(CHECKPOINT, pos, self.chain.state))
                    c.checkpoints += 1
                    since_mark = 0
                if not self._put((parts, buf)):
                    return
                if self._progress is not None:
                    self._progress(pos)
        c.read = reader.read_bytes
        self.digest = self.chain.digest()
        self._put(([encode_mark(END, self._src.size, self.digest)], None))
        self._put(None)

    def _encode(self, offset: int, view: memoryview) -> tuple[list[Piece], int]:
        """The records of the window VIEW at OFFSET: DATA for its non-zero pieces, ZERO for
        runs of zero pieces.  (records, data bytes)"""
        parts: list[Piece] = []
        n = len(view)
        i = 0
        data = 0
        c = self.counters
        while i < n:
            zero = _native.is_zero(view[i:i + PIECE])
            j = i + PIECE
            while j < n and _native.is_zero(view[j:j + PIECE]) == zero:
                j += PIECE
            j = min(j, n)
            if zero:
                parts.append(encode_zero(offset + i, j - i))
                c.records += 1
            else:
                for k in range(i, j, RECORD_BYTES):      # records of at most RECORD_BYTES
                    m = min(j, k + RECORD_BYTES)
                    head, payload = encode_data(offset + k, view[k:m], compress=self._compress)
                    parts += (head, payload)
                    c.records += 1
                data += j - i
            i = j
        c.data += data
        return parts, data


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    """A completed clone stream: the disk's size, its digest (hex), data bytes written,
    bytes received, checkpoints, resumes, whether preallocation was applied."""

    virtual_size: int
    digest: str
    bytes_written: int
    bytes_received: int
    checkpoints: int
    resumes: int
    preallocation_applied: bool


class CloneReceiver:
    """The target end of one clone stream of SIZE bytes from the source SESSION, written onto
    TARGET (a path, an open descriptor or a Place) that may hold at most CAPACITY bytes.
    Lives across requests: a request that fails leaves it at its last checkpoint."""

    def __init__(self, target: str | Place | int, size: int, *, session: str, capacity: int,
                 preallocation: str = "off", name: str = "target") -> None:
        if size > capacity:
            raise TargetTooSmallError.of(name, size, capacity)
        self.session = session
        self.size = size
        self.name = name
        self._prealloc = preallocation
        self.writer = Writer(target, size, preallocation=preallocation)
        self.durable = 0
        self.state = DigestChain(size).state
        self.written = 0
        self.received = 0
        self.checkpoints = 0
        self.resumes = 0
        self.digest: bytes | None = None
        self._parser: RecordParser | None = None
        self._chain: DigestChain | None = None

    def resume_point(self) -> dict[str, object]:
        """What a (re)connecting source is told."""
        return {"session": self.session, "size": self.size, "offset": self.durable,
                "state": self.state.hex()}

    def begin(self, offset: int) -> None:
        """A request sending the stream from OFFSET: the resume point (409 otherwise)."""
        if offset != self.durable:
            raise CloneStreamError(f"the stream resumes at {offset}, but {self.name} is "
                                   f"durable up to {self.durable}")
        if offset:
            self.resumes += 1
            log.info("%s: resuming the clone stream at %d", self.name, offset)
        self._parser = RecordParser(self.size, offset)
        self._chain = DigestChain.resume(self.size, offset, self.state)

    def push(self, data: bytes | bytearray | memoryview) -> None:
        assert self._parser is not None and self._chain is not None
        self.received += len(data)
        for rec in self._parser.feed(data):
            self._apply(rec, self._chain)

    def _apply(self, rec: Record, chain: DigestChain) -> None:
        if rec.kind == DATA:
            self.writer.write_at(rec.offset, rec.payload)
            chain.data(rec.payload)
            self.written += rec.length
        elif rec.kind == ZERO:
            self.writer.zero(rec.offset, rec.length)
            chain.zeros(rec.length)
        else:
            mine = chain.state if rec.kind == CHECKPOINT else chain.digest()
            if bytes(rec.payload) != mine:
                what = "checkpoint" if rec.kind == CHECKPOINT else "end"
                raise CloneStreamError(
                    f"disk digest mismatch at the {what} at offset {rec.offset}: the bytes "
                    f"received are not the source's")
            if rec.kind == CHECKPOINT:
                os.fdatasync(self.writer.fd)
                self.durable, self.state = rec.offset, mine
                self.checkpoints += 1
            else:
                self.digest = mine

    def finish_body(self) -> None:
        assert self._parser is not None
        self._parser.finish()

    def complete(self) -> ReceiveResult:
        """The stream ended with a matching digest: sync and commit the target."""
        assert self.digest is not None
        res = self.writer.close()
        return ReceiveResult(virtual_size=self.size, digest=self.digest.hex(),
                             bytes_written=self.written, bytes_received=self.received,
                             checkpoints=self.checkpoints, resumes=self.resumes,
                             preallocation_applied=res.preallocation_applied)

    def abort(self) -> None:
        """Give the clone up (the target keeps what was written, marked incomplete)."""
        self.writer.abort()


def disk_digest(path: str | os.PathLike[str], *,
                progress: Callable[[int, int], None] | None = None) -> str:
    """The clone stream's disk digest of PATH (a file or block device), hex: only the data
    spans are read."""
    with Context() as ctx, open_source(path, ctx=ctx) as src:
        chain = DigestChain(src.size)
        reader = _Reader(src)
        buf = mmap.mmap(-1, WINDOW)
        try:
            for off, length, is_data in data_spans(ctx, src, 0):
                if not is_data:
                    chain.zeros(length)
                    continue
                pos, end = off, off + length
                while pos < end:
                    n = min(WINDOW, end - pos)
                    chain.data(reader.read(buf, pos, n))
                    pos += n
                    if progress is not None:
                        progress(pos, src.size)
        finally:
            del reader
        return chain.digest().hex()
