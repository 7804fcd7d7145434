"""Pod mode: ``cdimover pod clone`` and ``cdimover pod import``, configured from the
environment as CDI configures its clone and import pods, reporting through a termination
message and a Prometheus progress endpoint.

A CDI worker pod runs one command and is watched by a controller in two ways: it scrapes a
progress counter from the pod's metrics endpoint (:mod:`cdimover.metrics`) and, when the
container ends, reads its termination message.  This module is that command.

**Configuration.**  Environment variables, as CDI sets them; a missing or malformed one is a
:class:`~cdimover.errors.ConfigurationError` naming the variable (one line, exit status 1),
raised before anything is written.

- ``clone``: ``VOLUME_MODE`` (``block`` | ``filesystem``, the source's mode) and
  ``MOUNT_POINT`` (the source: a block device, or a directory holding ``disk.img``),
  ``PREALLOCATION`` (``true`` | ``false``), ``OWNER_UID``, all required; ``DESTINATION`` (the
  target: a block device, or a directory -- ``disk.img`` in it; a path ending in
  ``/disk.img`` names its directory), ``FILESYSTEM_OVERHEAD`` (default ``0.06``),
  ``UPLOAD_IMAGE_SIZE`` (a Kubernetes quantity: a Filesystem target's ``disk.img`` is grown
  to min(size, usable space); ignored for Block targets).  Every mode pair goes through
  :func:`cdimover.volume.clone`.
- ``import``: ``IMPORTER_ENDPOINT`` (required: a local path or a ``file://`` URL of a RAW or
  QCOW2 image, or of a tar archive), ``IMPORTER_CONTENTTYPE`` (``kubevirt``, the default, or
  ``archive``: the tar archive is extracted into a Filesystem ``DESTINATION``),
  ``IMPORTER_IMAGE_SIZE`` (a quantity: ``disk.img`` grows to min(size, usable space), never
  shrinks), ``IMPORTER_CHECKSUM`` (``sha256:<hex>``; also ``md5``, ``sha1``, ``sha512``),
  ``PREALLOCATION`` (default ``false``), ``FILESYSTEM_OVERHEAD``, ``OWNER_UID`` (optional:
  the metric's label), ``DESTINATION``.

``DESTINATION`` defaults to ``/dev/cdi-block-volume`` when it exists, else ``/data``.
Command-line flags override the paths: ``--mount-point``, ``--destination``, ``--endpoint``,
``--termination-log`` (default ``/dev/termination-log``) and ``--metrics-address``
(``HOST:PORT``, default ``:8443``; ``none`` serves nothing).  ``--tls-cert`` and
``--tls-key`` (or ``METRICS_TLS_CERT_FILE`` and ``METRICS_TLS_KEY_FILE``), PEM files, make
the endpoint HTTPS.  ``--metrics-linger SECONDS`` keeps serving the final value after the
work is done, for a last scrape.  Both take ``--threads`` and ``--request-size``
to tune the copy (RAW sources, for an import).

**Sizes.**  Before writing, an import compares the image's virtual size with the target's
capacity: CDI's usable space (free space after ``FILESYSTEM_OVERHEAD``) for a Filesystem
target, the device size for a Block one; a clone does the same in
:func:`cdimover.volume.clone`.  Both report CDI's words, "virtual image size N is larger than
the reported available storage M", which controllers map to "DataVolume too small"; a write
that still meets ENOSPC reports "no space left on device", as Go spells it.

**Checksums.**  The native core reads the source itself, so the bytes it reads cannot be
hashed on their way through.  Instead a background thread hashes the source file in a
streaming pass (4 MiB reads, one buffer, hashlib releasing the GIL) while the copy runs: no
extra wall time when the disk keeps up, bounded memory.  The two are joined at the end; on a
mismatch the written image is removed (``disk.img`` unlinked, a Block target's written range
zeroed, an archive's extracted entries deleted) and the run fails.  While hashing, the
progress counter shows the lesser of the two passes.

**What the controller sees.**  The termination message (``--termination-log``; one line, at
most 4096 bytes) is ``{"message":"Clone Complete"|"Import Complete",
"preallocationApplied":bool}`` on success, and ``Unable to process data: <reason>`` on
failure.  The progress counter (``kubevirt_cdi_clone_progress_total`` or
``kubevirt_cdi_import_progress_total``, label ``ownerUID``) counts virtual bytes processed in
percent, holes and conversion included, and reaches 100 on success.

**Exit status.**  0 success; 1 failure or configuration error; 2 usage; 143 SIGTERM and 130
SIGINT, which cancel the copy at its next request: the target is synced and left for a
re-run, which replaces it, and the termination message says the run was cancelled.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from .errors import (
    ChecksumMismatchError,
    ConfigurationError,
    TargetTooSmallError,
    UnsupportedImageError,
)
if TYPE_CHECKING:
    from .metrics import MetricsServer, ProgressCounter

# Where CDI's controllers scrape a pod: port 8443 on every address of the pod.  (The metrics
# module, and with it prometheus_client and http.server, loads only when a pod command runs.)
DEFAULT_ADDRESS: Final = ":8443"
from .sizing import DEFAULT_OVERHEAD, format_size, parse_overhead, parse_quantity

__all__ = [
    "register",
    "CloneConfig",
    "ImportConfig",
    "Checksum",
    "ChecksumMismatchError",
    "clone_config",
    "import_config",
    "run_clone",
    "run_import",
    "success_message",
    "failure_message",
    "write_termination_log",
    "TERMINATION_LOG",
    "MAX_MESSAGE",
]

log = logging.getLogger(__name__)

TERMINATION_LOG: Final = "/dev/termination-log"
"""Where Kubernetes reads a container's termination message."""
MAX_MESSAGE: Final = 4096
"""Kubernetes keeps at most this many bytes of a termination message."""
BLOCK_VOLUME: Final = "/dev/cdi-block-volume"
DATA_DIR: Final = "/data"
FAILURE_PREFIX: Final = "Unable to process data: "
CLONE_COMPLETE: Final = "Clone Complete"
IMPORT_COMPLETE: Final = "Import Complete"

