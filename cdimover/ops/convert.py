"""Conversion of a guest disk to RAW: QCOW2 through the native core's converter, RAW through
the copy engine, onto a file or block device, sparse and durable.

The image is untrusted: a malformed one raises ImageFormatError, one that refers to other
files (backing file, external data file) raises UnsafeImageError, and one using an unsupported
feature (encryption, a compression type this build lacks) or a container cdimover does not
convert raises UnsupportedImageError -- all before the target is opened, so a refused image
never truncates an existing target.  No file but the source and the target is ever opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .. import _native
from .._native import Context, ProgressFn
from ..errors import ImageFormatError, UnsafeImageError
from ..formats.qcow2 import Format, ImageInfo, choose_format, inspect_fd, refusal
from ..io.endpoints import Place, Source, open_source, open_target
from ..types import CopyResult, ScanMethod
from .copy import Tuning, check_target_size, copy_endpoints, copy_opts, final_size_for, \
    finish_job, make_result, room_needed
from .prealloc import preallocation_mode

__all__ = ["convert", "examine"]


def convert(source: str | os.PathLike[str] | Source, target: str | os.PathLike[str] | Place, *,
            source_format: Format = "auto", preallocation: str | bool = "off",
            target_is_zero: bool = False, progress: ProgressFn | None = None,
            target_size: int | None = None, threads: int = 0, request_size: int = 0,
            context: Context | None = None,
            verify: Callable[[], object] | None = None,
            image: ImageInfo | None = None) -> CopyResult:
    """Write the guest disk of SOURCE (QCOW2 or RAW) to TARGET as RAW, bit-exact, sparse and
    durable.

    - SOURCE: a path or an open :class:`~cdimover.copy.Source` (left open); it is opened
      once, and its format decided on that descriptor.
    - SOURCE_FORMAT: "auto" converts QCOW2 when the magic is present, refuses the containers
      cdimover does not convert (UnsupportedImageError naming the format, see
      cdimover.detect) and copies RAW otherwise; "raw" copies byte for byte even when the
      data starts with a QCOW2 or other header; "qcow2" requires the magic.  RAW sources are
      copied as by cdimover.copy.copy().
    - TARGET: a path or a :class:`~cdimover.copy.Place`, opened and locked as by
      :func:`cdimover.copy.open_target` with the virtual size: a new file appears under its
      name only once complete; a block device must hold the image (TargetTooSmallError).
    - PREALLOCATION: "off", "falloc" or "full", as for copy(): the image's unallocated and
      zero clusters are allocated on the target, data is written once.
    - TARGET_SIZE: grow a file target to this size (never below the virtual size).
    - TARGET_IS_ZERO: an existing block-device target is known to read as zeros.
    - PROGRESS: progress(done, total) in guest bytes, as for copy().
    - VERIFY: called once the data is durable, before the target is declared complete.
    - IMAGE: what :func:`examine` found for SOURCE (an open Source), so that the format and
      header are not decided twice.

    Raises ImageFormatError for malformed images and the corrupt bit, UnsafeImageError for
    backing and external data files, UnsupportedImageError for encryption, unknown features
    and compression types this build lacks -- all before TARGET is opened, so a refused image
    never truncates an existing target.
    """
    if source_format not in ("auto", "raw", "qcow2"):
        raise ValueError(f"source_format={source_format!r}: expected 'auto', 'raw' or 'qcow2'")
    prealloc = preallocation_mode(preallocation)
    tuning = Tuning(threads=threads, request_size=request_size)
    start = time.monotonic()
    ctx = context or Context()
    try:
        if isinstance(source, Source):
            return _convert_open(ctx, source, target, source_format=source_format,
                                 target_is_zero=target_is_zero, progress=progress,
                                 start=start, preallocation=prealloc, target_size=target_size,
                                 tuning=tuning, verify=verify, image=image)
        if image is not None:
            raise ValueError("image= describes an open Source; pass that Source as source")
        with open_source(source, ctx=ctx) as src:
            return _convert_open(ctx, src, target, source_format=source_format,
                                 target_is_zero=target_is_zero, progress=progress,
                                 start=start, preallocation=prealloc, target_size=target_size,
                                 tuning=tuning, verify=verify)
    finally:
        if context is None:
            ctx.close()


def examine(src: Source, source_format: Format = "auto", *,
            context: Context | None = None) -> ImageInfo:
    """Decide, once, what the open SOURCE holds and whether it may be converted: the format
    probe (containers raise UnsupportedImageError), the QCOW2 header validated and the
    refusals applied (backing or data files, encryption...).  The ImageInfo (format "raw" or
    "qcow2", virtual size) can be handed to convert(image=...) so nothing is read again."""
    if source_format not in ("auto", "raw", "qcow2"):
        raise ValueError(f"source_format={source_format!r}: expected 'auto', 'raw' or 'qcow2'")
    ctx = context or Context()
    try:
        fmt = choose_format(src.fd, src.size, source_format, src.path)
        info = inspect_fd(ctx, src.fd, src.path, fmt, src.probe)
    finally:
        if context is None:
            ctx.close()
    refused = refusal(info)
    if refused is not None:
        raise refused
    return info


def _convert_open(ctx: Context, src: Source, target: str | os.PathLike[str] | Place, *,
                  source_format: str, target_is_zero: bool, progress: ProgressFn | None,
                  start: float, preallocation: str, target_size: int | None,
                  tuning: Tuning, verify: Callable[[], object] | None,
                  image: ImageInfo | None = None) -> CopyResult:
    """convert() once the source is open (IMAGE: what examine() found, if the caller has it)."""
    info = image if image is not None else examine(src, source_format,  # type: ignore[arg-type]
                                                   context=ctx)
    if info.format == "raw":
        return copy_endpoints(ctx, src, target, prealloc=preallocation, target_size=target_size,
                              reflink="auto", target_is_zero=target_is_zero, progress=progress,
                              tuning=tuning, start=start, verify=verify)
    final_size = final_size_for(info.virtual_size, target_size)
    # A QCOW2 image's clusters may expand (compression): its data may need the virtual size.
    need = room_needed(final_size, preallocation, None)
    with open_target(target, info.virtual_size, source=src, ctx=ctx, need=need) as dst:
        check_target_size(dst, target_size)
        paths = (src.path, dst.path)
        opts = copy_opts(src, dst, scan_method=ScanMethod.QCOW2, target_is_zero=target_is_zero,
                         preallocation=preallocation, tuning=tuning)
        opts.size = info.virtual_size
        opts.map_fd = -1
        stats = _native.new_stats()
        try:
            _native.run_qcow2_convert(ctx, src.fd, dst.fd, opts, stats, progress=progress,
                                      paths=paths)
        except (ImageFormatError, UnsafeImageError) as e:
            raise type(e)(f"{src.path}: {e}") from None
        finish_job(ctx, src, dst, info.virtual_size, final_size, preallocation, stats, paths,
                   verify)
        return make_result(
            src.path, dst, stats, source_format="qcow2", virtual_size=info.virtual_size,
            start=start, scan_method=ScanMethod.QCOW2, preallocation=preallocation,
            final_size=final_size,
            scan_note=f"qcow2 v{info.version}, {info.cluster_size}-byte clusters"
                      f"{', extended L2' if info.extended_l2 else ''}")
