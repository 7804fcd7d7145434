"""Import of an image from an HTTP(S) URL straight onto the target: no scratch copy, one pass.

How the bytes are fetched depends on what the server offers and what the file is:

- **ranges**: the server serves byte ranges and gave a size, and the file is not compressed.
  A QCOW2 is converted through range requests: the header and tables first, then only the
  allocated clusters, several requests at once (one connection per worker); unallocated
  clusters are never downloaded.  A RAW file is fetched in parallel ranges and hashed in
  offset order (workers fill a window of slots; the slots are hashed and written in order).
- **stream**: no ranges, no size, a compressed file (gzip, xz, zstd: told by magic bytes,
  never by name), or a QCOW2 with a checksum to verify.  One GET whose body is decompressed,
  hashed and decoded on the fly: RAW is written in order; a QCOW2 is converted as it arrives
  within a memory bound (an image whose data comes before the tables that place it, beyond
  that bound, is refused with a message that says so).

A dropped connection or a 5xx resumes from the last byte received (bounded retries, doubling
pauses); a stream over a server without ranges restarts from byte 0 and counts a restart.
The checksum (md5, sha1, sha256, sha512) covers the file as downloaded; a mismatch raises
ChecksumMismatchError before the target is declared complete (a new file is never left
behind).  A stream never writes past the target's capacity: a decompression bomb or an endless
body ends in TargetTooSmallError.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .. import _native
from .._native import Context, NativeSource, ProgressFn, SourceInfo
from ..checksum import Checksum
from ..errors import ChecksumMismatchError, ImageFormatError, TargetTooSmallError, \
    UnsupportedImageError
from ..formats.qcow2 import ImageInfo, _qcow2_info, refusal
from ..io.detect import HEAD_SIZE, detect_head, unsupported
from ..io.endpoints import Place, Target, open_target
from ..io.http import HttpSource
from ..types import CopyResult, ScanMethod
from .copy import Tuning, final_size_for, grow_target, make_result, room_needed, target_opts
from .prealloc import preallocation_mode
from .sink import complete_stream, convert_scratch, default_capacity, is_device, \
    is_memory_limit, open_stream_writer, scratch_writer, writing

__all__ = ["import_url", "ImportResult", "Checksum", "parse_checksum", "probe_url"]

_COMPRESSED = ("gzip", "xz", "zstd")
log = logging.getLogger("cdimover")


def parse_checksum(text: str) -> Checksum:
    """'ALGO:HEX' as CDI's IMPORTER_CHECKSUM holds it; ValueError when malformed."""
    try:
        return Checksum.parse(text)
    except ValueError as e:
        raise ValueError(f"checksum {e}") from None


@dataclass(frozen=True, slots=True)
class ImportResult:
    """An import from a URL: the copy's result and how the bytes were fetched."""

    copy: CopyResult
    url: str
    strategy: str               # "ranges" | "stream"
    source_format: str          # "raw" | "qcow2"
    compression: str            # "none" | "gzip" | "xz" | "zstd"
    file_size: int | None       # bytes of the file on the server, when told
    bytes_fetched: int          # body bytes received by every request
    requests: int
    retries: int
    restarts: int
    http_version: int
    digest: str | None          # "algo:hex" of the file as downloaded, when asked for
    peak_held: int              # a streamed QCOW2: most bytes held before their tables


@dataclass(frozen=True, slots=True)
class Probed:
    """What the first request told about a URL."""

    info: SourceInfo
    head: bytes
    format: str                 # "raw" | "qcow2" | a compression | "unknown" (no ranges)
    image: ImageInfo | None     # a QCOW2 read through ranges: its validated header


def _head(ctx: Context, ns: NativeSource, info: SourceInfo) -> bytes:
    """The first bytes of the file (they came with the first answer)."""
    n = HEAD_SIZE if info.size is None else min(HEAD_SIZE, info.size)
    if n == 0:
        return b""
    try:
        return ns.pread(ctx, n, 0)
    except OSError:
        return b""      # a short file of unknown size: the stream decides


