"""cdimover: a sparse-aware, bit-exact data mover for VM disks on Kubernetes.

Copies RAW disks between regular files and block devices in every direction, keeping holes
as holes and turning zeros written as data into holes, durably and with bounded memory;
converts QCOW2 images to RAW; clones CDI volumes.

The API by purpose:

- Moving disks: ``copy`` (RAW, file or block device), ``convert`` (QCOW2 or RAW to RAW),
  ``scan`` (the extent map a copy would use), ``is_zero``; ``Context`` (a reusable native
  context, cancellable from another thread).
- Remote images: ``import_url`` (RAW or QCOW2, maybe gzip/xz/zstd, from http(s):// straight
  onto the target, resumable, checksum in the same pass) with ``HttpSource`` (credentials,
  CA, headers, retries) -> ``ImportResult``; ``Checksum``.  ``import_registry`` (a
  containerDisk from docker://host/repo:tag or @sha256:, the layer holding /disk/ streamed
  onto the target, every digest checked) -> ``RegistryImportResult``.
- Images: ``inspect`` -> ``ImageInfo`` (``qemu-img info`` from a validated header); the
  format probe is ``cdimover.detect`` (``detect``, ``detect_path``).
- Preallocation: ``preallocate``, ``create_blank`` -> ``PreallocResult``.
- CDI volumes: ``Volume``, ``clone`` -> ``CloneResult``; sizing with ``usable_space`` and
  ``required_space`` (CDI's filesystem overhead).  Loaded on first use.
- Results and strategies: ``CopyResult``, ``Extent``, ``ScanMethod``, ``ZeroMethod``,
  ``AllocMethod``.
- Errors, all under ``CdimoverError``: ``ImageFormatError`` > ``UnsupportedImageError``,
  ``UnsafeImageError``, ``TargetTooSmallError``, ``CopyCancelled``, ``SourceInUseError``,
  ``CloneValidationError``, ``ConfigurationError``, ``ChecksumMismatchError``; remote
  sources raise ``RemoteError``: ``HttpStatusError`` > ``AuthenticationError``,
  ``RemoteNotFoundError``; ``TlsError``, ``NetworkError``, ``ProtocolError``,
  ``SourceChangedError``.  System failures are ``OSError``.
- Programs: the ``cdimover`` command (``cdimover.cli``) and the CDI pod programs
  (``cdimover pod clone|import``, ``cdimover.pod``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._native import Context
from .ops.copy import copy, is_zero, scan
from .errors import (
    AuthenticationError,
    CdimoverError,
    ChecksumMismatchError,
    HttpStatusError,
    NetworkError,
    ProtocolError,
    RemoteError,
    RemoteNotFoundError,
    SourceChangedError,
    TlsError,
    CloneValidationError,
    ConfigurationError,
    CopyCancelled,
    ImageFormatError,
    InUseError,
    SourceInUseError,
    TargetInUseError,
    TargetTooSmallError,
    UnsafeArchiveError,
    UnsafeImageError,
    UnsafeVolumeError,
    UnsupportedImageError,
)
from .types import AllocMethod, CopyResult, Extent, PreallocResult, ScanMethod, ZeroMethod

if TYPE_CHECKING:
    from .formats.qcow2 import ImageInfo, inspect
    from .io.http import HttpSource
    from .ops.convert import convert
    from .ops.prealloc import create_blank, preallocate
    from .ops.registry import RegistryImportResult, import_registry
    from .ops.remote import Checksum, ImportResult, import_url
    from .ops.writer import Writer
    from .sizing import required_space, usable_space
    from .cdi.volume import CloneResult, Volume, clone

# Only the copy path is imported with the package: the rest (QCOW2, preallocation, the
# writer, HTTP and registry imports with their TLS and certificate stores, the volume layer
# with PyYAML, sizing with decimal and fractions) is loaded on first use, so that `cdimover
# copy`, `cdimover --help` and `import cdimover; cdimover.copy(...)` pay no import time for it.
_LAZY = {"ImageInfo": "formats.qcow2", "inspect": "formats.qcow2",
         "HttpSource": "io.http", "convert": "ops.convert",
         "create_blank": "ops.prealloc", "preallocate": "ops.prealloc",
         "RegistryImportResult": "ops.registry", "import_registry": "ops.registry",
         "Checksum": "ops.remote", "ImportResult": "ops.remote", "import_url": "ops.remote",
         "Writer": "ops.writer",
         "CloneResult": "cdi.volume", "Volume": "cdi.volume", "clone": "cdi.volume",
         "required_space": "sizing", "usable_space": "sizing"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cdimover' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included (so help() lists them)."""
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Context",
    "copy",
    "convert",
    "inspect",
    "ImageInfo",
    "scan",
    "Writer",
    "preallocate",
    "create_blank",
    "usable_space",
    "required_space",
    "Volume",
    "clone",
    "CloneResult",
    "PreallocResult",
    "AllocMethod",
    "is_zero",
    "CopyResult",
    "Extent",
    "ScanMethod",
    "ZeroMethod",
    "CdimoverError",
    "CloneValidationError",
    "ConfigurationError",
    "CopyCancelled",
    "ImageFormatError",
    "InUseError",
    "SourceInUseError",
    "TargetInUseError",
    "UnsafeVolumeError",
    "TargetTooSmallError",
    "UnsafeArchiveError",
    "UnsafeImageError",
    "UnsupportedImageError",
    "import_url",
    "import_registry",
    "RegistryImportResult",
    "HttpSource",
    "ImportResult",
    "Checksum",
    "ChecksumMismatchError",
    "RemoteError",
    "HttpStatusError",
    "AuthenticationError",
    "RemoteNotFoundError",
    "TlsError",
    "NetworkError",
    "ProtocolError",
    "SourceChangedError",
]
