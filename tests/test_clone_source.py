"""``pod clone-source`` end to end: the source pod program and ``pod upload-server`` as two
processes, mTLS with certificates made here, the env as CDI sets it.

- cdimover ⇄ cdimover: the clone stream, all four volume-mode pairs on loop devices (512 and
  4Kn) and directories, preallocation on and off; sha256 and allocation against the source;
  the disk digest in the target's termination message checked against an implementation of
  its definition written here.
- cdimover's source ⇄ a CDI-style receiver written here (snappy decode with cramjam, then
  a raw write or ``tarfile`` extraction): the source sees 404 for the clone stream and falls
  back to CDI's wire format, which the receiver takes unchanged.
- Faults: a proxy that cuts the upload mid-stream (the stream resumes, re-sending at most a
  checkpoint; CDI's format restarts from 0), a target that starts late (the source waits),
  a wrong client certificate, a target too small.
- Two network namespaces joined by a veth pair: the same clone across them.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cramjam
import pytest

from conftest import need_root, need_tool
from netfix import NETNS_SERVER_IP, NetnsPair, free_port, netns_pair, stop_popen  # noqa: F401
from test_upload_server import CLIENT, ENV_VARS, UID, Server, certs, sha256, start  # noqa: F401

MiB = 1 << 20
SIZE = 40 * MiB
EXTENTS = [(0, 4096), (3 * MiB + 512, 2 * MiB), (10 * MiB, 6 * MiB), (33 * MiB, 3 * MiB),
           (SIZE - 8192, 8192)]
DATA = sum(n for _, n in EXTENTS)


def oracle_digest(path: Path | str, size: int) -> str:
    """The disk digest by its definition (sha256 chain over 1 MiB blocks)."""
    h = hashlib.sha256(b"cdimover-disk-digest-v1" + struct.pack("<Q", size)).digest()
    with open(path, "rb") as f:
        left = size
        while left:
            b = f.read(min(MiB, left))
            left -= len(b)
            h = hashlib.sha256(h + hashlib.sha256(b).digest()).digest()
    return h.hex()


def write_disk(path: Path, size: int = SIZE, seed: int = 11) -> None:
    rnd = random.Random(seed)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)
        for off, n in EXTENTS:
            f.seek(off)
            f.write(rnd.randbytes(n))
        f.seek(20 * MiB)
        f.write(bytes(2 * MiB))       # zeros written as data


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


@dataclass
class SourceRun:
    rc: int
    message: str
    out: dict[str, object]
    stderr: str


def source_env(certs: Path, mount: Path | str, mode: str, url: str, **extra: str
               ) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("CLONE_", "UPLOAD_", "CLIENT_", "SERVER_", "VOLUME_", "MOUNT_"))}
    e.update(VOLUME_MODE=mode, MOUNT_POINT=str(mount), UPLOAD_URL=url, OWNER_UID=UID,
             PREALLOCATION="false",
             CLIENT_CERT=(certs / "client.pem").read_text(),
             CLIENT_KEY=(certs / "client.key").read_text(),
             SERVER_CA_CERT=(certs / "ca.pem").read_text(), CLONE_RETRY_TIMEOUT="20",
             CLONE_CHECKPOINT_BYTES="4Mi")
    e.update(extra)
    return e


def run_source(env: dict[str, str], tmp: Path, *extra: str, prefix: tuple[str, ...] = (),
               timeout: float = 120) -> SourceRun:
    log = tmp / f"source-termination-{random.randrange(1 << 30)}"
    p = subprocess.run([*prefix, sys.executable, "-m", "cdimover", "pod",
                        "clone-source", "--json", "--metrics-address", "none", "--termination-log",
                        str(log), *extra],
                       env=env, capture_output=True, text=True, timeout=timeout)
    out = json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else {}
    return SourceRun(p.returncode, log.read_text() if log.exists() else "", out, p.stderr)


def make_source(mode: str, tmp: Path, loopdev: Callable[..., str], sector: int) -> tuple[str, Path]:
    """(MOUNT_POINT, the file holding the disk's bytes)."""
    if mode == "block":
        backing = tmp / "source-backing"
        write_disk(backing)
        return loopdev(backing, sector), backing
    vol = tmp / "source"
    vol.mkdir()
    (vol / "lost+found").mkdir()
    write_disk(vol / "disk.img")
    return str(vol), vol / "disk.img"


def make_target(mode: str, tmp: Path, loopdev: Callable[..., str], sector: int,
                size: int = SIZE) -> tuple[Path | str, Path]:
    """(DESTINATION, the file holding the target's bytes)."""
    if mode == "block":
        backing = tmp / "target-backing"
        with open(backing, "wb") as f:
            f.truncate(size)
            f.write(b"\xee" * MiB)     # a used device: holes of the source must be zeroed
        return loopdev(backing, sector), backing
    vol = tmp / "target"
    vol.mkdir()
    return vol, vol / "disk.img"


PAIRS = [("block", "block", 512), ("block", "filesystem", 4096), ("filesystem", "block", 4096),
         ("filesystem", "filesystem", 512), ("block", "block", 4096)]


@pytest.mark.parametrize("prealloc", [False, True], ids=["sparse", "prealloc"])
@pytest.mark.parametrize("src_mode,dst_mode,sector", PAIRS,
                         ids=[f"{a}-{b}-{s}" for a, b, s in PAIRS])
def test_clone_stream_pairs(src_mode: str, dst_mode: str, sector: int, prealloc: bool,
                            start: Callable[..., Server], certs: Path,  # noqa: F811
                            loopdev: Callable[..., str], tmp_path: Path) -> None:
    mount, src_bytes = make_source(src_mode, tmp_path, loopdev, sector)
    dest, dst_bytes = make_target(dst_mode, tmp_path, loopdev, sector)
    flag = "true" if prealloc else "false"
    srv = start(dest, PREALLOCATION=flag)
    run = run_source(source_env(certs, mount, src_mode, srv.url + "/v1beta1/upload",
                                PREALLOCATION=flag), tmp_path)
    assert run.rc == 0, run.stderr
    assert run.message == "Clone Complete" + (", Preallocation applied" if prealloc else "")
    rc, msg = srv.wait()
    assert rc == 0
    done = json.loads(msg)
    want = oracle_digest(src_bytes, SIZE)
    assert done == {"message": "Clone Complete", "preallocationApplied": prealloc,
                    "diskDigest": want}
    assert run.out["wire"] == "cdimover" and run.out["diskDigest"] == want
    assert sha256(dst_bytes, SIZE) == sha256(src_bytes, SIZE)
    assert int(run.out["wireBytes"]) <= DATA * 1.02 + 64 * 1024   # type: ignore[call-overload]
    if dst_mode == "filesystem":
        assert os.path.getsize(dst_bytes) == SIZE
        assert sorted(os.listdir(dest)) == ["disk.img"]
    if prealloc:
        assert allocated(dst_bytes) >= SIZE
    else:
        assert allocated(dst_bytes) <= DATA + 2 * MiB


# ---------------------------------------------------------------------------------------------
# CDI's wire format, both ways

class _CdiReceiver(http.server.BaseHTTPRequestHandler):
    """A minimal CDI upload server: 404 for anything but POST /v1beta1/upload, whose
    snappy-framed body is decoded whole and written raw or extracted (tarfile)."""

    target: Path
    bodies: list[tuple[str, int]]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_error(404)

    def do_POST(self) -> None:
        if self.path != "/v1beta1/upload":
            self.send_error(404)
            return
        chunks = []
        while True:
            line = self.rfile.readline()
            n = int(line.strip() or b"0", 16)
            if n == 0:
                self.rfile.readline()
                break
            chunks.append(self.rfile.read(n))
            self.rfile.readline()
        body = b"".join(chunks)
        data = bytes(cramjam.snappy.decompress(body))
        kind = self.headers.get("x-cdi-content-type", "")
        self.bodies.append((kind, len(body)))
        if kind == "blockdevice-clone":
            (self.target / "disk.img").write_bytes(data)
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                tf.extractall(self.target, filter="data")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def cdi_receiver(certs: Path, tmp_path: Path) -> Iterator[tuple[str, Path, list[tuple[str, int]]]]:  # noqa: F811
    target = tmp_path / "cdi-target"
    target.mkdir()
    bodies: list[tuple[str, int]] = []
    handler = type("H", (_CdiReceiver,), {"target": target, "bodies": bodies})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs / "server.pem"), str(certs / "server.key"))
    ctx.load_verify_locations(str(certs / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}/v1beta1/upload", target, bodies
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("src_mode", ["block", "filesystem"])
def test_falls_back_to_cdi_format_for_a_cdi_server(
        src_mode: str, cdi_receiver: tuple[str, Path, list[tuple[str, int]]], certs: Path,  # noqa: F811
        loopdev: Callable[..., str], tmp_path: Path) -> None:
    url, target, bodies = cdi_receiver
    mount, src_bytes = make_source(src_mode, tmp_path, loopdev, 512)
    if src_mode == "filesystem":
        (Path(mount) / "notes.txt").write_text("travels along\n")
    run = run_source(source_env(certs, mount, src_mode, url), tmp_path)
    assert run.rc == 0, run.stderr
    assert run.message == "Clone Complete" and run.out["wire"] == "cdi"
    assert sha256(target / "disk.img") == sha256(src_bytes)
    assert bodies[0][0] == ("blockdevice-clone" if src_mode == "block" else "filesystem-clone")
    if src_mode == "filesystem":
        assert (target / "notes.txt").read_text() == "travels along\n"
        assert not (target / "lost+found").exists()


@pytest.mark.parametrize("src_mode", ["block", "filesystem"])
def test_cdi_format_into_cdimover_server(src_mode: str, start: Callable[..., Server],  # noqa: F811
                                         certs: Path, loopdev: Callable[..., str],  # noqa: F811
                                         tmp_path: Path) -> None:
    """--wire cdi into cdimover's server (the path CDI's own source takes)."""
    mount, src_bytes = make_source(src_mode, tmp_path, loopdev, 512)
    srv = start()
    run = run_source(source_env(certs, mount, src_mode, srv.url + "/v1beta1/upload"),
                     tmp_path, "--wire", "cdi")
    assert run.rc == 0, run.stderr
    assert run.out["wire"] == "cdi"
    rc, msg = srv.wait()
    assert rc == 0 and json.loads(msg)["message"] == "Clone Complete"
    assert sha256(srv.volume / "disk.img") == sha256(src_bytes)
    assert allocated(srv.volume / "disk.img") <= DATA + 2 * MiB


# ---------------------------------------------------------------------------------------------
# Faults

class CutProxy:
    """127.0.0.1:port → TARGET; connection i whose client→server bytes pass CUTS[i] is cut
    (both ways closed; or with HOLE, nothing more is forwarded and nothing closed: a link
    that went dark); later connections pass everything."""

    def __init__(self, target: tuple[str, int], cuts: list[int], hole: bool = False) -> None:
        self.target = target
        self.cuts = cuts
        self.hole = hole
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.upstream_bytes: list[int] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            i = len(self.upstream_bytes)
            self.upstream_bytes.append(0)
            threading.Thread(target=self._serve, args=(i, c), daemon=True).start()

    def _serve(self, i: int, c: socket.socket) -> None:
        limit = self.cuts[i] if i < len(self.cuts) else 1 << 62
        try:
            u = socket.create_connection(self.target)
        except OSError:
            c.close()
            return

        def back() -> None:
            try:
                while d := u.recv(65536):
                    c.sendall(d)
            except OSError:
                pass
            finally:
                try:
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        threading.Thread(target=back, daemon=True).start()
        try:
            while d := c.recv(65536):
                if self.upstream_bytes[i] + len(d) > limit:
                    if self.hole:
                        self._stop.wait()
                    for s in (c, u):      # wakes the other thread's recv; FIN both ways
                        s.shutdown(socket.SHUT_RDWR)
                    break
                u.sendall(d)
                self.upstream_bytes[i] += len(d)
        except OSError:
            pass
        finally:
            c.close()
            u.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def cutproxy() -> Iterator[Callable[..., CutProxy]]:
    made: list[CutProxy] = []

    def make(target: tuple[str, int], cuts: list[int], hole: bool = False) -> CutProxy:
        made.append(CutProxy(target, cuts, hole))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_stream_resumes_after_cuts(start: Callable[..., Server], certs: Path,  # noqa: F811
                                   cutproxy: Callable[..., CutProxy], tmp_path: Path) -> None:
    """The upload is cut at half its data and again later: the stream resumes at the target's last
    checkpoint each time; what is sent twice is at most a checkpoint (+ a window in flight)."""
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    srv = start()
    # connection 0 is the GET of the negotiation, 1 the GET of the resume point
    proxy = cutproxy(("127.0.0.1", srv.port), [1 << 40, 1 << 40, int(DATA * 0.5),
                                               1 << 40, int(DATA * 0.4)])
    run = run_source(source_env(certs, vol, "filesystem",
                                f"https://127.0.0.1:{proxy.port}/v1beta1/upload",
                                CLONE_CHECKPOINT_BYTES="2Mi"), tmp_path)
    if run.rc:
        srv.proc.terminate()
        raise AssertionError(run.stderr + srv.proc.communicate()[1])
    assert run.out["resumes"] == 2, (run.out, run.stderr, proxy.upstream_bytes)
    rc, msg = srv.wait()
    assert rc == 0 and json.loads(msg)["diskDigest"] == oracle_digest(vol / "disk.img", SIZE)
    assert sha256(srv.volume / "disk.img") == sha256(vol / "disk.img")
    # What reached the target (TLS included): 2 MiB checkpoints, 4 MiB windows, so each cut
    # re-sends at most 6 MiB of what had arrived.
    assert sum(proxy.upstream_bytes) <= DATA * 1.02 + 2 * 6 * MiB, proxy.upstream_bytes


def test_stream_resumes_after_the_link_went_dark(
        start: Callable[..., Server], certs: Path,  # noqa: F811
        cutproxy: Callable[..., CutProxy], tmp_path: Path) -> None:
    """No reset, no FIN: the source gives the connection up after CLONE_IO_TIMEOUT, and the
    target, still waiting on the dead request (its idle timeout is a minute), drops it when
    the same source connects again, so the stream resumes at once."""
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    srv = start()
    proxy = cutproxy(("127.0.0.1", srv.port), [1 << 40, 1 << 40, int(DATA * 0.6)], hole=True)
    began = time.monotonic()
    run = run_source(source_env(certs, vol, "filesystem",
                                f"https://127.0.0.1:{proxy.port}/v1beta1/upload",
                                CLONE_CHECKPOINT_BYTES="2Mi", CLONE_IO_TIMEOUT="3"), tmp_path)
    assert run.rc == 0, run.stderr
    assert run.out["resumes"] == 1
    assert time.monotonic() - began < 50          # far from the server's 60 s idle timeout
    rc, msg = srv.wait()
    assert rc == 0 and json.loads(msg)["diskDigest"] == oracle_digest(vol / "disk.img", SIZE)
    assert sha256(srv.volume / "disk.img") == sha256(vol / "disk.img")


def test_cdi_format_restarts_after_a_cut(start: Callable[..., Server], certs: Path,  # noqa: F811
                                         cutproxy: Callable[..., CutProxy],
                                         tmp_path: Path) -> None:
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    srv = start()
    proxy = cutproxy(("127.0.0.1", srv.port), [1 << 20])
    run = run_source(source_env(certs, vol, "filesystem",
                                f"https://127.0.0.1:{proxy.port}/v1beta1/upload"),
                     tmp_path, "--wire", "cdi")
    assert run.rc == 0, run.stderr
    assert int(run.out["attempts"]) >= 2              # type: ignore[call-overload]
    rc, _ = srv.wait()
    assert rc == 0
    assert sha256(srv.volume / "disk.img") == sha256(vol / "disk.img")


def test_source_waits_for_a_late_target(start: Callable[..., Server], certs: Path,  # noqa: F811
                                        tmp_path: Path) -> None:
    """Connection refused for a few seconds (the upload pod not ready): no crash loop."""
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    port = free_port()
    env = source_env(certs, vol, "filesystem", f"https://127.0.0.1:{port}/v1beta1/upload")
    log = tmp_path / "late-log"
    p = subprocess.Popen([sys.executable, "-m", "cdimover", "pod", "clone-source",
                          "--metrics-address", "none", "--termination-log", str(log)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert p.poll() is None
        srv = start(port=port)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "trying again" in err
        assert log.read_text() == "Clone Complete"
        rc, _ = srv.wait()
        assert rc == 0
        assert sha256(srv.volume / "disk.img") == sha256(vol / "disk.img")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_wrong_client_certificate_and_small_target(start: Callable[..., Server],  # noqa: F811
                                                   certs: Path, loopdev: Callable[..., str],
                                                   tmp_path: Path) -> None:
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    srv = start()
    env = source_env(certs, vol, "filesystem", srv.url + "/v1beta1/upload",
                     CLIENT_CERT=(certs / "wrong-cn.pem").read_text(),
                     CLIENT_KEY=(certs / "wrong-cn.key").read_text())
    run = run_source(env, tmp_path)
    assert run.rc != 0
    assert run.message.startswith("Unable to process data: ") and "401" in run.message
    assert srv.running()
    # a target smaller than the source: refused before a byte is written, clearly, both ends
    backing = tmp_path / "small"
    with open(backing, "wb") as f:
        f.truncate(SIZE // 2)
    small = start(loopdev(backing, 512))
    run = run_source(source_env(certs, vol, "filesystem", small.url + "/v1beta1/upload"),
                     tmp_path)
    assert run.rc != 0
    assert "larger than the reported available storage" in run.message
    assert small.running()
    assert allocated(backing) == 0


# ---------------------------------------------------------------------------------------------
# Two nodes: network namespaces

def _server_in(pair: NetnsPair, certs: Path, dest: Path | str, tmp: Path,  # noqa: F811
               procs: list[subprocess.Popen[str]]) -> tuple[subprocess.Popen[str], Path]:
    log = tmp / "server-termination"
    e = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    e.update(TLS_CERT_FILE=str(certs / "server.pem"), TLS_KEY_FILE=str(certs / "server.key"),
             CLIENT_CERT_FILE=str(certs / "ca.pem"), CLIENT_NAME=CLIENT, OWNER_UID=UID,
             DESTINATION=str(dest), PREALLOCATION="false")
    p = subprocess.Popen([*pair.exec(pair.server), sys.executable, "-m", "cdimover", "pod",
                          "upload-server", "--listen", f"{NETNS_SERVER_IP}:8443",
                          "--termination-log", str(log)],
                         env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p, log


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started, ended by PID at teardown."""
    started: list[subprocess.Popen[str]] = []
    yield started
    stop_popen(started)


@pytest.mark.parametrize("dst_mode", ["filesystem", "block"])
def test_clone_across_network_namespaces(dst_mode: str, netns_pair: NetnsPair, certs: Path,  # noqa: F811
                                         loopdev: Callable[..., str], tmp_path: Path,
                                         procs: list[subprocess.Popen[str]]) -> None:
    """Block → Filesystem and Block → Block between two namespaces; the bytes on the
    source's end of the veth pair stay within 2 % + 256 KiB of the data (TLS, HTTP and the
    handshakes included)."""
    mount, src_bytes = make_source("block", tmp_path, loopdev, 4096)
    dest, dst_bytes = make_target(dst_mode, tmp_path, loopdev, 4096)
    server, log = _server_in(netns_pair, certs, dest, tmp_path, procs)
    before = netns_pair.tx_bytes(netns_pair.client, netns_pair.client_dev)
    run = run_source(source_env(certs, mount, "block",
                                f"https://{NETNS_SERVER_IP}:8443/v1beta1/upload"),
                     tmp_path, prefix=tuple(netns_pair.exec(netns_pair.client)))
    assert run.rc == 0, run.stderr
    sent = netns_pair.tx_bytes(netns_pair.client, netns_pair.client_dev) - before
    assert server.wait(30) == 0
    assert json.loads(log.read_text())["diskDigest"] == oracle_digest(src_bytes, SIZE)
    assert sha256(dst_bytes, SIZE) == sha256(src_bytes, SIZE)
    assert sent <= DATA * 1.02 + 256 * 1024, sent


def test_empty_100g_device_across_namespaces(netns_pair: NetnsPair, certs: Path,  # noqa: F811
                                             loopdev: Callable[..., str], tmp_path: Path,
                                             procs: list[subprocess.Popen[str]]) -> None:
    """An empty 100 GiB Block source: under 1 MiB crosses the link (CDI's format would send
    about 4.7 GiB of framed zeros after reading 100 GiB)."""
    size = 100 << 30
    backing = []
    for name in ("empty-src", "empty-dst"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
        backing.append(loopdev(tmp_path / name, 4096))
    server, log = _server_in(netns_pair, certs, backing[1], tmp_path, procs)
    before = netns_pair.tx_bytes(netns_pair.client, netns_pair.client_dev)
    run = run_source(source_env(certs, backing[0], "block",
                                f"https://{NETNS_SERVER_IP}:8443/v1beta1/upload"),
                     tmp_path, prefix=tuple(netns_pair.exec(netns_pair.client)))
    assert run.rc == 0, run.stderr
    sent = netns_pair.tx_bytes(netns_pair.client, netns_pair.client_dev) - before
    assert server.wait(60) == 0
    zeros = hashlib.sha256(b"cdimover-disk-digest-v1" + struct.pack("<Q", size)).digest()
    zb = hashlib.sha256(bytes(MiB)).digest()
    for _ in range(size // MiB):
        zeros = hashlib.sha256(zeros + zb).digest()
    assert json.loads(log.read_text())["diskDigest"] == zeros.hex()
    assert sent < MiB, sent
    assert allocated(tmp_path / "empty-dst") == 0


def test_source_in_use_and_a_target_past_its_deadline(start: Callable[..., Server],  # noqa: F811
                                                      certs: Path, tmp_path: Path) -> None:
    """A disk.img that QEMU holds locked (a running VM) is refused before anything is sent;
    a target whose DEADLINE passed has exited, and the source says it cannot reach it."""
    qemu_io = need_tool("qemu-io")
    vol = tmp_path / "source"
    vol.mkdir()
    write_disk(vol / "disk.img")
    srv = start()
    holder = subprocess.Popen([qemu_io, "-f", "raw", str(vol / "disk.img")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        run = run_source(source_env(certs, vol, "filesystem", srv.url + "/v1beta1/upload"),
                         tmp_path)
        assert run.rc != 0
        assert "locked by another process (a running QEMU?)" in run.message, run.message
    finally:
        holder.communicate("quit\n", timeout=10)
    assert srv.running() and not (srv.volume / "disk.img").exists()
    import datetime
    soon = (datetime.datetime.now(datetime.timezone.utc)
            + datetime.timedelta(seconds=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    late = start(DEADLINE=soon)
    rc, msg = late.wait(30)
    assert rc == 0 and json.loads(msg) == {"message": "Deadline Passed", "deadlinePassed": True}
    run = run_source(source_env(certs, vol, "filesystem", late.url + "/v1beta1/upload",
                                CLONE_RETRY_TIMEOUT="2"), tmp_path)
    assert run.rc != 0
    assert run.message.startswith("Unable to process data: cannot reach the target"), run.message
