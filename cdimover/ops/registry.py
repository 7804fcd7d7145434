"""Import of a containerDisk (a VM disk under /disk/ of a container image) from a registry
straight onto the target, in one pass per layer needed, every digest checked.

The manifest is resolved by :class:`~cdimover.io.registry.RegistryClient` (platform chosen
from an index, manifest digest checked).  Then the layers are walked **from the top down**,
as a container runtime shows ``/disk``:

- each layer blob is one GET through the native core (resumed with Range when a connection
  breaks; the registry's Authorization header is not sent to another origin after a
  redirect), decompressed (the media type's compression must match the magic bytes), and
  read as a tar archive by the core's tar stage; the sha256 of the blob as received must be
  the layer's digest, or the import fails and the target is never committed;
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
  see that they hold no disk) and written nowhere.

CDI itself scans base-first and stops at the first file, ignoring replacements in upper
layers; cdimover gives what the running container would see.
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass

from .. import _native
from .._native import Context, NativeSource, ProgressFn, StreamResult
from ..errors import AuthenticationError, ChecksumMismatchError, ImageFormatError, \
    TargetTooSmallError
from ..io.endpoints import Place, open_target
from ..io.http import _version, read_ca_bundle
from ..io.registry import ImageRef, Layer, RegistryClient, Resolved, parse_reference
from ..types import CopyResult, ScanMethod
from .copy import Tuning, make_result
from .sink import complete_stream, default_capacity, is_device, open_stream_writer, writing

__all__ = ["import_registry", "RegistryImportResult", "resolve_image", "registry_client"]

DISK_DIR = "disk"


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


def registry_client(image: str | ImageRef, *, auth: tuple[str, str] | None = None,
                    ca: str | None = None, insecure_tls: bool = False,
                    insecure_registries: tuple[str, ...] = ()) -> RegistryClient:
    """A client for IMAGE: plain HTTP when its registry (host[:port]) is listed in
    INSECURE_REGISTRIES, else HTTPS (verified against CA besides the system's, unless
    INSECURE_TLS)."""
    ref = image if isinstance(image, ImageRef) else parse_reference(image)
    plain = ref.registry in insecure_registries
    return RegistryClient(ref, auth=auth, ca=ca, insecure_tls=insecure_tls, plain_http=plain)


def resolve_image(client: RegistryClient, arch: str | None = None,
                  variant: str | None = None) -> Resolved:
    return client.resolve(arch, variant)


def _blob_source(ctx: Context, client: RegistryClient, layer: Layer, ca_pem: str | None,
                 retries: int) -> NativeSource:
    """Open the blob (the first request); a 401 (an expired token) is answered by one
    refresh."""
    for attempt in range(2):
        auth = client.authorization()
        try:
            return NativeSource(
                ctx, client.blob_url(layer.digest), ca_pem=ca_pem,
                headers=(f"Authorization: {auth}",) if auth else (),
                user_agent=f"cdimover/{_version()}", insecure=client.insecure_tls,
                retries=retries)
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


def import_registry(image: str | ImageRef, target: str | os.PathLike[str] | Place, *,
                    auth: tuple[str, str] | None = None, ca: str | None = None,
                    insecure_tls: bool = False, insecure_registries: tuple[str, ...] = (),
                    arch: str | None = None, variant: str | None = None,
                    source_format: str = "auto", preallocation: str = "off",
                    target_is_zero: bool = False, target_size: int | None = None,
                    capacity: int | None = None, progress: ProgressFn | None = None,
                    mem_limit: int = 0, retries: int = 5,
                    context: Context | None = None) -> RegistryImportResult:
    """Import the containerDisk IMAGE (docker://host/repo:tag or @sha256:...) onto TARGET as
    RAW.  AUTH: (user, password) for basic auth or the token endpoint; CA, INSECURE_TLS,
    INSECURE_REGISTRIES: see :func:`registry_client`; ARCH/VARIANT: the platform picked from
    an index (default this machine's).  CAPACITY, TARGET_SIZE, PREALLOCATION, MEM_LIMIT as for
    :func:`~cdimover.ops.remote.import_url`'s stream strategy."""
    from .prealloc import preallocation_mode

    prealloc = preallocation_mode(preallocation)
    client = registry_client(image, auth=auth, ca=ca, insecure_tls=insecure_tls,
                             insecure_registries=insecure_registries)
    start = time.monotonic()
    resolved = client.resolve(arch, variant)
    ca_pem = read_ca_bundle(ca) if ca else None
    name = str(client.ref)
    limit = capacity if capacity is not None else default_capacity(target)
    if limit is None:
        raise ValueError(f"{name}: give the target's capacity")
    if prealloc == "full" and capacity is None and not is_device(target):
        raise ValueError(f"{name}: preallocation=full of a file whose size is not known in "
                         "advance needs the target's capacity")
    ctx = context or Context()
    try:
        with open_target(target, limit, ctx=ctx, need=None) as dst:
            writer, early, _ = open_stream_writer(
                ctx, dst, limit, bound_known=capacity is not None, capacity=capacity,
                preallocation=prealloc, target_is_zero=target_is_zero, tuning=Tuning())
            paths = (name, dst.path)
            fetched = retries_seen = pulled = 0
            with writing(writer):
                skip: list[str] = []
                found: tuple[Layer, StreamResult] | None = None
                for layer in reversed(resolved.layers):
                    res, info = _pull_layer(ctx, client, layer, writer, ca_pem, retries, skip,
                                            source_format, mem_limit, progress, paths)
                    pulled += 1
                    fetched += info.bytes_fetched
                    retries_seen += info.retries
                    tar = res.tar
                    if tar is not None and tar.found:
                        found = (layer, res)
                        break
                    names = tar.names if tar is not None else ()
                    others = [n for n in names if not n.startswith(".wh.") and
                              not n.endswith("/")]
                    if others:
                        raise ImageFormatError(
                            f"{name}: no disk directly under /{DISK_DIR}/ in layer "
                            f"{layer.digest[:19]}: it has {', '.join(others)}")
                    skip += [n[4:] for n in names if n.startswith(".wh.")]
                    if tar is not None and tar.hidden:
                        break
                if found is None:
                    raise ImageFormatError(f"{name}: no disk file under /{DISK_DIR}/ in the "
                                           f"image ({len(resolved.layers)} layers, "
                                           f"{pulled} read)")
                stats = writer.finish()
            layer, res = found
            assert res.tar is not None
            vsize = res.image_size
            final_size = complete_stream(ctx, dst, stats, vsize, preallocation=prealloc,
                                         early=early, target_size=target_size, paths=paths)
            copy = make_result(name, dst, stats, source_format=res.format,
                               virtual_size=vsize, start=start,
                               scan_method=ScanMethod.QCOW2 if res.format == "qcow2"
                               else ScanMethod.FULL_READ, preallocation=prealloc,
                               final_size=final_size, scan_note="registry stream")
            return RegistryImportResult(
                copy=copy, image=name, manifest_digest=resolved.digest,
                platform=resolved.platform, layer=layer.digest, member=res.tar.member,
                source_format=res.format, compression=res.compression,
                member_compression=res.tar.member_compression, layers_pulled=pulled,
                bytes_fetched=fetched, retries=retries_seen, peak_held=res.peak_held)
    finally:
        if context is None:
            ctx.close()


def _pull_layer(ctx: Context, client: RegistryClient, layer: Layer, writer: _native.NativeWriter,
                ca_pem: str | None, retries: int, skip: list[str], source_format: str,
                mem_limit: int, progress: ProgressFn | None,
                paths: tuple[str, str]) -> tuple[StreamResult, _native.SourceInfo]:
    """Stream one layer blob through the tar stage onto WRITER; its sha256 checked."""
    name = paths[0]
    ns = _blob_source(ctx, client, layer, ca_pem, retries)
    try:
        opts = _native.new_stream_opts(format=source_format, compression=layer.compression,
                                       hash="sha256", mem_limit=mem_limit, tar_dir=DISK_DIR,
                                       tar_skip=skip, expect_digest=bytes.fromhex(layer.digest[7:]),
                                       expect_size=layer.size)
        shown: ProgressFn | None = None
        if progress is not None:
            report = progress
            total = layer.size
            shown = lambda done, _t: report(done, total)  # noqa: E731
        try:
            res = ns.stream(ctx, writer, opts, progress=shown, paths=paths)
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