def probe_url(ctx: Context, ns: NativeSource, source: HttpSource,
              source_format: str = "auto") -> Probed:
    """Decide what the URL holds from its first bytes: compression, QCOW2 (its header then
    validated through ranges when they are served) or RAW; containers cdimover does not
    convert raise UnsupportedImageError, images that refer to other files UnsafeImageError."""
    info = ns.info()
    head = _head(ctx, ns, info)
    found = detect_head(head) if source_format != "raw" else None
    fmt = "raw"
    if found is not None and found.format in _COMPRESSED:
        fmt = found.format
    elif found is not None and found.format == "qcow2":
        fmt = "qcow2"
    elif found is not None:
        raise unsupported(found, source.display_url)
    if source_format == "qcow2" and fmt == "raw":
        raise ImageFormatError(f"{source.display_url}: not a QCOW2 image "
                               "(no QFI\\xfb magic at offset 0)")
    image = None
    if fmt == "qcow2" and info.ranges and info.size is not None:
        try:
            out = ns.qcow2_inspect(ctx)
        except ImageFormatError as e:
            raise type(e)(f"{source.display_url}: {e}") from None
        image = _qcow2_info(out, source.display_url, info.size)
        refused = refusal(image)
        if refused is not None:
            raise refused
    return Probed(info=info, head=head, format=fmt, image=image)


def _verify(checksum: Checksum | None, digest: bytes, url: str) -> None:
    if checksum is None:
        return
    if not hmac.compare_digest(digest, checksum.digest):
        raise ChecksumMismatchError(
            f"{url}: {checksum.algorithm} of the downloaded file is {digest.hex()}, expected "
            f"{checksum.hexdigest}")


def import_url(source: HttpSource | str, target: str | os.PathLike[str] | Place, *,
               source_format: str = "auto", checksum: Checksum | str | None = None,
               preallocation: str | bool = "off", target_is_zero: bool = False,
               target_size: int | None = None, capacity: int | None = None,
               progress: ProgressFn | None = None, threads: int = 0, request_size: int = 0,
               mem_limit: int = 0, scratch_dir: str | None = None,
               context: Context | None = None,
               probed: tuple[NativeSource, Probed] | None = None) -> ImportResult:
    """Import the RAW or QCOW2 image (maybe gzip-, xz- or zstd-compressed) at SOURCE onto
    TARGET as RAW, bit-exact, sparse and durable, in one pass.

    - SOURCE: an :class:`~cdimover.io.http.HttpSource`, or a URL string.
    - TARGET: a path or Place, opened as convert() opens it: a new file appears under its
      name only once complete and verified; a block device must hold the image.
    - CHECKSUM: "algo:hex" or a Checksum, over the file as downloaded.
    - CAPACITY: the most bytes the image may need (a volume's capacity): a larger image raises
      TargetTooSmallError before anything is written when its size is known up front, and a
      stream stops there.  Default: a block device's size, or a file's free space.
    - TARGET_SIZE: grow a file target to this size (never below the virtual size).
    - MEM_LIMIT: bytes a streamed QCOW2 may hold (0: 64 MiB).  A QCOW2 whose layout needs more
      fails with UnsupportedImageError, unless SCRATCH_DIR is given: the image is then
      downloaded there (decompressed) and converted from it (strategy "scratch").
    - PROBED: what :func:`probe_url` found on an open source (which stays the caller's).
    """
    if isinstance(source, str):
        source = HttpSource(source)
    if isinstance(checksum, str):
        checksum = parse_checksum(checksum)
    if source_format not in ("auto", "raw", "qcow2"):
        raise ValueError(f"source_format={source_format!r}: expected 'auto', 'raw' or 'qcow2'")
    prealloc = preallocation_mode(preallocation)
    tuning = Tuning(threads=threads, request_size=request_size)
    start = time.monotonic()
    ctx = context or Context()
    own_source = probed is None
    try:
        ns = source.open(ctx) if probed is None else probed[0]
        try:
            pr = probe_url(ctx, ns, source, source_format) if probed is None else probed[1]
            args = dict(target_is_zero=target_is_zero, preallocation=prealloc,
                        target_size=target_size, capacity=capacity, progress=progress,
                        tuning=tuning, start=start, checksum=checksum)
            ranges = pr.info.ranges and pr.info.size is not None
            if ranges and (pr.format == "raw" or (pr.image is not None and checksum is None)):
                return _by_ranges(ctx, ns, source, pr, target, **args)  # type: ignore[arg-type]
            try:
                return _stream(ctx, ns, source, pr, target, source_format=source_format,
                               mem_limit=mem_limit, **args)  # type: ignore[arg-type]
            except UnsupportedImageError as e:
                if scratch_dir is None or not is_memory_limit(e):
                    raise
                log.warning("%s; downloading it to %s first", e, scratch_dir)
            return _via_scratch(ctx, ns, source, target, scratch_dir, source_format=source_format,
                                **args)  # type: ignore[arg-type]
        finally:
            if own_source:
                ns.free()
    finally:
        if context is None:
            ctx.close()


