"""``cdimover pod upload-server``: CDI's upload pod, writing the upload straight onto the volume
in one pass as it arrives -- RAW, gzip/xz/zstd-compressed RAW and QCOW2 -- with no scratch copy.

**Routes** (as CDI's): ``GET /healthz``; ``POST /v1beta1/upload`` and ``/v1alpha1/upload``
(sync: answered once the image is complete and durable); ``POST /v1beta1/upload-async``
(and v1alpha1; ``HEAD`` answers 200 so that virtctl picks it): answered once the body is
received and written, the final sync and the commit follow before the server exits;
``POST /v1beta1/upload-form`` and ``-form-async``: multipart, the part named ``file``,
streamed; ``POST /v1beta1/upload-archive`` (and v1alpha1, sync only, as CDI's): a tar
(plain, gzip, bzip2 or xz) extracted safely into the Filesystem volume (400 on a Block
volume).  ``GET /metrics``: cdimover's own progress gauges (CDI's upload pod serves no
metrics).  Other methods on these paths: 405; other paths: 404.

**Clone targets.**  The header ``x-cdi-content-type`` on a sync upload selects the target end
of CDI's host-assisted clones, whose body is in the snappy framing format (every chunk's
CRC-32C verified): ``blockdevice-clone``, the source device's bytes, written as RAW whatever
they start with (zero blocks left as holes) onto the device or ``disk.img``, which ends
exactly the source's size; ``filesystem-clone``, a GNU tar of the source volume (sparse
members included), extracted into a Filesystem volume, or onto a Block volume only its first
member named ``*disk.img*``.  The termination message then says "Clone Complete".  An async
clone is refused with 500 ("async clone not supported"), as CDI's.

**One upload.**  A second upload while one runs (or while an async one is committed): 503.
After success every upload is answered 409, and the server exits with the termination
message ``{"message":"Upload Complete","preallocationApplied":...}``.  A failed upload leaves
no new ``disk.img`` (an existing one stays marked incomplete) and the server keeps running
so the client can retry from byte 0.  At ``DEADLINE`` the server waits for a running upload,
then exits with ``{"message":"Deadline Passed","deadlinePassed":true}`` unless it succeeded.

**Answers.**  The image's size is checked before anything is written: a RAW body whose
``Content-Length`` exceeds the volume's usable space, or a QCOW2 whose virtual size does (its
header is the first thing in the body), is answered 400 with CDI's text "effective image size
is larger than the reported available storage"; so is ENOSPC or EDQUOT later.  A client that
sends no byte for ``--idle-timeout`` seconds (default 60) is answered 408 and dropped; other
failures 500.  The bodies are "Saving stream failed: <reason>", as CDI's.

**Scratch.**  A QCOW2 that needs more than the 64 MiB reorder bound (data before the tables
that place it: images grown by ``qemu-img resize``, internal snapshots) is converted from a
copy of the body kept in ``SCRATCH_DIR`` (default ``/scratch``) when that directory exists;
without it the upload is answered 500 and the server exits with CDI's
``{"scratchSpaceRequired":true}`` convention, so the controller recreates the pod with a
scratch volume.  RAW bodies are never copied to scratch.

**Timeouts.**  TLS handshake and request head: 10 s from the connection (CDI's only timeout,
``ReadHeaderTimeout``); between requests of a kept-alive connection: 10 s; between two pieces
of a body: ``--idle-timeout``.  A stalled client never pins the server.

**Memory.**  The body is read in pieces of about 1 MiB (the chunks aiohttp received, not
joined); one piece is decoded (in a worker thread) while the next is read, and reading pauses
while both are held and aiohttp's buffer holds 2 MiB more, so the server holds a few MiB of
body at most, whatever its size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import errno
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from aiohttp import StreamReader, web
from aiohttp.multipart import BodyPartReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ConfigurationError, TargetTooSmallError
from ..io.detect import HEAD_SIZE
from ..io.endpoints import Place
from ..formats.clonestream import CloneStreamError
from ..ops.clonesink import BodySink
from ..ops.clonestream import CloneReceiver
from ..ops.sink import StreamSink, is_memory_limit
from .messages import SCRATCH_SPACE_REQUIRED, describe
from .metrics import UploadProgress
from .wire import BLOCKDEVICE_CLONE, CLONE_STREAM_PATH, CONTENT_TYPE_HEADER, FILESYSTEM_CLONE, \
    OFFSET_HEADER, SESSION_HEADER, SIZE_HEADER

__all__ = ["UploadServer", "Destination", "Prepared", "Outcome", "server_tls_context",
           "HEADER_TIMEOUT", "IDLE_TIMEOUT", "SYNC_PATHS", "ASYNC_PATHS", "FORM_PATHS",
           "FORM_ASYNC_PATHS", "ARCHIVE_PATHS"]

log = logging.getLogger("cdimover")

HEADER_TIMEOUT: Final = 10.0
"""Seconds from a connection to its complete request head (TLS handshake included)."""
IDLE_TIMEOUT: Final = 60.0
"""Default seconds a body may go without a byte before the upload is dropped."""
LINGER: Final = 2.0
"""Seconds the rest of a refused body is read and dropped before the connection closes."""
PIECE: Final = 1 << 20
"""Body bytes decoded at a time."""
READ_BUFFER: Final = 1 << 20
"""aiohttp's read buffer of a body: reading from the connection pauses beyond twice this."""
SYNC_PATHS: Final = ("/v1beta1/upload", "/v1alpha1/upload")
ASYNC_PATHS: Final = ("/v1beta1/upload-async", "/v1alpha1/upload-async")
FORM_PATHS: Final = ("/v1beta1/upload-form", "/v1alpha1/upload-form")
FORM_ASYNC_PATHS: Final = ("/v1beta1/upload-form-async", "/v1alpha1/upload-form-async")
ARCHIVE_PATHS: Final = ("/v1beta1/upload-archive", "/v1alpha1/upload-archive")
_NO_ROOM: Final = "effective image size is larger than the reported available storage"

