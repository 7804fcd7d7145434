"""The upload server end to end: ``python -m cdimover pod upload-server`` in a subprocess on
127.0.0.1, HTTPS with certificates made here (a CA, the server's, clients with the right and a
wrong CN), real clients (curl, http.client, raw sockets for the misbehaving ones); checked
through the answers, the exit status, the termination message and the bytes written, against
``qemu-img convert -O raw`` of the same image."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TOOL_ENV, need_tool
from netfix import free_port, make_certs, make_client_cert, stop_popen

MiB = 1 << 20
CLIENT = "client.upload-server.cdi.kubevirt.io"
UID = "7d0c9a52-6a4f-4f0e-9d8e-3c1b2a4f5e6d"
ENV_VARS = ("TLS_KEY_FILE", "TLS_CERT_FILE", "CLIENT_CERT_FILE", "CLIENT_NAME", "LISTEN_ADDRESS",
            "LISTEN_PORT", "DESTINATION", "UPLOAD_IMAGE_SIZE", "FILESYSTEM_OVERHEAD",
            "PREALLOCATION", "DEADLINE", "OWNER_UID", "SCRATCH_DIR", "TLS_MIN_VERSION",
            "TLS_CIPHERS")


# ---------------------------------------------------------------------------------------------
# Fixtures: certificates, images, the server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("openssl")
    d = tmp_path_factory.mktemp("certs")
    make_certs(d)
    make_client_cert(d, "client", CLIENT)
    make_client_cert(d, "wrong-cn", "somebody.else")
    make_client_cert(d, "wrong-ca-client", CLIENT, ca="wrong-ca")
    return d


def _qemu_img(*args: str) -> None:
    subprocess.run([need_tool("qemu-img"), *args], check=True, env=TOOL_ENV,
                   capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24 MiB RAW disk (data, text, zeros, holes) and its uploads: compressed and QCOW2."""
    d = tmp_path_factory.mktemp("images")
    raw = d / "disk.raw"
    rnd = __import__("random").Random(13)
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        f.seek(MiB)
        f.write(rnd.randbytes(3 * MiB))
        f.seek(9 * MiB)
        f.write(b"cdimover upload " * 65536)
        f.seek(14 * MiB)
        f.write(bytes(MiB))                 # written zeros
        f.seek(20 * MiB + 4096)
        f.write(rnd.randbytes(12345))
    out = {"raw": raw}
    out["gzip"] = d / "disk.raw.gz"
    out["gzip"].write_bytes(gzip.compress(raw.read_bytes(), 6))
    for tool, ext in (("xz", "xz"), ("zstd", "zst")):
        exe = need_tool(tool)
        subprocess.run([exe, "-q", "-k", "-c", str(raw)], check=True, env=TOOL_ENV,
                       stdout=open(d / f"disk.raw.{ext}", "wb"))
        out[tool] = d / f"disk.raw.{ext}"
    out["qcow2"] = d / "disk.qcow2"
    _qemu_img("convert", "-O", "qcow2", str(raw), str(out["qcow2"]))
    out["qcow2-zlib"] = d / "disk-zlib.qcow2"
    _qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(out["qcow2-zlib"]))
    out["qcow2-zstd"] = d / "disk-zstd.qcow2"
    _qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw),
              str(out["qcow2-zstd"]))
    return out


def oracle(image: Path, tmp: Path) -> str:
    """sha256 of qemu-img's RAW conversion of IMAGE (the RAW itself for compressed bodies)."""
    out = tmp / (image.name + ".oracle")
    if not out.exists():
        src = image if "qcow2" in image.name else image.with_name("disk.raw")
        _qemu_img("convert", "-O", "raw", str(src), str(out))
    return sha256(out)


