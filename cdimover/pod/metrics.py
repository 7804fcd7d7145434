"""Progress metrics for pod mode: the counters CDI's controllers scrape, and the HTTP(S)
endpoint that serves them.

A clone or import pod reports its progress as one Prometheus counter,
``kubevirt_cdi_clone_progress_total`` or ``kubevirt_cdi_import_progress_total``, labelled with
the ``ownerUID`` of the object it works for, valued in percent (0 to 100) and never decreasing.
:class:`ProgressCounter` is that counter: a collector registered on a dedicated
``CollectorRegistry`` (never the process-wide default one), fed from any thread with
:meth:`ProgressCounter.set`, read by the exposition code under a lock.  It exposes only the
``_total`` sample, as CDI's Go counters do (no ``_created`` sample).

:class:`MetricsServer` serves a registry's text exposition on every path (``/metrics`` is what
controllers ask for) from one daemon thread running an event loop (``selectors``), so a scrape
is answered while the main thread waits in the native copy (which releases the GIL), and no
number of clients costs more than that one thread.

- At most ``max_connections`` (32) at once.  At the limit a new connection is accepted and
  replaces the oldest connection that has waited ``evict_after`` seconds (1) or more for its
  request (an idle or stalled client); when there is none it is closed at once, before any
  TLS work, so clients that reconnect as fast as they are dropped cost at most 32 handshakes
  a second.
- A connection must complete its TLS handshake, request line and headers within
  ``header_timeout`` seconds (5), and be answered within ``deadline`` seconds (10), of being
  accepted, or it is closed.
- One request per connection (``Connection: close``); a request head above 8 KiB is answered
  431, a method other than GET or HEAD 405.
- With a certificate and key it serves HTTPS (TLS 1.2 or later, no renegotiation); the
  handshake is non-blocking, in the loop, so a stalled client holds up nobody.
"""

from __future__ import annotations

import errno
import gzip
import logging
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from ..errors import ConfigurationError

__all__ = [
    "CLONE_PROGRESS",
    "IMPORT_PROGRESS",
    "self_signed_certificate",
    "ProgressCounter",
    "UploadProgress",
    "UPLOAD_PROGRESS",
    "UPLOAD_RECEIVED",
    "MetricsServer",
    "parse_address",
    "new_registry",
]

log = logging.getLogger(__name__)

Kind = Literal["clone", "import"]

CLONE_PROGRESS: Final = "kubevirt_cdi_clone_progress"
"""The clone progress counter's name; the exposed sample adds ``_total``."""
IMPORT_PROGRESS: Final = "kubevirt_cdi_import_progress"
"""The import progress counter's name; the exposed sample adds ``_total``."""

UPLOAD_PROGRESS: Final = "cdimover_upload_progress"
"""cdimover's own gauge of the running upload, in percent (CDI's upload pod serves none)."""
UPLOAD_RECEIVED: Final = "cdimover_upload_received_bytes"
"""cdimover's own gauge of the body bytes the running upload received."""

_NAMES: Final = {"clone": CLONE_PROGRESS, "import": IMPORT_PROGRESS}
_HELP: Final = {"clone": "The clone progress in percentage",
                "import": "The import progress in percentage"}
MAX_CONNECTIONS: Final = 32
"""Connections served at once by default."""
HEADER_TIMEOUT: Final = 5.0
"""Default seconds from accepting a connection to its complete request head (TLS handshake,
request line and headers)."""
DEADLINE: Final = 10.0
"""Default seconds from accepting a connection to the end of its response."""
EVICT_AFTER: Final = 1.0
"""Default seconds a connection waits for its request before a new one may replace it."""
_MAX_HEAD: Final = 8192
_ACCEPT_BURST: Final = 64
_ACCEPT_PAUSE: Final = 0.1   # after EMFILE and the like


class ProgressCounter(Collector):
    """The progress counter of one clone or import (KIND), labelled ``ownerUID=OWNER_UID``.

    The value is a percentage that only grows: :meth:`set` clamps to [0, 100] and ignores a
    value below the current one.  Safe to call from any thread.
    """

    def __init__(self, kind: Kind, owner_uid: str) -> None:
        if kind not in _NAMES:
            raise ValueError(f"kind must be 'clone' or 'import', not {kind!r}")
        self.kind: Final = kind
        self.owner_uid: Final = owner_uid
        self._lock = threading.Lock()
        self._value = 0.0

    @property
    def name(self) -> str:
        """The exposed sample's name, e.g. ``kubevirt_cdi_import_progress_total``."""
        return _NAMES[self.kind] + "_total"

    @property
    def value(self) -> float:
        """The current percentage."""
        with self._lock:
            return self._value

    def set(self, percent: float) -> float:
        """Raise the counter to PERCENT (clamped to [0, 100]); return the value now held."""
        p = min(max(float(percent), 0.0), 100.0)
        with self._lock:
            if p > self._value:
                self._value = p
            return self._value

    def collect(self) -> Iterator[Metric]:
        """Yield the counter family with its one sample (called by the exposition code)."""
        family = CounterMetricFamily(_NAMES[self.kind], _HELP[self.kind], labels=["ownerUID"])
        family.add_metric([self.owner_uid], self.value)
        yield family

    def describe(self) -> list[Metric]:
        """The family without samples, so registering does not call :meth:`collect`."""
        return [CounterMetricFamily(_NAMES[self.kind], _HELP[self.kind], labels=["ownerUID"])]


