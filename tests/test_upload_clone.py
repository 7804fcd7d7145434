"""The target end of CDI's host-assisted clones and archive uploads, and ``cdimover upload``.

The clone sources are built from independent parts, as CDI's cloner builds them: the raw
bytes of a loop device, or GNU ``tar -S`` run in a volume directory (CDI's ``tar cv -S``), put
in the snappy framing format by cramjam's encoder and POSTed by ``curl --data-binary @-`` with
``x-cdi-content-type``, over mTLS, into ``pod upload-server`` (the fixtures of
test_upload_server).  Oracle: the source's bytes (sha256) and allocation."""

from __future__ import annotations

import http.server
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cramjam
import pytest

from cdimover import _native
from cdimover.formats.snappyframe import FrameDecoder, FramingError, frame_crc
from conftest import TOOL_ENV, need_tool
from netfix import RawHttp, Response, free_port, rawhttp  # noqa: F401  (fixture)
from test_upload_server import (CLIENT, MiB, Server, certs, curl, sha256,  # noqa: F401
                                start, volume_files)

SIZE = 32 * MiB
DATA = ((1 * MiB, 3 * MiB), (9 * MiB, 2 * MiB), (SIZE - 64 * 1024, 60 * 1024))


def write_disk(path: Path, magic: bytes = b"QFI\xfb") -> None:
    """A 32 MiB disk: MAGIC at byte 0 (QCOW2's: a clone must copy it, not convert it), random
    data, written zeros, holes; 5 MiB + 60 KiB + 4 KiB of data."""
    rnd = random.Random(7)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(magic + rnd.randbytes(4096 - len(magic)))
        for off, n in DATA:
            f.seek(off)
            f.write(rnd.randbytes(n))
        f.seek(20 * MiB)
        f.write(bytes(MiB))


def framed(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress(data))


def post(srv: Server, body: bytes, content_type: str | None,
         path: str = "/v1beta1/upload") -> tuple[int, str]:
    """curl --data-binary @- of BODY with the clone header; (status, text)."""
    exe = need_tool("curl")
    hdr = ["-H", f"x-cdi-content-type: {content_type}"] if content_type else []
    p = subprocess.run([exe, "-sS", "--cacert", str(srv.certs / "ca.pem"),
                        "--cert", str(srv.certs / "client.pem"),
                        "--key", str(srv.certs / "client.key"), "-o", "-", "-w",
                        "\n%{http_code}", *hdr, "--data-binary", "@-", srv.url + path],
                       input=body, capture_output=True, env=TOOL_ENV, timeout=60)
    text, _, code = p.stdout.decode().rpartition("\n")
    return int(code or 0), text


def assert_done(srv: Server, message: str = "Clone Complete") -> None:
    rc, msg = srv.wait()
    assert rc == 0, srv.proc.stderr.read() if srv.proc.stderr else ""
    assert json.loads(msg)["message"] == message


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------------------------
# The framing decoder


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time: an oracle independent of the core's tables and SSE4.2."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_crc32c_matches_a_bitwise_implementation() -> None:
    rnd = random.Random(3)
    assert _native.crc32c(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 8, 9, 63, 64, 1000, 4099):
        data = rnd.randbytes(n)
        assert _native.crc32c(data) == crc32c_bitwise(data)
        # continued over a split anywhere
        k = n // 3
        assert _native.crc32c(data[k:], _native.crc32c(data[:k])) == crc32c_bitwise(data)


def decode(stream: bytes, step: int) -> bytes:
    d = FrameDecoder(batch=100_000)
    out = b"".join(x for i in range(0, len(stream), step) for x in d.feed(stream[i:i + step]))
    d.finish()
    return out


def test_decoder_reads_cramjam_frames_in_any_pieces() -> None:
    rnd = random.Random(5)
    data = rnd.randbytes(200_000) + bytes(500_000) + b"abc" * 70_000
    enc = framed(data)
    for step in (1, 3, 4, 5, 4096, 65_539, len(enc)):
        assert decode(enc[:300_000] if step == 1 else enc, step)[:10] == data[:10]
    assert decode(enc, 777) == data


