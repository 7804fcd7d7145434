"""The network fixtures of netfix.py do what they promise: nginx ranges, TLS with the right and
the wrong CA, HTTP/2, basic auth, redirects (same server, other port, loop) and its access log;
the fault proxy's cut, reset, stall and drip; the raw HTTP server's correct ranges and each of
its faults. Needs nginx, openssl and curl: skips locally without them, fails in CI."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TOOL_ENV, need_tool
from netfix import (
    HOST,
    FaultProxy,
    Hangup,
    NginxServer,
    RawHttp,
    Request,
    Response,
    Sleep,
    cut,
    drip,
    reset,
    stall,
)

KiB, MiB = 1 << 10, 1 << 20
DATA = os.urandom(256 * KiB)


def get(port: int, path: str, headers: dict[str, str] | None = None,
        timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP GET: status, headers (lower-case names), whole body."""
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_tool("curl"), "-sS", "--noproxy", "*", "--max-time", "10",
                           *args], capture_output=True, text=True, env=TOOL_ENV, check=False)


def raw_exchange(port: int, request: bytes, limit: int = 4 * MiB) -> bytes:
    """Send `request` as is, read until the server closes (or `limit` bytes)."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(request)
        out = b""
        while len(out) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


# ---------------------------------------------------------------------------------------------
# nginx

def test_nginx_range_and_log(nginx: NginxServer) -> None:
    name = nginx.put(DATA)
    status, headers, body = get(nginx.port, f"/{name}", {"Range": "bytes=1000-4999",
                                                         "X-Test-Header": "t1"})
    assert status == 206 and body == DATA[1000:5000]
    assert headers["content-range"] == f"bytes 1000-4999/{len(DATA)}"
    assert (get(nginx.port, f"/{name}")[2]) == DATA
    first, second = nginx.log_entries(name, expect=2)
    assert (first["status"], first["range"], first["x_test_header"]) == \
        (206, "bytes=1000-4999", "t1")
    assert (second["status"], second["range"], second["x_test_header"]) == (200, None, None)
    assert not first["auth_present"] and first["port"] == nginx.port
    assert nginx.bytes_sent(name) == 4000 + len(DATA)


def test_nginx_noranges(nginx: NginxServer) -> None:
    name = nginx.put(DATA)
    status, headers, body = get(nginx.port, f"/noranges/{name}", {"Range": "bytes=0-9"})
    assert status == 200 and body == DATA and "content-range" not in headers


def test_nginx_tls_ca(nginx: NginxServer) -> None:
    name = nginx.put(b"secure\n")
    ctx = ssl.create_default_context(cafile=str(nginx.ca_file))
    c = http.client.HTTPSConnection(HOST, nginx.tls_port, context=ctx, timeout=5)
    c.request("GET", f"/{name}")
    assert c.getresponse().read() == b"secure\n"
    c.close()
    wrong = ssl.create_default_context(cafile=str(nginx.wrong_ca_file))
    c = http.client.HTTPSConnection(HOST, nginx.tls_port, context=wrong, timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        c.request("GET", f"/{name}")
    c.close()


def test_nginx_http2_and_dns_name(nginx: NginxServer) -> None:
    name = nginx.put(b"h2\n")
    r = curl("--http2", "--cacert", str(nginx.ca_file), "-w", "%{http_version}", "-o",
             os.devnull, "--resolve", f"localhost:{nginx.tls_port}:{HOST}",
             nginx.url(name, "https", host="localhost"))
    assert r.returncode == 0 and r.stdout == "2", r.stderr
    assert nginx.log_entries(name, expect=1)[0]["protocol"] == "HTTP/2.0"
    r = curl("--cacert", str(nginx.wrong_ca_file), "-o", os.devnull, nginx.url(name, "https"))
    assert r.returncode == 60, r.stderr         # peer certificate cannot be authenticated


def test_nginx_auth(nginx: NginxServer) -> None:
    name = nginx.put(b"private\n")
    assert curl("-w", "%{http_code}", "-o", os.devnull,
                nginx.url(f"auth/{name}")).stdout == "401"
    assert curl("-u", f"{nginx.user}:wrong", "-w", "%{http_code}", "-o", os.devnull,
                nginx.url(f"auth/{name}")).stdout == "401"
    r = curl("-u", f"{nginx.user}:{nginx.password}", nginx.url(f"auth/{name}"))
    assert r.stdout == "private\n"
    assert [e["auth_present"] for e in nginx.log_entries(name, expect=3)] == [False, True, True]


def test_nginx_redirects(nginx: NginxServer) -> None:
    name = nginx.put(b"moved\n")
    status, headers, _ = get(nginx.port, f"/redirect/{name}")
    assert status == 302 and headers["location"] == nginx.url(name)
    status, headers, _ = get(nginx.port, f"/redirect-other/{name}")
    assert status == 302 and headers["location"] == nginx.url(name, other=True)
    assert curl("-L", nginx.url(f"redirect-other/{name}")).stdout == "moved\n"
    # Credentials are not sent on to another port: curl gets the other server's 401.
    r = curl("-L", "-u", f"{nginx.user}:{nginx.password}", "-w", "%{http_code}", "-o",
             os.devnull, nginx.url(f"redirect-other/auth/{name}"))
    assert r.stdout == "401"
    last = nginx.log_entries(f"/auth/{name}", expect=1)[-1]
    assert (last["port"], last["status"], last["auth_present"]) == (nginx.other_port, 401, False)
    r = curl("-L", "--max-redirs", "3", nginx.url("loop"))
    assert r.returncode == 47                   # too many redirects


# ---------------------------------------------------------------------------------------------
# faultproxy

def test_faultproxy_cut_then_pass(nginx: NginxServer,
                                  faultproxy: Callable[..., FaultProxy]) -> None:
    name = nginx.put(DATA)
    proxy = faultproxy((HOST, nginx.port), [cut(100_000)])
    with pytest.raises(http.client.IncompleteRead):
        get(proxy.port, f"/{name}")
    assert get(proxy.port, f"/{name}")[2] == DATA
    first, second = proxy.wait_done(2)
    assert first.fired and first.to_client == 100_000
    assert not second.fired and second.to_client > len(DATA)
    assert second.to_server > 0


def test_faultproxy_reset(nginx: NginxServer, faultproxy: Callable[..., FaultProxy]) -> None:
    name = nginx.put(DATA)
    proxy = faultproxy((HOST, nginx.port), [reset(1000)])
    with pytest.raises(ConnectionResetError):
        get(proxy.port, f"/{name}")
    assert proxy.wait_done(1)[0].to_client == 1000


def test_faultproxy_stall(nginx: NginxServer, faultproxy: Callable[..., FaultProxy]) -> None:
    name = nginx.put(DATA)
    proxy = faultproxy((HOST, nginx.port), [stall(5000, seconds=0.4), stall(5000)])
    t0 = time.monotonic()
    assert get(proxy.port, f"/{name}")[2] == DATA
    assert time.monotonic() - t0 >= 0.4
    with pytest.raises(TimeoutError):
        get(proxy.port, f"/{name}", timeout=0.3)
    assert proxy.wait_done(2)[1].to_client == 5000       # ended when the client left


def test_faultproxy_drip(rawhttp: Callable[..., RawHttp],
                         faultproxy: Callable[..., FaultProxy]) -> None:
    server = rawhttp(Response(b"x" * 400))
    proxy = faultproxy((HOST, server.port), [drip(after=100, chunk=50, delay=0.05)])
    t0 = time.monotonic()
    status, _, body = get(proxy.port, "/")
    assert status == 200 and body == b"x" * 400
    assert time.monotonic() - t0 >= 0.2          # at least 400/50 - 2 pauses after the head
    assert proxy.wait_done(1)[0].fired


# ---------------------------------------------------------------------------------------------
# rawhttp

@pytest.mark.parametrize("spec, expect", [
    ("bytes=10-19", (206, 10, 20)),
    ("bytes=100-", (206, 100, len(DATA))),
    ("bytes=-16", (206, len(DATA) - 16, len(DATA))),
    ("bytes=0-99999999", (206, 0, len(DATA))),
    (f"bytes={len(DATA)}-", (416, 0, 0)),
    ("bytes=0-1,5-6", (200, 0, len(DATA))),
])
def test_rawhttp_ranges(rawhttp: Callable[..., RawHttp], spec: str,
                        expect: tuple[int, int, int]) -> None:
    server = rawhttp(Response(DATA))
    status, headers, body = get(server.port, "/x", {"Range": spec})
    assert (status, body) == (expect[0], DATA[expect[1]:expect[2]])
    if status == 206:
        assert headers["content-range"] == f"bytes {expect[1]}-{expect[2] - 1}/{len(DATA)}"
    assert server.requests[0].range == spec


def test_rawhttp_keepalive_and_validators(rawhttp: Callable[..., RawHttp]) -> None:
    server = rawhttp(Response(DATA))
    c = http.client.HTTPConnection(HOST, server.port, timeout=5)
    tags = []
    for _ in range(2):
        c.request("GET", "/x", headers={"Range": "bytes=0-9"})
        r = c.getresponse()
        assert r.read() == DATA[:10]
        tags.append((r.getheader("ETag"), r.getheader("Last-Modified")))
    c.close()
    assert tags[0] == tags[1]
    changing = rawhttp(Response(DATA, changing_validators=True))
    first = get(changing.port, "/x")[1]
    second = get(changing.port, "/x", {"Range": "bytes=0-9", "If-Range": first["etag"]})
    assert second[0] == 200 and second[2] == DATA            # If-Range no longer matches
    assert first["etag"] != second[1]["etag"]
    assert first["last-modified"] != second[1]["last-modified"]


def test_rawhttp_ignores_range(rawhttp: Callable[..., RawHttp]) -> None:
    server = rawhttp(Response(DATA, ranges=False))
    status, headers, body = get(server.port, "/x", {"Range": "bytes=0-9"})
    assert status == 200 and body == DATA and "content-range" not in headers


def test_rawhttp_wrong_length(rawhttp: Callable[..., RawHttp]) -> None:
    short = rawhttp(Response(b"0123456789", length_delta=5))
    with pytest.raises(http.client.IncompleteRead):
        get(short.port, "/x")
    long = rawhttp(Response(b"0123456789", length_delta=-4))
    raw = raw_exchange(long.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 6\r\n" in head and body == b"0123456789"


def test_rawhttp_endless_and_huge_headers(rawhttp: Callable[..., RawHttp]) -> None:
    endless = rawhttp(Response(b"z" * 1000, endless=True))
    raw = raw_exchange(endless.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", limit=2 * MiB)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length" not in head and len(body) >= MiB and set(body) == {ord("z")}
    huge = rawhttp(Response(b"ok", huge_headers=MiB))
    raw = raw_exchange(huge.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert len(raw) > MiB and raw.endswith(b"\r\n\r\nok")
    with pytest.raises(http.client.HTTPException):
        get(huge.port, "/")                   # more than http.client's 100 header lines


def test_rawhttp_drip(rawhttp: Callable[..., RawHttp]) -> None:
    server = rawhttp(Response(b"abcdefghij", drip_chunk=2, drip_delay=0.03))
    t0 = time.monotonic()
    assert get(server.port, "/")[2] == b"abcdefghij"
    assert time.monotonic() - t0 >= 0.15


def test_rawhttp_scripted(rawhttp: Callable[..., RawHttp], tmp_path: Path) -> None:
    def handler(req: Request) -> list[bytes | Sleep | Hangup] | Response:
        if req.path == "/garbage":
            return [b"NOT HTTP AT ALL\r\n\r\n"]
        if req.path == "/rst":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", Sleep(0.05),
                    Hangup(reset=True)]
        return Response(b"fine")
    server = rawhttp(handler)
    with pytest.raises(http.client.BadStatusLine):
        get(server.port, "/garbage")
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        get(server.port, "/rst")
    assert get(server.port, "/ok")[2] == b"fine"
    out = tmp_path / "out"
    r = curl("-o", str(out), "-w", "%{http_code}", server.url("/ok"))
    assert r.stdout == "200" and out.read_bytes() == b"fine"
    assert [q.path for q in server.requests] == ["/garbage", "/rst", "/ok", "/ok"]
