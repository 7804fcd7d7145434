"""Bytes that arrive in order -- an HTTP body fetched or received -- decoded onto a target in
one pass: decompressed (gzip, xz, zstd), a QCOW2 converted as it arrives within a memory
bound, RAW written as is, never past the bound given.

The helpers :func:`open_stream_writer` and :func:`complete_stream` are the two ends every
stream shares (an HTTP import's GET, an upload's request body); :class:`StreamSink` is the
push side: its caller hands it the body piece by piece.

A QCOW2 whose layout needs more memory than the bound (data before the tables that place it)
fails with UnsupportedImageError mentioning "memory limit".  A sink given a scratch
directory keeps a copy of a body that may need it (QCOW2 or compressed; RAW never) while it
streams, and on that failure receives the rest into the copy and converts from it once the
body is complete: the target then sees one write, from the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .. import _native
from .._native import Context, NativeStream, NativeWriter, StreamResult
from ..errors import TargetTooSmallError, UnsupportedImageError
from ..io.detect import detect_head, unsupported
from ..io.endpoints import Place, Target, open_target
from ..types import PREALLOCATION_MODES, CopyResult
from .copy import Tuning, final_size_for, grow_target

__all__ = ["writing", "StreamSink", "SinkResult", "open_stream_writer", "complete_stream",
           "default_capacity", "is_device", "is_memory_limit", "scratch_writer",
           "convert_scratch"]

log = logging.getLogger("cdimover")
_COMPRESSED = ("gzip", "xz", "zstd")


@contextmanager
def writing(writer: NativeWriter) -> Iterator[NativeWriter]:
    """The life of WRITER around a block: when the block fails, what was written is synced
    for a re-run and completion is never reported (abort); the writer is freed either way."""
    try:
        yield writer
    except BaseException:
        try:
            writer.abort()
        except OSError:
            pass        # the block's failure is the one to report
        raise
    finally:
        writer.free()


def is_device(target: str | os.PathLike[str] | Place) -> bool:
    """Whether TARGET names a block device (followed, for a path the user gave)."""
    path = target.path if isinstance(target, Place) else os.fspath(target)
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def default_capacity(target: str | os.PathLike[str] | Place) -> int | None:
    """The most a stream may write to TARGET when the caller gave no capacity: a block device's
    size, or for a file the free space of its filesystem."""
    path = target.path if isinstance(target, Place) else os.fspath(target)
    if is_device(target):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_memory_limit(exc: BaseException) -> bool:
    """Whether EXC is a QCOW2 stream's refusal to hold more than its memory bound."""
    return isinstance(exc, UnsupportedImageError) and "memory limit" in str(exc)


def open_stream_writer(ctx: Context, dst: Target, bound: int, *, bound_known: bool,
                       capacity: int | None, preallocation: str, target_is_zero: bool,
                       tuning: Tuning) -> tuple[NativeWriter, str, int]:
    """A NativeWriter on DST that never writes past BOUND bytes (a block device: its size, or
    CAPACITY when smaller).  PREALLOCATION is applied by the writer when the bound is the
    image's size (BOUND_KNOWN or a device), else left to :func:`complete_stream`.
    Returns (writer, preallocation applied by the writer, bound)."""
    if dst.probe.is_blockdev:
        bound = dst.probe.size if capacity is None else min(capacity, dst.probe.size)
        bound_known = True
    early = preallocation if bound_known else "off"
    flags = 0
    if dst.fresh or target_is_zero:
        flags |= _native.const("CDM_COPY_TARGET_IS_ZERO")
    writer = NativeWriter(ctx, dst.fd, dst.direct_fd, size=bound,
                          sector=dst.probe.logical_sector, is_blockdev=dst.probe.is_blockdev,
                          sparse_size=tuning.sparse_size, flags=flags,
                          preallocation=PREALLOCATION_MODES[early], path=dst.path)
    return writer, early, bound


def complete_stream(ctx: Context, dst: Target, stats: Any, virtual_size: int, *,
                    preallocation: str, early: str, target_size: int | None,
                    paths: tuple[str, str]) -> int:
    """The end of a stream whose bytes are all on DST (the writer finished, STATS its
    statistics): a file cut to VIRTUAL_SIZE, preallocated if the writer did not, synced, grown
    to TARGET_SIZE, and DST committed.  Returns the file's final size."""
    final_size = final_size_for(virtual_size, target_size)
    if dst.probe.is_regular:
        os.ftruncate(dst.fd, virtual_size)
    if preallocation != "off" and early == "off" and virtual_size > 0:
        _native.preallocate(ctx, dst.fd, dst.direct_fd, dst.probe.is_blockdev,
                            dst.probe.logical_sector, 0, virtual_size,
                            PREALLOCATION_MODES[preallocation], stats, paths=paths)
    if dst.probe.is_regular:
        os.fsync(dst.fd)
        grow_target(ctx, dst, virtual_size, final_size, preallocation, stats, paths)
    dst.commit()
    return final_size


