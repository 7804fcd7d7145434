"""The exception hierarchy: every error cdimover raises on purpose derives from CdimoverError.

System failures stay plain OSError subclasses (FileNotFoundError, PermissionError, ...) carrying
the path they concern.
"""

from __future__ import annotations

__all__ = [
    "CdimoverError",
    "TargetTooSmallError",
    "CopyCancelled",
    "ImageFormatError",
    "UnsupportedImageError",
    "UnsafeImageError",
    "SourceInUseError",
    "CloneValidationError",
    "ConfigurationError",
    "ChecksumMismatchError",
    "UnsafeArchiveError",
]


class CdimoverError(Exception):
    """Root of cdimover's own errors; never raised directly."""


class TargetTooSmallError(CdimoverError):
    """The target cannot hold the source's virtual size; nothing was written."""

    def __init__(self, message: str, *, required: int | None = None,
                 available: int | None = None) -> None:
        super().__init__(message)
        self.required = required
        self.available = available


class CopyCancelled(CdimoverError):
    """The operation was cancelled (progress callback or signal); the target is incomplete."""


class ImageFormatError(CdimoverError, ValueError):
    """The image is malformed or corrupt."""


class UnsupportedImageError(ImageFormatError):
    """The image is well-formed but uses a feature cdimover does not convert."""


class UnsafeImageError(CdimoverError):
    """The image refers to other files (backing file, external data file) and was refused."""


class SourceInUseError(CdimoverError):
    """The clone source is in use (mounted, held open exclusively, or locked by QEMU)."""


class CloneValidationError(CdimoverError, ValueError):
    """A clone request breaks a rule (volume modes, content type, size, manifest fields)."""


class ConfigurationError(CdimoverError, ValueError):
    """A pod or CLI configuration value is missing or malformed."""


class ChecksumMismatchError(CdimoverError):
    """The source's digest differs from the expected checksum; the written image was removed."""


class UnsafeArchiveError(CdimoverError, ValueError):
    """An archive was refused: a member would land outside the destination or go through a
    symbolic link, is of a refused kind (device node, FIFO, hard link to a file the archive
    did not extract), exceeds a limit, or the archive is malformed."""
