"""The push API: bytes that arrive in any order (an upload body, a registry layer, a clone
stream) written onto a target file or block device by the same native writer as copies --
O_DIRECT where possible, bounded memory, zeros inside the data turned into holes or zeroed
ranges, the target's sector size honoured, fdatasync at the end.

    with cdimover.Writer("disk.img", size) as w:
        w.write_at(offset, data)
        w.zero(offset, length)
    result = w.result

A path is opened as copy() opens its target: a missing or regular file is (re)created with
SIZE bytes that read as zeros; a block device must hold SIZE bytes (TargetTooSmallError
before anything is written) and keeps its bytes past SIZE.  An open descriptor is written in
place (a regular file shorter than SIZE is extended).  When the block ends with an exception
the target is synced and left for a re-run, and ``result`` is never set.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

from .. import _native
from .._native import Context, NativeWriter, const
from ..errors import TargetTooSmallError
from ..io.endpoints import Place, Target, open_target
from ..io.fs import open_direct
from ..types import PREALLOCATION_MODES, CopyResult, ScanMethod
from .copy import make_result, room_needed
from .prealloc import preallocation_mode

__all__ = ["Writer"]

Buffer = bytes | bytearray | memoryview


def _open_fd(ctx: Context, fd: int, size: int, name: str) -> Target:
    """A Target for the caller's descriptor FD (not closed by the Writer)."""
    pr = _native.probe(ctx, fd, name)
    if pr.is_blockdev and pr.size < size:
        raise TargetTooSmallError.of(name, size, pr.size)
    if pr.is_regular and pr.size < size:
        os.ftruncate(fd, size)
        pr = _native.probe(ctx, fd, name)
    direct = open_direct(fd, os.O_WRONLY)
    return Target(path=name, fd=fd, probe=pr, direct_fd=direct, fresh=False)


class Writer:
    """Write SIZE bytes of TARGET (a path or an open descriptor) at any offsets, in any order.

    - PREALLOCATION: "off", "falloc" or "full", as for copy(); applied when the writer opens,
      so ranges never written are reserved (falloc) or written (full) too.
    - TARGET_IS_ZERO: the caller knows TARGET reads as zeros (a fresh thin device): zero ranges
      are then skipped, so each range must be written at most once.  Without it, a range
      written twice holds the last bytes written, zeros included.
    - SPARSE_SIZE, DETECT_ZEROS: zero-detection granularity (0 = 4096) and whether all-zero
      blocks of the data become holes or zeroed ranges.

    A Writer is used by one thread at a time.  Use it as a context manager, or call close()
    (which returns the result) or abort().
    """

    def __init__(self, target: str | os.PathLike[str] | Place | int, size: int, *,
                 preallocation: str | bool = "off", target_is_zero: bool = False,
                 sparse_size: int = 0, detect_zeros: bool = True,
                 context: Context | None = None) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        self._prealloc = preallocation_mode(preallocation)
        self._size = size
        self._start = time.monotonic()
        self._result: CopyResult | None = None
        self._closed = False
        self._own_ctx = context is None
        self._ctx = context or Context()
        self._owns_fd = not isinstance(target, int)
        try:
            if isinstance(target, int):
                self._dst = _open_fd(self._ctx, target, size, f"/proc/self/fd/{target}")
            else:
                self._dst = open_target(target, size, ctx=self._ctx, mode=0o644,
                                        need=room_needed(size, self._prealloc, None))
            self._open_native(target_is_zero, sparse_size, detect_zeros)
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_fd(cls, fd: int, size: int, *, preallocation: str | bool = "off",
                target_is_zero: bool = False, sparse_size: int = 0, detect_zeros: bool = True,
                context: Context | None = None) -> Writer:
        """A Writer on the open descriptor FD (a regular file or block device opened for
        writing), which stays the caller's to close."""
        return cls(fd, size, preallocation=preallocation, target_is_zero=target_is_zero,
                   sparse_size=sparse_size, detect_zeros=detect_zeros, context=context)

    def _open_native(self, target_is_zero: bool, sparse_size: int, detect_zeros: bool) -> None:
        dst = self._dst
        flags = 0
        if target_is_zero:
            flags |= const("CDM_COPY_TARGET_IS_ZERO")
        if not detect_zeros:
            flags |= const("CDM_COPY_NO_ZERO_DETECT")
        self._native: NativeWriter | None = None
        self._native = NativeWriter(
            self._ctx, dst.fd, dst.direct_fd, size=self._size,
            sector=dst.probe.logical_sector, is_blockdev=dst.probe.is_blockdev,
            sparse_size=sparse_size, flags=flags,
            preallocation=PREALLOCATION_MODES[self._prealloc], path=dst.path)

    @property
    def path(self) -> str:
        return self._dst.path

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        """The target's descriptor (``os.fdatasync`` of it makes what was written durable)."""
        return self._dst.fd

    def _writer(self) -> NativeWriter:
        if self._closed or self._native is None:
            raise ValueError(f"{self._dst.path}: the writer is closed")
        return self._native

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write DATA at OFFSET.  All-zero blocks inside DATA become holes or zeroed ranges.
        OSError (EINVAL) when the range passes SIZE; nothing of it is written then."""
        if offset < 0:
            raise ValueError(f"offset must not be negative: {offset}")
        self._writer().put(offset, data)

    def zero(self, offset: int, length: int) -> None:
        """Make [OFFSET, OFFSET+LENGTH) read as zeros: a hole on a file where the filesystem
        allows it, zeroed (BLKZEROOUT or written) on a device."""
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must not be negative: {offset}, {length}")
        self._writer().zero(offset, length)

    def close(self) -> CopyResult:
        """Sync the target and return the result (also kept in ``result``)."""
        w = self._writer()
        try:
            stats = w.finish()
            if self._owns_fd:
                self._dst.commit()      # a new file takes its name, an existing one loses its mark
            self._result = make_result(
                "-", self._dst, stats, source_format="raw", virtual_size=self._size,
                start=self._start, scan_method=ScanMethod.NONE, preallocation=self._prealloc,
                final_size=self._size)
            return self._result
        finally:
            self._release()

    def abort(self) -> None:
        """Sync what was written and give up: the target is left for a re-run, ``result``
        stays unset."""
        if self._closed:
            return
        try:
            if self._native is not None:
                self._native.abort()
        finally:
            self._release()

    @property
    def result(self) -> CopyResult:
        """The CopyResult of a writer closed cleanly; RuntimeError otherwise."""
        if self._result is None:
            raise RuntimeError(f"{self._dst.path}: the writer did not complete")
        return self._result

    def _release(self) -> None:
        self._closed = True
        native = getattr(self, "_native", None)
        if native is not None:
            native.free()
            self._native = None
        dst = getattr(self, "_dst", None)
        if dst is not None:
            if self._owns_fd:
                dst.close()
            elif dst.direct_fd >= 0:
                os.close(dst.direct_fd)
                dst.direct_fd = -1
        if self._own_ctx:
            self._ctx.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
            return
        try:
            self.abort()
        except OSError:
            pass    # the exception in the block is the one to report