def sha256(path: Path | str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else 1 << 62
        while left > 0:
            b = f.read(min(MiB, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    log: Path
    certs: Path
    volume: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        """The exit status and the termination message once the server ended."""
        rc = self.proc.wait(timeout)
        return rc, self.log.read_text() if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def context(self, cert: str | None = "client") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(str(self.certs / f"{cert}.pem"), str(self.certs / f"{cert}.key"))
        return ctx


@pytest.fixture
def start(certs: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start(volume=None, *extra_args, **env) -> a running server (healthz answers);
    stopped by its PID at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def run(volume: Path | str | None = None, *extra: str, port: int = 0, **env: str) -> Server:
        vol = Path(volume) if volume is not None else tmp_path / "data"
        if volume is None:
            vol.mkdir(exist_ok=True)
        log = tmp_path / f"termination-log-{len(procs)}"
        e = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        e.update(TLS_CERT_FILE=str(certs / "server.pem"), TLS_KEY_FILE=str(certs / "server.key"),
                 CLIENT_CERT_FILE=str(certs / "ca.pem"), CLIENT_NAME=CLIENT, OWNER_UID=UID,
                 DESTINATION=str(vol), SCRATCH_DIR=str(tmp_path / "no-scratch"))
        e.update(env)
        chosen = port
        for _ in range(5):
            port = chosen or free_port()
            p = subprocess.Popen(
                [sys.executable, "-m", "cdimover", "pod", "upload-server", "--listen",
                 f"127.0.0.1:{port}", "--termination-log", str(log), *extra],
                env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            srv = Server(p, port, log, certs, vol)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and p.poll() is None:
                try:
                    c = http.client.HTTPSConnection("127.0.0.1", port, timeout=2,
                                                    context=srv.context(None))
                    c.request("GET", "/healthz")
                    r = c.getresponse()
                    if r.status == 200 and r.read() == b"OK":
                        return srv
                except OSError:
                    time.sleep(0.05)
            if p.poll() is None:
                break
        raise AssertionError(f"the server did not start: {p.stderr.read() if p.stderr else ''}")

    try:
        yield run
    finally:
        stop_popen(procs)


def curl(srv: Server, path: str, *args: str, cert: str | None = "client",
         timeout: float = 60) -> tuple[int, str]:
    """Run curl against SRV's PATH; (HTTP status, body)."""
    exe = need_tool("curl")
    auth = ["--cert", str(srv.certs / f"{cert}.pem"), "--key", str(srv.certs / f"{cert}.key")] \
        if cert else []
    p = subprocess.run([exe, "-sS", "--cacert", str(srv.certs / "ca.pem"), *auth, "-o", "-",
                        "-w", "\n%{http_code}", *args, srv.url + path], env=TOOL_ENV,
                       capture_output=True, text=True, timeout=timeout)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body


def raw_request(srv: Server, head: str, body: bytes = b"", *,
                cert: str = "client") -> ssl.SSLSocket:
    """An open TLS connection to SRV that sent the request head HEAD and BODY (no more)."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    tls = srv.context(cert).wrap_socket(sock, server_hostname="127.0.0.1")
    tls.sendall(head.encode() + b"\r\n\r\n" + body)
    return tls


def read_status(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    data = b""
    try:
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                n = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")]
                if n and len(rest) >= n[0]:
                    break
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    head, _, rest = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), rest


def assert_complete(srv: Server, *, prealloc: bool = False) -> None:
    rc, msg = srv.wait()
    assert rc == 0, srv.proc.stderr.read() if srv.proc.stderr else ""
    assert json.loads(msg) == {"message": "Upload Complete", "preallocationApplied": prealloc}


def volume_files(vol: Path) -> list[str]:
    return sorted(os.listdir(vol))


# ---------------------------------------------------------------------------------------------
# Formats and clients


@pytest.mark.parametrize("kind", ["raw", "gzip", "xz", "zstd", "qcow2", "qcow2-zlib",
                                  "qcow2-zstd"])
def test_upload_writes_the_image_bit_exact_and_sparse(
        kind: str, images: dict[str, Path], start: Callable[..., Server],
        tmp_path: Path) -> None:
    """curl --data-binary of each format: 200, the server exits with CDI's message, disk.img
    is qemu-img's RAW conversion, 0660, sparse (the holes and written zeros not allocated)."""
    srv = start()
    code, body = curl(srv, "/v1beta1/upload", "--data-binary", f"@{images[kind]}")
    assert code == 200, body
    assert_complete(srv)
    disk = srv.volume / "disk.img"
    assert volume_files(srv.volume) == ["disk.img"]
    assert sha256(disk) == oracle(images[kind], tmp_path)
    st = os.stat(disk)
    assert st.st_mode & 0o777 == 0o660
    assert st.st_size == 24 * MiB
    assert st.st_blocks * 512 <= 9 * MiB        # 3 MiB + 1 MiB + 12345 bytes of data


def test_chunked_upload_with_python_client_and_image_size(
        images: dict[str, Path], start: Callable[..., Server], tmp_path: Path) -> None:
    """http.client: HEAD on upload-async answers 200 (virtctl's probe); a chunked POST (no
    Content-Length) to it answers 200; disk.img is grown to UPLOAD_IMAGE_SIZE, preallocated."""
    srv = start(None, UPLOAD_IMAGE_SIZE="64Mi", PREALLOCATION="true")
    c = http.client.HTTPSConnection("127.0.0.1", srv.port, context=srv.context())
    c.request("HEAD", "/v1beta1/upload-async")
    r = c.getresponse()
    r.read()
    assert r.status == 200

    def pieces() -> Iterator[bytes]:
        data = images["qcow2-zlib"].read_bytes()
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]
    c.request("POST", "/v1beta1/upload-async", body=pieces(), encode_chunked=True)
    r = c.getresponse()
    assert r.status == 200, r.read()
    assert_complete(srv, prealloc=True)
    disk = srv.volume / "disk.img"
    assert os.path.getsize(disk) == 64 * MiB
    assert sha256(disk, 24 * MiB) == oracle(images["qcow2-zlib"], tmp_path)
    assert os.stat(disk).st_blocks * 512 >= 64 * MiB       # falloc: every block reserved


def test_curl_chunked_and_form_uploads(images: dict[str, Path], start: Callable[..., Server],
                                       tmp_path: Path) -> None:
    """curl -T (chunked, sync) and curl -F file=@ (multipart, async form)."""
    srv = start()
    code, body = curl(srv, "/v1beta1/upload", "-T", str(images["xz"]),
                      "-H", "Transfer-Encoding: chunked", "-X", "POST")
    assert code == 200, body
    assert_complete(srv)
    assert sha256(srv.volume / "disk.img") == oracle(images["xz"], tmp_path)

    vol2 = tmp_path / "data2"
    vol2.mkdir()
    srv = start(vol2)
    code, body = curl(srv, "/v1beta1/upload-form-async", "-F", "note=ignored",
                      "-F", f"file=@{images['qcow2']}")
    assert code == 200, body
    assert_complete(srv)
    assert sha256(vol2 / "disk.img") == oracle(images["qcow2"], tmp_path)


@pytest.mark.blockdev
@pytest.mark.parametrize("sector", [512, 4096])
def test_upload_onto_a_loop_device(sector: int, images: dict[str, Path],
                                   start: Callable[..., Server], loopdev: Callable[..., str],
                                   tmp_path: Path) -> None:
    """A QCOW2 upload onto a Block volume (512 B and 4 KiB sectors): the image's bytes at the
    start, the device's tail untouched; then the form route with a zstd RAW."""
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(31 * MiB)
        f.write(b"\xa5" * MiB)
    dev = loopdev(backing, sector)
    srv = start(dev)
    code, body = curl(srv, "/v1beta1/upload", "--data-binary", f"@{images['qcow2-zstd']}")
    assert code == 200, body
    assert_complete(srv)
    assert sha256(dev, 24 * MiB) == oracle(images["qcow2-zstd"], tmp_path)
    with open(dev, "rb") as f:
        f.seek(31 * MiB)
        assert f.read(MiB) == b"\xa5" * MiB


# ---------------------------------------------------------------------------------------------
# Who may upload, and when


def test_client_certificates(images: dict[str, Path], start: Callable[..., Server]) -> None:
    """No certificate, or a CN other than CLIENT_NAME: 401; a certificate of another CA fails
    the handshake; the server keeps running and a right client then succeeds.  /healthz and
    /metrics need no certificate; GET on an upload path is 405, an unknown path 404."""
    srv = start()
    data = f"@{images['raw']}"
    assert curl(srv, "/v1beta1/upload", "--data-binary", data, cert=None)[0] == 401
    assert curl(srv, "/v1beta1/upload", "--data-binary", data, cert="wrong-cn")[0] == 401
    assert curl(srv, "/v1beta1/upload", "--data-binary", data, cert="wrong-ca-client")[0] == 0
    assert curl(srv, "/v1beta1/upload", cert=None)[0] == 405
    assert curl(srv, "/nothing", cert=None)[0] == 404
    code, text = curl(srv, "/metrics", cert=None)
    assert code == 200 and f'cdimover_upload_progress{{ownerUID="{UID}"}} 0.0' in text
    assert srv.running() and not (srv.volume / "disk.img").exists()
    assert curl(srv, "/v1beta1/upload", "--data-binary", data)[0] == 200
    assert_complete(srv)


def test_concurrent_upload_is_503_and_after_success_409(
        images: dict[str, Path], start: Callable[..., Server], tmp_path: Path) -> None:
    """While one body is being received a second upload is answered 503; once it completed,
    409 (during --linger), then the server exits."""
    srv = start(None, "--linger", "3")
    data = images["raw"].read_bytes()
    first = raw_request(srv, f"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {len(data)}", data[:MiB])
    time.sleep(0.5)
    assert curl(srv, "/v1beta1/upload", "--data-binary", f"@{images['raw']}")[0] == 503
    first.sendall(data[MiB:])
    assert read_status(first)[0] == 200
    first.close()
    code, body = curl(srv, "/v1beta1/upload-async", "--data-binary", f"@{images['raw']}")
    assert code == 409, body
    assert_complete(srv)
    assert sha256(srv.volume / "disk.img") == oracle(images["raw"], tmp_path)


def test_deadline_passed(start: Callable[..., Server]) -> None:
    # far enough ahead for a slow start (the sanitizer run) to reach /healthz first
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=10)
    srv = start(None, DEADLINE=when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    rc, msg = srv.wait()
    assert rc == 0
    assert json.loads(msg) == {"message": "Deadline Passed", "deadlinePassed": True}
    assert not (srv.volume / "disk.img").exists()


# ---------------------------------------------------------------------------------------------
# Bad bodies


def test_truncated_body_leaves_nothing_and_a_retry_succeeds(
        images: dict[str, Path], start: Callable[..., Server], tmp_path: Path) -> None:
    """A client that closes halfway: no disk.img (nor a partial file), the server still runs,
    and the same upload sent again succeeds."""
    srv = start()
    data = images["qcow2"].read_bytes()
    tls = raw_request(srv, f"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Length: {len(data)}", data[:len(data) // 2])
    time.sleep(0.3)
    tls.close()
    time.sleep(0.5)
    assert srv.running()
    assert volume_files(srv.volume) == []
    code, body = curl(srv, "/v1beta1/upload", "--data-binary", f"@{images['qcow2']}")
    assert code == 200, body
    assert_complete(srv)
    assert sha256(srv.volume / "disk.img") == oracle(images["qcow2"], tmp_path)


def test_stalled_upload_hits_the_idle_timeout(images: dict[str, Path],
                                              start: Callable[..., Server]) -> None:
    srv = start(None, "--idle-timeout", "1", "--header-timeout", "2")
    t = time.monotonic()
    tls = raw_request(srv, "POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: 10000000", images["raw"].read_bytes()[:2 * MiB])
    status, body = read_status(tls)
    assert status == 408, body
    assert time.monotonic() - t < 8
    assert srv.running() and volume_files(srv.volume) == []
    # a connection that never sends its request head is closed too
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    t = time.monotonic()
    sock.settimeout(20)
    assert sock.recv(1) == b""
    assert 1.5 < time.monotonic() - t < 8


def test_too_large_images_are_refused_before_writing(
        start: Callable[..., Server], tmp_path: Path) -> None:
    """A RAW body whose Content-Length exceeds the usable space, and a QCOW2 whose virtual
    size (100 GiB) does: 400 with CDI's text, before a byte is written."""
    srv = start()
    st = os.statvfs(srv.volume)
    too_big = 2 * st.f_bavail * st.f_frsize + 1
    tls = raw_request(srv, f"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Length: {too_big}", b"\x01" * 65536)
    status, body = read_status(tls)
    assert status == 400
    assert b"effective image size is larger than the reported available storage" in body
    big = tmp_path / "big.qcow2"
    _qemu_img("create", "-f", "qcow2", str(big), "100T" if too_big > 100 << 30 else "100G")
    code, text = curl(srv, "/v1beta1/upload", "--data-binary", f"@{big}")
    assert code == 400
    assert "effective image size is larger than the reported available storage" in text
    assert srv.running() and volume_files(srv.volume) == []


@pytest.mark.blockdev
def test_decompression_bomb_onto_a_small_volume(start: Callable[..., Server],
                                                loopdev: Callable[..., str],
                                                tmp_path: Path) -> None:
    """A gzip of 256 MiB of zeros onto a 16 MiB Block volume: 400 with CDI's text, nothing
    written past the device; a VMDK body: 500 naming the format; the server keeps running."""
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    dev = loopdev(backing)
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as g:
        for _ in range(256):
            g.write(bytes(MiB))
    srv = start(dev)
    before = set(os.listdir(tmp_path))
    code, text = curl(srv, "/v1beta1/upload", "--data-binary", f"@{bomb}")
    assert code == 400, text
    assert "effective image size is larger than the reported available storage" in text
    vmdk = tmp_path / "disk.vmdk"
    _qemu_img("create", "-f", "vmdk", str(vmdk), "1M")
    code, text = curl(srv, "/v1beta1/upload", "--data-binary", f"@{vmdk}")
    assert code == 500 and "VMDK" in text.upper(), text
    assert srv.running()
    assert set(os.listdir(tmp_path)) - before <= {"disk.vmdk"}
    assert os.path.getsize(backing) == 16 * MiB


# ---------------------------------------------------------------------------------------------
# The reorder bound: scratch


def _late_tables_image(tmp_path: Path) -> Path:
    """A QCOW2 whose data comes before its L1 table (qemu-img resize moves a grown L1 to the
    end of the file): 6 MiB of data then the table."""
    raw = tmp_path / "late.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(6 * MiB))
    img = tmp_path / "late.qcow2"
    _qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=65536", str(raw), str(img))
    _qemu_img("resize", str(img), "1G")
    return img


def test_a_qcow2_past_the_reorder_bound(start: Callable[..., Server], tmp_path: Path) -> None:
    """Without a scratch directory: 500, and the server exits with scratchSpaceRequired; with
    one: converted from the copy of the body, bit-exact."""
    img = _late_tables_image(tmp_path)
    raw = tmp_path / "late.raw"
    srv = start(None, "--mem-limit", "1Mi")
    code, text = curl(srv, "/v1beta1/upload", "--data-binary", f"@{img}")
    if code == 200:
        pytest.skip("this qemu-img left the L1 table in front of the data")
    assert code == 500 and "scratch space required" in text, text
    rc, msg = srv.wait()
    assert rc == 0
    done = json.loads(msg)
    assert done["scratchSpaceRequired"] is True and "memory limit" in done["message"]
    assert volume_files(srv.volume) == []

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vol = tmp_path / "data-scratch"
    vol.mkdir()
    srv = start(vol, "--mem-limit", "1Mi", SCRATCH_DIR=str(scratch))
    code, text = curl(srv, "/v1beta1/upload", "--data-binary", f"@{img}")
    assert code == 200, text
    assert_complete(srv)
    assert sha256(vol / "disk.img", 6 * MiB) == sha256(raw)
    assert os.listdir(scratch) == []
