"""Real servers for network tests, as pytest fixtures (registered by conftest.py).

- `nginx` (session): one nginx child process with a plain HTTP server, a second plain server
  (`other_port`, for cross-origin redirects) and an HTTPS + HTTP/2 server whose certificate comes
  from a throwaway CA made with the openssl CLI. Every server offers the same locations over one
  docroot: `/NAME`, `/auth/NAME` (basic auth), `/noranges/NAME` (Range ignored),
  `/redirect/NAME` (302 to `/NAME`), `/redirect-other/NAME` (302 to `/NAME` on the other plain
  server), `/loop` (302 to itself). The access log is JSON lines: see `NginxServer.log_entries`.
- `faultproxy` (factory): a TCP proxy that cuts, stalls, resets or drips the server->client
  stream, one `Fault` per accepted connection.
- `rawhttp` (factory): a small HTTP/1.1 server for what nginx cannot do: wrong Content-Length,
  200 to a Range request, validators that change on every request, an endless body, huge
  headers, a slow drip, or a fully scripted exchange.

All of them listen on 127.0.0.1 only and are stopped in teardown: nginx by its PID, the Python
servers by joining their threads.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import secrets
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, Union

import pytest

from conftest import TOOL_ENV, need, need_tool

HOST = "127.0.0.1"
POLL = 0.05                      # how often blocked loops look at their stop event


def free_port() -> int:
    """A port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, alive: Callable[[], bool], timeout: float = 10.0) -> bool:
    """True once 127.0.0.1:port accepts a connection; False if `alive()` turns false first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def send_all(sock: socket.socket, data: bytes, stop: threading.Event) -> bool:
    """sock.sendall that gives up when `stop` is set (the peer may never read). The socket must
    have a timeout. False if stopped or the peer went away."""
    view = memoryview(data)
    while view:
        if stop.is_set():
            return False
        try:
            view = view[sock.send(view):]
        except TimeoutError:
            continue
        except OSError:
            return False
    return True


def abort(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------------------------
# nginx

@dataclass
class NginxServer:
    """A running nginx; see the module docstring for its servers and locations."""
    dir: Path
    root: Path
    port: int
    other_port: int
    tls_port: int
    ca_file: Path
    wrong_ca_file: Path
    user: str
    password: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def url(self, path: str, scheme: str = "http", other: bool = False,
            host: str = HOST) -> str:
        """`url("f")` -> http://127.0.0.1:PORT/f; scheme="https" for the TLS server, other=True
        for the second plain server."""
        if scheme == "https":
            port = self.tls_port
        elif scheme == "http":
            port = self.other_port if other else self.port
        else:
            raise ValueError(f"unknown scheme {scheme!r}")
        return f"{scheme}://{host}:{port}/{path.lstrip('/')}"

    def put(self, data: bytes, name: str | None = None) -> str:
        """Drop `data` into the docroot under `name` (default: a fresh unique name, since the
        server and its log are shared by the whole session); returns the name."""
        if name is None:
            name = f"obj{next(self._names)}-{secrets.token_hex(4)}"
        (self.root / name).write_bytes(data)
        return name

    def log_entries(self, uri_suffix: str | None = None, expect: int = 0,
                    timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access log as dicts (port, scheme, protocol, method, uri, status, bytes_sent,
        range, auth_present, x_test_header, connection, connection_requests), oldest first;
        empty headers are None. Only entries whose uri ends with `uri_suffix` if given. nginx
        writes an entry just after the response, so a client may be done a moment earlier:
        `expect` waits (up to `timeout`) until that many entries match."""
        deadline = time.monotonic() + timeout
        while True:
            entries = []
            for line in self.access_log.read_text().split("\n")[:-1]:   # whole lines only
                e = json.loads(line)
                e["auth_present"] = bool(e["auth_present"])
                for k in ("range", "x_test_header"):
                    e[k] = e[k] or None
                if uri_suffix is None or e["uri"].endswith(uri_suffix):
                    entries.append(e)
            if len(entries) >= expect or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def bytes_sent(self, uri_suffix: str | None = None, expect: int = 0) -> int:
        """Sum of the body bytes sent for the matching entries (see `log_entries`)."""
        return sum(int(e["bytes_sent"]) for e in self.log_entries(uri_suffix, expect))


