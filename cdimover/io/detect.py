"""The one format probe: what an image is, from a few small headers.

``detect(fd, size)`` reads at most four small pieces of the image with ``os.pread`` -- 4 KiB
at offset 0, 8 bytes at 0x8001 (ISO 9660) and the 512-byte footer at the end (fixed VHD, DMG)
-- and never follows anything the headers name.  It works the same on regular files and on
block devices.  Everything it does not recognise is RAW, so a disk's own bytes (a partition
table, a filesystem, an ISO 9660 image) are never mistaken for a container.

Formats, as qemu's probes recognise them (``block/*.c``):

==========  ==========================================  =====================
format      signature                                   cdimover
==========  ==========================================  =====================
raw         anything else                               copies and converts
iso         ``CD001`` at 0x8001 (ISO 9660)              RAW: copies, converts
qcow2       ``QFI\\xfb``, version 2 or 3 (or unknown)   converts to RAW
qcow        ``QFI\\xfb``, version 1                     refuses
qed         ``QED\\0``                                  refuses
vmdk        ``KDMV``, ``COWD``, ``# Disk DescriptorFile``  refuses
vhd         ``conectix`` at 0 (dynamic) or at size-512  refuses
            (fixed)
vhdx        ``vhdxfile``                                refuses
vdi         ``0xbeda107f`` (LE) at 64                   refuses
parallels   ``WithoutFreeSpace`` / ``WithouFreSpacExt`` refuses
dmg         ``koly`` at size-512                        refuses
luks        ``LUKS\\xba\\xbe``                          refuses
gzip, xz,   their stream magics                         refuses
zstd, bzip2
tar         ``ustar`` at 257                            refuses
==========  ==========================================  =====================

A QCOW2 magic with a version other than 1 is reported as ``qcow2``: the header validator
then refuses it with :class:`~cdimover.errors.ImageFormatError` naming the version.

The entry points (``inspect``, ``convert``, ``copy``, ``cdimover info``, the pod importer)
call :func:`require_supported` or :func:`require_raw`, which raise
:class:`~cdimover.errors.UnsupportedImageError` naming the format.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import UnsupportedImageError

__all__ = ["Detected", "detect", "detect_head", "detect_path", "require_supported", "require_raw",
           "unsupported", "FORMATS", "HEAD_SIZE"]

HEAD_SIZE: Final = 4096
"""Bytes read at offset 0; every signature but ISO 9660's and the footers' lies inside."""
ISO_OFFSET: Final = 0x8001
"""ISO 9660's first volume descriptor (sector 16 of 2048 bytes) holds ``CD001`` here."""
FOOTER_SIZE: Final = 512

QCOW_MAGIC: Final = b"QFI\xfb"


@dataclass(frozen=True, slots=True)
class Detected:
    """What an image is.

    ``format`` is a short name (see the module docstring), ``description`` a human one that
    reads well in "<description> images are not supported", and ``container`` is True when
    cdimover does not convert the format (everything but ``raw``, ``iso`` and ``qcow2``).
    """

    format: str
    description: str
    container: bool

    @property
    def is_raw(self) -> bool:
        """True when the bytes are the disk itself (``raw`` or ``iso``)."""
        return self.format in ("raw", "iso")


def _c(fmt: str, description: str) -> Detected:
    return Detected(fmt, description, True)


RAW: Final = Detected("raw", "RAW", False)
ISO: Final = Detected("iso", "ISO 9660 (RAW)", False)

# (offset, magic, result): prefixes at fixed offsets of the first HEAD_SIZE bytes.
_HEAD_MAGIC: Final[tuple[tuple[int, bytes, Detected], ...]] = (
    (0, b"QED\x00", _c("qed", "QED")),
    (0, b"KDMV", _c("vmdk", "VMDK (sparse extent)")),
    (0, b"COWD", _c("vmdk", "VMDK (ESX sparse extent)")),
    (0, b"# Disk DescriptorFile", _c("vmdk", "VMDK (descriptor)")),
    (0, b"vhdxfile", _c("vhdx", "VHDX")),
    (0, b"conectix", _c("vhd", "VHD (vpc, dynamic)")),
    (64, b"\x7f\x10\xda\xbe", _c("vdi", "VDI")),
    (0, b"WithoutFreeSpace", _c("parallels", "Parallels")),
    (0, b"WithouFreSpacExt", _c("parallels", "Parallels")),
    (0, b"LUKS\xba\xbe", _c("luks", "LUKS-encrypted")),
    (0, b"\x1f\x8b\x08", _c("gzip", "gzip-compressed")),
    (0, b"\xfd7zXZ\x00", _c("xz", "xz-compressed")),
    (0, b"\x28\xb5\x2f\xfd", _c("zstd", "zstd-compressed")),
    (257, b"ustar", _c("tar", "tar archive")),
)
_BZIP2_BLOCK: Final = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
_FOOTER_MAGIC: Final[tuple[tuple[bytes, Detected], ...]] = (
    (b"conectix", _c("vhd", "VHD (vpc, fixed)")),
    (b"koly", _c("dmg", "DMG")),
)

