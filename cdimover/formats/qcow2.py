"""QCOW2 images: inspection and conversion to RAW by the native core.

``inspect()`` reports what ``qemu-img info`` reports, from a header the core has validated;
``info_json()`` renders it in qemu-img's JSON shape.  ``convert()`` writes the guest disk of a
QCOW2 image straight onto a file or block device, sparse and durable, through the same target
writer as ``copy()``.  The image is untrusted: a malformed one raises ImageFormatError, one
that refers to other files (backing file, external data file) raises UnsafeImageError, and one
using an unsupported feature (encryption, a compression type this build lacks) raises
UnsupportedImageError -- all before the target is opened, so a refused image never truncates
an existing target.  No file but the source and the target is ever opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from .. import _native
from .._native import Context, const, cstring
from ..errors import ImageFormatError, UnsafeImageError, UnsupportedImageError
from ..io.detect import require_supported

__all__ = ["ImageInfo", "inspect", "inspect_fd", "choose_format", "info_json", "refusal",
           "QCOW2_MAGIC"]

QCOW2_MAGIC = b"QFI\xfb"

Format = Literal["auto", "raw", "qcow2"]

_COMPRESSION = {const("CDM_QCOW2_COMPRESSION_ZLIB"): "zlib",
                const("CDM_QCOW2_COMPRESSION_ZSTD"): "zstd"}
_CRYPT = {const("CDM_QCOW2_CRYPT_AES"): "aes", const("CDM_QCOW2_CRYPT_LUKS"): "luks"}


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image is, as far as a validated header tells (no data is read).

    For RAW images only ``filename``, ``format``, ``virtual_size``, ``actual_size`` and
    ``file_size`` carry information.  ``backing_file`` and ``data_file`` are the names stored
    in the image (None when absent); they are reported, never opened.
    """

    filename: str
    format: str                        # "raw" | "qcow2"
    virtual_size: int
    actual_size: int                   # bytes allocated to the image file
    file_size: int                     # bytes of the image file or device
    cluster_size: int | None = None
    version: int | None = None         # 2 or 3
    compat: str | None = None          # "0.10" (v2) | "1.1" (v3)
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    encrypted: bool = False
    encryption_format: str | None = None   # "aes" | "luks" | "unknown(N)"
    compression_type: str | None = None    # "zlib" | "zstd"
    compression_supported: bool = True
    extended_l2: bool = False
    lazy_refcounts: bool = False
    refcount_bits: int | None = None
    dirty: bool = False
    corrupt: bool = False
    bitmaps: bool = False
    nb_snapshots: int = 0
    l1_size: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0


def _string(field: Any) -> str:
    return cstring(field)


def _qcow2_info(out: Any, path: str, actual_size: int) -> ImageInfo:
    version = int(out.version)
    crypt = int(out.crypt_method)
    return ImageInfo(
        filename=path, format="qcow2", virtual_size=int(out.virtual_size),
        actual_size=actual_size, file_size=int(out.file_size),
        cluster_size=1 << int(out.cluster_bits), version=version,
        compat="0.10" if version == 2 else "1.1",
        backing_file=_string(out.backing_name) if out.has_backing else None,
        backing_format=_string(out.backing_format) or None,
        data_file=_string(out.data_file_name) if out.has_data_file else None,
        data_file_raw=bool(out.data_file_raw),
        encrypted=crypt != const("CDM_QCOW2_CRYPT_NONE"),
        encryption_format=_CRYPT.get(crypt, f"unknown({crypt})") if crypt else None,
        compression_type=_COMPRESSION[int(out.compression_type)],
        compression_supported=bool(out.compression_supported),
        extended_l2=bool(out.extended_l2), lazy_refcounts=bool(out.lazy_refcounts),
        refcount_bits=1 << int(out.refcount_order), dirty=bool(out.dirty),
        corrupt=bool(out.corrupt), bitmaps=bool(out.has_bitmaps),
        nb_snapshots=int(out.nb_snapshots), l1_size=int(out.l1_size),
        incompatible_features=int(out.incompatible_features),
        compatible_features=int(out.compatible_features),
        autoclear_features=int(out.autoclear_features))


