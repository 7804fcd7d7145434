"""``cdimover pod clone``: both volumes in one pod, cloned through cdimover.cdi.volume."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .config import CloneConfig
from .progress import Progress, sync_quietly

if TYPE_CHECKING:
    from .metrics import ProgressCounter

__all__ = ["run_clone"]

log = logging.getLogger(__name__)


def run_clone(cfg: CloneConfig, counter: ProgressCounter, *, threads: int = 0,
              request_size: int = 0) -> bool:
    """Clone the volume at CFG.mount_point into CFG.destination through volume.clone, feeding
    COUNTER; return whether preallocation was applied."""
    from ..cdi.volume import FILESYSTEM, Volume, clone

    progress = Progress(counter)

    src = Volume.open(cfg.mount_point, cfg.filesystem_overhead)
    dst = Volume.open(cfg.destination, cfg.filesystem_overhead)
    target_size: int | None = None
    if cfg.image_size is not None and dst.mode == FILESYSTEM:
        # CDI grows disk.img to the requested size, as far as the volume allows.
        grow = min(cfg.image_size, dst.capacity)
        if src.virtual_size is not None and grow > src.virtual_size:
            target_size = grow
    elif cfg.image_size is not None:
        log.info("UPLOAD_IMAGE_SIZE ignored: the Block target %s has the size of its device",
                 dst.path)
    try:
        result = clone(src, dst, content_type="kubevirt", preallocation=cfg.preallocation,
                       filesystem_overhead=cfg.filesystem_overhead, target_size=target_size,
                       progress=progress.copied, threads=threads, request_size=request_size)
    except BaseException:
        sync_quietly(dst.disk_path)
        raise
    return result.preallocation_applied