_HASH_CHUNK: Final = 4 << 20
_DIGEST_HEX: Final = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_GO_ERRNO_TEXT: Final = {errno.ENOSPC: "no space left on device",
                         errno.EDQUOT: "disk quota exceeded"}
# Leading bytes of formats the pod does not convert yet, so they are never written as RAW.
_REFUSED_MAGIC: Final = (
    (0, b"\x1f\x8b", "gzip-compressed"), (0, b"\xfd7zXZ\x00", "xz-compressed"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed"), (0, b"BZh", "bzip2-compressed"),
    (0, b"KDMV", "VMDK"), (0, b"# Disk DescriptorFile", "VMDK"), (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VHD (vpc)"), (64, b"\x7f\x10\xda\xbe", "VDI"))
_QCOW2_MAGIC: Final = b"QFI\xfb"

Kind = Literal["clone", "import"]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class Checksum:
    """An expected digest: ``algorithm`` (hashlib name) and ``hexdigest`` (lower case)."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True, slots=True)
class CloneConfig:
    """A clone pod's configuration (see the module docstring for the variables)."""

    volume_mode: Literal["block", "filesystem"]
    mount_point: str
    destination: str
    preallocation: bool
    owner_uid: str
    filesystem_overhead: str
    image_size: int | None


@dataclass(frozen=True, slots=True)
class ImportConfig:
    """An import pod's configuration (see the module docstring for the variables)."""

    endpoint: str
    content_type: Literal["kubevirt", "archive"]
    destination: str
    preallocation: bool
    owner_uid: str
    filesystem_overhead: str
    image_size: int | None
    checksum: Checksum | None


def _get(env: Mapping[str, str], name: str, *, required: bool = False,
         hint: str = "") -> str | None:
    """ENV[NAME] without surrounding whitespace; None when unset or empty, which is a
    ConfigurationError when REQUIRED (HINT says what is expected)."""
    value = env.get(name, "").strip()
    if value:
        return value
    if required:
        raise ConfigurationError(f"{name}: not set{f' (expected {hint})' if hint else ''}")
    return None


def _bool(env: Mapping[str, str], name: str, *, required: bool) -> bool:
    """ENV[NAME] as ``true`` or ``false`` (False when unset and not REQUIRED)."""
    value = _get(env, name, required=required, hint="true or false")
    if value is None:
        return False
    if value not in ("true", "false"):
        raise ConfigurationError(f"{name}: {value!r} is not 'true' or 'false'")
    return value == "true"


def _overhead(env: Mapping[str, str]) -> str:
    """FILESYSTEM_OVERHEAD, checked, as given (default 0.06)."""
    value = _get(env, "FILESYSTEM_OVERHEAD") or str(DEFAULT_OVERHEAD)
    try:
        parse_overhead(value)
    except ValueError as e:
        raise ConfigurationError(f"FILESYSTEM_OVERHEAD: {e}") from None
    return value


def _quantity(env: Mapping[str, str], name: str) -> int | None:
    """ENV[NAME] as a Kubernetes quantity in bytes, None when unset."""
    value = _get(env, name)
    if value is None:
        return None
    try:
        return parse_quantity(value)
    except ValueError as e:
        raise ConfigurationError(f"{name}: {e}") from None


def _checksum(env: Mapping[str, str]) -> Checksum | None:
    """IMPORTER_CHECKSUM as ALGORITHM:HEX, None when unset."""
    value = _get(env, "IMPORTER_CHECKSUM")
    if value is None:
        return None
    algorithm, sep, digest = value.partition(":")
    algorithm = algorithm.lower()
    if not sep or algorithm not in _DIGEST_HEX:
        raise ConfigurationError(f"IMPORTER_CHECKSUM: {value!r} is not ALGORITHM:HEX with "
                                 f"ALGORITHM one of md5, sha1, sha256, sha512")
    digest = digest.lower()
    if len(digest) != _DIGEST_HEX[algorithm] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ConfigurationError(f"IMPORTER_CHECKSUM: {value!r}: a {algorithm} digest is "
                                 f"{_DIGEST_HEX[algorithm]} hexadecimal digits")
    return Checksum(algorithm, digest)


def _default_destination() -> str:
    """The volume CDI mounts: the block device when present, else the directory."""
    if os.path.exists(BLOCK_VOLUME):
        return BLOCK_VOLUME
    if os.path.isdir(DATA_DIR):
        return DATA_DIR
    raise ConfigurationError(f"DESTINATION: not set, and neither {BLOCK_VOLUME} nor "
                             f"{DATA_DIR} exists")


def _volume_path(path: str, name: str) -> str:
    """The volume PATH names (variable NAME): a directory or a block device; a path ending in
    ``/disk.img`` whose directory exists names that directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return path
    parent = os.path.dirname(path.rstrip("/"))
    if os.path.basename(path.rstrip("/")) == "disk.img" and parent and os.path.isdir(parent):
        return parent
    what = "does not exist" if st is None else "is neither a directory nor a block device"
    raise ConfigurationError(f"{name}: {path} {what}")


def clone_config(env: Mapping[str, str], *, mount_point: str | None = None,
                 destination: str | None = None) -> CloneConfig:
    """Read a clone pod's configuration from ENV; MOUNT_POINT and DESTINATION override the
    variables of those names.  ConfigurationError naming the variable at fault."""
    mode = _get(env, "VOLUME_MODE", required=True, hint="block or filesystem")
    assert mode is not None
    if mode.lower() not in ("block", "filesystem"):
        raise ConfigurationError(f"VOLUME_MODE: {mode!r} is not 'block' or 'filesystem'")
    volume_mode: Literal["block", "filesystem"] = \
        "block" if mode.lower() == "block" else "filesystem"
    source = mount_point or _get(env, "MOUNT_POINT", required=True,
                                 hint="the source volume's path")
    assert source is not None
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise ConfigurationError(f"MOUNT_POINT: {source} does not exist") from None
    if volume_mode == "block" and not stat.S_ISBLK(st.st_mode):
        raise ConfigurationError(f"MOUNT_POINT: {source} is not a block device, but "
                                 f"VOLUME_MODE is block")
    if volume_mode == "filesystem" and not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"MOUNT_POINT: {source} is not a directory, but "
                                 f"VOLUME_MODE is filesystem")
    preallocation = _bool(env, "PREALLOCATION", required=True)
    owner = _get(env, "OWNER_UID", required=True, hint="the owner's UID, the metric's label")
    assert owner is not None
    overhead = _overhead(env)
    size = _quantity(env, "UPLOAD_IMAGE_SIZE")
    dest = destination or _get(env, "DESTINATION") or _default_destination()
    return CloneConfig(volume_mode=volume_mode, mount_point=source,
                       destination=_volume_path(dest, "DESTINATION"),
                       preallocation=preallocation, owner_uid=owner,
                       filesystem_overhead=overhead, image_size=size)


def _endpoint_path(value: str) -> str:
    """The local path of IMPORTER_ENDPOINT VALUE: a path, or a ``file://`` URL."""
    if "://" not in value:
        return value
    url = urllib.parse.urlsplit(value)
    if url.scheme.lower() != "file":
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: the {url.scheme!r} scheme is "
                                 f"not supported yet (a local path or a file:// URL)")
    if url.netloc not in ("", "localhost"):
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: a file:// URL names a local "
                                 f"file (no host)")
    path = urllib.parse.unquote(url.path)
    if not path:
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r} has no path")
    return path


