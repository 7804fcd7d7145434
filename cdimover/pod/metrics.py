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
controllers ask for) from a ``ThreadingHTTPServer`` in a daemon thread, so a scrape is answered
while the main thread waits in the native copy (which releases the GIL).  With a certificate
and key it serves HTTPS; the TLS handshake runs in the thread of each connection, never in the
accepting thread, so a stalled client cannot hold up other scrapes.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from ..errors import ConfigurationError

__all__ = [
    "CLONE_PROGRESS",
    "IMPORT_PROGRESS",
    "self_signed_certificate",
    "ProgressCounter",
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

_NAMES: Final = {"clone": CLONE_PROGRESS, "import": IMPORT_PROGRESS}
_HELP: Final = {"clone": "The clone progress in percentage",
                "import": "The import progress in percentage"}
# Seconds a connection may stay silent (TLS handshake, request line) before it is dropped.
_CONNECTION_TIMEOUT: Final = 10.0


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


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer for one family, dual-stack when bound to every IPv6 address,
    whose connections are TLS-wrapped when it has an SSL context."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 family: socket.AddressFamily, tls: ssl.SSLContext | None) -> None:
        self.address_family = family
        self.tls = tls
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Every address of both families, as Go's ":8443" listens.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # TCPServer's bind, without HTTPServer's reverse DNS lookup of the bound address
        # (which can hang in a pod without DNS).
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, addr = self.socket.accept()
        conn.settimeout(_CONNECTION_TIMEOUT)
        if self.tls is not None:
            # The handshake happens on the first read, in the connection's own thread.
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def _family_for(host: str) -> tuple[str, socket.AddressFamily]:
    """The address to bind and its family: an empty host is every address (IPv6 dual-stack
    where the kernel has IPv6, else IPv4)."""
    if host == "":
        return ("::", socket.AF_INET6) if socket.has_ipv6 else ("0.0.0.0", socket.AF_INET)
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigurationError(f"--metrics-address: cannot resolve {host!r}: "
                                 f"{e.strerror}") from None
    family, _, _, _, sockaddr = info[0]
    return str(sockaddr[0]), socket.AddressFamily(family)


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with CERTFILE and KEYFILE (PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
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
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdimover-metrics")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile = os.path.join(directory, "tls.crt")
    keyfile = os.path.join(directory, "tls.key")
    for path, data in ((certfile, cert.public_bytes(serialization.Encoding.PEM)),
                       (keyfile, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return certfile, keyfile


class MetricsServer:
    """Serve REGISTRY's Prometheus text exposition at ADDRESS (``HOST:PORT``).

    HTTPS when CERTFILE and KEYFILE (PEM files) are given, plain HTTP otherwise.  Use as a
    context manager, or call :meth:`start` and :meth:`stop`; :attr:`port` is the bound port
    (useful with port 0).
    """

    def __init__(self, registry: CollectorRegistry, address: str, *,
                 certfile: str | None = None, keyfile: str | None = None) -> None:
        if (certfile is None) != (keyfile is None):
            raise ConfigurationError("metrics TLS: a certificate needs its key and a key its "
                                     "certificate")
        self.registry = registry
        self.address = address
        self.host, self.requested_port = parse_address(address)
        self.tls = tls_context(certfile, keyfile) if certfile and keyfile else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound (the requested one, or the kernel's choice for port 0)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The URL of the metrics, for logs."""
        scheme = "https" if self.tls is not None else "http"
        host = self.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and start serving in a daemon thread.  OSError (EADDRINUSE...) naming the
        address when the socket cannot be bound."""
        if self._server is not None:
            return self
        bind_host, family = _family_for(self.host)
        handler: type[BaseHTTPRequestHandler] = MetricsHandler.factory(self.registry)
        try:
            self._server = _Server((bind_host, self.requested_port), handler, family, self.tls)
        except OSError as e:
            if self.host == "" and family == socket.AF_INET6 and e.errno in (
                    errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                self._server = _Server(("0.0.0.0", self.requested_port), handler,
                                       socket.AF_INET, self.tls)
            else:
                raise OSError(e.errno, f"cannot serve metrics: {e.strerror}",
                              self.address) from None
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="cdimover-metrics", daemon=True)
        self._thread.start()
        log.info("serving progress metrics on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