def test_decoder_uncompressed_padding_and_skippable_chunks() -> None:
    """Chunks of every kind the format allows, built by hand from the specification."""
    def chunk(kind: int, body: bytes) -> bytes:
        return struct.pack("<I", kind | len(body) << 8) + body
    a, b = b"uncompressed chunk", bytes(1000)
    stream = (chunk(0xFF, b"sNaPpY") + chunk(0x01, struct.pack("<I", frame_crc(a)) + a)
              + chunk(0xFE, bytes(70_000)) + chunk(0x80, b"skip me")
              + chunk(0x00, struct.pack("<I", frame_crc(b))
                      + bytes(cramjam.snappy.compress_raw(b)))
              + chunk(0xFF, b"sNaPpY"))
    assert decode(stream, 13) == a + b
    with pytest.raises(FramingError, match="unskippable"):
        decode(stream + chunk(0x02, b"x"), 100)


def test_decoder_refuses_corruption_and_truncation() -> None:
    enc = bytearray(framed(random.Random(1).randbytes(300_000)))
    second = 10 + 4 + (struct.unpack_from("<I", enc, 10)[0] >> 8)   # the second data chunk
    bad = bytearray(enc)
    bad[second + 4] ^= 0x01                                         # a CRC bit
    with pytest.raises(FramingError, match="CRC-32C mismatch"):
        decode(bytes(bad), 65536)
    with pytest.raises(FramingError, match="truncated"):
        decode(bytes(enc[:-100]), 65536)
    with pytest.raises(FramingError, match="stream identifier"):
        decode(bytes(enc[10:]), 65536)
    with pytest.raises(FramingError, match="empty stream"):
        decode(b"", 1)


# ---------------------------------------------------------------------------------------------
# Clones: the four volume-mode pairs


def fs_source(d: Path) -> Path:
    """A Filesystem source volume as CDI's cloner sees it: disk.img, a note, lost+found."""
    d.mkdir()
    write_disk(d / "disk.img")
    (d / "lost+found").mkdir()
    (d / "notes").mkdir()
    (d / "notes" / "readme.txt").write_text("cloned along\n")
    return d


def tar_of(volume: Path) -> bytes:
    """GNU tar as CDI's cloner runs it: ``tar cv -S <entries but lost+found>`` in the volume."""
    names = sorted(n for n in os.listdir(volume) if n != "lost+found")
    return subprocess.run([need_tool("tar"), "cv", "-S", *names], cwd=volume, check=True,
                          capture_output=True, env=TOOL_ENV).stdout


def block_source(tmp: Path, loopdev: Callable[..., str], sector: int) -> tuple[str, bytes]:
    backing = tmp / "source-backing"
    write_disk(backing)
    dev = loopdev(backing, sector)
    with open(dev, "rb") as f:
        return dev, f.read()


PAIRS = [("block", "block", 512), ("block", "block", 4096), ("block", "filesystem", 512),
         ("block", "filesystem", 4096), ("filesystem", "filesystem", 0),
         ("filesystem", "block", 512), ("filesystem", "block", 4096)]


@pytest.mark.parametrize("src_mode,dst_mode,sector", PAIRS,
                         ids=[f"{a}-{b}-{s}" for a, b, s in PAIRS])
