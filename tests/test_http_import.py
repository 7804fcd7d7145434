"""Imports over HTTP and HTTPS from real servers: nginx (ranges, TLS, basic auth, redirects),
a fault-injecting proxy (cut, reset, stall) and a scriptable bad server.  Oracle: `qemu-img
convert` of the same file locally; allocation checked on the target."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TOOL_ENV, need_tool
from layouts import sha256_file
from netfix import PASS, Hangup, Request, Response, cut, reset, stall

import cdimover
from cdimover import cli
from cdimover.errors import (
    AuthenticationError,
    ChecksumMismatchError,
    NetworkError,
    ProtocolError,
    RemoteNotFoundError,
    SourceChangedError,
    TlsError,
)
from cdimover.io.http import HttpSource
from cdimover.ops.remote import import_url

MiB = 1 << 20


def qemu_img() -> str:
    return need_tool("qemu-img")


def make_qcow2(path: Path, size: int, writes: list[tuple[int, int, int]],
               *opts: str) -> Path:
    """A QCOW2 of SIZE bytes with (pattern, offset, length) writes, then rewritten by
    `qemu-img convert -O qcow2` (tables before data, as images are published)."""
    raw = path.with_suffix(".src")
    with open(raw, "wb") as f:
        f.truncate(size)
        for pattern, off, length in writes:
            f.seek(off)
            f.write(bytes([pattern]) * length)
    subprocess.run([qemu_img(), "convert", "-q", "-f", "raw", "-O", "qcow2", *opts, str(raw),
                    str(path)], check=True, env=TOOL_ENV)
    raw.unlink()
    return path


def oracle(image: Path, tmp: Path) -> str:
    out = tmp / "oracle.raw"
    subprocess.run([qemu_img(), "convert", "-q", "-O", "raw", str(image), str(out)],
                   check=True, env=TOOL_ENV)
    digest = sha256_file(out)
    out.unlink()
    return digest


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


WRITES = [(0x5A, 1 * MiB, 3 * MiB), (0x11, 40 * MiB, 5 * MiB), (0xC3, 63 * MiB + 4096, 8192)]


@pytest.fixture
def qcow2_on_nginx(nginx: Any, tmp_path: Path) -> tuple[str, Path]:
    img = make_qcow2(tmp_path / "img.qcow2", 64 * MiB, WRITES)
    name = nginx.put(img.read_bytes(), name=f"{tmp_path.name}.qcow2")
    return name, img


def test_qcow2_by_ranges_fetches_only_allocated_clusters(nginx: Any, qcow2_on_nginx: Any,
                                                          tmp_path: Path) -> None:
    name, img = qcow2_on_nginx
    out = tmp_path / "out.raw"
    r = import_url(nginx.url(name), out)
    assert r.strategy == "ranges" and r.source_format == "qcow2"
    assert sha256_file(out) == oracle(img, tmp_path)
    assert os.path.getsize(out) == 64 * MiB
    data = sum(length for _, _, length in WRITES)
    assert allocated(out) <= data + 2 * MiB        # holes stay holes
    sent = nginx.bytes_sent(name, expect=r.requests)
    assert sent == r.bytes_fetched
    assert sent <= 1.02 * allocated(img)           # unallocated clusters never downloaded
    assert sent < os.path.getsize(img) or allocated(img) < os.path.getsize(img)


def test_raw_by_ranges_with_checksum(nginx: Any, tmp_path: Path) -> None:
    data = bytearray(24 * MiB)
    data[5 * MiB:6 * MiB] = os.urandom(MiB)
    data[20 * MiB:20 * MiB + 4096] = b"\x01" * 4096
    name = nginx.put(bytes(data))
    digest = hashlib.sha512(data).hexdigest()
    out = tmp_path / "out.raw"
    r = import_url(nginx.url(name), out, checksum=f"sha512:{digest}",
                   request_size=MiB, threads=4)
    assert r.strategy == "ranges" and r.digest == f"sha512:{digest}"
    assert out.read_bytes() == bytes(data)
    assert allocated(out) <= 2 * MiB
    assert r.requests >= 24      # parallel ranges, one per request-sized piece


def test_checksum_mismatch_leaves_no_file(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(os.urandom(MiB))
    out = tmp_path / "out.raw"
    with pytest.raises(ChecksumMismatchError, match="sha256 of the downloaded file"):
        import_url(nginx.url(name), out, checksum="sha256:" + "00" * 32)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_https_with_ca_and_http2(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path) -> None:
    name, img = qcow2_on_nginx
    out = tmp_path / "out.raw"
    r = import_url(HttpSource(nginx.url(name, scheme="https"), ca=str(nginx.ca_file)), out)
    assert sha256_file(out) == oracle(img, tmp_path)
    assert r.http_version == 2


def test_https_ca_directory(nginx: Any, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(nginx.ca_file.read_bytes())
    (certs / "README").write_text("not a certificate")
    name = nginx.put(os.urandom(MiB))
    out = tmp_path / "out.raw"
    import_url(HttpSource(nginx.url(name, scheme="https"), ca=str(certs)), out)
    assert out.read_bytes() == (nginx.root / name).read_bytes()


def test_https_wrong_ca_is_a_tls_error(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(b"x" * 4096)
    for ca in (str(nginx.wrong_ca_file), None):
        with pytest.raises(TlsError, match="not trusted"):
            import_url(HttpSource(nginx.url(name, scheme="https"), ca=ca), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    r = import_url(HttpSource(nginx.url(name, scheme="https"), insecure=True), tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == b"x" * 4096
    assert r.copy.virtual_size == 4096


def test_basic_auth(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(os.urandom(2 * MiB))
    url = nginx.url(f"auth/{name}")
    with pytest.raises(AuthenticationError, match="401.*wants credentials") as e:
        import_url(url, tmp_path / "o")
    assert e.value.status == 401
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        import_url(HttpSource(url, auth=(nginx.user, "wrong")), tmp_path / "o")
    import_url(HttpSource(url, auth=(nginx.user, nginx.password)), tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == (nginx.root / name).read_bytes()
    # credentials inside the URL are taken out of it, and never logged
    userinfo = url.replace("http://", f"http://{nginx.user}:{nginx.password}@")
    src = HttpSource(userinfo)
    assert nginx.password not in repr(src) and nginx.password not in src.url
    import_url(src, tmp_path / "p")
    assert (tmp_path / "p").read_bytes() == (nginx.root / name).read_bytes()


def test_credentials_never_follow_a_redirect_to_another_origin(nginx: Any,
                                                                tmp_path: Path) -> None:
    name = nginx.put(os.urandom(MiB))
    same = HttpSource(nginx.url(f"redirect/auth/{name}"), auth=(nginx.user, nginx.password))
    import_url(same, tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == (nginx.root / name).read_bytes()
    other = HttpSource(nginx.url(f"redirect-other/auth/{name}"),
                       auth=(nginx.user, nginx.password), headers=("X-Test-Header: secret",))
    with pytest.raises(AuthenticationError, match="401"):
        import_url(other, tmp_path / "p")
    # nginx logs a request just after answering it: wait for the other origin's entry itself
    # (the same-origin import alone may already have logged several for this name)
    deadline = time.monotonic() + 10
    while True:
        hits = [e for e in nginx.log_entries(name) if e["port"] == nginx.other_port]
        if hits or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert hits and not any(e["auth_present"] for e in hits)
    assert not any(e["x_test_header"] == "secret" for e in hits)


def test_redirect_loop_is_bounded(nginx: Any, tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="more than 10 redirects"):
        import_url(nginx.url("loop"), tmp_path / "o")


def test_not_found(nginx: Any, tmp_path: Path) -> None:
    with pytest.raises(RemoteNotFoundError, match="404 Not Found"):
        import_url(nginx.url("no-such-image.qcow2"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_extra_headers_reach_the_server(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(os.urandom(MiB))
    import_url(HttpSource(nginx.url(name), headers=("X-Test-Header: hello",)),
               tmp_path / "o")
    entries = nginx.log_entries(name, expect=2)
    assert entries and all(e["x_test_header"] == "hello" for e in entries)


def test_user_agent(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(body=b"a" * 8192))
    import_url(srv.url("/x"), tmp_path / "o")
    assert {r.headers.get("user-agent") for r in srv.requests} == {
        f"cdimover/{cdimover.__version__}"}


def test_version_is_the_installed_packages() -> None:
    # The User-Agent's version comes from cdimover.__version__, not from the installed
    # metadata (a cold start would pay for reading it): the two must agree.
    from importlib.metadata import version
    assert cdimover.__version__ == version("cdimover")


@pytest.mark.parametrize("fault", [cut(3 * MiB), reset(2 * MiB)], ids=["cut", "reset"])
def test_broken_connection_resumes(nginx: Any, faultproxy: Any, qcow2_on_nginx: Any,
                                   tmp_path: Path, fault: Any) -> None:
    data = os.urandom(12 * MiB)
    name = nginx.put(data)
    proxy = faultproxy(("127.0.0.1", nginx.port), [], then=fault)
    out = tmp_path / "out.raw"
    # every connection breaks after a few MiB: ranges of 4 MiB need resuming
    r = import_url(HttpSource(proxy.url(f"/{name}"), retries=20, retry_delay=0.01), out,
                   threads=1, request_size=4 * MiB)
    assert out.read_bytes() == data
    assert r.retries >= 1


def test_qcow2_resumes_through_a_flaky_proxy(nginx: Any, faultproxy: Any,
                                             qcow2_on_nginx: Any, tmp_path: Path) -> None:
    name, img = qcow2_on_nginx
    proxy = faultproxy(("127.0.0.1", nginx.port), [], then=cut(MiB))
    out = tmp_path / "out.raw"
    r = import_url(HttpSource(proxy.url(f"/{name}"), retries=20, retry_delay=0.01), out)
    assert sha256_file(out) == oracle(img, tmp_path)
    assert r.retries >= 1


def test_stall_ends_in_idle_timeout(nginx: Any, faultproxy: Any, tmp_path: Path) -> None:
    name = nginx.put(os.urandom(4 * MiB))
    proxy = faultproxy(("127.0.0.1", nginx.port), [], then=stall(MiB))
    with pytest.raises(NetworkError, match="no progress for 1 seconds"):
        import_url(HttpSource(proxy.url(f"/{name}"), idle_timeout=1, retries=0),
                   tmp_path / "o", threads=1)
    assert not (tmp_path / "o").exists()


def test_retries_are_bounded(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(status=503))
    with pytest.raises(Exception, match="503 Service Unavailable .after 3 attempts"):
        import_url(HttpSource(srv.url("/x"), retries=2, retry_delay=0.01), tmp_path / "o")
    assert len(srv.requests) == 3


def test_whole_file_where_a_range_was_asked(rawhttp: Any, tmp_path: Path) -> None:
    body = os.urandom(3 * MiB)
    calls = []

    def handler(req: Request) -> Response:
        calls.append(req.range)
        return Response(body=body, ranges=len(calls) == 1)   # ranges only for the first

    srv = rawhttp(handler)
    with pytest.raises(ProtocolError, match="answered 200 with the whole file"):
        import_url(srv.url("/x"), tmp_path / "o", request_size=MiB)


def test_file_changed_during_import(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(body=os.urandom(3 * MiB), changing_validators=True))
    with pytest.raises(SourceChangedError, match="changed on the server"):
        import_url(srv.url("/x"), tmp_path / "o", request_size=MiB)
    assert not (tmp_path / "o").exists()


def test_short_body_is_retried_then_fails(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(body=os.urandom(MiB), length_delta=4096))
    with pytest.raises(NetworkError):
        import_url(HttpSource(srv.url("/x"), retries=1, retry_delay=0.01), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_huge_headers(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(body=b"x", huge_headers=1 << 20))
    with pytest.raises(ProtocolError, match="headers exceed 64 KiB"):
        import_url(srv.url("/x"), tmp_path / "o")


def test_hangup_without_answer(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(lambda req: [Hangup()])
    with pytest.raises(NetworkError, match="after 2 attempts"):
        import_url(HttpSource(srv.url("/x"), retries=1, retry_delay=0.01), tmp_path / "o")


def test_qcow2_onto_block_device(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path,
                                 loopdev: Any) -> None:
    name, img = qcow2_on_nginx
    backing = tmp_path / "dev.img"
    with open(backing, "wb") as f:
        f.write(b"\xee" * (65 * MiB))      # old contents that must be zeroed
    for sector in (512, 4096):
        dev = loopdev(backing, sector_size=sector)
        import_url(nginx.url(name), dev)
        with open(dev, "rb") as f:
            got = hashlib.sha256(f.read(64 * MiB)).hexdigest()
        assert got == oracle(img, tmp_path)


def test_cli_import_and_info(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path,
                             capsys: Any) -> None:
    import json

    name, img = qcow2_on_nginx
    out = tmp_path / "cli.raw"
    assert cli.main(["import", "--json", nginx.url(name), str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["strategy"] == "ranges" and doc["virtual_size"] == 64 * MiB
    assert sha256_file(out) == oracle(img, tmp_path)
    assert cli.main(["info", "--json", nginx.url(name)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["virtual-size"] == 64 * MiB and info["format"] == "qcow2"
    assert cli.main(["import", nginx.url("missing"), str(tmp_path / "m")]) == 1
    assert "404 Not Found" in capsys.readouterr().err
    pw = tmp_path / "pw"
    pw.write_text(nginx.password + "\n")
    assert cli.main(["import", "-q", "--user", nginx.user, "--password-file", str(pw),
                     nginx.url(f"auth/{name}"), str(tmp_path / "a.raw")]) == 0


# ---- the stream: no ranges, compressed files, QCOW2 with a checksum --------------------------

def sparse_raw(size: int) -> bytes:
    data = bytearray(size)
    data[MiB:2 * MiB] = os.urandom(MiB)
    data[size // 2:size // 2 + 8192] = b"\x42" * 8192
    data[size - 4096:] = os.urandom(4096)
    return bytes(data)


def compress(data: bytes, tool: str, tmp: Path) -> bytes:
    exe = need_tool(tool)
    return subprocess.run([exe, "-c"], input=data, capture_output=True, check=True,
                          env=TOOL_ENV).stdout


@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd", None])
def test_compressed_raw_streams_sparse(nginx: Any, tmp_path: Path, tool: str | None) -> None:
    data = sparse_raw(16 * MiB)
    body = compress(data, tool, tmp_path) if tool else data
    name = nginx.put(body, name=f"{tmp_path.name}.img" + (f".{tool}" if tool else ""))
    # no ranges for the uncompressed case: the stream is the only way
    url = nginx.url(name if tool else f"noranges/{name}")
    out = tmp_path / "out.raw"
    sha = hashlib.sha256(body).hexdigest()
    r = import_url(url, out, checksum=f"sha256:{sha}")
    assert r.strategy == "stream"
    assert r.compression == ({"gzip": "gzip", "xz": "xz", "zstd": "zstd"}[tool] if tool
                             else "none")
    assert out.read_bytes() == data
    assert allocated(out) <= 2 * MiB            # zeros became holes
    # fetched once (without ranges, the first answer's bytes are fetched again)
    assert len(body) <= r.bytes_fetched <= len(body) + (0 if tool else MiB)


def test_compression_is_told_by_magic_not_name(nginx: Any, tmp_path: Path) -> None:
    data = sparse_raw(8 * MiB)
    name = nginx.put(compress(data, "xz", tmp_path), name=f"{tmp_path.name}-disk.img.gz")
    r = import_url(nginx.url(name), tmp_path / "out.raw")
    assert r.compression == "xz"
    assert (tmp_path / "out.raw").read_bytes() == data


@pytest.mark.parametrize("where", ["noranges", "xz", "checksum"])
def test_qcow2_stream(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path, where: str) -> None:
    name, img = qcow2_on_nginx
    body = img.read_bytes()
    checksum = None
    if where == "xz":
        name = nginx.put(compress(body, "xz", tmp_path), name=f"{tmp_path.name}.qcow2.xz")
        url = nginx.url(name)
    elif where == "noranges":
        url = nginx.url(f"noranges/{name}")
    else:
        url = nginx.url(name)
        checksum = "sha1:" + hashlib.sha1(body).hexdigest()
    out = tmp_path / "out.raw"
    r = import_url(url, out, checksum=checksum)
    assert r.strategy == "stream" and r.source_format == "qcow2"
    assert sha256_file(out) == oracle(img, tmp_path)
    assert os.path.getsize(out) == 64 * MiB
    assert allocated(out) <= sum(length for _, _, length in WRITES) + 2 * MiB
    assert r.peak_held <= 8 * MiB


def test_qcow2_stream_onto_dirty_block_device(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path,
                                              loopdev: Any) -> None:
    name, img = qcow2_on_nginx
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\xee" * (64 * MiB))
    dev = loopdev(backing, sector_size=4096)
    import_url(nginx.url(f"noranges/{name}"), dev)
    with open(dev, "rb") as f:
        assert hashlib.sha256(f.read(64 * MiB)).hexdigest() == oracle(img, tmp_path)


def test_stream_checksum_mismatch_leaves_no_file(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(compress(sparse_raw(4 * MiB), "zstd", tmp_path))
    with pytest.raises(ChecksumMismatchError):
        import_url(nginx.url(name), tmp_path / "o", checksum="md5:" + "0" * 32)
    assert os.listdir(tmp_path) == []


def test_decompression_bomb_is_bounded_by_capacity(nginx: Any, tmp_path: Path) -> None:
    from cdimover.errors import TargetTooSmallError

    bomb = compress(bytes(256 * MiB), "zstd", tmp_path)
    name = nginx.put(bomb)
    with pytest.raises(TargetTooSmallError, match="larger than the target"):
        import_url(nginx.url(name), tmp_path / "o", capacity=16 * MiB)
    assert not (tmp_path / "o").exists()


def test_endless_body_is_bounded_by_capacity(rawhttp: Any, tmp_path: Path) -> None:
    from cdimover.errors import TargetTooSmallError

    srv = rawhttp(Response(body=b"\x01" * MiB, endless=True, ranges=False))
    with pytest.raises(TargetTooSmallError):
        import_url(srv.url("/x"), tmp_path / "o", capacity=8 * MiB)
    assert not (tmp_path / "o").exists()


def test_longer_body_than_announced(rawhttp: Any, tmp_path: Path) -> None:
    # bytes after the announced length are not part of the answer: never taken
    body = os.urandom(2 * MiB)
    srv = rawhttp(Response(body=body, length_delta=-4096, ranges=False))
    import_url(HttpSource(srv.url("/x"), retries=0), tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == body[:-4096]


def test_stream_resumes_with_ranges(nginx: Any, faultproxy: Any, tmp_path: Path) -> None:
    data = sparse_raw(24 * MiB)
    body = compress(data, "gzip", tmp_path)
    name = nginx.put(body)
    # every connection breaks: the open's first, then each one the stream resumes on
    proxy = faultproxy(("127.0.0.1", nginx.port), [cut(len(body) // 3)],
                       then=cut(len(body) // 2))
    r = import_url(HttpSource(proxy.url(f"/{name}"), retries=10, retry_delay=0.01),
                   tmp_path / "o", checksum="sha256:" + hashlib.sha256(body).hexdigest())
    assert (tmp_path / "o").read_bytes() == data
    assert r.retries >= 1 and r.restarts == 0
    assert r.bytes_fetched < 1.5 * len(body)     # resumed, not restarted


def test_stream_without_ranges_restarts_and_says_so(nginx: Any, faultproxy: Any,
                                                    tmp_path: Path) -> None:
    data = sparse_raw(8 * MiB)
    name = nginx.put(data)
    proxy = faultproxy(("127.0.0.1", nginx.port), [PASS, cut(3 * MiB)])
    r = import_url(HttpSource(proxy.url(f"/noranges/{name}"), retries=3, retry_delay=0.01),
                   tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == data
    assert r.restarts == 1


def test_stream_slow_drip_hits_idle_timeout(rawhttp: Any, tmp_path: Path) -> None:
    srv = rawhttp(Response(body=os.urandom(MiB), ranges=False, drip_chunk=16,
                           drip_delay=0.05))
    with pytest.raises(NetworkError, match="no progress for 1 seconds"):
        import_url(HttpSource(srv.url("/x"), idle_timeout=1, retries=0), tmp_path / "o",
                   capacity=8 * MiB)


def test_http_proxy_from_the_environment(rawhttp: Any, nginx: Any, tmp_path: Path,
                                         monkeypatch: Any) -> None:
    body = os.urandom(MiB)
    name = nginx.put(body)
    seen: list[str] = []

    def proxy(req: Request) -> Response:
        seen.append(req.path)       # absolute-form: the proxy is asked for the whole URL
        return Response(body=body)

    srv = rawhttp(proxy)
    monkeypatch.setenv("http_proxy", srv.url(""))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    import_url(nginx.url(name), tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == body
    assert seen and all(p == nginx.url(name) for p in seen)
    count = len(seen)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    import_url(nginx.url(name), tmp_path / "p")
    assert (tmp_path / "p").read_bytes() == body
    assert len(seen) == count          # no_proxy: straight to the server


def test_qcow2_beyond_the_memory_bound(nginx: Any, qcow2_on_nginx: Any, tmp_path: Path) -> None:
    from cdimover.errors import UnsupportedImageError

    name, img = qcow2_on_nginx
    url = nginx.url(f"noranges/{name}")
    with pytest.raises(UnsupportedImageError, match="within the memory limit"):
        import_url(url, tmp_path / "o", mem_limit=4096)
    assert not (tmp_path / "o").exists()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = import_url(url, tmp_path / "o", mem_limit=4096, scratch_dir=str(scratch))
    assert r.strategy == "scratch"
    assert sha256_file(tmp_path / "o") == oracle(img, tmp_path)
    assert list(scratch.iterdir()) == []         # the scratch copy is removed
