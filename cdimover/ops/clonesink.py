"""Request bodies that are not a disk image: the target end of CDI's host-assisted clones and
archive uploads, pushed piece by piece like :class:`~cdimover.ops.sink.StreamSink`.

- :class:`FramedSink`: the snappy framing format (``x-cdi-content-type``), decoded and
  CRC-checked in front of another sink.
- :class:`ArchiveSink`: a tar stream (plain or gzip/bzip2/xz compressed) extracted beneath a
  Filesystem volume's directory with :func:`~cdimover.io.extract.extract_tar` -- the
  ``filesystem-clone`` onto a Filesystem volume and ``/v1beta1/upload-archive``.
- :class:`DiskMemberSink`: a tar stream of which only the first member whose name contains
  ``disk.img`` is kept, written onto a block device through a RAW StreamSink (the
  ``filesystem-clone`` onto a Block volume, as CDI's ``newTarDiskImageReader``); the rest is
  read and dropped.

tarfile pulls its input, the server pushes it: both tar sinks run their reader in a thread of
their own fed through a bounded :class:`_Pipe` (``PIPE_BYTES``), so that a body of any size
passes through in bounded memory and a failure on either side reaches the other at once.
Every sink has the same four calls: :meth:`push` each piece, :meth:`finish_body`,
:meth:`complete` (durable; what was written), or :meth:`abort` at any point.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, Final, Protocol, cast

from ..errors import UnsafeArchiveError
from ..formats.snappyframe import FrameDecoder
from .sink import SinkResult, StreamSink

__all__ = ["BodySink", "FramedSink", "ArchiveSink", "DiskMemberSink", "DISK_MEMBER",
           "PIPE_BYTES"]

log = logging.getLogger("cdimover")

DISK_MEMBER: Final = "disk.img"
"""The member a Filesystem → Block clone keeps: the first whose name contains this."""
PIPE_BYTES: Final = 4 << 20
"""The most body bytes held between the server and a tar reader."""
_READ: Final = 1 << 20


class BodySink(Protocol):
    """What the upload server pushes a request body into."""

    def push(self, data: bytes | bytearray | memoryview) -> None: ...
    def finish_body(self) -> None: ...
    def complete(self) -> SinkResult: ...
    def abort(self) -> None: ...


class FramedSink:
    """The snappy framing format decoded into INNER (a sink of the decoded bytes)."""

    def __init__(self, inner: BodySink) -> None:
        self.inner = inner
        self.decoder = FrameDecoder()

    def push(self, data: bytes | bytearray | memoryview) -> None:
        for piece in self.decoder.feed(data):
            self.inner.push(piece)

    def finish_body(self) -> None:
        self.decoder.finish()
        self.inner.finish_body()

    def complete(self) -> SinkResult:
        return self.inner.complete()

    def abort(self) -> None:
        self.inner.abort()


class _Aborted(Exception):
    """The other side of a pipe gave up."""


class _Pipe:
    """Bytes from one thread to another, at most LIMIT held; ``read`` as a file's."""

    def __init__(self, limit: int = PIPE_BYTES) -> None:
        self._limit = limit
        self._parts: deque[bytes] = deque()
        self._held = 0
        self._closed = False       # the writer is done
        self._aborted = False      # the writer gave up
        self._reader_done = False  # the reader stopped (finished or failed)
        self._cond = threading.Condition()
        self.read_bytes = 0

    def put(self, data: bytes | bytearray | memoryview) -> bool:
        """Hand DATA to the reader, waiting for room; False when the reader has stopped."""
        with self._cond:
            while self._held >= self._limit and not self._reader_done:
                self._cond.wait()
            if self._reader_done:
                return False
            self._parts.append(bytes(data))
            self._held += len(data)
            self._cond.notify_all()
            return True

    def close(self, aborted: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._aborted = self._aborted or aborted
            self._cond.notify_all()

    def reader_done(self) -> None:
        with self._cond:
            self._reader_done = True
            self._parts.clear()
            self._held = 0
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._parts and not self._closed:
                self._cond.wait()
            if self._aborted:
                raise _Aborted("the upload was abandoned")
            if not self._parts:
                return b""
            out: list[bytes] = []
            got = 0
            while self._parts and (n < 0 or got < n):
                part = self._parts.popleft()
                if n >= 0 and got + len(part) > n:
                    self._parts.appendleft(part[n - got:])
                    part = part[:n - got]
                out.append(part)
                got += len(part)
            self._held -= got
            self.read_bytes += got
            self._cond.notify_all()
            return b"".join(out)


class _TarReader:
    """A tar stream consumed by CONSUME(pipe) in a thread of its own."""

    def __init__(self, name: str, consume: Callable[[_Pipe], SinkResult]) -> None:
        self.name = name
        self._pipe = _Pipe()
        self._consume = consume
        self._result: SinkResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cdimover-tar", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._consume(self._pipe)
        except BaseException as e:
            self._error = e
        finally:
            self._pipe.reader_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def push(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pipe.put(data):
            self._thread.join()
            self._raise()
            raise UnsafeArchiveError("the archive ended before the body did")

    def finish_body(self) -> None:
        self._pipe.close()
        self._thread.join()
        self._raise()

    def result(self) -> SinkResult:
        assert self._result is not None
        return self._result

    def stop(self) -> None:
        self._pipe.close(aborted=True)
        self._thread.join()


def _tar_result(fmt: str, size: int, bytes_in: int, start: float,
                prealloc: bool) -> SinkResult:
    return SinkResult(format=fmt, compression="none", virtual_size=size, final_size=size,
                      bytes_in=bytes_in, strategy="stream", peak_held=PIPE_BYTES,
                      preallocation_applied=prealloc, elapsed=time.monotonic() - start)


class ArchiveSink:
    """A tar stream extracted beneath the directory DIR_FD (not owned), safely.  A failed or
    abandoned extraction removes the top-level entries that were not there before it.
    PREALLOCATE: ``disk.img``, when the archive holds one at the top, gets its holes
    allocated (``posix_fallocate``) once extracted."""

    def __init__(self, dir_fd: int, *, name: str, preallocate: bool = False) -> None:
        self.name = name
        self._dir_fd = dir_fd
        self._preallocate = preallocate
        self._before = set(os.listdir(dir_fd))
        self._start = time.monotonic()
        self._done = False
        self._reader = _TarReader(name, self._extract)

    def _extract(self, pipe: _Pipe) -> SinkResult:
        from ..io.extract import extract_tar

        res = extract_tar(cast(BinaryIO, pipe), self._dir_fd)
        applied = False
        if self._preallocate and DISK_MEMBER in res.entries:
            fd = os.open(DISK_MEMBER, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._dir_fd)
            try:
                size = os.fstat(fd).st_size
                if size:
                    os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
                applied = True
            finally:
                os.close(fd)
        log.info("%s: extracted %d files (%d bytes, %d written), %d directories, %d symlinks",
                 self.name, res.files, res.size, res.bytes_written, res.dirs, res.symlinks)
        return _tar_result("archive", res.size, pipe.read_bytes, self._start, applied)

    def push(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.push(data)

    def finish_body(self) -> None:
        self._reader.finish_body()

    def complete(self) -> SinkResult:
        self._done = True
        return self._reader.result()

    def abort(self) -> None:
        self._reader.stop()
        if self._done:
            return
        from ..io.extract import remove_entries

        new = set(os.listdir(self._dir_fd)) - self._before
        if new:
            log.info("%s: removing what the failed extraction created: %s", self.name,
                     ", ".join(sorted(new)))
            remove_entries(self._dir_fd, sorted(new))


class DiskMemberSink:
    """A tar stream whose first member named ``*disk.img*`` is written by the StreamSink
    OPEN(member size) returns (which checks the size before it writes); the other members
    are read and dropped.  No such member: UnsafeArchiveError."""

    def __init__(self, open_sink: Callable[[int], StreamSink], *, name: str) -> None:
        self.name = name
        self._open = open_sink
        self._sink: StreamSink | None = None
        self._lock = threading.Lock()
        self._reader = _TarReader(name, self._copy)

    def _copy(self, pipe: _Pipe) -> SinkResult:
        from ..io.extract import CheckedTarInfo

        with tarfile.open(fileobj=cast(BinaryIO, pipe), mode="r|", tarinfo=CheckedTarInfo,
                          bufsize=64 << 10) as tf:
            for m in tf:
                tf.members.clear()  # type: ignore[attr-defined]
                if not m.isreg() or DISK_MEMBER not in m.name:
                    continue
                log.info("%s: writing the member %r (%d bytes)", self.name, m.name, m.size)
                with self._lock:
                    self._sink = self._open(m.size)
                src = tf.extractfile(m)
                assert src is not None
                done = 0
                while True:
                    data = src.read(_READ)
                    if not data:
                        break
                    self._sink.push(data)
                    done += len(data)
                if done != m.size:
                    raise UnsafeArchiveError(f"truncated archive: member {m.name!r} has "
                                             f"{done} of its {m.size} bytes")
                self._sink.finish_body()
                break
            else:
                raise UnsafeArchiveError(f"the archive has no member named *{DISK_MEMBER}*")
        while pipe.read(_READ):     # what follows the disk image is read and dropped
            pass
        return _tar_result("raw", m.size, pipe.read_bytes, time.monotonic(), False)

    def push(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.push(data)

    def finish_body(self) -> None:
        self._reader.finish_body()

    def complete(self) -> SinkResult:
        assert self._sink is not None
        return self._sink.complete()

    def abort(self) -> None:
        self._reader.stop()
        with self._lock:
            if self._sink is not None:
                self._sink.abort()