LOG_FORMAT = (
    '{"port":$server_port,"scheme":"$scheme","protocol":"$server_protocol",'
    '"method":"$request_method","uri":"$request_uri","status":$status,'
    '"bytes_sent":$body_bytes_sent,"range":"$http_range","auth_present":$netfix_auth,'
    '"x_test_header":"$http_x_test_header","connection":$connection,'
    '"connection_requests":$connection_requests}')


def nginx_conf(d: Path, root: Path, port: int, other_port: int, tls_port: int) -> str:
    def server(listen: str, other: str) -> str:
        return f"""
    server {{
        listen {listen};
        root {root};
        location / {{ }}
        location /auth/ {{
            alias {root}/;
            auth_basic "cdimover";
            auth_basic_user_file {d}/htpasswd;
        }}
        location /noranges/ {{ alias {root}/; max_ranges 0; }}
        location ~ ^/redirect/(.*)$ {{ return 302 $scheme://$host:$server_port/$1; }}
        location ~ ^/redirect-other/(.*)$ {{ return 302 http://{HOST}:{other}/$1; }}
        location = /loop {{ return 302 $scheme://$host:$server_port/loop; }}
    }}"""
    temps = "\n".join(f"    {kind}_temp_path {d}/{kind}_temp;"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{"user root;" if os.geteuid() == 0 else ""}
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
{temps}
    map $http_authorization $netfix_auth {{ "" false; default true; }}
    log_format netfix escape=json '{LOG_FORMAT}';
    access_log {d}/access.log netfix;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    keepalive_timeout 10s;
{server(f"{HOST}:{port}", str(other_port))}
{server(f"{HOST}:{other_port}", str(port))}
{server(f"{HOST}:{tls_port} ssl http2", str(other_port))}
}}
"""


def openssl(*args: str, cwd: Path, input: str | None = None) -> str:
    return subprocess.run(["openssl", *args], cwd=cwd, env=TOOL_ENV, check=True, text=True,
                          input=input, capture_output=True).stdout


def make_ca(d: Path, name: str) -> None:
    """name.key + name.pem: a self-signed CA (EC P-256, two days)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=cdimover test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_certs(d: Path, extra_ips: Iterable[str] = ()) -> None:
    """ca.pem (+ key), server.pem/server.key signed by it for 127.0.0.1, localhost, the
    server address of :func:`netns_pair` and EXTRA_IPS, and an unrelated wrong-ca.pem."""
    make_ca(d, "ca")
    make_ca(d, "wrong-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName="
        f"{','.join(f'IP:{ip}' for ip in ('127.0.0.1', NETNS_SERVER_IP, *extra_ips))},"
        "DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
            cwd=d)