def test_clone_pairs(src_mode: str, dst_mode: str, sector: int, start: Callable[..., Server],
                     loopdev: Callable[..., str], tmp_path: Path) -> None:
    """Each pair of volume modes: 200, "Clone Complete", the guest disk bit-exact (QCOW2 magic
    at byte 0 included), the target as sparse as the source, nothing else on a Block
    target."""
    src_disk = tmp_path / "reference.img"
    write_disk(src_disk)
    want = sha256(src_disk)
    if src_mode == "block":
        _, raw = block_source(tmp_path, loopdev, sector)
        body, ctype = framed(raw), "blockdevice-clone"
    else:
        body, ctype = framed(tar_of(fs_source(tmp_path / "source"))), "filesystem-clone"
    if dst_mode == "block":
        backing = tmp_path / "target-backing"
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        srv = start(loopdev(backing, sector))
    else:
        srv = start()
    code, text = post(srv, body, ctype)
    assert code == 200, text
    assert_done(srv)
    data_bytes = sum(n for _, n in DATA) + 4096
    if dst_mode == "block":
        assert sha256(srv.volume, SIZE) == want
        assert allocated(backing) <= data_bytes + 2 * MiB
    else:
        disk = srv.volume / "disk.img"
        assert sha256(disk) == want
        assert os.path.getsize(disk) == SIZE
        assert allocated(disk) <= data_bytes + 2 * MiB
        expect = ["disk.img", "notes"] if src_mode == "filesystem" else ["disk.img"]
        assert volume_files(srv.volume) == expect
        if src_mode == "filesystem":
            assert (srv.volume / "notes" / "readme.txt").read_text() == "cloned along\n"


def test_clone_of_sparse_gnu_formats(start: Callable[..., Server], tmp_path: Path) -> None:
    """disk.img in a PAX 1.0 sparse archive (``--sparse-version=1.0``) onto a file target."""
    src = fs_source(tmp_path / "source")
    tar = subprocess.run([need_tool("tar"), "c", "-S", "--format=posix",
                          "--sparse-version=1.0", "disk.img"], cwd=src, check=True,
                         capture_output=True, env=TOOL_ENV).stdout
    assert len(tar) < 8 * MiB
    srv = start()
    code, text = post(srv, framed(tar), "filesystem-clone")
    assert code == 200, text
    assert_done(srv)
    assert sha256(srv.volume / "disk.img") == sha256(src / "disk.img")


# ---------------------------------------------------------------------------------------------
# Refusals


def test_corrupt_or_truncated_clone_is_never_complete(start: Callable[..., Server],
                                                      tmp_path: Path) -> None:
    """A CRC mismatch, then a truncated stream: 500 naming the fault, no disk.img left, the
    server still running; then the intact stream succeeds."""
    src = tmp_path / "src.img"
    write_disk(src)
    enc = bytearray(framed(src.read_bytes()))
    srv = start()
    bad = bytearray(enc)
    bad[10 + 8 + 100] ^= 0x10       # inside the first chunk's literal (random) bytes
    code, text = post(srv, bytes(bad), "blockdevice-clone")
    assert code == 500 and ("CRC-32C mismatch" in text or "does not decode" in text), text
    assert volume_files(srv.volume) == [] and srv.running()
    code, text = post(srv, bytes(enc[:len(enc) // 3]), "blockdevice-clone")
    assert code == 500 and "truncated" in text, text
    assert volume_files(srv.volume) == [] and srv.running()
    code, text = post(srv, bytes(enc), "blockdevice-clone", path="/v1beta1/upload-async")
    assert code == 500 and "async clone not supported" in text
    code, text = post(srv, bytes(enc), "blockdevice-clone")
    assert code == 200, text
    assert_done(srv)
    assert sha256(srv.volume / "disk.img") == sha256(src)


def evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"ok\n"))
        m = tarfile.TarInfo({"dotdot": "../escaped", "absolute": "/tmp/escaped-abs",
                             "device": "sda"}[kind])
        if kind == "device":
            m.type, m.devmajor, m.devminor = tarfile.BLKTYPE, 8, 0
            tf.addfile(m)
        else:
            m.size = 4
            tf.addfile(m, io.BytesIO(b"bad\n"))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "device"])
@pytest.mark.parametrize("route", ["filesystem-clone", "archive"])
def test_unsafe_tar_is_refused(kind: str, route: str, start: Callable[..., Server],
                               tmp_path: Path) -> None:
    """``..``, an absolute name, a device node: 500 "unsafe archive member", nothing written
    outside the volume, the members before it removed again."""
    vol = tmp_path / "inner" / "data"
    vol.mkdir(parents=True)
    srv = start(vol)
    tar = evil_tar(kind)
    if route == "archive":
        code, text = post(srv, tar, None, path="/v1beta1/upload-archive")
    else:
        code, text = post(srv, framed(tar), "filesystem-clone")
    assert code == 500 and "unsafe archive member" in text, text
    assert volume_files(vol) == [] and srv.running()
    assert sorted(os.listdir(vol.parent)) == ["data"]
    assert not os.path.exists("/tmp/escaped-abs")


