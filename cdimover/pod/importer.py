"""``cdimover pod import``: a RAW or QCOW2 image (or a tar archive) from IMPORTER_ENDPOINT onto
the volume, opened once, checked against the volume's capacity before a byte is written, its
checksum verified before the disk is declared complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import ChecksumMismatchError, ScratchSpaceRequired, TargetTooSmallError, \
    UnsupportedImageError
from .config import ImportConfig
from .progress import Hasher, Progress

if TYPE_CHECKING:
    from ..io.endpoints import Place
    from .metrics import ProgressCounter

__all__ = ["run_import"]


def _wipe_device(path: str, length: int) -> None:
    """Zero the first LENGTH bytes of the Block volume PATH after a rejected image (a file
    target is never declared complete in that case: see _import_disk)."""
    from ..ops.prealloc import create_blank

    create_blank(path, length)


def _import_disk(cfg: ImportConfig, progress: Progress, *, threads: int,
                 request_size: int) -> bool:
    """Import the RAW or QCOW2 image CFG.endpoint into the volume CFG.destination, checking
    its virtual size against the volume's capacity first; whether preallocation was applied.
    The image is opened once; its checksum, when asked for, is verified before the disk is
    declared complete (a new disk.img is then never left behind)."""
    from ..io.endpoints import open_source
    from ..ops.convert import convert, examine
    from ..cdi.volume import BLOCK, Volume, target_place

    with open_source(cfg.endpoint) as src:
        image = examine(src)        # the format and header, decided once for the whole import
        vol = Volume.open(cfg.destination, cfg.filesystem_overhead)
        if image.virtual_size > vol.capacity:
            raise TargetTooSmallError.of(vol.disk_path, image.virtual_size, vol.capacity,
                                         what=f"the {image.format} image's virtual size",
                                         detail=vol.describe_capacity())
        block = vol.mode == BLOCK
        grow_to: int | None = None
        if cfg.image_size is not None and not block:
            grow_to = min(cfg.image_size, vol.capacity)
            if grow_to <= image.virtual_size:
                grow_to = None
        hasher = _start_hasher(cfg, progress, src.fd)
        place, dir_fd = target_place(vol)
        try:
            result = convert(src, place, image=image,
                             preallocation="falloc" if cfg.preallocation else "off",
                             progress=progress.copied, target_size=grow_to, threads=threads,
                             request_size=request_size,
                             verify=hasher.verify if hasher is not None else None)
        except ChecksumMismatchError:
            if block:
                _wipe_device(vol.disk_path, image.virtual_size)
            raise
        except BaseException:
            if hasher is not None:
                hasher.stop()
            raise
        finally:
            os.close(dir_fd)
    return result.preallocation_applied


@contextmanager
def _remote_target(cfg: ImportConfig) -> Iterator[tuple[Place, int, int | None]]:
    """The volume of an import from the network: (where the disk goes, the volume's capacity,
    the size to grow disk.img to).  A checksum or digest mismatch zeroes a Block volume's
    image (a new disk.img is removed by the import itself); a QCOW2 beyond the memory bound
    without scratch space becomes ScratchSpaceRequired."""
    from ..cdi.volume import BLOCK, Volume, target_place

    vol = Volume.open(cfg.destination, cfg.filesystem_overhead)
    block = vol.mode == BLOCK
    grow_to = min(cfg.image_size, vol.capacity) if cfg.image_size and not block else None
    place, dir_fd = target_place(vol)
    try:
        yield place, vol.capacity, grow_to
    except ChecksumMismatchError:
        if block:
            _wipe_device(vol.disk_path, vol.capacity)
        raise
    except UnsupportedImageError as e:
        _need_scratch(cfg, e)
        raise
    finally:
        os.close(dir_fd)


def _import_http(cfg: ImportConfig, progress: Progress, *, threads: int,
                 request_size: int, mem_limit: int) -> bool:
    """Import the image at CFG.http straight onto the volume: capacity checked before a byte
    is written when the size is known, and a stream stopped there when it is not; the checksum
    verified in the same pass."""
    from ..ops.remote import import_url

    assert cfg.http is not None
    with _remote_target(cfg) as (place, capacity, grow_to):
        result = import_url(cfg.http, place, checksum=str(cfg.checksum) if cfg.checksum
                            else None, preallocation="falloc" if cfg.preallocation else "off",
                            capacity=capacity, target_size=grow_to, progress=progress.copied,
                            threads=threads, request_size=request_size, mem_limit=mem_limit,
                            scratch_dir=cfg.scratch_dir)
    return result.copy.preallocation_applied


def _import_registry(cfg: ImportConfig, progress: Progress, *, mem_limit: int) -> bool:
    """Import the containerDisk CFG.registry straight onto the volume: the layer holding the
    disk streamed through the format probe, every digest checked."""
    from ..ops.registry import import_registry

    src = cfg.registry
    assert src is not None
    with _remote_target(cfg) as (place, capacity, grow_to):
        result = import_registry(
            src.image, place, auth=src.auth, ca=src.ca, proxy_ca=src.proxy_ca,
            insecure_tls=src.insecure_tls, insecure_registries=src.insecure_registries,
            arch=src.arch, preallocation="falloc" if cfg.preallocation else "off",
            capacity=capacity, target_size=grow_to, progress=progress.copied,
            mem_limit=mem_limit, scratch_dir=cfg.scratch_dir)
    return result.copy.preallocation_applied


def _need_scratch(cfg: ImportConfig, exc: UnsupportedImageError) -> None:
    """A QCOW2 beyond the memory bound in a pod without scratch space (CFG.scratch_dir, used
    only for such an image; cdimover never asks for it otherwise): ScratchSpaceRequired (CDI's
    controller then recreates the pod with a scratch volume)."""
    from ..ops.sink import is_memory_limit

    if is_memory_limit(exc) and cfg.scratch_dir is None:
        raise ScratchSpaceRequired(str(exc)) from None


def _start_hasher(cfg: ImportConfig, progress: Progress,
                  fd: int | None = None) -> Hasher | None:
    """Start hashing the image open as FD when CFG has a checksum; the hasher or None."""
    if cfg.checksum is None:
        return None
    return Hasher(cfg.endpoint, cfg.checksum, progress.hashed, fd=fd).start()


def _import_archive(cfg: ImportConfig, progress: Progress) -> bool:
    """Extract the tar archive (optionally compressed) at CFG.endpoint beneath the
    destination directory with :func:`cdimover.io.extract.extract_tar`: nothing is written
    outside it and no link is followed; progress counts archive bytes read.  The archive is
    opened once (the checksum pass reads the same open file).  On a checksum mismatch the
    entries the archive created or replaced at the top of the destination are removed,
    without following links."""
    from ..io.extract import extract_tar, open_dir_nofollow, remove_entries

    with open(cfg.endpoint, "rb") as raw:
        dest_fd = open_dir_nofollow(cfg.destination)
        try:
            hasher = _start_hasher(cfg, progress, raw.fileno())
            try:
                total = os.fstat(raw.fileno()).st_size
                result = extract_tar(
                    raw, dest_fd, progress=lambda n: progress.copied(min(n, total), total))
                progress.copied(total, total)  # extract_tar synced what it wrote
            except BaseException:
                if hasher is not None:
                    hasher.stop()
                raise
            if hasher is not None:
                try:
                    hasher.verify()
                except ChecksumMismatchError:
                    remove_entries(dest_fd, result.entries)
                    raise
        finally:
            os.close(dest_fd)
    return False


def run_import(cfg: ImportConfig, counter: ProgressCounter, *, threads: int = 0,
               request_size: int = 0, mem_limit: int = 0) -> bool:
    """Import CFG.endpoint into CFG.destination, feeding COUNTER; return whether preallocation
    was applied.  THREADS and REQUEST_SIZE tune the copy of RAW sources (0: the defaults);
    MEM_LIMIT bounds a streamed QCOW2 (0: 64 MiB)."""
    progress = Progress(counter, hashing=cfg.checksum is not None)
    if cfg.content_type == "archive":
        return _import_archive(cfg, progress)
    if cfg.http is not None:
        progress = Progress(counter, hashing=False)     # hashed in the same pass
        return _import_http(cfg, progress, threads=threads, request_size=request_size,
                            mem_limit=mem_limit)
    if cfg.registry is not None:
        return _import_registry(cfg, Progress(counter, hashing=False), mem_limit=mem_limit)
    return _import_disk(cfg, progress, threads=threads, request_size=request_size)