def import_config(env: Mapping[str, str], *, endpoint: str | None = None,
                  destination: str | None = None) -> ImportConfig:
    """Read an import pod's configuration from ENV; ENDPOINT and DESTINATION override the
    variables IMPORTER_ENDPOINT and DESTINATION.  ConfigurationError naming the variable."""
    value = endpoint or _get(env, "IMPORTER_ENDPOINT", required=True,
                             hint="a local path or a file:// URL")
    assert value is not None
    path = _endpoint_path(value)
    content = _get(env, "IMPORTER_CONTENTTYPE") or "kubevirt"
    if content not in ("kubevirt", "archive"):
        raise ConfigurationError(f"IMPORTER_CONTENTTYPE: {content!r} is not 'kubevirt' or "
                                 f"'archive'")
    content_type: Literal["kubevirt", "archive"] = \
        "archive" if content == "archive" else "kubevirt"
    size = _quantity(env, "IMPORTER_IMAGE_SIZE")
    checksum = _checksum(env)
    preallocation = _bool(env, "PREALLOCATION", required=False)
    overhead = _overhead(env)
    owner = _get(env, "OWNER_UID") or ""
    dest = _volume_path(destination or _get(env, "DESTINATION") or _default_destination(),
                        "DESTINATION")
    if content_type == "archive" and not os.path.isdir(dest):
        raise ConfigurationError(f"IMPORTER_CONTENTTYPE: archive is extracted into a "
                                 f"directory, but DESTINATION {dest} is a block device")
    return ImportConfig(endpoint=path, content_type=content_type, destination=dest,
                        preallocation=preallocation, owner_uid=owner,
                        filesystem_overhead=overhead, image_size=size, checksum=checksum)