@dataclass(frozen=True, slots=True)
class SinkResult:
    """What a sink wrote: the image found, its size, how (``stream``, or ``scratch`` when the
    body was converted from the scratch copy), bytes received and the time taken."""

    format: str                 # "raw" | "qcow2"
    compression: str            # "none" | "gzip" | "xz" | "zstd"
    virtual_size: int
    final_size: int
    bytes_in: int
    strategy: str
    peak_held: int
    preallocation_applied: bool
    elapsed: float


class StreamSink:
    """A body pushed in order onto TARGET (a path or Place), opened at creation.

    - HEAD: the body's first bytes (4 KiB, or all of a shorter body), which decide what it
      holds: a container cdimover does not convert raises UnsupportedImageError, and a RAW
      body of LENGTH bytes (when known) larger than CAPACITY raises TargetTooSmallError --
      both before the target is opened.  HEAD is not pushed: push it first.
    - CAPACITY: the most bytes the image may occupy; the stream never writes past it (a QCOW2
      whose virtual size exceeds it fails when its header arrives, a decompression bomb when
      it gets there).
    - SCRATCH_DIR: where a QCOW2 or compressed body is copied while it streams, for the
      memory-limit fallback; None: no copy, the limit is final.
    - PREALLOCATION ("off", "falloc", "full"), TARGET_SIZE (a file grows to it),
      TARGET_IS_ZERO, MEM_LIMIT (0: the core's 64 MiB), TUNING.
    - FORMAT: "auto" (HEAD decides), or "raw": the bytes are the disk, written as they are
      whatever they start with (a clone of a disk that holds a QCOW2 or a gzip file);
      HEAD is then not examined.

    One thread at a time: :meth:`push` every piece, then :meth:`finish_body` (the body is
    complete and handed to the target) and :meth:`complete` (durable and committed), or
    :meth:`abort` at any point.  A sink that did not complete leaves no new file behind, and
    an existing file marked incomplete.
    """

    def __init__(self, target: str | os.PathLike[str] | Place, head: bytes, *,
                 length: int | None, capacity: int, name: str = "upload",
                 scratch_dir: str | None = None, preallocation: str = "off",
                 target_size: int | None = None, target_is_zero: bool = False,
                 mem_limit: int = 0, tuning: Tuning = Tuning(), format: str = "auto") -> None:
        self.name = name
        self._target = target
        self._capacity = capacity
        self._prealloc = preallocation
        self._target_size = target_size
        self._target_is_zero = target_is_zero
        self._tuning = tuning
        self._start = time.monotonic()
        self._received = 0
        self._stream_result: StreamResult | None = None
        self._result: SinkResult | None = None
        found = detect_head(head) if format == "auto" else None
        if found is not None and found.format not in _COMPRESSED + ("qcow2",):
            raise unsupported(found, name)
        self._raw = found is None
        bound, known = capacity, False
        if self._raw and length is not None:
            if length > capacity:
                raise TargetTooSmallError.of(name, length, capacity, what="the raw image")
            bound, known = length, True
        self._ctx = Context()
        self._scratch_fd, self._scratch_path = -1, ""
        self._spilling = False
        self._dst: Target | None = None
        self._writer: NativeWriter | None = None
        self._stream: NativeStream | None = None
        try:
            if scratch_dir is not None and not self._raw:
                self._scratch_fd, self._scratch_path = tempfile.mkstemp(
                    prefix="cdimover-upload-", dir=scratch_dir)
            self._dst = open_target(target, bound, ctx=self._ctx, need=None)
            self._writer, self._early, _ = open_stream_writer(
                self._ctx, self._dst, bound, bound_known=known, capacity=capacity,
                preallocation=preallocation, target_is_zero=target_is_zero, tuning=tuning)
            opts = _native.new_stream_opts(
                format=format, compression="auto" if format == "auto" else "none",
                mem_limit=mem_limit)
            self._stream = NativeStream(self._ctx, self._writer, opts, path=name)
        except BaseException:
            self.abort()
            raise

    @property
    def received(self) -> int:
        """Body bytes pushed so far."""
        return self._received

    @property
    def spilled(self) -> bool:
        """Whether the body goes to the scratch copy, to be converted from there."""
        return self._spilling

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """The next piece of the body."""
        self._received += len(data)
        if self._scratch_fd >= 0:
            _write_all(self._scratch_fd, data, self._scratch_path)
        if self._spilling:
            return
        assert self._stream is not None
        try:
            self._stream.push(data)
        except UnsupportedImageError as e:
            if self._scratch_fd < 0 or not is_memory_limit(e):
                raise
            log.warning("%s: %s; receiving the rest into %s and converting from there",
                        self.name, e, self._scratch_path)
            self._drop_target()
            self._spilling = True

    def finish_body(self) -> None:
        """The body is complete: decode its end onto the target (a stream), or hold it in the
        scratch copy for :meth:`complete`."""
        if self._spilling:
            return
        assert self._stream is not None
        self._stream_result = self._stream.finish()
        self._discard_scratch()

    def complete(self) -> SinkResult:
        """Make the image durable and declare the target complete; what was written."""
        if self._result is not None:
            return self._result
        if self._spilling:
            self._result = self._convert_scratch()
            return self._result
        res, dst, writer = self._stream_result, self._dst, self._writer
        assert res is not None and dst is not None and writer is not None
        stats = writer.finish()
        self._release_native()
        final = complete_stream(self._ctx, dst, stats, res.image_size,
                                preallocation=self._prealloc, early=self._early,
                                target_size=self._target_size, paths=(self.name, dst.path))
        self._result = SinkResult(
            format=res.format, compression=res.compression, virtual_size=res.image_size,
            final_size=final, bytes_in=res.bytes_in, strategy="stream",
            peak_held=res.peak_held, preallocation_applied=self._prealloc != "off",
            elapsed=time.monotonic() - self._start)
        self.abort()        # closes what is left; the target is committed
        return self._result

    def abort(self) -> None:
        """Give up: the target is synced and left for a re-run (a new file removed, an
        existing one marked incomplete), the scratch copy removed.  Idempotent."""
        self._drop_target()
        self._discard_scratch()
        self._ctx.close()

    # -- internals --------------------------------------------------------------------------

    def _release_native(self) -> None:
        if self._stream is not None:
            self._stream.free()
            self._stream = None
        if self._writer is not None:
            self._writer.free()
            self._writer = None

    def _drop_target(self) -> None:
        if self._writer is not None and self._result is None:
            try:
                self._writer.abort()
            except (OSError, RuntimeError):
                pass
        self._release_native()
        if self._dst is not None:
            self._dst.close()
            self._dst = None

    def _discard_scratch(self) -> None:
        if self._scratch_fd >= 0:
            os.close(self._scratch_fd)
            self._scratch_fd = -1
        if self._scratch_path:
            try:
                os.unlink(self._scratch_path)
            except FileNotFoundError:
                pass
            self._scratch_path = ""

    def _convert_scratch(self) -> SinkResult:
        """The memory-limit fallback: the scratch copy (decompressed into a second one when
        compressed) converted onto the target."""
        fd, path = self._scratch_fd, self._scratch_path
        compression = "none"
        decoded = ""
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            head = os.pread(fd, 4096, 0)
            found = detect_head(head)
            if found is not None and found.format in _COMPRESSED:
                compression = found.format
                dfd, decoded = tempfile.mkstemp(prefix="cdimover-upload-",
                                                dir=os.path.dirname(path))
                try:
                    writer = scratch_writer(self._ctx, dfd, decoded, self._capacity)
                    try:
                        res = _native.run_stream(self._ctx, fd, writer,
                                                 format=_native.FORMATS["raw"], path=self.name)
                        writer.finish()
                    finally:
                        writer.free()
                    os.ftruncate(dfd, res.image_size)
                finally:
                    os.close(dfd)
            copy = convert_scratch(self._ctx, decoded or path, self._target, self.name,
                                   capacity=self._capacity, preallocation=self._prealloc,
                                   target_is_zero=self._target_is_zero,
                                   target_size=self._target_size, tuning=self._tuning)
        finally:
            if decoded:
                os.unlink(decoded)
            self._discard_scratch()
        return SinkResult(
            format="qcow2", compression=compression, virtual_size=copy.virtual_size,
            final_size=copy.target_size or copy.virtual_size, bytes_in=self._received,
            strategy="scratch", peak_held=0, preallocation_applied=copy.preallocation_applied,
            elapsed=time.monotonic() - self._start)


