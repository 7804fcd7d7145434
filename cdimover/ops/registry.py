"""Import of a containerDisk (a VM disk under /disk/ of a container image) from a registry
straight onto the target, in one pass per layer needed, every digest checked.

The manifest is resolved by :class:`~cdimover.io.registry.RegistryClient` (platform chosen
from an index, manifest digest checked).  Then the layers are walked **from the top down**,
as a container runtime shows ``/disk``:

- each layer blob is one GET through the native core (resumed with Range when a connection
  breaks, with a new token when the old one ran out meanwhile; the registry's Authorization
  header is not sent to another origin after a redirect), decompressed (the media type's
  compression must match the magic bytes), and read as a tar archive by the core's tar
  stage; the sha256 of the blob as received must be the layer's digest, or the import fails
  and the target is never committed (a blob corrupted so that it stops decoding is still read
  to its end, so that the digest mismatch is what is reported);
- the topmost layer holding a regular file directly under ``disk/`` provides the disk: that
  file's bytes go through the format probe (gzip/xz inside it too) onto the target as they
  arrive, RAW as is (sparse members' holes stay holes) and QCOW2 through the single-pass
  converter;
- a layer that has no such file but whites out ``disk/`` (``.wh.disk``, an opaque
  ``disk/.wh..wh..opq``, an opaque root) ends the walk: there is no disk.  Whiteouts of single
  files (``disk/.wh.NAME``) hide NAME in the layers below;
- two files under ``disk/`` in the layer that has one (or a file in a subdirectory of it, a
  link) is an error naming them, and so is no file at all;
- only the layers needed are downloaded: in a single-layer containerDisk exactly one blob,
  and the layers below the one holding the disk never.  Layers above it are downloaded (to
  see that they hold no disk) and written nowhere;
- a QCOW2 disk whose layout needs more than the memory bound is, with a scratch directory,
  pulled again into it and converted from there (the one case where a blob is fetched
  twice); without one the import fails with UnsupportedImageError.

CDI itself scans base-first and stops at the first file, ignoring replacements in upper
layers; cdimover gives what the running container would see.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import time
from dataclasses import dataclass

from .. import _native
from .._native import Context, NativeSource, ProgressFn, StreamResult
from ..errors import AuthenticationError, ChecksumMismatchError, ImageFormatError, \
    TargetTooSmallError, UnsupportedImageError
from ..io.endpoints import Place, open_target
from ..io.http import read_ca_bundle, user_agent
from ..io.registry import ImageRef, Layer, RegistryClient, Resolved, parse_reference
from ..types import CopyResult, ScanMethod
from .copy import Tuning, make_result
from .sink import complete_stream, convert_scratch, default_capacity, is_device, \
    is_memory_limit, open_stream_writer, scratch_writer, writing

__all__ = ["import_registry", "RegistryImportResult", "resolve_image", "registry_client"]

DISK_DIR = "disk"
log = logging.getLogger("cdimover")


@dataclass(frozen=True, slots=True)
class RegistryImportResult:
    copy: CopyResult
    image: str                  # the reference as given
    manifest_digest: str
    platform: str               # "linux/amd64" when chosen from an index, else ""
    layer: str                  # digest of the layer that held the disk
    member: str                 # the disk's path in that layer
    source_format: str
    compression: str            # the layer's
    member_compression: str     # inside the member
    layers_pulled: int
    bytes_fetched: int          # blob bytes received (all layers pulled)
    retries: int
    peak_held: int
    strategy: str = "stream"    # "scratch": converted from a copy in the scratch directory


def registry_client(image: str | ImageRef, *, auth: tuple[str, str] | None = None,
                    ca: str | None = None, proxy_ca: str | None = None,
                    insecure_tls: bool = False,
                    insecure_registries: tuple[str, ...] = ()) -> RegistryClient:
    """A client for IMAGE: plain HTTP when its registry (host[:port]) is listed in
    INSECURE_REGISTRIES, else HTTPS (verified against CA and PROXY_CA besides the system's,
    unless INSECURE_TLS)."""
    ref = image if isinstance(image, ImageRef) else parse_reference(image)
    plain = ref.registry in insecure_registries
    return RegistryClient(ref, auth=auth, ca=ca, proxy_ca=proxy_ca, insecure_tls=insecure_tls,
                          plain_http=plain)


def resolve_image(client: RegistryClient, arch: str | None = None,
                  variant: str | None = None) -> Resolved:
    return client.resolve(arch, variant)


def _blob_source(ctx: Context, client: RegistryClient, layer: Layer, retries: int) -> NativeSource:
    """Open the blob (the first request); a 401 (an expired token) is answered by one
    refresh."""
    ca_pem = read_ca_bundle(client.ca) if client.ca else None
    proxy_pem = read_ca_bundle(client.proxy_ca) if client.proxy_ca else None
    for attempt in range(2):
        auth = client.fresh_authorization()
        try:
            return NativeSource(
                ctx, client.blob_url(layer.digest), ca_pem=ca_pem, proxy_ca_pem=proxy_pem,
                headers=(f"Authorization: {auth}",) if auth else (),
                user_agent=user_agent(), insecure=client.insecure_tls,
                retries=retries, reauth=client.reauth_header)
        except AuthenticationError as e:
            if attempt == 1 or e.status != 401:
                raise
            if client.token is not None:
                client.refresh()
            elif client.auth is not None and not client.use_basic:
                client.use_basic = True
            else:
                raise
    raise AssertionError("unreachable")


class _ToScratch(Exception):
    """The disk of LAYER is a QCOW2 that cannot be converted as it arrives (raised inside the
    target's writer, which it aborts)."""

    def __init__(self, layer: Layer, skip: list[str], cause: Exception) -> None:
        super().__init__(str(cause))
        self.layer, self.skip = layer, skip


def import_registry(image: str | ImageRef, target: str | os.PathLike[str] | Place, *,
                    auth: tuple[str, str] | None = None, ca: str | None = None,
                    proxy_ca: str | None = None, insecure_tls: bool = False,
                    insecure_registries: tuple[str, ...] = (),
                    arch: str | None = None, variant: str | None = None,
                    source_format: str = "auto", preallocation: str = "off",
                    target_is_zero: bool = False, target_size: int | None = None,
                    capacity: int | None = None, progress: ProgressFn | None = None,
                    mem_limit: int = 0, scratch_dir: str | None = None, retries: int = 5,
                    context: Context | None = None) -> RegistryImportResult:
    """Import the containerDisk IMAGE (docker://host/repo:tag or @sha256:...) onto TARGET as
    RAW.  AUTH: (user, password) for basic auth or the token endpoint; CA, PROXY_CA,
    INSECURE_TLS, INSECURE_REGISTRIES: see :func:`registry_client`; ARCH/VARIANT: the platform
    picked from an index (default this machine's).  CAPACITY, TARGET_SIZE, PREALLOCATION,
    MEM_LIMIT as for :func:`~cdimover.ops.remote.import_url`'s stream strategy; a QCOW2 whose
    layout needs more than MEM_LIMIT fails with UnsupportedImageError, unless SCRATCH_DIR is
    given: the disk's layer is then pulled again, the disk stored there (decompressed) and
    converted from it.  PROGRESS gets the blob bytes received of all the layers (the total
    counts every layer, as the walk may need them all)."""
    from .prealloc import preallocation_mode

    prealloc = preallocation_mode(preallocation)
    client = registry_client(image, auth=auth, ca=ca, proxy_ca=proxy_ca,
                             insecure_tls=insecure_tls, insecure_registries=insecure_registries)
    start = time.monotonic()
    resolved = client.resolve(arch, variant)
    name = str(client.ref)
    limit = capacity if capacity is not None else default_capacity(target)
    if limit is None:
        raise ValueError(f"{name}: give the target's capacity")
    if prealloc == "full" and capacity is None and not is_device(target):
        raise ValueError(f"{name}: preallocation=full of a file whose size is not known in "
                         "advance needs the target's capacity")
    ctx = context or Context()
    walk = _Walk(ctx, client, resolved, retries, mem_limit, progress)
    try:
        try:
            return _import_stream(walk, target, limit, source_format=source_format,
                                  capacity=capacity, prealloc=prealloc,
                                  target_is_zero=target_is_zero, target_size=target_size,
                                  scratch=scratch_dir is not None, start=start)
        except _ToScratch as s:
            assert scratch_dir is not None
            log.warning("%s; pulling layer %s again into %s", s, s.layer.digest, scratch_dir)
            return _import_via_scratch(walk, s.layer, s.skip, target, scratch_dir,
                                       capacity=capacity, limit=limit, prealloc=prealloc,
                                       target_is_zero=target_is_zero, target_size=target_size,
                                       start=start)
    finally:
        if context is None:
            ctx.close()


@dataclass
class _Walk:
    """One import's pulls: the client, what they fetched, progress over all the layers."""

    ctx: Context
    client: RegistryClient
    resolved: Resolved
    retries: int
    mem_limit: int
    progress: ProgressFn | None
    fetched: int = 0
    retried: int = 0
    pulled: int = 0
    base: int = 0           # bytes of the layers pulled before the current one

    def pull(self, layer: Layer, writer: _native.NativeWriter, skip: list[str],
             source_format: str, paths: tuple[str, str]) -> StreamResult:
        shown: ProgressFn | None = None
        if self.progress is not None:
            report, base = self.progress, self.base
            total = max(1, sum(la.size for la in self.resolved.layers))
            shown = lambda done, _t: report(min(base + done, total), total)  # noqa: E731
        res, info = _pull_layer(self.ctx, self.client, layer, writer, self.retries, skip,
                                source_format, self.mem_limit, shown, paths)
        self.pulled += 1
        self.base += layer.size
        self.fetched += info.bytes_fetched
        self.retried += info.retries
        return res

    def result(self, copy: CopyResult, layer: Layer, res: StreamResult, *, fmt: str,
               peak_held: int, strategy: str = "stream") -> RegistryImportResult:
        assert res.tar is not None
        return RegistryImportResult(
            copy=copy, image=str(self.client.ref), manifest_digest=self.resolved.digest,
            platform=self.resolved.platform, layer=layer.digest, member=res.tar.member,
            source_format=fmt, compression=layer.compression,
            member_compression=res.tar.member_compression, layers_pulled=self.pulled,
            bytes_fetched=self.fetched, retries=self.retried, peak_held=peak_held,
            strategy=strategy)


def _import_stream(walk: _Walk, target: str | os.PathLike[str] | Place, limit: int, *,
                   source_format: str, capacity: int | None, prealloc: str,
                   target_is_zero: bool, target_size: int | None, scratch: bool,
                   start: float) -> RegistryImportResult:
    """The layers from the top down, the disk streamed onto TARGET as it arrives; _ToScratch
    when SCRATCH allows it and the disk needs it."""
    name = str(walk.client.ref)
    layers = walk.resolved.layers
    with open_target(target, limit, ctx=walk.ctx, need=None) as dst:
        writer, early, _ = open_stream_writer(
            walk.ctx, dst, limit, bound_known=capacity is not None, capacity=capacity,
            preallocation=prealloc, target_is_zero=target_is_zero, tuning=Tuning())
        paths = (name, dst.path)
        with writing(writer):
            skip: list[str] = []
            found: tuple[Layer, StreamResult] | None = None
            for layer in reversed(layers):
                try:
                    res = walk.pull(layer, writer, skip, source_format, paths)
                except UnsupportedImageError as e:
                    if not scratch or not is_memory_limit(e):
                        raise
                    raise _ToScratch(layer, list(skip), e) from None
                tar = res.tar
                if tar is not None and tar.found:
                    found = (layer, res)
                    break
                names = tar.names if tar is not None else ()
                others = [n for n in names if not n.startswith(".wh.") and not n.endswith("/")]
                if others:
                    raise ImageFormatError(
                        f"{name}: no disk directly under /{DISK_DIR}/ in layer "
                        f"{layer.digest[:19]}: it has {', '.join(others)}")
                skip += [n[4:] for n in names if n.startswith(".wh.")]
                if tar is not None and tar.hidden:
                    break
            if found is None:
                raise ImageFormatError(f"{name}: no disk file under /{DISK_DIR}/ in the "
                                       f"image ({len(layers)} layers, {walk.pulled} read)")
            stats = writer.finish()
        layer, res = found
        vsize = res.image_size
        final_size = complete_stream(walk.ctx, dst, stats, vsize, preallocation=prealloc,
                                     early=early, target_size=target_size, paths=paths)
        copy = make_result(name, dst, stats, source_format=res.format, virtual_size=vsize,
                           start=start, scan_method=ScanMethod.QCOW2 if res.format == "qcow2"
                           else ScanMethod.FULL_READ, preallocation=prealloc,
                           final_size=final_size, scan_note="registry stream")
        return walk.result(copy, layer, res, fmt=res.format, peak_held=res.peak_held)


def _import_via_scratch(walk: _Walk, layer: Layer, skip: list[str],
                        target: str | os.PathLike[str] | Place, scratch_dir: str, *,
                        capacity: int | None, limit: int, prealloc: str,
                        target_is_zero: bool, target_size: int | None,
                        start: float) -> RegistryImportResult:
    """The fallback for a QCOW2 disk that cannot be converted as it arrives: LAYER pulled
    again (digest checked), its disk stored decompressed in SCRATCH_DIR, converted from there
    onto TARGET, and removed."""
    del start      # the conversion times itself
    name = str(walk.client.ref)
    fd, path = tempfile.mkstemp(prefix="cdimover-scratch-", dir=scratch_dir)
    try:
        bound = capacity if capacity is not None else default_capacity(scratch_dir + "/x")
        # the QCOW2 file may be larger than the disk it holds (its tables)
        bound = (bound or limit) + (bound or limit) // 8 + (64 << 20)
        writer = scratch_writer(walk.ctx, fd, path, bound)
        try:
            res = walk.pull(layer, writer, skip, "raw", (name, path))
            writer.finish()
        finally:
            writer.free()
        os.ftruncate(fd, res.image_size)
        copy = convert_scratch(walk.ctx, path, target, name, capacity=capacity,
                               preallocation=prealloc, target_is_zero=target_is_zero,
                               target_size=target_size, tuning=Tuning())
    finally:
        os.close(fd)
        os.unlink(path)
    return walk.result(copy, layer, res, fmt="qcow2", peak_held=0, strategy="scratch")


def _pull_layer(ctx: Context, client: RegistryClient, layer: Layer, writer: _native.NativeWriter,
                retries: int, skip: list[str], source_format: str, mem_limit: int,
                progress: ProgressFn | None,
                paths: tuple[str, str]) -> tuple[StreamResult, _native.SourceInfo]:
    """Stream one layer blob through the tar stage onto WRITER; its sha256 checked."""
    name = paths[0]
    ns = _blob_source(ctx, client, layer, retries)
    try:
        opts = _native.new_stream_opts(
            format=source_format, compression=layer.compression, hash="sha256",
            mem_limit=mem_limit, tar_dir=DISK_DIR, tar_skip=skip,
            expect_digest=bytes.fromhex(layer.digest[7:]), expect_size=layer.size)
        try:
            res = ns.stream(ctx, writer, opts, progress=progress, paths=paths)
        except ChecksumMismatchError as e:
            # the core read the whole blob through the digest, also past a decoding failure
            raise ChecksumMismatchError(
                f"{name}: layer {layer.digest} does not match its digest: {e}; refusing it "
                "(the target is not committed)") from None
        except (ImageFormatError, TargetTooSmallError) as e:
            raise type(e)(f"{name}: layer {layer.digest}: {e}") from None
        info = ns.info()
    finally:
        ns.free()
    got = "sha256:" + res.digest.hex()
    if not hmac.compare_digest(got, layer.digest):
        raise ChecksumMismatchError(f"{name}: layer {layer.digest} arrived with sha256 "
                                    f"{got}: refusing it (the target is not committed)")
    if res.bytes_in != layer.size:
        raise ChecksumMismatchError(f"{name}: layer {layer.digest} has {res.bytes_in} bytes, "
                                    f"the manifest says {layer.size}")
    return res, info