# ---------------------------------------------------------------------------------------------
# Messages


def _clip(text: str) -> str:
    """TEXT on one line, at most MAX_MESSAGE bytes of UTF-8 (cut at a character boundary)."""
    line = " ".join(text.split())
    data = line.encode("utf-8", errors="replace")
    if len(data) <= MAX_MESSAGE:
        return line
    return data[:MAX_MESSAGE].decode("utf-8", errors="ignore")


def success_message(kind: Kind, preallocation_applied: bool) -> str:
    """The termination message of a successful clone or import (KIND)."""
    return json.dumps({"message": CLONE_COMPLETE if kind == "clone" else IMPORT_COMPLETE,
                       "preallocationApplied": bool(preallocation_applied)},
                      separators=(",", ":"))


def _cancel_signal(exc: BaseException) -> str | None:
    """"SIGTERM" or "SIGINT" when EXC (or its cause) is the CLI's reaction to that signal."""
    from .cli import Terminated

    for e in (exc, exc.__cause__):
        if isinstance(e, Terminated):
            return "SIGTERM"
        if isinstance(e, KeyboardInterrupt):
            return "SIGINT"
    return None


def _describe(exc: BaseException) -> str:
    """EXC in words: OSErrors as ``path: reason`` with Go's spelling of ENOSPC and EDQUOT."""
    if isinstance(exc, TargetTooSmallError) and exc.required is not None \
            and exc.available is not None:
        return (f"virtual image size {exc.required} is larger than the reported available "
                f"storage {exc.available}. A larger PVC is required ({exc})")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        go = _GO_ERRNO_TEXT.get(exc.errno or 0)
        if go is not None:
            plain = os.strerror(exc.errno or 0)
            reason = go + reason[len(plain):] if reason.startswith(plain) else f"{go} ({reason})"
        if exc.filename is not None:
            return f"{exc.filename}: {reason}"
        return reason
    return str(exc) or type(exc).__name__