class UploadProgress(Collector):
    """The progress of the upload being received, labelled ``ownerUID=OWNER_UID``: two gauges,
    percent of the body (0 until the end when its length is not told; 100 once the image is
    complete) and body bytes received.  Each new upload starts again from 0, so they are
    gauges, not counters.  Safe to call from any thread."""

    def __init__(self, owner_uid: str) -> None:
        self.owner_uid: Final = owner_uid
        self._lock = threading.Lock()
        self._percent = 0.0
        self._received = 0

    @property
    def value(self) -> float:
        """The current percentage."""
        with self._lock:
            return self._percent

    def start(self) -> None:
        """A new upload begins."""
        with self._lock:
            self._percent, self._received = 0.0, 0

    def received(self, done: int, total: int | None) -> None:
        """DONE body bytes of TOTAL (None: not told) received."""
        with self._lock:
            self._received = done
            if total:
                self._percent = min(max(100.0 * done / total, 0.0), 99.9)

    def complete(self) -> None:
        """The image is complete and durable."""
        with self._lock:
            self._percent = 100.0

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(UPLOAD_PROGRESS, "The upload progress in percentage",
                                  labels=["ownerUID"]),
                GaugeMetricFamily(UPLOAD_RECEIVED, "Body bytes received by the upload",
                                  labels=["ownerUID"]))

    def collect(self) -> Iterator[Metric]:
        """Yield the two gauges (called by the exposition code)."""
        percent, received = self._families()
        with self._lock:
            percent.add_metric([self.owner_uid], self._percent)
            received.add_metric([self.owner_uid], float(self._received))
        yield percent
        yield received

    def describe(self) -> list[Metric]:
        """The families without samples."""
        return list(self._families())


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A dedicated registry (no process or platform collectors) holding COLLECTORS."""
    registry = CollectorRegistry(auto_describe=True)
    for c in collectors:
        registry.register(c)
    return registry


def parse_address(text: str, *, what: str = "--metrics-address") -> tuple[str, int]:
    """Split ``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT`` into (host, port); an empty host means
    every address.  Port 0 asks the kernel for a free port.  ConfigurationError naming WHAT
    for anything else."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigurationError(f"{what}: {text!r} is not HOST:PORT (e.g. ':8443')")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigurationError(f"{what}: {text!r}: write an IPv6 host in brackets, "
                                 f"e.g. '[::1]:8443'")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(f"{what}: {text!r}: the port must be a number from 0 to "
                                 f"65535")
    return host, int(port_text)


