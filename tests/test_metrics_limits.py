"""The metrics endpoint under hostile clients: hundreds of idle or stalled connections (TCP,
half a TLS handshake, half a request) cost one thread, never keep a scrape from answering
within the controllers' 2 s timeout, and are closed after the header timeout."""

from __future__ import annotations

import gzip
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdimover.pod.metrics import (EVICT_AFTER, HEADER_TIMEOUT, MetricsServer, ProgressCounter,
                              new_registry, self_signed_certificate)

UID = "owner-1"
SAMPLE = f'kubevirt_cdi_import_progress_total{{ownerUID="{UID}"}} 42.0'
# The first bytes of a TLS ClientHello record: enough for the server to start the handshake.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def tasks() -> int:
    """Threads of this process, as the kernel counts them."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def counter() -> ProgressCounter:
    c = ProgressCounter("import", UID)
    c.set(42)
    return c


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    return self_signed_certificate(str(tmp_path))


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Client sockets, closed at teardown."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def connect(port: int, socks: list[socket.socket], timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    socks.append(s)
    return s


def scrape(url: str) -> tuple[float, str]:
    """(seconds, body) of one scrape as a controller makes it: 2 s timeout, certificate not
    verified."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = time.monotonic()
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
        body = r.read().decode()
    return time.monotonic() - t, body


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes S (EOF or reset) within WITHIN seconds; bytes it sends
    first (a TLS alert) are skipped."""
    end = time.monotonic() + within
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if not s.recv(4096):
                return True
        except (TimeoutError, socket.timeout):
            return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            return True
    return False


def test_scrapes_answer_under_200_idle_and_stalled_clients(
        counter: ProgressCounter, tls_files: tuple[str, str],
        clients: list[socket.socket]) -> None:
    cert, key = tls_files
    before = (threading.active_count(), tasks())
    with MetricsServer(new_registry(counter), "127.0.0.1:0", certfile=cert,
                       keyfile=key) as server:
        assert (threading.active_count(), tasks()) == (before[0] + 1, before[1] + 1)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        stalled_tls = []
        for _ in range(10):   # handshake done, then half a request
            s = ctx.wrap_socket(connect(server.port, clients), server_hostname="x")
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled_tls.append(s)
        for _ in range(20):   # half a ClientHello
            connect(server.port, clients).sendall(PARTIAL_HELLO)
        for _ in range(200):  # nothing at all
            connect(server.port, clients)
        started = time.monotonic()
        # Clients that connected a moment ago keep their slots (the others were closed at
        # once); once they have waited EVICT_AFTER, a new client takes the oldest one's.
        time.sleep(EVICT_AFTER + 0.2)
        for _ in range(5):
            took, body = scrape(server.url)
            assert SAMPLE in body.splitlines()
            assert took < 2
            # One thread serves them all, whatever the number of clients.
            assert (threading.active_count(), tasks()) == (before[0] + 1, before[1] + 1)
        # Every stalled client is closed by the header timeout (5 s after it connected).
        deadline = HEADER_TIMEOUT + 2 - (time.monotonic() - started)
        waiting = stalled_tls + [s for s in clients if s.fileno() >= 0]
        assert len(waiting) == 230
        assert all(closed_by_server(s, max(deadline, 0.1)) for s in waiting)
        took, body = scrape(server.url)
        assert SAMPLE in body.splitlines()
        for s in stalled_tls:
            s.close()
    assert threading.active_count() == before[0]
    # The kernel forgets the server's thread a moment after Python joined it (longer under
    # the sanitizers): wait for it, boundedly.
    deadline = time.monotonic() + 5
    while tasks() != before[1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tasks() == before[1]


def test_stalled_and_trickling_clients_are_closed_at_the_header_timeout(
        counter: ProgressCounter, clients: list[socket.socket]) -> None:
    with MetricsServer(new_registry(counter), "127.0.0.1:0", header_timeout=1.0,
                       deadline=2.0) as server:
        idle = connect(server.port, clients)
        half = connect(server.port, clients)
        half.sendall(b"GET /metrics HTTP/1.1\r\n")
        trickle = connect(server.port, clients)
        start = time.monotonic()
        # A client that keeps sending, a byte at a time, is still cut at the header timeout.
        cut = None
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"y" * 40:
            try:
                trickle.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - start
                break
            time.sleep(0.1)
            trickle.settimeout(0.001)
            try:
                if trickle.recv(1) == b"":
                    cut = time.monotonic() - start
                    break
            except (TimeoutError, socket.timeout):
                pass
        assert cut is not None and 0.9 <= cut <= 1.6, cut
        for s in (idle, half):
            assert closed_by_server(s, 1.0)
        assert time.monotonic() - start < 2.2
        # A prompt client is answered as before.
        assert SAMPLE in scrape(server.url)[1].splitlines()


def test_at_the_limit_new_clients_are_refused_until_one_has_waited(
        counter: ProgressCounter, clients: list[socket.socket]) -> None:
    with MetricsServer(new_registry(counter), "127.0.0.1:0", max_connections=4,
                       evict_after=0.5) as server:
        first = [connect(server.port, clients) for _ in range(4)]
        born = time.monotonic()
        early = connect(server.port, clients)
        assert closed_by_server(early, 0.3)             # every slot is young: refused
        assert not any(closed_by_server(s, 0.05) for s in first)
        time.sleep(max(0.0, born + 0.6 - time.monotonic()))
        late = connect(server.port, clients)
        assert closed_by_server(first[0], 1.0)          # the oldest made room
        assert not any(closed_by_server(s, 0.1) for s in first[1:])
        late.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        late.settimeout(2)
        reply = b""
        while chunk := late.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and SAMPLE.encode() in reply


def raw(port: int, request: bytes, clients: list[socket.socket]) -> bytes:
    s = connect(port, clients, timeout=2)
    s.sendall(request)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply


def test_requests(counter: ProgressCounter, clients: list[socket.socket]) -> None:
    with MetricsServer(new_registry(counter), "127.0.0.1:0") as server:
        port = server.port
        ok = raw(port, b"GET /any/path?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", clients)
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert f"Content-Length: {len(body)}".encode() in head and b"Connection: close" in head
        assert SAMPLE.encode() in body.splitlines()
        only_head = raw(port, b"HEAD /metrics HTTP/1.1\r\n\r\n", clients)
        assert only_head.startswith(b"HTTP/1.1 200 OK") and only_head.endswith(b"\r\n\r\n")
        gz = raw(port, b"GET / HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n", clients)
        head, _, body = gz.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        assert SAMPLE.encode() in gzip.decompress(body).splitlines()
        none = raw(port, b"GET /?name[]=other HTTP/1.1\r\n\r\n", clients)
        assert SAMPLE.encode() not in none and none.startswith(b"HTTP/1.1 200 OK")
        post = raw(port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", clients)
        assert post.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        big = raw(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", clients)
        assert big.startswith(b"HTTP/1.1 431 ")
        assert raw(port, b"nonsense\r\n\r\n", clients).startswith(b"HTTP/1.1 400 ")


def test_stop_closes_clients_and_the_port(counter: ProgressCounter,
                                          clients: list[socket.socket]) -> None:
    before = threading.active_count()
    server = MetricsServer(new_registry(counter), "127.0.0.1:0").start()
    port = server.port
    waiting = [connect(port, clients) for _ in range(5)]
    time.sleep(0.1)
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < 2
    assert all(closed_by_server(s, 1.0) for s in waiting)
    assert threading.active_count() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.stop()   # idempotent