def failure_message(kind: Kind, exc: BaseException) -> str:
    """The termination message of a clone or import (KIND) that failed with EXC."""
    sig = _cancel_signal(exc)
    if sig is not None:
        text = (f"{kind} cancelled by {sig}; the target is incomplete and is replaced when the "
                f"{kind} runs again")
    else:
        text = _describe(exc)
    return _clip(FAILURE_PREFIX + text)


def write_termination_log(path: str, message: str) -> None:
    """Write MESSAGE (one line, clipped to MAX_MESSAGE bytes) to PATH; a failure to write is
    logged, never raised: the exit status still tells the outcome."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(_clip(message))
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path,
                    e.strerror or e)


# ---------------------------------------------------------------------------------------------
# Progress and checksums


class _Progress:
    """Feeds the progress counter from the copy (its progress callback) and, when a checksum
    is verified, from the hashing thread: the counter shows the lesser of the two."""

    def __init__(self, counter: ProgressCounter, hashing: bool = False) -> None:
        self.counter = counter
        self._lock = threading.Lock()
        self._copy = 0.0
        self._hash = 0.0 if hashing else 1.0

    def _publish(self) -> None:
        self.counter.set(100.0 * min(self._copy, self._hash))

    def copied(self, done: int, total: int) -> None:
        """The copy's progress callback: DONE of TOTAL virtual bytes."""
        with self._lock:
            self._copy = max(self._copy, done / total if total else 1.0)
            self._publish()

    def hashed(self, done: int, total: int) -> None:
        """DONE of TOTAL source bytes hashed."""
        with self._lock:
            self._hash = max(self._hash, done / total if total else 1.0)
            self._publish()


class _Hasher:
    """Hash a file in a daemon thread, 4 MiB at a time, reporting progress; stoppable.

    What it read is dropped from the page cache as it goes (``POSIX_FADV_DONTNEED`` after
    each chunk, and over the whole file at the end), so a pass over a large source does not
    fill the pod's memory cgroup with cache; pages another reader brings in again are that
    reader's."""

    def __init__(self, path: str, checksum: Checksum,
                 progress: Callable[[int, int], None]) -> None:
        self.path = path
        self.checksum = checksum
        self.progress = progress
        self._stop = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cdimover-checksum",
                                        daemon=True)

    def start(self) -> _Hasher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            h = hashlib.new(self.checksum.algorithm, usedforsecurity=False)
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                total = os.lseek(fd, 0, os.SEEK_END)
                os.lseek(fd, 0, os.SEEK_SET)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                buf = bytearray(_HASH_CHUNK)
                view = memoryview(buf)
                done = 0
                while not self._stop.is_set():
                    n = os.readv(fd, [buf])
                    if n == 0:
                        break
                    h.update(view[:n])
                    _drop_cache(fd, done, n)
                    done += n
                    self.progress(done, total)
            finally:
                _drop_cache(fd, 0, 0)  # and what readahead brought in beyond the last chunk
                os.close(fd)
            if not self._stop.is_set():
                self._digest = h.hexdigest()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by verify()
            self._error = e

    def stop(self) -> None:
        """Stop hashing (the copy failed) and wait briefly for the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def verify(self) -> None:
        """Wait for the digest; raise the thread's error, or ChecksumMismatchError."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._digest != self.checksum.hexdigest:
            raise ChecksumMismatchError(
                f"checksum mismatch: IMPORTER_CHECKSUM is {self.checksum} but {self.path} has "
                f"{self.checksum.algorithm}:{self._digest}; the written image was removed")


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop FD's clean cached pages in [OFFSET, OFFSET+LENGTH) (LENGTH 0: to the end); a
    file that cannot be advised (a pipe) keeps them."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _sync_quietly(path: str) -> None:
    """fsync PATH (a file or a block device) so what was written survives; errors are logged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        log.warning("cannot sync %s: %s", path, e.strerror or e)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Clone


def run_clone(cfg: CloneConfig, counter: ProgressCounter, *, threads: int = 0,
              request_size: int = 0) -> bool:
    """Clone the volume at CFG.mount_point into CFG.destination through volume.clone, feeding
    COUNTER; return whether preallocation was applied."""
    from .volume import FILESYSTEM, Volume, clone

    progress = _Progress(counter)

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
        _sync_quietly(dst.disk_path)
        raise
    return result.preallocation_applied


# ---------------------------------------------------------------------------------------------
# Import


@dataclass(frozen=True, slots=True)
class _Image:
    """A source image: its format ("raw" or "qcow2") and virtual size."""

    format: str
    virtual_size: int


def _inspect_image(path: str) -> _Image:
    """Identify the image at PATH: QCOW2 by its magic, RAW otherwise; formats not converted
    yet (VMDK, VHDX, VDI, VHD, compressed images) are refused rather than copied as RAW."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 512, 0)
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if head.startswith(_QCOW2_MAGIC):
        from .qcow2 import inspect, refusal

        info = inspect(path, format="qcow2")
        refused = refusal(info)  # backing or data files, encryption: before any write
        if refused is not None:
            raise refused
        return _Image("qcow2", info.virtual_size)
    for offset, magic, name in _REFUSED_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            raise UnsupportedImageError(f"{path}: {name} images are not supported yet "
                                        f"(RAW and QCOW2 are)")
    return _Image("raw", size)


