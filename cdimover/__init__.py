"""cdimover: a sparse-aware, bit-exact data mover for VM disks on Kubernetes.

Copies RAW disks between regular files and block devices in every direction, keeping holes
as holes and turning zeros written as data into holes, durably and with bounded memory.
"""

from __future__ import annotations

from ._native import Context
from .copy import copy, is_zero, scan
from .errors import (
    CdimoverError,
    CloneValidationError,
    ConfigurationError,
    CopyCancelled,
    ImageFormatError,
    SourceInUseError,
    TargetTooSmallError,
    UnsafeImageError,
    UnsupportedImageError,
)
from .prealloc import create_blank, preallocate
from .sizing import required_space, usable_space
from .types import AllocMethod, CopyResult, Extent, PreallocResult, ScanMethod, ZeroMethod
from .volume import CloneResult, Volume, clone

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Context",
    "copy",
    "scan",
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
    "SourceInUseError",
    "TargetTooSmallError",
    "UnsafeImageError",
    "UnsupportedImageError",
]