def _check_capacity(url: str, what: str, need: int, capacity: int | None) -> None:
    if capacity is not None and need > capacity:
        raise TargetTooSmallError.of(url, need, capacity, what=what)


def _result(ns: NativeSource, source: HttpSource, dst: Target, stats: Any, *, strategy: str,
            fmt: str, compression: str, virtual_size: int, final_size: int, start: float,
            preallocation: str, checksum: Checksum | None, digest: bytes,
            peak_held: int = 0) -> ImportResult:
    info = ns.info()
    copy = make_result(source.display_url, dst, stats, source_format=fmt,
                       virtual_size=virtual_size, start=start,
                       scan_method=ScanMethod.QCOW2 if fmt == "qcow2" else ScanMethod.FULL_READ,
                       preallocation=preallocation, final_size=final_size,
                       scan_note=f"http {strategy}")
    return ImportResult(
        copy=copy, url=source.display_url, strategy=strategy, source_format=fmt,
        compression=compression, file_size=info.size, bytes_fetched=info.bytes_fetched,
        requests=info.requests, retries=info.retries, restarts=info.restarts,
        http_version=info.http_version,
        digest=f"{checksum.algorithm}:{digest.hex()}" if checksum is not None else None,
        peak_held=peak_held)


def _finish(ctx: Context, dst: Target, virtual_size: int, final_size: int, preallocation: str,
            stats: Any, paths: tuple[str, str]) -> None:
    if dst.probe.is_regular:
        grow_target(ctx, dst, virtual_size, final_size, preallocation, stats, paths)
    dst.commit()


def _by_ranges(ctx: Context, ns: NativeSource, source: HttpSource, pr: Probed,
               target: str | os.PathLike[str] | Place, *, target_is_zero: bool,
               preallocation: str, target_size: int | None, capacity: int | None,
               progress: ProgressFn | None, tuning: Tuning, start: float,
               checksum: Checksum | None) -> ImportResult:
    """The ranges strategy: a QCOW2 (PR.image set; never with a checksum) converted, or a RAW
    file copied and hashed in offset order."""
    qcow2 = pr.image is not None
    if pr.image is not None:
        vsize, what = pr.image.virtual_size, "the qcow2 image's virtual size"
    else:
        assert pr.info.size is not None
        vsize, what = pr.info.size, "the raw image"
    _check_capacity(source.display_url, what, vsize, capacity)
    final_size = final_size_for(vsize, target_size)
    need = room_needed(final_size, preallocation, None)
    with open_target(target, vsize, ctx=ctx, need=need) as dst:
        paths = (source.display_url, dst.path)
        opts = target_opts(dst, vsize, scan_method=ScanMethod.QCOW2 if qcow2
                           else ScanMethod.FULL_READ, target_is_zero=target_is_zero,
                           preallocation=preallocation, tuning=tuning)
        stats = _native.new_stats()
        digest = b""
        if qcow2:
            try:
                ns.qcow2_convert(ctx, dst.fd, opts, stats, progress=progress, paths=paths)
            except ImageFormatError as e:
                raise type(e)(f"{source.display_url}: {e}") from None
        else:
            digest = ns.copy(ctx, dst.fd, opts, stats,
                             hash=checksum.algorithm if checksum else "", progress=progress,
                             paths=paths).digest
            _verify(checksum, digest, source.display_url)
        _finish(ctx, dst, vsize, final_size, preallocation, stats, paths)
        return _result(ns, source, dst, stats, strategy="ranges",
                       fmt="qcow2" if qcow2 else "raw", compression="none",
                       virtual_size=vsize, final_size=final_size, start=start,
                       preallocation=preallocation, checksum=None if qcow2 else checksum,
                       digest=digest)