def _write_image(source: str, image: _Image, target: str, *, block: bool, preallocation: bool,
                 grow_to: int | None, progress: Callable[[int, int], None], threads: int,
                 request_size: int) -> bool:
    """Write IMAGE (at SOURCE) to TARGET as RAW -- the one place that calls the converters.
    BLOCK: TARGET is a block device.  GROW_TO: a file target's final size.  Returns whether
    preallocation was applied."""
    from .qcow2 import convert

    result = convert(source, target, source_format="qcow2" if image.format == "qcow2" else "raw",
                     preallocation="falloc" if preallocation else "off", progress=progress,
                     target_size=None if block else grow_to, threads=threads,
                     request_size=request_size)
    return result.preallocation_applied


def _wipe(target: str, block: bool, length: int) -> None:
    """Remove a rejected image: unlink a file target, zero a block target's first LENGTH
    bytes."""
    if block:
        from .prealloc import create_blank

        create_blank(target, length)
    else:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass


def _create_disk_image(path: str) -> None:
    """Create or take over ``disk.img`` with CDI's mode 0660 whatever the umask; never follow
    a symlink."""
    from .volume import DISK_IMAGE_MODE

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, DISK_IMAGE_MODE)
    try:
        os.fchmod(fd, DISK_IMAGE_MODE)
    finally:
        os.close(fd)


def _import_disk(cfg: ImportConfig, progress: _Progress, *, threads: int,
                 request_size: int) -> bool:
    """Import the RAW or QCOW2 image CFG.endpoint into the volume CFG.destination, checking
    its virtual size against the volume's capacity first; whether preallocation was applied."""
    from .volume import BLOCK, Volume

    image = _inspect_image(cfg.endpoint)
    vol = Volume.open(cfg.destination, cfg.filesystem_overhead)
    if image.virtual_size > vol.capacity:
        raise TargetTooSmallError(
            f"{vol.disk_path}: the {image.format} image's virtual size "
            f"{format_size(image.virtual_size)} does not fit the "
            f"{vol.describe_capacity()}", required=image.virtual_size, available=vol.capacity)
    block = vol.mode == BLOCK
    grow_to: int | None = None
    if cfg.image_size is not None and not block:
        grow_to = min(cfg.image_size, vol.capacity)
        if grow_to <= image.virtual_size:
            grow_to = None
    if not block:
        _create_disk_image(vol.disk_path)
    hasher = _start_hasher(cfg, progress)
    try:
        applied = _write_image(cfg.endpoint, image, vol.disk_path, block=block,
                               preallocation=cfg.preallocation, grow_to=grow_to,
                               progress=progress.copied, threads=threads,
                               request_size=request_size)
    except BaseException:
        if hasher is not None:
            hasher.stop()
        _sync_quietly(vol.disk_path)
        raise
    if hasher is not None:
        try:
            hasher.verify()
        except ChecksumMismatchError:
            _wipe(vol.disk_path, block, image.virtual_size)
            raise
    return applied


def _start_hasher(cfg: ImportConfig, progress: _Progress) -> _Hasher | None:
    """Start hashing CFG.endpoint when CFG has a checksum; the hasher or None."""
    if cfg.checksum is None:
        return None
    return _Hasher(cfg.endpoint, cfg.checksum, progress.hashed).start()