def scratch_writer(ctx: Context, fd: int, path: str, size: int) -> NativeWriter:
    """A writer onto the new scratch file FD (PATH), sized SIZE (the bound of what it may
    receive; the caller truncates it to what arrived): sparse, no preallocation."""
    os.ftruncate(fd, size)
    return NativeWriter(ctx, fd, -1, size=size, sector=512, is_blockdev=False, sparse_size=0,
                        flags=_native.const("CDM_COPY_TARGET_IS_ZERO"),
                        preallocation=PREALLOCATION_MODES["off"], path=path)


def convert_scratch(ctx: Context, path: str, target: str | os.PathLike[str] | Place,
                    name: str, *, capacity: int | None, preallocation: str,
                    target_is_zero: bool, target_size: int | None, tuning: Tuning,
                    progress: _native.ProgressFn | None = None) -> CopyResult:
    """Convert the QCOW2 scratch copy PATH (of the image NAME) onto TARGET, its virtual size
    checked against CAPACITY first."""
    from ..io.endpoints import open_source
    from .convert import convert, examine

    with open_source(path, ctx=ctx) as src:
        image = examine(src, "qcow2", context=ctx)
        if capacity is not None and image.virtual_size > capacity:
            raise TargetTooSmallError.of(name, image.virtual_size, capacity,
                                         what="the qcow2 image's virtual size")
        return convert(src, target, image=image, preallocation=preallocation,
                       target_is_zero=target_is_zero, target_size=target_size,
                       threads=tuning.threads, request_size=tuning.request_size,
                       progress=progress, context=ctx)


def _write_all(fd: int, data: bytes | bytearray | memoryview, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