Outcome = Literal["complete", "deadline", "scratch", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """Where one upload goes: TARGET (a path or Place), the most the image may occupy, the
    size a file grows to, a descriptor to close afterwards (-1: none), and the Filesystem
    volume's directory, where archives and filesystem clones go (-1: a device or a file)."""

    target: str | Place
    capacity: int
    target_size: int | None = None
    close_fd: int = -1
    volume_dir: int = -1


Destination = Callable[[], Prepared]
"""Called at the start of each upload (the volume's free space is measured then)."""


class _Pushable(Protocol):
    def push(self, data: bytes | bytearray | memoryview) -> None: ...


class UploadError(Exception):
    """An upload refused or failed: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def server_tls_context(cert: str, key: str, *, client_ca: str | None = None,
                       min_version: ssl.TLSVersion | None = None,
                       ciphers: str | None = None) -> ssl.SSLContext:
    """The server's TLS context: CERT and KEY (PEM); client certificates verified against
    CLIENT_CA when a client presents one (none required at the TLS level, as CDI's
    VerifyClientCertIfGiven); MIN_VERSION (default TLS 1.2); CIPHERS (OpenSSL names, for
    TLS 1.2 and below).  ConfigurationError naming the variable at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version or ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigurationError(f"TLS_CERT_FILE/TLS_KEY_FILE: cannot load {cert} and {key}: "
                                 f"{getattr(e, 'reason', None) or e}") from None
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigurationError(f"TLS_CIPHERS: none of {ciphers!r} is a cipher this "
                                     f"build of OpenSSL knows") from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigurationError(f"CLIENT_CERT_FILE: cannot load {client_ca}: "
                                     f"{getattr(e, 'reason', None) or e}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _common_name(peercert: Any) -> str | None:
    """The subject CN of a verified peer certificate (ssl's getpeercert() dict)."""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _Body:
    """A request body read piece by piece.  A read that waits more than the idle timeout for
    a byte is cancelled by a watchdog timer, armed once per idle period rather than once per
    read (an ``asyncio.wait_for`` per read costs a task each)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], idle: float,
                 length: int | None) -> None:
        self._read = read
        self._idle = idle
        self.length = length
        self.received = 0
        self._eof = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._since = -1.0          # loop time the waiting read started; < 0: none waits
        self._timer: asyncio.TimerHandle | None = None
        self._stalled = False

    def _watch(self) -> None:
        """The watchdog: cancel the read that has waited the idle timeout, else re-arm."""
        self._timer = None
        if self._since < 0:
            return
        due = self._since + self._idle
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._watch)
        elif self._task is not None:
            self._stalled = True
            self._task.cancel()

    async def _more(self) -> bytes:
        self._task = asyncio.current_task()
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._idle, self._watch)
        try:
            data = await self._read()
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            uncancel = getattr(self._task, "uncancel", None)    # Python 3.11+
            if uncancel is not None and uncancel() > 0:
                raise       # cancelled from elsewhere as well
            raise UploadError(408, f"no body byte for {self._idle:g} s: the upload was "
                              f"dropped; send it again") from None
        except (ConnectionError, web.HTTPException) as e:
            raise UploadError(400, f"the body ended early ({e}); send it again") from None
        except Exception as e:     # aiohttp's payload errors (truncated body, bad chunking)
            raise UploadError(400, f"the body could not be read ({type(e).__name__}: {e}); "
                              f"send it again") from None
        finally:
            self._since = -1.0
        self.received += len(data)
        if not data:
            self._eof = True
        return data

    async def pieces(self, least: int = PIECE) -> list[bytes]:
        """The next LEAST bytes or more, as received (fewer at the end; [] once the body is
        over): not joined, which would copy them once more."""
        parts: list[bytes] = []
        have = 0
        while have < least and not self._eof:
            data = await self._more()
            if data:
                parts.append(data)
                have += len(data)
        if self._eof and self.length is not None and self.received < self.length:
            raise UploadError(400, f"the body ended after {self.received} of {self.length} "
                              f"bytes; send it again")
        return parts

    async def piece(self, least: int = PIECE) -> bytes:
        """The next LEAST bytes or more, joined (fewer at the end; b"" once it is over)."""
        return b"".join(await self.pieces(least))


def _push_all(sink: _Pushable, parts: list[bytes]) -> None:
    for data in parts:
        sink.push(data)


async def _read_content(content: StreamReader) -> bytes:
    """The next bytes of the request body CONTENT, as aiohttp received them (b"": its end)."""
    while True:
        data, end_of_http_chunk = await content.readchunk()
        if data or not end_of_http_chunk:
            return data


class UploadServer:
    """The upload server: serve until an upload succeeded, the deadline passed, a scratch
    volume is needed or a signal came; :meth:`run` returns which (an :data:`Outcome`)."""

    def __init__(self, destination: Destination, *, host: str, port: int,
                 tls: ssl.SSLContext | None, client_name: str | None,
                 require_client_cert: bool, preallocation: bool, scratch_dir: str | None,
                 progress: UploadProgress, registry: CollectorRegistry,
                 deadline: datetime.datetime | None = None, idle_timeout: float = IDLE_TIMEOUT,
                 header_timeout: float = HEADER_TIMEOUT, linger: float = 0.0,
                 mem_limit: int = 0, name: str = "upload") -> None:
        self._destination = destination
        self._host, self._port = host, port
        self._tls = tls
        self._client_name = client_name
        self._require_cert = require_client_cert
        self._prealloc = "falloc" if preallocation else "off"
        self._scratch = scratch_dir
        self._progress = progress
        self._registry = registry
        self._deadline = deadline
        self._idle = idle_timeout
        self._header_timeout = header_timeout
        self._linger = linger
        self._mem_limit = mem_limit
        self._name = name
        self._busy = False
        self._done = False
        self.preallocation_applied = False
        self.clone_target = False
        self.disk_digest: str | None = None
        self._clone: CloneReceiver | None = None
        self._clone_prepared: Prepared | None = None
        self._clone_task: asyncio.Task[Any] | None = None
        self.outcome: Outcome = "stopped"
        self.failure: BaseException | None = None
        self.scratch_reason = ""
        self.port = 0
        self._finished: asyncio.Event | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "cdimover-upload")
        self._waiting_head: set[Any] = set()

    # -- the run ----------------------------------------------------------------------------

    def run(self, ready: Callable[[int], None] | None = None) -> Outcome:
        """Serve until the end; READY(port) is called once the server listens."""
        try:
            return asyncio.run(self._serve(ready))
        finally:
            self._pool.shutdown(wait=True)

    def _end(self, outcome: Outcome) -> None:
        if self._finished is not None and not self._finished.is_set():
            self.outcome = outcome
            self._finished.set()

    async def _serve(self, ready: Callable[[int], None] | None) -> Outcome:
        import signal

        loop = asyncio.get_running_loop()
        self._finished = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 20)
        for path in SYNC_PATHS + ASYNC_PATHS + FORM_PATHS + FORM_ASYNC_PATHS + ARCHIVE_PATHS:
            app.router.add_route("POST", path, self._handler(path))
        for path in ASYNC_PATHS + FORM_ASYNC_PATHS:
            app.router.add_route("HEAD", path, self._head)
        app.router.add_post(CLONE_STREAM_PATH, self._clone_stream)
        app.router.add_get(CLONE_STREAM_PATH, self._clone_state)
        app.router.add_get("/healthz", self._healthz, allow_head=True)
        app.router.add_get("/metrics", self._metrics, allow_head=True)
        # lingering_time: after an answer sent before the body's end (a refusal), what is left
        # of the body is read and dropped this long, so the client sees the answer rather
        # than a reset; then the connection is closed.
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=self._header_timeout,
                               handler_cancellation=False, lingering_time=LINGER,
                               read_bufsize=READ_BUFFER)
        await runner.setup()
        handlers = runner.server
        assert handlers is not None

        def factory() -> Any:
            proto = handlers()
            self._waiting_head.add(proto)
            loop.call_later(self._header_timeout, self._head_overdue, proto)
            return proto

        server = await loop.create_server(
            factory, self._host or None, self._port, ssl=self._tls, reuse_address=True,
            backlog=128, ssl_handshake_timeout=self._header_timeout if self._tls else None)
        self.port = int(server.sockets[0].getsockname()[1])
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._end, "stopped")
        deadline_task = asyncio.create_task(self._watch_deadline())
        log.info("upload server listening on %s:%d", self._host or "*", self.port)
        if ready is not None:
            ready(self.port)
        try:
            await self._finished.wait()
            if self.outcome == "complete" and self._linger > 0:
                await asyncio.sleep(self._linger)
        finally:
            deadline_task.cancel()
            server.close()
            await runner.cleanup()
            if self._clone is not None:
                await loop.run_in_executor(self._pool, self._drop_clone)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.outcome

    def _head_overdue(self, proto: Any) -> None:
        """A connection that has not sent a complete request head in time is closed."""
        if proto in self._waiting_head:
            self._waiting_head.discard(proto)
            transport = getattr(proto, "transport", None)
            if transport is not None and not transport.is_closing():
                log.info("closing a connection that sent no request in %g s",
                         self._header_timeout)
                transport.close()

    async def _watch_deadline(self) -> None:
        if self._deadline is None:
            return
        delay = (self._deadline - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        await asyncio.sleep(max(delay, 0.0))
        while self._busy:
            log.info("deadline passed; waiting for the running upload")
            await asyncio.sleep(0.5)
        if not self._done:
            log.info("deadline passed without an upload; exiting")
            self._end("deadline")

    # -- routes -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        self._waiting_head.discard(request.protocol)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _head(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _authorized(self, request: web.Request) -> bool:
        if not self._require_cert:
            return True
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        if not peer:
            return False
        return self._client_name is None or _common_name(peer) == self._client_name

    def _handler(self, path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        form = path in FORM_PATHS + FORM_ASYNC_PATHS
        is_async = path in ASYNC_PATHS + FORM_ASYNC_PATHS
        archive = path in ARCHIVE_PATHS

        async def handle(request: web.Request) -> web.Response:
            return await self._upload(request, form=form, is_async=is_async, archive=archive)
        return handle

    def _open_sink(self, kind: str, pr: Prepared, head: bytes, length: int | None) -> BodySink:
        """The sink for an upload of KIND ("image", "archive" or a clone content type)."""
        from ..ops.clonesink import ArchiveSink, DiskMemberSink, FramedSink

        def raw(size: int | None) -> StreamSink:
            return StreamSink(pr.target, b"", length=size, capacity=pr.capacity,
                              name=self._name, preallocation=self._prealloc, format="raw")
        if kind == "image":
            return StreamSink(pr.target, head, length=length, capacity=pr.capacity,
                              name=self._name, scratch_dir=self._scratch,
                              preallocation=self._prealloc, target_size=pr.target_size,
                              mem_limit=self._mem_limit)
        if kind == BLOCKDEVICE_CLONE:
            return FramedSink(raw(None))
        if kind == "archive" and pr.volume_dir < 0:
            raise UploadError(400, "an archive upload needs a Filesystem volume; "
                              f"{self._name} is not one")
        if pr.volume_dir >= 0:
            sink: BodySink = ArchiveSink(pr.volume_dir, name=self._name,
                                         preallocate=self._prealloc != "off")
            return sink if kind == "archive" else FramedSink(sink)
        return FramedSink(DiskMemberSink(raw, name=self._name))

    async def _upload(self, request: web.Request, *, form: bool, is_async: bool,
                      archive: bool = False) -> web.Response:
        if not self._authorized(request):
            log.warning("refused an upload without the expected client certificate")
            return web.Response(status=401)
        if self._busy:
            log.warning("refused a concurrent upload")
            return web.Response(status=503)
        if self._done:
            log.warning("refused an upload after the upload completed")
            return web.Response(status=409)
        self._busy = True
        loop = asyncio.get_running_loop()
        sink: BodySink | None = None
        prepared: Prepared | None = None
        committing = False
        kind = "archive" if archive else "image"
        content_type = request.headers.get(CONTENT_TYPE_HEADER, "")
        if not archive and content_type in (BLOCKDEVICE_CLONE, FILESYSTEM_CLONE):
            kind = content_type
            log.info("content type %s", content_type)
        try:
            if kind != "image" and is_async:
                raise UploadError(500, "async clone not supported")
            body = await self._open_body(request, form)
            self._progress.start()
            head = await body.piece(HEAD_SIZE)
            prepared = await loop.run_in_executor(self._pool, self._destination)
            pr = prepared
            sink = await loop.run_in_executor(
                self._pool, lambda: self._open_sink(kind, pr, head, body.length))
            await self._pump(sink, body, head)
            await loop.run_in_executor(self._pool, sink.finish_body)
            if is_async:
                committing = True
                asyncio.create_task(self._commit(sink, prepared))
                sink = prepared = None
                log.info("body received and written; committing in the background")
                return web.Response(text="")
            result = await loop.run_in_executor(self._pool, sink.complete)
            self.clone_target = kind in (BLOCKDEVICE_CLONE, FILESYSTEM_CLONE)
            self._succeeded(result.preallocation_applied, result.virtual_size)
            return web.Response(text="")
        except BaseException as e:
            return await self._failed(e, sink)
        finally:
            if prepared is not None and prepared.close_fd >= 0:
                os.close(prepared.close_fd)
            if not committing:
                self._busy = False

    async def _open_body(self, request: web.Request, form: bool) -> _Body:
        if not form:
            content = request.content
            return _Body(lambda: _read_content(content), self._idle, request.content_length)
        try:
            reader = await asyncio.wait_for(request.multipart(), self._idle)
            while True:
                part = await asyncio.wait_for(reader.next(), self._idle)
                if part is None:
                    raise UploadError(400, "the form has no part named 'file'")
                if isinstance(part, BodyPartReader) and part.name == "file":
                    break
                log.info("ignoring the form part %r", getattr(part, "name", None))
                await asyncio.wait_for(part.release(), self._idle)
        except asyncio.TimeoutError:
            raise UploadError(408, f"no body byte for {self._idle:g} s") from None
        except (ValueError, AssertionError, KeyError) as e:
            raise UploadError(400, f"not a multipart form ({e})") from None
        file_part = part
        return _Body(lambda: file_part.read_chunk(PIECE), self._idle, None)

    async def _pump(self, sink: _Pushable, body: _Body, head: bytes) -> None:
        """Push the body into SINK: one piece decoded in the worker while the next is read."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = loop.run_in_executor(self._pool, sink.push, head)
        try:
            while True:
                parts = await body.pieces()
                if pending is not None:
                    done, pending = pending, None
                    await done
                self._progress.received(body.received, body.length)
                if not parts:
                    return
                pending = loop.run_in_executor(self._pool, _push_all, sink, parts)
        finally:
            if pending is not None:
                await asyncio.wait([pending])

    async def _commit(self, sink: BodySink, prepared: Prepared) -> None:
        """The end of an async upload: durable and committed, then the server exits (a
        failure here ends it too, as CDI's does: the body is gone)."""
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, sink.complete)
            self._succeeded(result.preallocation_applied, result.virtual_size)
        except BaseException as e:
            log.error("the async upload failed after its body was received: %s", describe(e))
            await loop.run_in_executor(self._pool, sink.abort)
            self.failure = e
            self._end("failed")
        finally:
            if prepared.close_fd >= 0:
                os.close(prepared.close_fd)
            self._busy = False

    # -- cdimover's clone stream --------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        if not self._authorized(request):
            log.warning("refused a clone stream without the expected client certificate")
            return web.Response(status=401)
        if self._busy:
            return web.Response(status=503)
        if self._done:
            return web.Response(status=409)
        return None

    def _resume_point(self) -> dict[str, object]:
        if self._clone is None:
            return {"protocol": 1, "offset": 0}
        return dict(self._clone.resume_point(), protocol=1)

    async def _take_over(self, request: web.Request) -> None:
        """A source of the running clone stream that connects again gave up on the request
        in progress (a link cut without a reset leaves it waiting for the idle timeout):
        that request is cancelled, so the source resumes at once."""
        task = self._clone_task
        if (task is None or task.done() or self._clone is None or not self._authorized(request)
                or request.headers.get(SESSION_HEADER) != self._clone.session):
            return
        log.info("the clone source connected again: dropping its previous request")
        task.cancel()
        await asyncio.wait([task])

    async def _clone_state(self, request: web.Request) -> web.Response:
        """GET: the protocol and the point a source resumes at."""
        await self._take_over(request)
        refused = self._refusal(request)
        return refused or web.json_response(self._resume_point())

    def _drop_clone(self) -> None:
        """Give up the clone in progress (the target keeps what was written)."""
        rc, pr = self._clone, self._clone_prepared
        self._clone = self._clone_prepared = None
        try:
            if rc is not None:
                rc.abort()
        finally:
            if pr is not None and pr.close_fd >= 0:
                os.close(pr.close_fd)

    def _open_clone(self, session: str, size: int) -> CloneReceiver:
        if self._clone is not None:
            log.info("a new clone stream replaces the one at %d", self._clone.durable)
            self._drop_clone()
        pr = self._destination()
        try:
            self._clone = CloneReceiver(pr.target, size, session=session, capacity=pr.capacity,
                                        preallocation=self._prealloc, name=self._name)
        except BaseException:
            if pr.close_fd >= 0:
                os.close(pr.close_fd)
            raise
        self._clone_prepared = pr
        return self._clone

    def _finish_clone(self, rc: CloneReceiver) -> Any:
        rc.finish_body()
        result = rc.complete()
        pr, self._clone, self._clone_prepared = self._clone_prepared, None, None
        if pr is not None and pr.close_fd >= 0:
            os.close(pr.close_fd)
        return result

    async def _clone_stream(self, request: web.Request) -> web.Response:
        """POST: the stream from the offset the source names (0, or the resume point)."""
        await self._take_over(request)
        refused = self._refusal(request)
        if refused is not None:
            return refused
        self._busy = True
        self._clone_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            try:
                session = request.headers[SESSION_HEADER]
                size = int(request.headers[SIZE_HEADER])
                offset = int(request.headers.get(OFFSET_HEADER, "0"))
                if size < 0 or offset < 0 or not session or len(session) > 128:
                    raise ValueError("out of range")
            except (KeyError, ValueError) as e:
                raise UploadError(400, f"a clone stream needs the headers {SESSION_HEADER}, "
                                  f"{SIZE_HEADER} and {OFFSET_HEADER} ({e})") from None
            rc = self._clone
            if rc is None or rc.session != session or rc.size != size:
                if offset:
                    return web.json_response(self._resume_point(), status=409)
                rc = await loop.run_in_executor(self._pool, self._open_clone, session, size)
            elif offset != rc.durable:
                return web.json_response(self._resume_point(), status=409)
            rc.begin(offset)
            self._progress.start()
            content = request.content
            body = _Body(lambda: _read_content(content), self._idle, request.content_length)
            await self._pump(rc, body, b"")
            result = await loop.run_in_executor(self._pool, self._finish_clone, rc)
            self.clone_target = True
            self.disk_digest = result.digest
            log.info("clone stream complete: %d bytes of data in %d bytes received, %d "
                     "checkpoints, %d resumes, digest %s", result.bytes_written,
                     result.bytes_received, result.checkpoints, result.resumes, result.digest)
            self._succeeded(result.preallocation_applied, result.virtual_size)
            return web.json_response({"digest": result.digest,
                                      "bytesWritten": result.bytes_written,
                                      "preallocationApplied": result.preallocation_applied})
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            status, text = _answer(e)
            if isinstance(e, CloneStreamError):
                status = 422
            no_room = isinstance(e, TargetTooSmallError) or (
                isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            if no_room and self._clone is not None:
                await loop.run_in_executor(self._pool, self._drop_clone)
            resume = self._clone.durable if self._clone is not None else 0
            log.error("clone stream failed (%d): %s; it can resume at %d", status, text, resume)
            if not isinstance(e, Exception):
                raise
            return web.json_response(dict(self._resume_point(),
                                          error=f"Saving stream failed: {text}"), status=status)
        finally:
            self._busy = False
            self._clone_task = None

    def _succeeded(self, preallocation_applied: bool, size: int) -> None:
        self._done = True
        self.preallocation_applied = preallocation_applied
        self._progress.complete()
        log.info("upload complete: %d bytes written to %s", size, self._name)
        self._end("complete")

    async def _failed(self, exc: BaseException, sink: BodySink | None) -> web.Response:
        if sink is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, sink.abort)
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        status, text = _answer(exc)
        if sink is None or not is_memory_limit(exc) or self._scratch is not None:
            log.error("upload failed (%d): %s", status, text)
        if is_memory_limit(exc) and self._scratch is None:
            self.scratch_reason = str(exc)
            text = f"{SCRATCH_SPACE_REQUIRED}: {exc}"
            log.error("upload failed: %s; exiting for a pod with scratch space", text)
            self._end("scratch")
        if not isinstance(exc, Exception):
            raise exc
        return web.Response(status=status, text=f"Saving stream failed: {text}")


def _answer(exc: BaseException) -> tuple[int, str]:
    """The status and the reason for a failed upload, as CDI's upload server words them."""
    if isinstance(exc, UploadError):
        return exc.status, str(exc)
    if isinstance(exc, TargetTooSmallError) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
        return 400, f"{_NO_ROOM}: {describe(exc)}"
    return 500, describe(exc)


def volume_destination(path: str, filesystem_overhead: str,
                       image_size: int | None) -> Destination:
    """Uploads onto the CDI volume PATH (a directory: its ``disk.img``; a block device):
    capacity by CDI's overhead formula, measured at each upload; a ``disk.img`` grown to
    min(IMAGE_SIZE, usable space)."""
    def prepare() -> Prepared:
        from ..cdi.volume import BLOCK, Volume, target_place

        vol = Volume.open(path, filesystem_overhead)
        grow = None
        if image_size is not None and vol.mode != BLOCK:
            grow = min(image_size, vol.capacity)
        place, dir_fd = target_place(vol)
        return Prepared(target=place, capacity=vol.capacity, target_size=grow, close_fd=dir_fd,
                        volume_dir=dir_fd if vol.mode != BLOCK else -1)
    return prepare


def path_destination(path: str) -> Destination:
    """Uploads onto the file or block device PATH: capacity the device's size, or the free
    space of the file's filesystem.  A directory PATH is a Filesystem volume: images go to
    its ``disk.img``, archives and filesystem clones beneath it."""
    def prepare() -> Prepared:
        from ..io.extract import open_dir_nofollow
        from ..ops.sink import default_capacity

        if os.path.isdir(path):
            dir_fd = open_dir_nofollow(path)
            st = os.fstatvfs(dir_fd)
            return Prepared(target=Place(dir_fd=dir_fd, name="disk.img",
                                         path=os.path.join(path, "disk.img")),
                            capacity=st.f_bavail * st.f_frsize, close_fd=dir_fd,
                            volume_dir=dir_fd)

        capacity = default_capacity(path)
        if capacity is None:
            raise OSError(errno.ENOENT, "cannot measure the free space for", path)
        return Prepared(target=path, capacity=capacity)
    return prepare
