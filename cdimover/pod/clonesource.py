"""``cdimover pod clone-source``: the sending end of a host-assisted clone between nodes, a
drop-in for CDI's clone source pod, talking to CDI's upload server or to cdimover's.

**Configuration** (CDI's env): ``VOLUME_MODE`` (``block``/``filesystem``), ``MOUNT_POINT``
(the device, or the read-only mount of a Filesystem source), ``UPLOAD_URL`` (the target's
upload URL, ``https://host:8443/v1beta1/upload``), ``CLIENT_CERT``, ``CLIENT_KEY``,
``SERVER_CA_CERT`` (PEM text, as CDI passes them; loaded from memory, never written to a
file), ``OWNER_UID``, ``PREALLOCATION``.  cdimover's own: ``CLONE_WIRE`` (``auto``, the
default; ``cdi``; ``cdimover``), ``CLONE_COMPRESSION`` (``none``, the default; ``zstd``),
``CLONE_RETRY_TIMEOUT`` (seconds to keep trying while the target is not reachable, 600),
``CLONE_CHECKPOINT_BYTES`` (data between the target's durable checkpoints, 16Mi),
``CLONE_IO_TIMEOUT`` (seconds a send or an answer may stall before the connection is given
up and made again, 60).

**Wire.**  The source first asks the target for cdimover's clone stream (``GET
/v1beta1/clone-stream``).  A cdimover upload server answers with its resume point and gets
the stream (:mod:`cdimover.ops.clonestream`): data only, checked, resumable.  CDI's server
answers 404, and gets CDI's wire format unchanged: ``x-cdi-content-type:
blockdevice-clone`` (the device's bytes; holes are not read, their zeros are framed once and
repeated) or ``filesystem-clone`` (a GNU tar of the volume's top-level entries but
``lost+found``, sparse members unless preallocating, made by ``tar``), in the snappy framing
format.  A Filesystem source holding more than ``disk.img`` uses CDI's format too (the tar
carries every file).

**Retries.**  Connection refused, a reset, a 5xx or 503 (the target busy) are retried with
a doubling pause (0.5 s to 10 s) for ``CLONE_RETRY_TIMEOUT`` seconds of no progress: many
clones starting at once no longer crash-loop their sources.  The cdimover stream then asks
for the resume point and goes on from the last checkpoint the target made durable; CDI's
format starts again from byte 0, as CDI's does.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from .._native import Context
from ..cdi.volume import BLOCK, Volume, check_not_in_use
from ..errors import CdimoverError, ConfigurationError, NetworkError, ProtocolError, \
    TargetTooSmallError, TlsError
from ..io.endpoints import Source, open_source
from ..formats.clonestream import DIGEST_BLOCK
from ..ops.clonestream import CHECKPOINT_BYTES, WINDOW, StreamProducer, data_spans
from .config import _bool, _quantity, get_env, source_volume
from .wire import BLOCKDEVICE_CLONE, CLONE_STREAM_PATH, CONTENT_TYPE_HEADER, \
    FILESYSTEM_CLONE, OFFSET_HEADER, SESSION_HEADER, SIZE_HEADER

__all__ = ["CloneSourceConfig", "clone_source_config", "run_clone_source", "CloneOutcome",
           "RETRY_TIMEOUT", "IO_TIMEOUT"]

log = logging.getLogger("cdimover")

RETRY_TIMEOUT: Final = 600.0
_PAUSE_FIRST: Final = 0.5
_PAUSE_MAX: Final = 10.0
IO_TIMEOUT: Final = 60.0
_SEND_BATCH: Final = 256 << 10
_MAX_REFUSED: Final = 3
_LOST_FOUND: Final = "lost+found"
Wire = Literal["auto", "cdi", "cdimover"]


@dataclass(frozen=True, slots=True)
class CloneSourceConfig:
    """A clone source pod's configuration (see the module docstring)."""

    volume_mode: Literal["block", "filesystem"]
    mount_point: str
    upload_url: str
    client_cert: str | None
    client_key: str | None
    server_ca: str | None
    owner_uid: str
    preallocation: bool
    wire: Wire = "auto"
    compression: Literal["none", "zstd"] = "none"
    retry_timeout: float = RETRY_TIMEOUT
    io_timeout: float = IO_TIMEOUT
    checkpoint_bytes: int = CHECKPOINT_BYTES