def test_archive_upload(start: Callable[..., Server], loopdev: Callable[..., str],
                        tmp_path: Path) -> None:
    """/v1beta1/upload-archive: a gzip tar extracted into the volume ("Upload Complete"); on a
    Block volume 400."""
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(b"x" * 10_000)
    os.symlink("b/file", src / "a" / "link")
    tgz = tmp_path / "tree.tgz"
    subprocess.run([need_tool("tar"), "czf", str(tgz), "-C", str(src), "a"], check=True)
    srv = start()
    code, text = post(srv, tgz.read_bytes(), None, path="/v1beta1/upload-archive")
    assert code == 200, text
    assert_done(srv, "Upload Complete")
    assert (srv.volume / "a" / "b" / "file").read_bytes() == b"x" * 10_000
    assert os.readlink(srv.volume / "a" / "link") == "b/file"

    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    srv = start(loopdev(backing))
    code, text = post(srv, tgz.read_bytes(), None, path="/v1beta1/upload-archive")
    assert code == 400 and "needs a Filesystem volume" in text, text


# ---------------------------------------------------------------------------------------------
# cdimover upload


def client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdimover", "upload", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("use_async", [False, True])
def test_client_with_a_client_certificate(use_async: bool, start: Callable[..., Server],
                                          tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    write_disk(img, b"")
    srv = start()
    c = srv.certs
    r = client(str(img), srv.url, "--ca", str(c / "ca.pem"), "--cert", str(c / "client.pem"),
               "--key", str(c / "client.key"), "--json", "--progress",
               *(["--async"] if use_async else []))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["async"] is use_async and out["status"] == 200 and out["bytes"] == SIZE
    assert out["url"].endswith("/v1beta1/upload-async" if use_async else "/v1beta1/upload")
    assert "upload [" in r.stderr             # the progress bar
    rc, msg = srv.wait()
    assert rc == 0 and json.loads(msg)["message"] == "Upload Complete"
    assert sha256(srv.volume / "disk.img") == sha256(img)


def test_client_without_the_certificate_is_refused(start: Callable[..., Server],
                                                   tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(b"x" * 4096)
    srv = start()
    r = client(str(img), srv.url, "--ca", str(srv.certs / "ca.pem"))
    assert r.returncode == 1 and "401" in r.stderr


def test_client_retries_503_and_refused_connections(rawhttp: Callable[..., RawHttp],
                                                    tmp_path: Path) -> None:
    """Two 503s, then 200: three POSTs of the whole file, the token sent each time, and the
    client says it starts again from byte 0.  A port where nothing listens yet: refused,
    retried until a server appears."""
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(300_000))
    answers = iter([503, 503, 200])
    srv = rawhttp(lambda req: Response(status=next(answers), body=b""))
    r = client(str(img), srv.url("/v1beta1/upload"), "--token", "jwt-1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["attempts"] == 3
    assert r.stderr.count("from byte 0") == 2
    posts = [q for q in srv.requests if q.method == "POST"]
    assert len(posts) == 3
    assert all(q.headers["authorization"] == "Bearer jwt-1" for q in posts)
    assert all(q.headers["content-length"] == "300000" for q in posts)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cdimover", "upload", str(img),
                             f"http://127.0.0.1:{port}", "--retry", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        done = threading.Event()

        def receive() -> None:
            class H(http.server.BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    n = int(self.headers["Content-Length"])
                    while n:
                        n -= len(self.rfile.read(min(n, 65536)))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    done.set()

                def log_message(self, *a: object) -> None:
                    pass
            with http.server.HTTPServer(("127.0.0.1", port), H) as s:
                s.timeout = 0.2
                while not done.is_set():
                    s.handle_request()
        t = threading.Thread(target=receive, daemon=True)
        t.start()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "attempt 1 failed" in err and "from byte 0" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