def choose_format(fd: int, size: int, requested: str, path: str) -> str:
    """The format to read FD (SIZE bytes) as: RAW is never probed; otherwise the one format
    probe decides, refusing containers (UnsupportedImageError naming the format); "qcow2"
    needs the QCOW2 magic; "auto" picks QCOW2 exactly when the magic is there."""
    if requested not in ("auto", "raw", "qcow2"):
        raise ValueError(f"format={requested!r}: expected 'auto', 'raw' or 'qcow2'")
    if requested == "raw":
        return "raw"
    found = require_supported(fd, size, path)
    if found.format == "qcow2":
        return "qcow2"
    if requested == "qcow2":
        raise ImageFormatError(f"{path}: not a QCOW2 image (no QFI\\xfb magic at offset 0)")
    return "raw"


def inspect_fd(ctx: Context, fd: int, path: str, fmt: str, probe: _native.Probe) -> ImageInfo:
    actual = os.fstat(fd).st_blocks * 512 if probe.is_regular else 0
    if fmt == "raw":
        return ImageInfo(filename=path, format="raw", virtual_size=probe.size,
                         actual_size=actual, file_size=probe.size)
    try:
        out = _native.qcow2_inspect(ctx, fd, path)
    except ImageFormatError as e:
        raise type(e)(f"{path}: {e}") from None
    return _qcow2_info(out, path, actual)


def inspect(path: str | os.PathLike[str], *, format: Format = "auto") -> ImageInfo:
    """Describe the image at PATH (a file or block device) without reading its data.

    FORMAT "raw" takes the bytes as they are, even when they start with a QCOW2 header;
    "qcow2" requires the QCOW2 magic (ImageFormatError otherwise); "auto" chooses QCOW2 when
    the magic is present.  Images with backing files, external data files or encryption are
    described, not refused; malformed headers raise ImageFormatError, unknown incompatible
    features UnsupportedImageError.  Unless FORMAT is "raw", the format probe
    (cdimover.detect) runs first: containers cdimover does not convert (VMDK, VHD, VHDX,
    VDI, QED, QCOW v1, LUKS, gzip, xz, zstd, bzip2, tar, ...) raise UnsupportedImageError
    naming the format; an ISO 9660 image is RAW.
    """
    p = os.fspath(path)
    with Context() as ctx:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            probe = _native.probe(ctx, fd, p)
            return inspect_fd(ctx, fd, p, choose_format(fd, probe.size, format, p), probe)
        finally:
            os.close(fd)


def refusal(info: ImageInfo) -> Exception | None:
    """The error convert() raises for INFO before touching the target, or None when the image
    may be converted.  The core applies the same rules again when converting."""
    name = info.filename
    if info.format != "qcow2":
        return None
    if info.backing_file is not None:
        return UnsafeImageError(
            f"{name}: the image has a backing file {info.backing_file!r}; backing files are "
            f"never opened")
    if info.data_file is not None:
        return UnsafeImageError(
            f"{name}: the image keeps its data in an external data file {info.data_file!r}; "
            f"data files are never opened")
    if info.encrypted:
        return UnsupportedImageError(
            f"{name}: the image is encrypted ({info.encryption_format}); encrypted images are "
            f"not supported")
    if info.corrupt:
        return ImageFormatError(
            f"{name}: the image is marked corrupt; repair it with qemu-img check -r all")
    if not info.compression_supported:
        return UnsupportedImageError(
            f"{name}: compression type {info.compression_type} is not supported by this build")
    return None


def info_json(info: ImageInfo) -> dict[str, Any]:
    """INFO in the shape of ``qemu-img info --output=json`` (the keys cdimover knows: no
    snapshot list, no full-backing-filename, encryption parameters reduced to the format)."""
    out: dict[str, Any] = {
        "virtual-size": info.virtual_size,
        "filename": info.filename,
        "format": info.format,
        "actual-size": info.actual_size,
        "dirty-flag": info.dirty,
    }
    if info.format != "qcow2":
        return out
    out["cluster-size"] = info.cluster_size
    data: dict[str, Any] = {"compat": info.compat, "compression-type": info.compression_type}
    if info.version != 2:
        data["lazy-refcounts"] = info.lazy_refcounts
    data["refcount-bits"] = info.refcount_bits
    if info.encrypted:
        data["encrypt"] = {"format": info.encryption_format}
        out["encrypted"] = True
    if info.data_file is not None:
        data["data-file"] = info.data_file
        data["data-file-raw"] = info.data_file_raw
    if info.version != 2:
        data["corrupt"] = info.corrupt
        data["extended-l2"] = info.extended_l2
    out["format-specific"] = {"type": "qcow2", "data": data}
    if info.backing_file is not None:
        out["backing-filename"] = info.backing_file
        if info.backing_format:
            out["backing-filename-format"] = info.backing_format
    return out