def _family_for(host: str) -> tuple[str, socket.AddressFamily]:
    """The address to bind and its family: an empty host is every address (IPv6 dual-stack
    where the kernel has IPv6, else IPv4)."""
    if host == "":
        return ("::", socket.AF_INET6) if socket.has_ipv6 else ("0.0.0.0", socket.AF_INET)
    try:
        # An ASCII name as bytes: a str goes through the "idna" codec, which loads the
        # unicodedata tables (1.2 MiB) into every pod for a name such as "localhost".
        info = socket.getaddrinfo(host.encode() if host.isascii() else host, None,
                                  type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigurationError(f"--metrics-address: cannot resolve {host!r}: "
                                 f"{e.strerror}") from None
    family, _, _, _, sockaddr = info[0]
    return str(sockaddr[0]), socket.AddressFamily(family)


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with CERTFILE and KEYFILE (PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        reason = e.reason or str(e)
    except OSError as e:
        reason = e.strerror or str(e)
    else:
        return ctx
    raise ConfigurationError(f"metrics TLS: cannot load the certificate {certfile} and the key "
                             f"{keyfile}: {reason}")


def self_signed_certificate(directory: str, *, days: int = 365) -> tuple[str, str]:
    """Make a self-signed certificate and its key (EC P-256, PEM, mode 0600) in DIRECTORY:
    (certfile, keyfile).  CDI's pods serve their metrics over HTTPS with such a certificate,
    and its controllers scrape them without verifying it."""
    import os

    from .._native import self_signed_cert

    cert, key = self_signed_cert("cdimover-metrics",
                                 ("DNS:localhost", "IP:127.0.0.1", "IP:::1"), days)
    certfile = os.path.join(directory, "tls.crt")
    keyfile = os.path.join(directory, "tls.key")
    for path, data in ((certfile, cert), (keyfile, key)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return certfile, keyfile


_HANDSHAKE, _READ, _WRITE = 0, 1, 2


class _Connection:
    """One client: its socket, where it is in the exchange, and its deadlines."""

    __slots__ = ("sock", "peer", "state", "born", "head_by", "done_by", "inbuf", "outbuf")

    def __init__(self, sock: socket.socket, peer: object, state: int, now: float,
                 header_timeout: float, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.state = state
        self.born = now
        self.head_by = now + header_timeout
        self.done_by = now + deadline
        self.inbuf = b""
        self.outbuf = b""

    def expires(self) -> float:
        """When this connection is closed unless it has progressed."""
        return self.done_by if self.state == _WRITE else min(self.head_by, self.done_by)


def _response(status: str, headers: list[tuple[str, str]], body: bytes, *,
              head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


class _Loop:
    """The event loop serving LISTENER: accepts, TLS handshakes, reads request heads and
    writes responses, all non-blocking, in the one thread that calls :meth:`run`."""

    def __init__(self, listener: socket.socket, tls: ssl.SSLContext | None,
                 registry: CollectorRegistry, *, max_connections: int,
                 header_timeout: float, deadline: float, evict_after: float) -> None:
        self.listener = listener
        self.tls = tls
        self.registry = registry
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.deadline = deadline
        self.evict_after = evict_after
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping = False
        # In accept order, so the first one found waiting for its request is the oldest.
        self.conns: dict[socket.socket, _Connection] = {}
        self.accept_paused_until = 0.0

    def stop(self) -> None:
        """Ask the loop to end (from any thread)."""
        self.stopping = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        """Serve until :meth:`stop`; then close every connection (not the listener)."""
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping:
                now = time.monotonic()
                wake = [c.expires() for c in self.conns.values()]
                if self.accept_paused_until:
                    wake.append(self.accept_paused_until)
                timeout = max(0.0, min(wake) - now) if wake else None
                for key, _ in self.sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._step(key.fileobj)  # type: ignore[arg-type]
                self._expire()
        finally:
            for sock in list(self.conns):
                self._close(sock)
            self.sel.close()
            self.wake_r.close()
            self.wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self.wake_r.recv(64):
                pass
        except OSError:
            pass

    def _expire(self) -> None:
        now = time.monotonic()
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        for sock, conn in list(self.conns.items()):
            if now >= conn.expires():
                log.debug("metrics: closing %s: too slow", conn.peer)
                self._close(sock)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                # Out of descriptors or memory: stop accepting for a moment rather than spin.
                log.warning("metrics: cannot accept a connection: %s", e.strerror or e)
                self.sel.unregister(self.listener)
                self.accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                return
            if len(self.conns) >= self.max_connections and not self._evict():
                sock.close()   # no slot to take: refused before any TLS work
                continue
            sock.setblocking(False)
            state = _READ
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
                state = _HANDSHAKE
            now = time.monotonic()
            self.conns[sock] = _Connection(sock, peer, state, now, self.header_timeout,
                                           self.deadline)
            self.sel.register(sock, selectors.EVENT_READ, "conn")

    def _evict(self) -> bool:
        """Close the oldest connection that has waited EVICT_AFTER seconds or more for its
        request; False when there is none."""
        oldest = time.monotonic() - self.evict_after
        for sock, conn in self.conns.items():
            if conn.born > oldest:
                return False   # in accept order: the rest are younger still
            if conn.state != _WRITE:
                log.debug("metrics: closing %s to make room", conn.peer)
                self._close(sock)
                return True
        return False

    def _close(self, sock: socket.socket) -> None:
        self.conns.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _want(self, sock: socket.socket, events: int) -> None:
        self.sel.modify(sock, events, "conn")

    def _step(self, sock: socket.socket) -> None:
        """Advance SOCK's exchange as far as it goes without blocking."""
        conn = self.conns.get(sock)
        if conn is None:
            return
        try:
            if conn.state == _HANDSHAKE:
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                conn.state = _READ
            if conn.state == _READ:
                while True:
                    data = sock.recv(4096)
                    if not data:
                        self._close(sock)   # gone before asking
                        return
                    conn.inbuf += data
                    end = conn.inbuf.find(b"\r\n\r\n")
                    if end < 0:
                        end = conn.inbuf.find(b"\n\n")
                    if 0 <= end <= _MAX_HEAD:
                        conn.outbuf = self._answer(conn.inbuf[:end])
                        break
                    if len(conn.inbuf) > _MAX_HEAD:
                        conn.outbuf = _response("431 Request Header Fields Too Large", [],
                                                b"")
                        break
                conn.state = _WRITE
                conn.inbuf = b""
            while conn.outbuf:
                n = sock.send(conn.outbuf)
                conn.outbuf = conn.outbuf[n:]
            self._close(sock)
        except ssl.SSLWantReadError:
            self._want(sock, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(sock, selectors.EVENT_WRITE)
        except (BlockingIOError, InterruptedError):
            self._want(sock, selectors.EVENT_WRITE if conn.state == _WRITE
                       else selectors.EVENT_READ)
        except Exception:  # noqa: BLE001 - one client's failure never stops the server
            log.debug("metrics: connection from %s failed", conn.peer, exc_info=True)
            self._close(sock)

    def _answer(self, head: bytes) -> bytes:
        """The response to the request HEAD (request line and headers): the exposition for
        GET (and its headers for HEAD) on every path, as prometheus_client's handler does
        (``Accept`` picks the format, ``name[]`` restricts, gzip when accepted)."""
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", [], b"")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", [("Allow", "GET, HEAD")], b"")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        registry: Collector = self.registry
        if "name[]" in params:
            registry = self.registry.restricted_registry(params["name[]"])
        try:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(registry)
        except Exception:  # noqa: BLE001 - a collector's failure is the scrape's, not ours
            log.warning("metrics: cannot render the exposition", exc_info=True)
            return _response("500 Internal Server Error", [], b"")
        out = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            out.append(("Content-Encoding", "gzip"))
        return _response("200 OK", out, body, head_only=method == "HEAD")


def _listen(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """A non-blocking listening socket on (HOST, PORT); every address of both families when
    HOST is the IPv6 wildcard, as Go's ":8443" listens."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class MetricsServer:
    """Serve REGISTRY's Prometheus text exposition at ADDRESS (``HOST:PORT``).

    HTTPS when CERTFILE and KEYFILE (PEM files) are given, plain HTTP otherwise.  Use as a
    context manager, or call :meth:`start` and :meth:`stop`; :attr:`port` is the bound port
    (useful with port 0).  MAX_CONNECTIONS, HEADER_TIMEOUT, DEADLINE and EVICT_AFTER bound the
    clients as the module docstring says; all the serving happens in one daemon thread.
    """

    def __init__(self, registry: CollectorRegistry, address: str, *,
                 certfile: str | None = None, keyfile: str | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT, deadline: float = DEADLINE,
                 evict_after: float = EVICT_AFTER) -> None:
        if (certfile is None) != (keyfile is None):
            raise ConfigurationError("metrics TLS: a certificate needs its key and a key its "
                                     "certificate")
        if max_connections < 1 or header_timeout <= 0 or deadline < header_timeout \
                or evict_after < 0:
            raise ValueError("max_connections must be at least 1, header_timeout positive, "
                             "deadline at least header_timeout and evict_after not negative")
        self.registry = registry
        self.address = address
        self.host, self.requested_port = parse_address(address)
        self.tls = tls_context(certfile, keyfile) if certfile and keyfile else None
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.deadline = deadline
        self.evict_after = evict_after
        self._listener: socket.socket | None = None
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound (the requested one, or the kernel's choice for port 0)."""
        if self._listener is None:
            return self.requested_port
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """The URL of the metrics, for logs."""
        scheme = "https" if self.tls is not None else "http"
        host = self.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind (in the calling thread) and start serving in a daemon thread.  OSError
        (EADDRINUSE...) naming the address when the socket cannot be bound."""
        if self._listener is not None:
            return self
        bind_host, family = _family_for(self.host)
        try:
            listener = _listen(bind_host, self.requested_port, family)
        except OSError as e:
            if self.host == "" and family == socket.AF_INET6 and e.errno in (
                    errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                listener = _listen("0.0.0.0", self.requested_port, socket.AF_INET)
            else:
                raise OSError(e.errno, f"cannot serve metrics: {e.strerror}",
                              self.address) from None
        loop = _Loop(listener, self.tls, self.registry, max_connections=self.max_connections,
                     header_timeout=self.header_timeout, deadline=self.deadline,
                     evict_after=self.evict_after)
        self._listener, self._loop = listener, loop
        self._thread = threading.Thread(target=loop.run, name="cdimover-metrics", daemon=True)
        self._thread.start()
        log.info("serving progress metrics on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and the socket (idempotent)."""
        listener, loop, thread = self._listener, self._loop, self._thread
        self._listener = self._loop = self._thread = None
        if listener is None:
            return
        if loop is not None:
            loop.stop()
        if thread is not None:
            thread.join(timeout=5)
        listener.close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