def clone_source_config(env: Mapping[str, str], *, mount_point: str | None = None,
                        upload_url: str | None = None, wire: str | None = None
                        ) -> CloneSourceConfig:
    """Read the clone source's configuration from ENV (the arguments override)."""
    mode, mp = source_volume(env, mount_point)
    url = upload_url or get_env(env, "UPLOAD_URL", required=True, hint="the target's URL")
    assert url is not None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"UPLOAD_URL: {url!r} is not an https URL")
    w = (wire or get_env(env, "CLONE_WIRE") or "auto").lower()
    if w not in ("auto", "cdi", "cdimover"):
        raise ConfigurationError(f"CLONE_WIRE: {w!r} is not auto, cdi or cdimover")
    comp = (get_env(env, "CLONE_COMPRESSION") or "none").lower()
    if comp not in ("none", "zstd"):
        raise ConfigurationError(f"CLONE_COMPRESSION: {comp!r} is not none or zstd")
    retry = _seconds(env, "CLONE_RETRY_TIMEOUT", RETRY_TIMEOUT)
    io_timeout = _seconds(env, "CLONE_IO_TIMEOUT", IO_TIMEOUT)
    owner = get_env(env, "OWNER_UID", required=True, hint="the owner's UID, the metric's label")
    assert owner is not None
    checkpoint = _quantity(env, "CLONE_CHECKPOINT_BYTES") or CHECKPOINT_BYTES
    if checkpoint < DIGEST_BLOCK:
        raise ConfigurationError("CLONE_CHECKPOINT_BYTES: at least 1Mi")
    cert, key = get_env(env, "CLIENT_CERT"), get_env(env, "CLIENT_KEY")
    if (cert is None) != (key is None):
        raise ConfigurationError("CLIENT_CERT and CLIENT_KEY: set both or neither")
    return CloneSourceConfig(
        volume_mode=mode, mount_point=mp,
        upload_url=url, client_cert=cert, client_key=key, server_ca=get_env(env, "SERVER_CA_CERT"),
        owner_uid=owner, preallocation=_bool(env, "PREALLOCATION", required=True),
        wire=w,  # type: ignore[arg-type]
        compression=comp,  # type: ignore[arg-type]
        retry_timeout=retry, io_timeout=io_timeout, checkpoint_bytes=checkpoint)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(get_env(env, name) or default)
    except ValueError:
        raise ConfigurationError(f"{name}: not a number of seconds") from None
    if not 0 < value < 1e9:
        raise ConfigurationError(f"{name}: out of range")
    return value


def client_tls_context(cfg: CloneSourceConfig) -> ssl.SSLContext:
    """The client's TLS context: SERVER_CA_CERT verifies the target (the system's CAs when
    unset), CLIENT_CERT/CLIENT_KEY are presented; the PEM text is loaded from memory."""
    ctx = ssl.create_default_context(cadata=cfg.server_ca) if cfg.server_ca else \
        ssl.create_default_context()
    if cfg.client_cert and cfg.client_key:
        fd = os.memfd_create("cdimover-client-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, (cfg.client_cert.strip() + "\n" + cfg.client_key.strip() + "\n")
                     .encode())
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except ssl.SSLError as e:
            raise ConfigurationError(f"CLIENT_CERT/CLIENT_KEY: cannot load them: "
                                     f"{e.reason or e}") from None
        finally:
            os.close(fd)
    return ctx


class _SourceFailure(Exception):
    """Reading or encoding the source failed (never retried): ORIGINAL says why."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _guarded(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """PIECES with any failure of theirs marked as the source's."""
    try:
        yield from pieces
    except GeneratorExit:
        raise
    except Exception as e:
        raise _SourceFailure(e) from e


class _Answer(Exception):
    """The target answered STATUS with BODY."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode('utf-8', 'replace').strip()}")
        self.status = status
        self.body = body

    def json(self) -> dict[str, object]:
        try:
            out = json.loads(self.body)
            return out if isinstance(out, dict) else {}
        except ValueError:
            return {}


class _Target:
    """Requests to the upload server at URL."""

    def __init__(self, url: str, tls: ssl.SSLContext | None, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.timeout = timeout
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path or "/v1beta1/upload"
        self.tls = tls

    def _connect(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, context=self.tls,
                                               timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        conn = self._connect()
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, resp.read(1 << 20)
        finally:
            conn.close()

    def post(self, path: str, headers: Mapping[str, str], pieces: Iterable[bytes | memoryview]
             ) -> bytes:
        """POST the PIECES as a chunked body; the answer's body (_Answer unless 2xx)."""
        conn = self._connect()
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            try:
                _send_chunked(conn, pieces)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                pass        # the server answered early: its answer says why
            resp = conn.getresponse()
            body = resp.read(1 << 20)
            if resp.status // 100 != 2:
                raise _Answer(resp.status, body)
            return body
        finally:
            conn.close()


