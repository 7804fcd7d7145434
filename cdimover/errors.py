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
    "InUseError",
    "SourceInUseError",
    "TargetInUseError",
    "UnsafeVolumeError",
    "CloneValidationError",
    "ConfigurationError",
    "ChecksumMismatchError",
    "Terminated",
    "ScratchSpaceRequired",
    "UnsafeArchiveError",
    "RemoteError",
    "HttpStatusError",
    "AuthenticationError",
    "RemoteNotFoundError",
    "TlsError",
    "NetworkError",
    "ProtocolError",
    "SourceChangedError",
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

    @classmethod
    def of(cls, where: str, required: int, available: int, *, what: str = "the image",
           room: str = "", detail: str = "") -> TargetTooSmallError:
        """The one wording of "too small": ``WHERE: target holds AVAILABLE[ ROOM] but WHAT
        needs REQUIRED[ (DETAIL)]``, sizes in words and in bytes."""
        from .units import format_size

        text = (f"{where}: target holds {format_size(available)} ({available} bytes"
                f"{' ' + room if room else ''}) but {what} needs {format_size(required)} "
                f"({required} bytes)")
        if detail:
            text += f"; {detail}"
        return cls(text, required=required, available=available)


class CopyCancelled(CdimoverError):
    """The operation was cancelled (progress callback or signal); the target is incomplete."""


class ImageFormatError(CdimoverError, ValueError):
    """The image is malformed or corrupt."""


class UnsupportedImageError(ImageFormatError):
    """The image is well-formed but uses a feature cdimover does not convert."""


class UnsafeImageError(CdimoverError):
    """The image refers to other files (backing file, external data file) and was refused."""


class InUseError(CdimoverError):
    """A disk is in use by someone else: mounted, claimed exclusively, locked by a running
    QEMU, or used by another cdimover job."""


class SourceInUseError(InUseError):
    """The clone source is in use (mounted, held open exclusively, locked by QEMU, or being
    written by another cdimover job)."""


class TargetInUseError(InUseError):
    """The target is in use (mounted, locked by QEMU, or written by another cdimover job);
    nothing was written."""


class UnsafeVolumeError(CdimoverError):
    """A volume holds a symbolic link where a disk or directory must be, or changed between
    inspection and use; nothing was read or written through it."""


class CloneValidationError(CdimoverError, ValueError):
    """A clone request breaks a rule (volume modes, content type, size, manifest fields)."""


class ConfigurationError(CdimoverError, ValueError):
    """A pod or CLI configuration value is missing or malformed."""


class ScratchSpaceRequired(CdimoverError):
    """A pod's image cannot be converted as it arrives and the pod has no scratch volume: the
    pod ends with CDI's ``scratchSpaceRequired`` message (exit 0), and the controller
    recreates it with one."""


class ChecksumMismatchError(CdimoverError):
    """The source's digest differs from the expected checksum; the written image was removed."""


class UnsafeArchiveError(CdimoverError, ValueError):
    """An archive was refused: a member would land outside the destination or go through a
    symbolic link, is of a refused kind (device node, FIFO, hard link to a file the archive
    did not extract), exceeds a limit, or the archive is malformed."""


class RemoteError(CdimoverError):
    """A remote source (HTTP, HTTPS) failed: the subclasses say how."""


class HttpStatusError(RemoteError):
    """The server answered with an error status (``status``); not retried unless 5xx."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(HttpStatusError):
    """401 or 403 (407 from a proxy): credentials missing, wrong, or not allowed."""


class RemoteNotFoundError(HttpStatusError):
    """404 or 410: no such file on the server."""


class TlsError(RemoteError):
    """TLS failed: the server's certificate is not trusted, the CA bundle is unusable, or the
    handshake failed."""


class NetworkError(RemoteError):
    """The connection failed, broke or stayed idle, after the retries."""


class ProtocolError(RemoteError):
    """The server broke the protocol: a body longer or shorter than announced, a whole file
    where a range was asked for, oversized headers, too many redirects."""


class SourceChangedError(RemoteError):
    """The remote file changed during the transfer (ETag, Last-Modified or size)."""


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that a running job stops at its next request (a
    BaseException, like KeyboardInterrupt: it is not an error of the job)."""
