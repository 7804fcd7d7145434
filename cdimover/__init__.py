"""cdimover: a sparse-aware, bit-exact data mover for VM disks on Kubernetes.

Copies RAW disks between regular files and block devices in every direction, keeping holes
as holes and turning zeros written as data into holes, durably and with bounded memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    UnsafeArchiveError,
    UnsafeImageError,
    UnsupportedImageError,
)
from .prealloc import create_blank, preallocate
from .qcow2 import ImageInfo, convert, inspect
from .types import AllocMethod, CopyResult, Extent, PreallocResult, ScanMethod, ZeroMethod

if TYPE_CHECKING:
    from .sizing import required_space, usable_space
    from .volume import CloneResult, Volume, clone

# The volume layer pulls in the manifest tooling (PyYAML) and sizing pulls in decimal and
# fractions; load them on first use so that a copy or conversion pays no import time for them.
_LAZY = {"CloneResult": "volume", "Volume": "volume", "clone": "volume",
         "required_space": "sizing", "usable_space": "sizing"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cdimover' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Context",
    "copy",
    "convert",
    "inspect",
    "ImageInfo",
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
    "UnsafeArchiveError",
    "UnsafeImageError",
    "UnsupportedImageError",
]