def _send_chunked(conn: http.client.HTTPConnection, pieces: Iterable[bytes | memoryview]) -> None:
    """Send PIECES in chunked encoding, small pieces gathered into one chunk."""
    small: list[bytes | memoryview] = []
    held = 0

    def flush() -> None:
        nonlocal held
        if held:
            conn.send(b"%X\r\n" % held + b"".join(small) + b"\r\n")
            small.clear()
            held = 0

    for p in pieces:
        n = len(p)
        if n == 0:
            continue
        if n < _SEND_BATCH:
            small.append(bytes(p))    # copied: the producer reuses its buffers
            held += n
            if held >= _SEND_BATCH:
                flush()
            continue
        flush()
        conn.send(b"%X\r\n" % n)
        conn.send(p)
        conn.send(b"\r\n")
    flush()
    conn.send(b"0\r\n\r\n")


_RETRYABLE: Final = (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException,
                     ssl.SSLEOFError, OSError)


class _Retry:
    """The doubling pause between attempts, given up after TIMEOUT seconds without progress."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pause = _PAUSE_FIRST
        self.since = time.monotonic()
        self.attempts = 0

    def progressed(self) -> None:
        self.pause = _PAUSE_FIRST
        self.since = time.monotonic()

    def wait(self, why: BaseException) -> None:
        """Sleep before the next attempt, or raise WHY's error when time is up (at once for
        a certificate the target's CA does not sign)."""
        self.attempts += 1
        if isinstance(why, _SourceFailure):
            raise why.original
        if isinstance(why, ssl.SSLCertVerificationError) or \
                time.monotonic() - self.since + self.pause > self.timeout:
            raise _fatal(why)
        log.warning("the target is not ready or the connection failed (%s); trying again "
                    "in %.1f s", why, self.pause)
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, _PAUSE_MAX)


def _fatal(e: BaseException) -> CdimoverError:
    """The error to end the clone with, for the last failure E."""
    if isinstance(e, CdimoverError):
        return e
    if isinstance(e, _Answer):
        if e.status == 400 and b"larger than the reported available storage" in e.body:
            return TargetTooSmallError(f"the target refused the clone: {e}")
        return ProtocolError(f"the target refused the clone: {e}")
    if isinstance(e, ssl.SSLCertVerificationError):
        return TlsError(f"the target's certificate: {e.verify_message}")
    if isinstance(e, ssl.SSLError):
        return TlsError(f"TLS with the target failed: {e}")
    return NetworkError(f"cannot reach the target: {e}")


@dataclass(frozen=True, slots=True)
class CloneOutcome:
    """What the source sent: WIRE ("cdimover" or "cdi"), disk bytes, bytes on the wire
    (before TLS), attempts, resumes, and the disk digest the target verified ("" in CDI's
    format)."""

    wire: str
    size: int
    wire_bytes: int
    attempts: int
    resumes: int
    digest: str


def _session(cfg: CloneSourceConfig, size: int) -> str:
    import hashlib

    return hashlib.sha256(f"{cfg.owner_uid}\0{cfg.volume_mode}\0{size}".encode()).hexdigest()[:32]


def _extra_entries(vol: Volume) -> list[str]:
    """A Filesystem source's top-level entries other than disk.img and lost+found."""
    dir_fd = vol.open_dir()
    try:
        return sorted(n for n in os.listdir(dir_fd) if n not in ("disk.img", _LOST_FOUND))
    finally:
        os.close(dir_fd)