def make_client_cert(d: Path, name: str, cn: str, ca: str = "ca") -> None:
    """name.key + name.pem: a client certificate for CN, signed by the CA ca.pem/ca.key."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                   "keyUsage=critical,digitalSignature\n"
                                   "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d)


def start_nginx(exe: str, d: Path, ports: tuple[int, int, int]) -> subprocess.Popen[bytes]:
    """Start nginx on the given ports and wait until it answers. Raises OSError(EADDRINUSE) if
    a port was taken, RuntimeError on any other failure to start."""
    (d / "nginx.conf").write_text(nginx_conf(d, d / "root", *ports))
    for log in ("error.log", "access.log"):
        (d / log).write_bytes(b"")
    with open(d / "stderr.log", "wb") as err:
        proc = subprocess.Popen([exe, "-e", str(d / "error.log"), "-p", f"{d}/",
                                 "-c", str(d / "nginx.conf")], env=TOOL_ENV,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    if all(wait_port(p, lambda: proc.poll() is None) for p in ports):
        return proc
    stop_process(proc)
    why = (d / "error.log").read_text() + (d / "stderr.log").read_text()
    if "Address already in use" in why:
        raise OSError(errno.EADDRINUSE, why)
    raise RuntimeError(f"nginx did not start:\n{why}")


def stop_popen(procs: Iterable[subprocess.Popen[str]]) -> None:
    """End each of PROCS (started by a test) by its PID: SIGTERM, then SIGKILL after 10 s;
    close their pipes."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_exe() -> str:
    exe = shutil.which("nginx", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    need(exe is not None, "needs nginx (Debian nginx-light)")
    assert exe is not None
    return exe


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """One nginx for the whole session (see the module docstring); stopped by its PID."""
    exe = nginx_exe()
    need_tool("openssl")
    d = tmp_path_factory.mktemp("nginx")
    (d / "root").mkdir()
    make_certs(d)
    user, password = "cdi", secrets.token_urlsafe(12)
    digest = openssl("passwd", "-apr1", "-stdin", cwd=d, input=password + "\n").strip()
    (d / "htpasswd").write_text(f"{user}:{digest}\n")
    for attempt in range(5):
        ports = (free_port(), free_port(), free_port())
        if len(set(ports)) < 3:
            continue
        try:
            proc = start_nginx(exe, d, ports)
            break
        except OSError as e:
            if e.errno != errno.EADDRINUSE or attempt == 4:
                raise
    else:
        raise RuntimeError("no three distinct free ports for nginx")
    try:
        yield NginxServer(dir=d, root=d / "root", port=ports[0], other_port=ports[1],
                          tls_port=ports[2], ca_file=d / "ca.pem",
                          wrong_ca_file=d / "wrong-ca.pem", user=user, password=password)
    finally:
        stop_process(proc)


# ---------------------------------------------------------------------------------------------
# A threaded TCP server stopped by an event: the base of the proxy and the HTTP server.

class TcpServer:
    """Accepts on 127.0.0.1 (ephemeral port), one thread per connection running
    `serve(index, conn)`. `close()` sets `stop`, closes the listener and joins every thread;
    `serve` must return soon after `stop` is set."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"{type(self).__name__}-{self.port}")
        self._accept.start()

    def url(self, path: str = "", scheme: str = "http") -> str:
        return f"{scheme}://{HOST}:{self.port}/{path.lstrip('/')}"

    def serve(self, index: int, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        for index in itertools.count():
            while not self.stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                    break
                except TimeoutError:
                    continue
                except OSError:
                    return
            else:
                return
            conn.settimeout(POLL)
            t = threading.Thread(target=self._run, args=(index, conn), daemon=True,
                                 name=f"{self._accept.name}-{index}")
            self._threads.append(t)
            t.start()

    def _run(self, index: int, conn: socket.socket) -> None:
        try:
            self.serve(index, conn)
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self._accept.join(5)
        self._listener.close()
        for t in [self._accept, *self._threads]:
            t.join(5)
        leaked = [t.name for t in [self._accept, *self._threads] if t.is_alive()]
        assert not leaked, f"threads still running after close: {leaked}"


def server_factory(make: Callable[..., TcpServer]) -> Iterator[Callable[..., Any]]:
    """Fixture body: a factory of servers, all closed in teardown."""
    made: list[TcpServer] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        made.append(make(*args, **kwargs))
        return made[-1]

    try:
        yield factory
    finally:
        for s in reversed(made):
            s.close()


# ---------------------------------------------------------------------------------------------
# faultproxy

FaultKind = Literal["pass", "cut", "reset", "stall", "drip"]


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one connection's server->client stream once `after` bytes went
    through: cut (FIN; after a pause of `seconds` when given), reset (RST), stall for
    `seconds` (None: until the client leaves or the proxy stops), or drip `chunk` bytes every
    `delay` seconds."""
    kind: FaultKind = "pass"
    after: int = 0
    seconds: float | None = None
    chunk: int = 1
    delay: float = 0.01


PASS = Fault()


def cut(after: int, pause: float | None = None) -> Fault:
    return Fault("cut", after, seconds=pause)


def reset(after: int) -> Fault:
    return Fault("reset", after)


def stall(after: int, seconds: float | None = None) -> Fault:
    return Fault("stall", after, seconds=seconds)


def drip(after: int = 0, chunk: int = 1, delay: float = 0.01) -> Fault:
    return Fault("drip", after, chunk=chunk, delay=delay)


@dataclass
class ProxyConnection:
    index: int
    fault: Fault
    to_client: int = 0          # bytes forwarded server -> client
    to_server: int = 0          # bytes forwarded client -> server
    fired: bool = False         # the fault took effect
    done: threading.Event = field(default_factory=threading.Event)


class FaultProxy(TcpServer):
    """Forwards 127.0.0.1:port to `target`; connection i gets faults[i], later ones `then`."""

    def __init__(self, target: tuple[str, int], faults: Iterable[Fault] = (),
                 then: Fault = PASS) -> None:
        self.target = target
        self.faults = list(faults)
        self.then = then
        self.connections: list[ProxyConnection] = []
        super().__init__()

    def wait_done(self, count: int, timeout: float = 5.0) -> list[ProxyConnection]:
        """The first `count` connections, once each has ended."""
        deadline = time.monotonic() + timeout
        while len(self.connections) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        for c in self.connections[:count]:
            assert c.done.wait(max(0.0, deadline - time.monotonic())), f"connection {c.index}"
        return self.connections[:count]

    def serve(self, index: int, client: socket.socket) -> None:
        fault = self.faults[index] if index < len(self.faults) else self.then
        info = ProxyConnection(index, fault)
        self.connections.append(info)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            info.done.set()
            return
        upstream.settimeout(POLL)
        try:
            self._pump(client, upstream, info)
        finally:
            upstream.close()
            info.done.set()

    def _pump(self, client: socket.socket, upstream: socket.socket,
              info: ProxyConnection) -> None:
        """Forward both ways until the server is done and all it sent went to the client, the
        client left during a stall, or the fault ended the connection."""
        fault = info.fault
        pending = b""              # read from upstream, not yet sent to the client
        upstream_eof = client_eof = False
        resume = 0.0               # monotonic time before which nothing goes to the client
        with selectors.DefaultSelector() as sel:
            while not self.stop.is_set():
                now = time.monotonic()
                if pending and now >= resume:
                    n = len(pending)
                    if not info.fired and fault.kind != "pass":
                        n = min(n, fault.after - info.to_client)
                    elif info.fired and fault.kind == "drip":
                        n = min(n, fault.chunk)
                        resume = now + fault.delay
                    if n and not send_all(client, pending[:n], self.stop):
                        return
                    pending = pending[n:]
                    info.to_client += n
                    if not info.fired and fault.kind != "pass" \
                            and info.to_client >= fault.after:
                        info.fired = True
                        if fault.kind == "cut":
                            if fault.seconds is not None and self.stop.wait(fault.seconds):
                                return
                            self._shutdown_write(client)
                            client.close()
                            return
                        if fault.kind == "reset":
                            abort(client)
                            return
                        if fault.kind == "stall":
                            resume = now + (fault.seconds if fault.seconds is not None
                                            else float("inf"))
                    continue
                if upstream_eof and not pending:
                    return
                watch = []
                if not client_eof:
                    watch.append(client)
                if not upstream_eof and not pending:
                    watch.append(upstream)
                for s in watch:
                    sel.register(s, selectors.EVENT_READ)
                wait = POLL if not pending else max(0.0, min(POLL, resume - now))
                ready = [k.fileobj for k, _ in sel.select(wait)] if watch else []
                for s in watch:
                    sel.unregister(s)
                if not watch:
                    time.sleep(wait)
                if client in ready:
                    data = self._recv(client)
                    if not data:
                        client_eof = True
                        if fault.kind == "stall" and info.fired:
                            return         # nobody left to stall for
                        self._shutdown_write(upstream)
                    elif send_all(upstream, data, self.stop):
                        info.to_server += len(data)
                if upstream in ready:
                    pending = self._recv(upstream)
                    upstream_eof = not pending

    @staticmethod
    def _recv(s: socket.socket) -> bytes:
        try:
            return s.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _shutdown_write(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def faultproxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: faultproxy((host, port), [cut(1 << 20)], then=PASS) -> FaultProxy."""
    yield from server_factory(FaultProxy)


# ---------------------------------------------------------------------------------------------
# rawhttp

@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]            # names in lower case

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Hangup:
    """End the connection now: FIN, or RST with reset=True."""
    reset: bool = False


Action = Union[bytes, Sleep, Hangup]


@dataclass
class Response:
    """A declarative answer; the defaults make a correct server (200, or 206 with Content-Range
    for a single satisfiable byte range, 416 otherwise, If-Range honoured), so a test turns on
    one fault at a time:

    - ranges=False: 200 with the whole body to a Range request;
    - length_delta: Content-Length announces len(body) + delta; the connection is closed after
      the body (delta > 0: a short body, delta < 0: extra bytes);
    - changing_validators: a new ETag and Last-Modified on every request;
    - endless: the body repeats forever, without Content-Length;
    - huge_headers: that many bytes of extra header lines;
    - drip_delay: the body goes out `drip_chunk` bytes at a time, `drip_delay` seconds apart;
    - status/headers: override or add (a given status disables range handling).
    """
    body: bytes = b""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True
    length_delta: int = 0
    changing_validators: bool = False
    endless: bool = False
    huge_headers: int = 0
    drip_chunk: int = 1
    drip_delay: float = 0.0
    etag: str = '"v0"'
    last_modified: float = 1_600_000_000.0


REASONS = {200: "OK", 206: "Partial Content", 302: "Found", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 416: "Range Not Satisfiable",
           500: "Internal Server Error", 503: "Service Unavailable"}

Handler = Callable[[Request], Union[Response, Iterable[Action]]]


def byte_range(spec: str | None, size: int) -> tuple[int, int] | None | Literal["bad"]:
    """(first, last) for a single `bytes=` range, None to send the whole body (no Range, a
    multi-range or a malformed one), "bad" when unsatisfiable."""
    if not spec or not spec.startswith("bytes=") or "," in spec:
        return None
    first_s, sep, last_s = spec[6:].strip().partition("-")
    if not sep or not (first_s or last_s) or not (first_s + last_s).isdigit():
        return None
    if not first_s:
        n = int(last_s)
        return (max(0, size - n), size - 1) if n and size else "bad"
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if last_s and int(last_s) < first:
        return None
    return (first, last) if first < size else "bad"


class RawHttp(TcpServer):
    """HTTP/1.1 on 127.0.0.1:port answering every request with `handler(request)` (or a fixed
    Response). A Response keeps the connection alive when it can; a list of actions is sent as
    given and the connection closed after it. `requests` records what came in."""

    def __init__(self, handler: Handler | Response) -> None:
        self.handler: Handler = handler if callable(handler) else (lambda _req: handler)
        self.requests: list[Request] = []
        self._count = itertools.count()
        super().__init__()

    def serve(self, index: int, conn: socket.socket) -> None:
        buf = b""
        while not self.stop.is_set():
            head, buf = self._read_head(conn, buf)
            if head is None:
                return
            req = self._parse(head)
            length = int(req.headers.get("content-length", "0") or 0)
            while len(buf) < length and not self.stop.is_set():
                more = self._recv(conn)
                if more is None:
                    return
                buf += more
            buf = buf[length:]
            self.requests.append(req)
            answer = self.handler(req)
            actions = self.render(req, answer) if isinstance(answer, Response) else answer
            for a in actions:
                if isinstance(a, Sleep):
                    if self.stop.wait(a.seconds):
                        return
                elif isinstance(a, Hangup):
                    if a.reset:
                        abort(conn)
                    return
                elif not send_all(conn, a, self.stop):
                    return
            if not isinstance(answer, Response) \
                    or req.headers.get("connection", "").lower() == "close":
                return

    def _recv(self, conn: socket.socket) -> bytes | None:
        """Some bytes; None at EOF, on error or when stopping."""
        while not self.stop.is_set():
            try:
                return conn.recv(65536) or None
            except TimeoutError:
                continue
            except OSError:
                return None
        return None

    def _read_head(self, conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in buf:
            if len(buf) > 1 << 16:
                return None, b""
            more = self._recv(conn)
            if more is None:
                return None, b""
            buf += more
        head, _, rest = buf.partition(b"\r\n\r\n")
        return head, rest

    @staticmethod
    def _parse(head: bytes) -> Request:
        lines = head.decode("latin-1").split("\r\n")
        method, path, *_ = lines[0].split(" ") + ["", ""]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Request(method, path, headers)

    def render(self, req: Request, r: Response) -> Iterator[Action]:
        """The actions for a Response, lazily (an endless body never ends). They end with a
        Hangup unless the body is exactly what Content-Length announced."""
        n = next(self._count) if r.changing_validators else 0
        etag = f'"v{n}"' if r.changing_validators else r.etag
        modified = formatdate(r.last_modified + n, usegmt=True)
        body, status = r.body, r.status or 200
        headers = {"ETag": etag, "Last-Modified": modified, "Accept-Ranges": "bytes"}
        if r.status is None and r.ranges and not r.endless:
            if_range = req.headers.get("if-range")
            rng = byte_range(req.range, len(body)) if if_range in (None, etag, modified) \
                else None
            if rng == "bad":
                status, body = 416, b""
                headers["Content-Range"] = f"bytes */{len(r.body)}"
            elif rng is not None:
                status, body = 206, body[rng[0]:rng[1] + 1]
                headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{len(r.body)}"
        close = r.endless or r.length_delta != 0
        if not r.endless:
            headers["Content-Length"] = str(len(body) + r.length_delta)
        if close:
            headers["Connection"] = "close"
        headers.update(r.headers)
        if req.method == "HEAD":
            body = b""
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        filler = "x" * 1000
        lines += [f"X-Filler-{i}: {filler}" for i in range(r.huge_headers // 1014)]
        yield "\r\n".join(lines + ["", ""]).encode("latin-1")
        if r.endless:
            yield from itertools.repeat(r.body or b"\0" * 65536)
        elif r.drip_delay:
            for i in range(0, len(body), r.drip_chunk):
                yield Sleep(r.drip_delay)
                yield body[i:i + r.drip_chunk]
        else:
            yield body
        if close:
            yield Hangup()


@pytest.fixture
def rawhttp() -> Iterator[Callable[..., RawHttp]]:
    """Factory: rawhttp(Response(body=...)) or rawhttp(handler) -> RawHttp."""
    yield from server_factory(RawHttp)


# ---------------------------------------------------------------------------------------------
# Two "nodes": network namespaces joined by a veth pair

NETNS_SERVER_IP = "169.254.213.1"
NETNS_CLIENT_IP = "169.254.213.2"


@dataclass
class NetnsPair:
    """Namespaces SERVER (address NETNS_SERVER_IP on SERVER_DEV) and CLIENT (NETNS_CLIENT_IP
    on CLIENT_DEV), joined by a veth pair that exists only inside them."""

    server: str
    client: str
    server_dev: str
    client_dev: str

    def exec(self, ns: str) -> list[str]:
        """The command prefix that runs a program in namespace NS."""
        return ["ip", "netns", "exec", ns]

    def tx_bytes(self, ns: str, dev: str) -> int:
        """Bytes sent by DEV in NS (its own /sys, as ip netns exec mounts it)."""
        out = subprocess.run([*self.exec(ns), "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
                             check=True, capture_output=True, text=True).stdout
        return int(out)

    def link(self, up: bool) -> None:
        """Take the client's end of the link down or up."""
        subprocess.run([*self.exec(self.client), "ip", "link", "set", self.client_dev,
                        "up" if up else "down"], check=True)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Two fresh network namespaces and a veth pair with link-local addresses (a /30) inside
    them; removed at teardown (deleting a namespace removes its end of the pair)."""
    from conftest import need_root, need_tool

    need_root()
    need_tool("ip")
    tag = f"{os.getpid() % 100000}{random.randrange(1000):03d}"
    pair = NetnsPair(f"cdm-s{tag}", f"cdm-c{tag}", f"cdms{tag}"[:15], f"cdmc{tag}"[:15])
    made: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)
    try:
        for ns in (pair.server, pair.client):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", pair.server_dev, "netns", pair.server, "type", "veth", "peer", "name",
           pair.client_dev, "netns", pair.client)
        for ns, dev, addr in ((pair.server, pair.server_dev, NETNS_SERVER_IP),
                              (pair.client, pair.client_dev, NETNS_CLIENT_IP)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