def _import_archive(cfg: ImportConfig, progress: _Progress) -> bool:
    """Extract the tar archive (optionally compressed) at CFG.endpoint beneath the
    destination directory with :func:`cdimover.extract.extract_tar`: nothing is written
    outside it and no link is followed; progress counts archive bytes read.  On a checksum
    mismatch the entries the archive created or replaced at the top of the destination are
    removed, without following links."""
    from .extract import extract_tar, open_dir_nofollow, remove_entries

    hasher = _start_hasher(cfg, progress)
    try:
        dest_fd = open_dir_nofollow(cfg.destination)
    except BaseException:
        if hasher is not None:
            hasher.stop()
        raise
    try:
        try:
            with open(cfg.endpoint, "rb") as raw:
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
               request_size: int = 0) -> bool:
    """Import CFG.endpoint into CFG.destination, feeding COUNTER; return whether preallocation
    was applied.  THREADS and REQUEST_SIZE tune the copy of RAW sources (0: the defaults)."""
    progress = _Progress(counter, hashing=cfg.checksum is not None)
    if cfg.content_type == "archive":
        return _import_archive(cfg, progress)
    return _import_disk(cfg, progress, threads=threads, request_size=request_size)


# ---------------------------------------------------------------------------------------------
# The command


def _size(text: str) -> int:
    """argparse type: a byte count or Kubernetes quantity."""
    try:
        return parse_quantity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    """argparse type: a small whole number (a thread count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 1 << 16:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def _request_size(text: str) -> int:
    """argparse type: a request size that fits the core's 32-bit field."""
    value = _size(text)
    if value >= 1 << 32:
        raise argparse.ArgumentTypeError("must be below 4 GiB")
    return value