def run_clone_source(cfg: CloneSourceConfig, progress: Callable[[float], object]) -> CloneOutcome:
    """Send the source volume to the target; PROGRESS(percent) as it goes."""
    vol = Volume.open(cfg.mount_point)
    check_not_in_use(vol)       # a running VM's disk is not a consistent source
    target = _Target(cfg.upload_url, client_tls_context(cfg)
                     if cfg.upload_url.startswith("https:") else None, cfg.io_timeout)
    wire = cfg.wire
    if wire != "cdi" and vol.mode != BLOCK:
        extra = _extra_entries(vol)
        if extra:
            log.info("the source holds more than disk.img (%s): sending CDI's filesystem "
                     "clone, which carries every file", ", ".join(extra[:5]))
            wire = "cdi"
    retry = _Retry(cfg.retry_timeout)
    if wire == "auto":
        wire = _negotiate(target, retry)
    with Context() as ctx:
        if wire == "cdimover":
            fd = vol.open_disk()
            try:
                with open_source(vol.disk_path, ctx=ctx, fd=fd) as src:
                    return _send_stream(cfg, target, ctx, src, retry, progress)
            finally:
                os.close(fd)
        if vol.mode == BLOCK:
            fd = vol.open_disk()
            try:
                with open_source(vol.disk_path, ctx=ctx, fd=fd) as src:
                    return _send_cdi(cfg, target, retry, BLOCKDEVICE_CLONE, src.size,
                                     lambda: _framed(_device_bytes(ctx, src, progress)))
            finally:
                os.close(fd)
        size = vol.virtual_size or 0
        return _send_cdi(cfg, target, retry, FILESYSTEM_CLONE, size,
                         lambda: _framed(_tar_bytes(cfg.mount_point, size, progress,
                                                    sparse=not cfg.preallocation)))


def _negotiate(target: _Target, retry: _Retry) -> Wire:
    """"cdimover" when the target speaks the clone stream, "cdi" when it answers 404/405."""
    while True:
        try:
            status, body = target.get(CLONE_STREAM_PATH)
        except _RETRYABLE as e:
            retry.wait(e)
            continue
        if status in (404, 405):
            log.info("the target does not speak cdimover's clone stream: CDI's format")
            return "cdi"
        if status == 200:
            return "cdimover"
        if status == 401:
            raise ProtocolError("the target refused the client certificate (401)")
        if status == 409:
            raise ProtocolError("the target already holds a completed upload (409)")
        retry.wait(_Answer(status, body))


def _send_stream(cfg: CloneSourceConfig, target: _Target, ctx: Context, src: Source,
                 retry: _Retry, progress: Callable[[float], object]) -> CloneOutcome:
    """cdimover's clone stream, resumed from the target's durable point after a failure."""
    size = src.size
    session = _session(cfg, size)
    wire_bytes = resumes = 0
    durable = -1            # the target's resume point at the last attempt
    refused = 0             # attempts in a row that the target refused as corrupt
    while True:
        try:
            status, body = target.get(CLONE_STREAM_PATH, {SESSION_HEADER: session})
            if status != 200:
                raise _Answer(status, body)
            point = json.loads(body)
        except (_Answer, ValueError, *_RETRYABLE) as e:
            if isinstance(e, _Answer) and e.status in (401, 409):
                raise _fatal(e) from None
            retry.wait(e)
            continue
        start, state = 0, None
        if point.get("session") == session and point.get("size") == size and point.get("offset"):
            start, state = int(point["offset"]), bytes.fromhex(str(point["state"]))
            resumes += 1
            log.info("resuming the clone stream at %d of %d bytes", start, size)
        if start > durable:
            retry.progressed()      # only what the target made durable counts as progress
            refused = 0
        durable = start
        producer = StreamProducer(ctx, src, start=start, state=state,
                                  compress=cfg.compression == "zstd",
                                  checkpoint_bytes=cfg.checkpoint_bytes,
                                  progress=lambda pos: progress(100.0 * pos / max(size, 1)))
        headers = {SESSION_HEADER: session, SIZE_HEADER: str(size), OFFSET_HEADER: str(start),
                   "Content-Type": "application/octet-stream"}
        try:
            answer = target.post(CLONE_STREAM_PATH, headers, _guarded(producer.pieces()))
        except (_Answer, _SourceFailure, *_RETRYABLE) as e:
            wire_bytes += producer.counters.wire
            if isinstance(e, _Answer) and (e.status in (400, 401) or (
                    e.status == 409 and not e.json())):
                raise _fatal(e) from None
            if isinstance(e, _Answer) and e.status == 422:
                refused += 1        # the target found the stream corrupt or wrong
                if refused >= _MAX_REFUSED:
                    raise ProtocolError(f"the target refused the stream {refused} times from "
                                        f"offset {start}: {e}") from None
            else:
                refused = 0
            retry.wait(e)
            continue
        finally:
            producer.close()
        wire_bytes += producer.counters.wire
        done = json.loads(answer)
        digest = producer.digest.hex()
        if done.get("digest") != digest:
            raise ProtocolError(f"the target reports the digest {done.get('digest')}, the "
                                f"source's is {digest}")
        log.info("clone stream complete: %d bytes, %d of data, %d on the wire, %d resumes, "
                 "disk digest %s", size, producer.counters.data, wire_bytes, resumes, digest)
        return CloneOutcome(wire="cdimover", size=size, wire_bytes=wire_bytes,
                            attempts=retry.attempts + 1, resumes=resumes, digest=digest)