def _stream(ctx: Context, ns: NativeSource, source: HttpSource, pr: Probed,
            target: str | os.PathLike[str] | Place, *, source_format: str, mem_limit: int,
            target_is_zero: bool, preallocation: str, target_size: int | None,
            capacity: int | None, progress: ProgressFn | None, tuning: Tuning, start: float,
            checksum: Checksum | None) -> ImportResult:
    size = pr.info.size
    if pr.format == "raw" and size is not None and pr.head:
        _check_capacity(source.display_url, "the raw image", size, capacity)
        bound = size
    else:
        limit = capacity if capacity is not None else default_capacity(target)
        if limit is None:
            raise ValueError(f"{source.display_url}: the image's size is not known in advance: "
                             "give the target's capacity")
        bound = limit
    bound_known = capacity is not None or size is not None and pr.format == "raw"
    if preallocation == "full" and not bound_known and not is_device(target):
        raise ValueError(f"{source.display_url}: preallocation=full of a file whose size is "
                         "not known in advance needs the target's capacity")
    with open_target(target, bound, ctx=ctx, need=None) as dst:
        # preallocation: by the writer over the known bound, else afterwards (falloc keeps data)
        writer, early, bound = open_stream_writer(
            ctx, dst, bound, bound_known=bound_known, capacity=capacity,
            preallocation=preallocation, target_is_zero=target_is_zero, tuning=tuning)
        paths = (source.display_url, dst.path)
        with writing(writer):
            opts = _native.new_stream_opts(
                format=source_format, compression="auto",
                hash=checksum.algorithm if checksum else "", mem_limit=mem_limit)
            try:
                # a stream of unknown length reports nothing until it is done
                shown: ProgressFn | None = None
                if progress is not None:
                    report = progress
                    shown = lambda done, total: report(done, total) if total else None  # noqa: E731
                res = ns.stream(ctx, writer, opts, progress=shown, paths=paths)
            except TargetTooSmallError as e:
                hint = ""
                if capacity is None and dst.probe.is_regular:
                    hint = (" (a file's bound is its filesystem's free space unless a capacity "
                            "is given)")
                raise TargetTooSmallError(f"{source.display_url}: {e}{hint}") from None
            except ImageFormatError as e:
                raise type(e)(f"{source.display_url}: {e}") from None
            stats = writer.finish()
        _verify(checksum, res.digest, source.display_url)
        vsize = res.image_size
        final_size = complete_stream(ctx, dst, stats, vsize, preallocation=preallocation,
                                     early=early, target_size=target_size, paths=paths)
        return _result(ns, source, dst, stats, strategy="stream", fmt=res.format,
                       compression=res.compression, virtual_size=vsize,
                       final_size=final_size, start=start, preallocation=preallocation,
                       checksum=checksum, digest=res.digest, peak_held=res.peak_held)


def _via_scratch(ctx: Context, ns: NativeSource, source: HttpSource,
                 target: str | os.PathLike[str] | Place, scratch_dir: str, *,
                 source_format: str, target_is_zero: bool, preallocation: str,
                 target_size: int | None, capacity: int | None, progress: ProgressFn | None,
                 tuning: Tuning, start: float, checksum: Checksum | None) -> ImportResult:
    del source_format, start     # a QCOW2, converted as convert() does
    """The fallback for a QCOW2 that cannot be converted as it arrives: the file is streamed
    (decompressed, hashed) into SCRATCH_DIR, converted from there, and removed."""
    fd, path = tempfile.mkstemp(prefix="cdimover-scratch-", dir=scratch_dir)
    try:
        bound = capacity if capacity is not None else default_capacity(scratch_dir + "/x")
        writer = scratch_writer(ctx, fd, path, bound or 0)
        try:
            opts = _native.new_stream_opts(format="raw", compression="auto",
                                           hash=checksum.algorithm if checksum else "")
            res = ns.stream(ctx, writer, opts, paths=(source.display_url, path))
            writer.finish()
        finally:
            writer.free()
        _verify(checksum, res.digest, source.display_url)
        os.ftruncate(fd, res.image_size)
        copy = convert_scratch(ctx, path, target, source.display_url, capacity=capacity,
                               preallocation=preallocation, target_is_zero=target_is_zero,
                               target_size=target_size, tuning=tuning, progress=progress)
    finally:
        os.close(fd)
        os.unlink(path)
    info = ns.info()
    return ImportResult(
        copy=copy, url=source.display_url, strategy="scratch", source_format="qcow2",
        compression=res.compression, file_size=info.size, bytes_fetched=info.bytes_fetched,
        requests=info.requests, retries=info.retries, restarts=info.restarts,
        http_version=info.http_version,
        digest=f"{checksum.algorithm}:{res.digest.hex()}" if checksum is not None else None,
        peak_held=0)