FORMATS: Final = ("raw", "iso", "qcow2", "qcow", "qed", "vmdk", "vhd", "vhdx", "vdi",
                  "parallels", "dmg", "luks", "gzip", "xz", "zstd", "bzip2", "tar")
"""Every format name detect() returns."""


def _qcow(head: bytes) -> Detected:
    version = struct.unpack_from(">I", head, 4)[0] if len(head) >= 8 else 0
    if version == 1:
        return _c("qcow", "QCOW version 1")
    if version in (2, 3):
        return Detected("qcow2", f"QCOW2 version {version}", False)
    return Detected("qcow2", f"QCOW2 (unknown version {version})", False)


def detect_head(head: bytes) -> Detected | None:
    """The format shown by the first bytes HEAD of an image (up to 4 KiB), or None when they
    show none (footers and the ISO descriptor are not looked at)."""
    if head.startswith(QCOW_MAGIC):
        return _qcow(head)
    for offset, magic, found in _HEAD_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return found
    if len(head) >= 10 and head[:3] == b"BZh" and head[3] in b"123456789" \
            and head[4:10] in _BZIP2_BLOCK:
        return _c("bzip2", "bzip2-compressed")
    return None


def detect(fd: int, size: int) -> Detected:
    """The format of the image open on FD (a regular file or block device of SIZE bytes).

    Reads at most 4 KiB at offset 0, 8 bytes at 0x8001 and 512 bytes at SIZE - 512 with
    ``os.pread`` (the file offset is untouched); follows nothing.  Unrecognised bytes are
    RAW.  OSError from the reads propagates.
    """
    head = os.pread(fd, min(HEAD_SIZE, size), 0) if size > 0 else b""
    found = detect_head(head)
    if found is not None:
        return found
    if size >= FOOTER_SIZE * 2:
        footer = os.pread(fd, FOOTER_SIZE, size - FOOTER_SIZE)
        for magic, found in _FOOTER_MAGIC:
            if footer.startswith(magic):
                return found
    if size >= ISO_OFFSET + 5 and os.pread(fd, 5, ISO_OFFSET) == b"CD001":
        return ISO
    return RAW


def detect_path(path: str | os.PathLike[str]) -> Detected:
    """detect() on the file or block device at PATH, opened read-only and closed again."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return detect(fd, os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)


_DECOMPRESS: Final = {"gzip": "gunzip", "xz": "unxz", "zstd": "unzstd", "bzip2": "bunzip2"}


def unsupported(found: Detected, path: str) -> UnsupportedImageError:
    """The error for the container FOUND at PATH: names the format and what to do instead."""
    if found.format in _DECOMPRESS:
        hint = f"decompress it first ({_DECOMPRESS[found.format]})"
    elif found.format == "tar":
        hint = "extract the disk image from it first"
    elif found.format == "luks":
        hint = "decrypt it first (qemu-img convert --object secret,... -O raw)"
    else:
        hint = f"convert it first: qemu-img convert -f {found.format} -O qcow2"
    return UnsupportedImageError(
        f"{path}: {found.description} images are not supported yet (format {found.format}; "
        f"RAW and QCOW2 are): {hint}")


def require_supported(fd: int, size: int, path: str) -> Detected:
    """detect() on FD, raising UnsupportedImageError (see unsupported()) for a container;
    otherwise the result (``raw``, ``iso`` or ``qcow2``)."""
    found = detect(fd, size)
    if found.container:
        raise unsupported(found, path)
    return found


def require_raw(fd: int, size: int, path: str, source_format: str) -> None:
    """Check that the source open on FD may be copied as RAW.

    SOURCE_FORMAT "raw" takes the bytes as they are (nothing is read); "auto" probes and
    raises UnsupportedImageError when the source is QCOW2 (copy() would copy its host
    clusters, not its guest disk) or a container.  ValueError for any other value.
    """
    if source_format == "raw":
        return
    if source_format != "auto":
        raise ValueError(f"source_format={source_format!r}: expected 'auto' or 'raw'")
    found = require_supported(fd, size, path)
    if found.format == "qcow2":
        raise UnsupportedImageError(
            f"{path}: the source is a {found.description} image, and a copy moves RAW bytes: "
            f"convert it with cdimover.convert(), or pass source_format='raw' to copy the "
            f"image file as it is")