def _send_cdi(cfg: CloneSourceConfig, target: _Target, retry: _Retry, content_type: str,
              size: int,
              make: Callable[[], Iterator[bytes]]) -> CloneOutcome:
    """CDI's wire format (a fresh body from MAKE() for each attempt, from byte 0)."""
    headers = {CONTENT_TYPE_HEADER: content_type, "Content-Type": "application/octet-stream"}
    sent = 0
    while True:
        counted = _Counted(make())
        try:
            target.post(target.path, headers, _guarded(counted))
        except (_Answer, _SourceFailure, *_RETRYABLE) as e:
            sent += counted.wire
            if isinstance(e, _Answer) and e.status in (400, 401, 409):
                raise _fatal(e) from None
            if counted.wire:
                retry.progressed()
            retry.wait(e)
            continue
        finally:
            counted.close()
        sent += counted.wire
        log.info("%s complete: %d bytes on the wire", content_type, sent)
        return CloneOutcome(wire="cdi", size=size, wire_bytes=sent,
                            attempts=retry.attempts + 1, resumes=0, digest="")


class _Counted:
    """PIECES counted as they pass (bytes on the wire)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self.wire = 0

    def __iter__(self) -> Iterator[bytes]:
        for p in self._pieces:
            self.wire += len(p)
            yield p

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


def _framed(data: Iterator[bytes | int]) -> Iterator[bytes]:
    """DATA in the snappy framing format (each piece its own framed stream, which the format
    allows: a stream identifier may repeat); equal zero pieces are framed once."""
    import cramjam

    zero_cache: dict[int, bytes] = {}
    try:
        for piece in data:
            if isinstance(piece, int):
                n = piece
                if n not in zero_cache:
                    zero_cache[n] = bytes(cramjam.snappy.compress(bytes(n)))
                yield zero_cache[n]
            else:
                yield bytes(cramjam.snappy.compress(piece))
    finally:
        close = getattr(data, "close", None)
        if close is not None:
            close()


def _device_bytes(ctx: Context, src: Source, progress: Callable[[float], object]
                  ) -> Iterator[bytes | int]:
    """The device's bytes in windows; a hole is a window size (an int), never read."""
    import mmap

    from ..ops.clonestream import _Reader

    reader = _Reader(src)
    buf = mmap.mmap(-1, WINDOW)
    for off, length, is_data in data_spans(ctx, src, 0):
        pos, end = off, off + length
        while pos < end:
            n = min(WINDOW, end - pos)
            if is_data:
                yield bytes(reader.read(buf, pos, n))
            else:
                yield n
            pos += n
            progress(100.0 * pos / max(src.size, 1))


def _tar_bytes(mount_point: str, size: int, progress: Callable[[float], object], *,
               sparse: bool) -> Iterator[bytes | int]:
    """A GNU tar of MOUNT_POINT's top-level entries but lost+found, from ``tar``; progress
    is the tar's bytes against the disk's SIZE, held below 100 % until the end."""
    names = sorted(n for n in os.listdir(mount_point) if n != _LOST_FOUND)
    cmd = ["tar", "--format=gnu", "-c", "-f", "-", "-C", mount_point]
    if sparse:
        cmd.insert(1, "--sparse")
    cmd += ["--", *names]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ok = False
    done = 0
    try:
        while True:
            data = proc.stdout.read(WINDOW)
            if not data:
                break
            done += len(data)
            progress(min(99.0, 100.0 * done / max(size, 1)))
            yield data
        ok = True
    finally:
        if not ok and proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        if ok and proc.returncode != 0:
            raise OSError(f"tar of {mount_point} failed ({proc.returncode}): "
                          f"{err.decode(errors='replace').strip()[:500]}")