def _seconds(text: str) -> float:
    """argparse type: seconds, 0 to 3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _report(args: argparse.Namespace, message: str, source: str, target: str,
            elapsed: float) -> None:
    """Print the outcome on stdout (JSON with --json, nothing with --quiet)."""
    done = json.loads(message)
    if args.json:
        print(json.dumps(dict(done, source=source, target=target, elapsed=round(elapsed, 3)),
                         indent=2))
    elif not args.quiet:
        print(f"{done['message']}: {source} -> {target}"
              f"{' (preallocated)' if done['preallocationApplied'] else ''}")


def _cmd_pod(args: argparse.Namespace) -> int:
    """Run ``pod clone`` or ``pod import`` (ARGS.pod_command): read the configuration, serve
    the metrics, do the work, write the termination message.  Errors propagate to cli.main
    (which prints them and picks the exit status) after the failure message is written."""
    from .cli import Terminated

    kind: Kind = args.pod_command
    env = os.environ
    server: MetricsServer | None = None
    try:
        cfg: CloneConfig | ImportConfig
        if kind == "clone":
            cfg = clone_config(env, mount_point=args.mount_point, destination=args.destination)
        else:
            cfg = import_config(env, endpoint=args.endpoint, destination=args.destination)
        from .metrics import MetricsServer, ProgressCounter, new_registry

        counter = ProgressCounter(kind, cfg.owner_uid)
        certfile = args.tls_cert or _get(env, "METRICS_TLS_CERT_FILE")
        keyfile = args.tls_key or _get(env, "METRICS_TLS_KEY_FILE")
        if args.metrics_address.lower() != "none":
            if certfile or keyfile or args.metrics_http:
                server = MetricsServer(new_registry(counter), args.metrics_address,
                                       certfile=certfile, keyfile=keyfile)
            else:
                # HTTPS with a certificate of our own, as CDI's pods serve it; the files are
                # loaded into the TLS context and removed at once.
                from .metrics import self_signed_certificate

                with tempfile.TemporaryDirectory(prefix="cdimover-metrics-") as tls_dir:
                    certfile, keyfile = self_signed_certificate(tls_dir)
                    server = MetricsServer(new_registry(counter), args.metrics_address,
                                           certfile=certfile, keyfile=keyfile)
            server.start()
        start = time.monotonic()
        if isinstance(cfg, CloneConfig):
            applied = run_clone(cfg, counter, threads=args.threads,
                                request_size=args.request_size)
            source, target = cfg.mount_point, cfg.destination
        else:
            applied = run_import(cfg, counter, threads=args.threads,
                                 request_size=args.request_size)
            source, target = cfg.endpoint, cfg.destination
        counter.set(100.0)
        message = success_message(kind, applied)
        write_termination_log(args.termination_log, message)
    except BaseException as e:
        write_termination_log(args.termination_log, failure_message(kind, e))
        if server is not None:
            server.stop()
        raise
    # The work is done and reported: a signal from here on only ends the linger.
    try:
        _report(args, message, source, target, time.monotonic() - start)
        if server is not None and args.metrics_linger > 0:
            time.sleep(args.metrics_linger)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        if server is not None:
            server.stop()
    return 0


def register(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
             common: argparse.ArgumentParser) -> None:
    """Add the ``pod`` command to the CLI's subparsers SUB (COMMON: shared options)."""
    p = sub.add_parser(
        "pod", help="run as a CDI clone or import pod",
        description="Run as a CDI clone or import pod, configured from the environment as CDI "
        "configures its pods; progress is served as Prometheus metrics and the outcome "
        "written as the termination message.")
    pods = p.add_subparsers(dest="pod_command", metavar="KIND", required=True)

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--termination-log", default=TERMINATION_LOG, metavar="PATH",
                        help=f"where the termination message goes (default {TERMINATION_LOG})")
    shared.add_argument("--metrics-address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help=f"serve progress metrics here (default {DEFAULT_ADDRESS}: every "
                        "address; port 0: any free port; 'none': no endpoint)")
    shared.add_argument("--tls-cert", metavar="PEM", help="serve metrics over HTTPS with this "
                        "certificate (or METRICS_TLS_CERT_FILE); needs --tls-key.  Without "
                        "one, a self-signed certificate is made at start, as CDI's pods do")
    shared.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (or "
                        "METRICS_TLS_KEY_FILE)")
    shared.add_argument("--metrics-http", action="store_true",
                        help="serve metrics over plain HTTP instead of HTTPS")
    shared.add_argument("--metrics-linger", type=_seconds, default=0.0, metavar="SECONDS",
                        help="keep serving the final metrics this long after success "
                        "(default 0)")
    shared.add_argument("--destination", metavar="PATH",
                        help="the target volume (overrides DESTINATION)")
    shared.add_argument("--threads", type=_count, default=0,
                        help="worker threads of the copy (default: the copy's)")
    shared.add_argument("--request-size", type=_request_size, default=0, metavar="SIZE",
                        help="bytes per I/O request (default: the copy's)")

    c = pods.add_parser(
        "clone", parents=[common, shared], help="clone a volume (VOLUME_MODE, MOUNT_POINT, "
        "DESTINATION, PREALLOCATION, OWNER_UID, FILESYSTEM_OVERHEAD, UPLOAD_IMAGE_SIZE)",
        description="Clone the source volume MOUNT_POINT (VOLUME_MODE block or filesystem) "
        "into DESTINATION (a block device or a directory holding disk.img), for every pair "
        "of volume modes.  Required: VOLUME_MODE, MOUNT_POINT, PREALLOCATION (true|false), "
        "OWNER_UID.  Optional: DESTINATION (default /dev/cdi-block-volume or /data), "
        "FILESYSTEM_OVERHEAD (0.06), UPLOAD_IMAGE_SIZE (grow disk.img to this quantity).")
    c.add_argument("--mount-point", metavar="PATH",
                   help="the source volume (overrides MOUNT_POINT)")
    c.set_defaults(func=_cmd_pod, endpoint=None)

    i = pods.add_parser(
        "import", parents=[common, shared], help="import an image (IMPORTER_ENDPOINT, "
        "IMPORTER_CONTENTTYPE, IMPORTER_IMAGE_SIZE, IMPORTER_CHECKSUM, PREALLOCATION, ...)",
        description="Import the RAW or QCOW2 image (or, with IMPORTER_CONTENTTYPE=archive, "
        "the tar archive) at IMPORTER_ENDPOINT, a local path or file:// URL, into "
        "DESTINATION.  Optional: IMPORTER_CONTENTTYPE (kubevirt|archive), IMPORTER_IMAGE_SIZE "
        "(grow disk.img to this quantity), IMPORTER_CHECKSUM (sha256:<hex>, md5, sha1, "
        "sha512), PREALLOCATION (true|false), FILESYSTEM_OVERHEAD (0.06), OWNER_UID, "
        "DESTINATION (default /dev/cdi-block-volume or /data).")
    i.add_argument("--endpoint", metavar="PATH_OR_URL",
                   help="the image (overrides IMPORTER_ENDPOINT)")
    i.set_defaults(func=_cmd_pod, mount_point=None)
