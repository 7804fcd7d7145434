"""Pod mode end to end: ``python -m cdimover pod clone|import`` in a subprocess, configured by
environment variables, checked through its exit status, its termination message, the bytes it
wrote and its metrics endpoint (scraped while it runs); plus in-process checks of the message
and metric helpers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import tempfile
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdimover.errors import TargetTooSmallError
from cdimover.pod.metrics import ProgressCounter, new_registry, parse_address
from cdimover.pod import MAX_MESSAGE, failure_message, success_message
from cdimover.sizing import usable_space
from conftest import TOOL_ENV, need, need_root, need_tool
from layouts import Layout, Segment, nonzero_blocks, sha256_prefix, write_layout
from layouts import sha256_file as sha256

MiB = 1 << 20
UID = "0b8c1e6a-5f1d-4b59-9a35-7c1f2d3e4a5b"
# Every variable the pod reads, removed from the inherited environment.
POD_VARS = ("VOLUME_MODE", "MOUNT_POINT", "DESTINATION", "PREALLOCATION", "OWNER_UID",
            "FILESYSTEM_OVERHEAD", "UPLOAD_IMAGE_SIZE", "IMPORTER_ENDPOINT",
            "IMPORTER_CONTENTTYPE", "IMPORTER_IMAGE_SIZE", "IMPORTER_CHECKSUM",
            "METRICS_TLS_CERT_FILE", "METRICS_TLS_KEY_FILE")
SMALL = Layout((Segment("data", 256 << 10), Segment("hole", MiB), Segment("zero", 128 << 10),
                Segment("data", 64 << 10), Segment("hole", 3 * MiB - (448 << 10))), 7)
DENSE = Layout((Segment("data", 64 * MiB),), 11)
CANCEL_TEXT = "cancelled by {sig}; the target is incomplete and is replaced when the {kind} " \
              "runs again"


# ---------------------------------------------------------------------------------------------
# Helpers


def pod_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in POD_VARS}
    env.update(variables)
    return env


def pod_args(kind: str, tmp_path: Path, *extra: str, metrics: str = "127.0.0.1:0",
             http: bool = True) -> list[str]:
    return [sys.executable, "-m", "cdimover", "pod", kind,
            "--termination-log", str(tmp_path / "termination-log"),
            "--metrics-address", metrics, *(["--metrics-http"] if http else []), *extra]


def run_pod(kind: str, tmp_path: Path, env: dict[str, str], *extra: str,
            metrics: str = "127.0.0.1:0") -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the pod command to the end: (completed process, termination message)."""
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    p = subprocess.run(pod_args(kind, tmp_path, *extra, metrics=metrics), env=pod_env(**env),
                       capture_output=True, text=True, timeout=120)
    return p, log.read_text() if log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str, name: str, context: ssl.SSLContext | None = None) -> float | None:
    """The value of NAME{ownerUID=UID} at URL, or None when the endpoint does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return None
    m = re.search(rf'^{name}\{{ownerUID="{UID}"\}} (\S+)$', text, re.M)
    assert m is not None, text
    assert "_created" not in text
    return float(m[1])


def watch(proc: subprocess.Popen[str], url: str, name: str, *,
          context: ssl.SSLContext | None = None, until: Callable[[float], bool] | None = None,
          deadline: float = 60) -> list[float]:
    """Scrape URL every 50 ms until the process ends (or UNTIL(value) holds); the values."""
    values: list[float] = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        t = time.monotonic()
        v = scrape(url, name, context)
        assert time.monotonic() - t < 2, "a scrape took longer than the controller's timeout"
        if v is not None:
            values.append(v)
            if until is not None and until(v):
                return values
        elif proc.poll() is not None:
            return values
        time.sleep(0.05)
    raise AssertionError("the pod did not finish in time")


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Factory for pod processes that are killed at teardown if still running."""
    procs: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        # A pod gets SIGINT's default disposition even when this suite runs in a background
        # job, which starts with SIGINT ignored (and Python then keeps it ignored).
        p = subprocess.Popen(args, env=pod_env(**env), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory: tmpfs(size) -> a fresh tmpfs of SIZE bytes, unmounted at teardown."""
    need_root()
    mounts: list[Path] = []

    def make(size: int) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        need(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    try:
        yield make
    finally:
        for mnt in reversed(mounts):
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def volume(tmp_path: Path, name: str, mode: str, layout: Layout | None,
           loopdev: Callable[..., str], size: int = 0) -> str:
    """A Filesystem volume (directory, with disk.img written from LAYOUT) or a Block volume
    (a loop device of max(SIZE, layout size) bytes, LAYOUT written at its start)."""
    if mode == "filesystem":
        d = tmp_path / name
        d.mkdir()
        if layout is not None:
            write_layout(d / "disk.img", layout)
        return str(d)
    backing = tmp_path / f"{name}.backing"
    if layout is not None:
        write_layout(backing, layout)
    with open(backing, "ab") as f:
        f.truncate(max(size, layout.size if layout else 0))
    return loopdev(backing)


def disk_of(vol: str) -> str:
    return os.path.join(vol, "disk.img") if os.path.isdir(vol) else vol



def clone_env(source: str, destination: str, **more: str) -> dict[str, str]:
    mode = "filesystem" if os.path.isdir(source) else "block"
    env = dict(VOLUME_MODE=mode, MOUNT_POINT=source, DESTINATION=destination,
               PREALLOCATION="false", OWNER_UID=UID)
    env.update(more)
    return env


def qcow2_of(raw: Path, tmp_path: Path) -> Path:
    qemu_img = need_tool("qemu-img")
    out = tmp_path / (raw.stem + ".qcow2")
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True, capture_output=True, env=TOOL_ENV)
    return out


# ---------------------------------------------------------------------------------------------
# Configuration errors


CONFIG_ERRORS: list[tuple[str, dict[str, str | None], str]] = [
    ("clone", {"VOLUME_MODE": None}, "VOLUME_MODE: not set"),
    ("clone", {"VOLUME_MODE": "ssd"}, "VOLUME_MODE: 'ssd' is not"),
    ("clone", {"VOLUME_MODE": "block"}, "MOUNT_POINT: "),
    ("clone", {"PREALLOCATION": "yes"}, "PREALLOCATION: 'yes' is not 'true' or 'false'"),
    ("clone", {"PREALLOCATION": None}, "PREALLOCATION: not set"),
    ("clone", {"OWNER_UID": None}, "OWNER_UID: not set"),
    ("clone", {"FILESYSTEM_OVERHEAD": "six percent"}, "FILESYSTEM_OVERHEAD: "),
    ("clone", {"FILESYSTEM_OVERHEAD": "1.5"}, "FILESYSTEM_OVERHEAD: "),
    ("clone", {"UPLOAD_IMAGE_SIZE": "10GB"}, "UPLOAD_IMAGE_SIZE: invalid quantity '10GB'"),
    ("import", {"IMPORTER_ENDPOINT": None}, "IMPORTER_ENDPOINT: not set"),
    ("import", {"IMPORTER_ENDPOINT": "ftp://127.0.0.1/disk.img"}, "IMPORTER_ENDPOINT: "),
    ("import", {"IMPORTER_CONTENTTYPE": "iso"}, "IMPORTER_CONTENTTYPE: 'iso' is not"),
    ("import", {"IMPORTER_IMAGE_SIZE": "-1Gi"}, "IMPORTER_IMAGE_SIZE: invalid quantity"),
    ("import", {"IMPORTER_CHECKSUM": "sha256:abc"}, "IMPORTER_CHECKSUM: "),
    ("import", {"IMPORTER_CHECKSUM": "crc32:deadbeef"}, "IMPORTER_CHECKSUM: "),
    ("import", {"PREALLOCATION": "1"}, "PREALLOCATION: '1' is not"),
    ("import", {"DESTINATION": "/nonexistent/volume"}, "DESTINATION: /nonexistent/volume"),
]


@pytest.mark.parametrize("kind,change,expected", CONFIG_ERRORS,
                         ids=[f"{k}-{'-'.join(f'{n}={v}' for n, v in c.items())}"
                              for k, c, _ in CONFIG_ERRORS])
def test_configuration_error(tmp_path: Path, kind: str, change: dict[str, str | None],
                             expected: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_layout(src / "disk.img", SMALL)
    env: dict[str, str | None]
    if kind == "clone":
        env = dict(clone_env(str(src), str(dst)))
    else:
        env = dict(IMPORTER_ENDPOINT=str(src / "disk.img"), DESTINATION=str(dst), OWNER_UID=UID)
    env.update(change)
    p, message = run_pod(kind, tmp_path, {k: v for k, v in env.items() if v is not None})
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"cdimover: {expected}"), p.stderr
    assert message == "Unable to process data: " + p.stderr[len("cdimover: "):-1]
    assert p.stdout == ""
    assert not (dst / "disk.img").exists()


# ---------------------------------------------------------------------------------------------
# Clone


def test_clone_filesystem_to_filesystem(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_layout(src / "disk.img", SMALL)
    p, message = run_pod("clone", tmp_path, clone_env(str(src), str(dst)))
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Clone Complete","preallocationApplied":false}'
    assert sha256(dst / "disk.img") == sha256(src / "disk.img")
    assert os.stat(dst / "disk.img").st_mode & 0o777 == 0o660
    assert os.stat(dst / "disk.img").st_blocks * 512 < SMALL.size  # holes stay holes


def test_clone_destination_may_name_disk_img(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_layout(src / "disk.img", SMALL)
    p, message = run_pod("clone", tmp_path, clone_env(str(src), str(dst / "disk.img")), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["message"] == "Clone Complete"
    assert sha256(dst / "disk.img") == sha256(src / "disk.img")


@pytest.mark.blockdev
@pytest.mark.parametrize("src_mode,dst_mode,prealloc", [
    ("block", "block", "false"), ("block", "filesystem", "true"),
    ("filesystem", "block", "true"), ("filesystem", "filesystem", "true")])
def test_clone_mode_pairs(tmp_path: Path, loopdev: Callable[..., str], src_mode: str,
                          dst_mode: str, prealloc: str) -> None:
    src = volume(tmp_path, "src", src_mode, SMALL, loopdev)
    dst = volume(tmp_path, "dst", dst_mode, None, loopdev, size=SMALL.size + 2 * MiB)
    p, message = run_pod("clone", tmp_path, clone_env(src, dst, PREALLOCATION=prealloc))
    assert p.returncode == 0, p.stderr
    assert json.loads(message) == {"message": "Clone Complete",
                                   "preallocationApplied": prealloc == "true"}
    assert sha256_prefix(disk_of(dst), SMALL.size) == sha256_prefix(disk_of(src), SMALL.size)
    if dst_mode == "filesystem" and prealloc == "true":
        assert os.stat(disk_of(dst)).st_blocks * 512 >= SMALL.size


def test_clone_upload_image_size_grows_within_usable_space(
        tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_layout(src / "disk.img", SMALL)
    dst = tmpfs(16 * MiB)
    p, message = run_pod("clone", tmp_path, clone_env(str(src), str(dst),
                                                      UPLOAD_IMAGE_SIZE="8Mi"))
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(dst / "disk.img") == 8 * MiB
    p, message = run_pod("clone", tmp_path, clone_env(str(src), str(dst),
                                                      UPLOAD_IMAGE_SIZE="1Ti"))
    assert p.returncode == 0, p.stderr
    # min(requested, usable): CDI's usable space of the empty 16 MiB volume.
    assert os.path.getsize(dst / "disk.img") == usable_space(16 * MiB, "0.06") == 15 * MiB
    assert sha256_prefix(dst / "disk.img", SMALL.size) == sha256(src / "disk.img")


def test_clone_too_small_uses_cdi_phrase(tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_layout(src / "disk.img", Layout((Segment("data", 4096), Segment("hole", 8 * MiB)), 1))
    dst = tmpfs(4 * MiB)
    p, message = run_pod("clone", tmp_path, clone_env(str(src), str(dst)))
    assert p.returncode == 1
    assert message.startswith("Unable to process data: virtual image size ")
    assert "is larger than the reported available storage" in message
    assert not (dst / "disk.img").exists()


@pytest.mark.blockdev
def wait_for_termination_log(tmp_path: Path, timeout: float = 30) -> Path:
    """100 % is reported when the last byte is copied, before the final sync: a test that
    ends the linger with SIGTERM first waits for the termination message."""
    log = tmp_path / "termination-log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def test_clone_metrics_reach_100(tmp_path: Path, loopdev: Callable[..., str],
                                 popen: Callable[..., subprocess.Popen[str]]) -> None:
    src = volume(tmp_path, "src", "block", DENSE, loopdev)
    dst = tmp_path / "dst"
    dst.mkdir()
    port = free_port()
    proc = popen(pod_args("clone", tmp_path, "--metrics-linger", "2",
                          metrics=f"127.0.0.1:{port}"), clone_env(src, str(dst)))
    values = watch(proc, f"http://127.0.0.1:{port}/metrics", "kubevirt_cdi_clone_progress_total",
                   until=lambda v: v >= 100)
    log = wait_for_termination_log(tmp_path)
    proc.send_signal(signal.SIGTERM)  # ends the linger early
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert values == sorted(values) and values[-1] == 100.0
    assert json.loads(log.read_text())["message"] == "Clone Complete"
    assert sha256(dst / "disk.img") == sha256_prefix(src, DENSE.size)


# ---------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_import_raw(tmp_path: Path, as_url: bool) -> None:
    image = tmp_path / "my image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    endpoint = "file://" + urllib.parse.quote(str(image)) if as_url else str(image)
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=endpoint,
                                                  DESTINATION=str(dst), OWNER_UID=UID,
                                                  IMPORTER_IMAGE_SIZE="64Mi"))
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    assert os.path.getsize(dst / "disk.img") == 64 * MiB
    assert sha256_prefix(dst / "disk.img", SMALL.size) == sha256(image)
    assert not nonzero_blocks(dst / "disk.img", 64 * MiB) - nonzero_blocks(image, SMALL.size)


def test_import_image_size_never_shrinks_and_checksum_matches(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    md5 = hashlib.md5(image.read_bytes()).hexdigest()
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=str(dst), OWNER_UID=UID,
                                                  IMPORTER_IMAGE_SIZE="1Mi",
                                                  IMPORTER_CHECKSUM=f"MD5:{md5.upper()}"))
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(dst / "disk.img") == SMALL.size
    assert sha256(dst / "disk.img") == sha256(image)


@pytest.mark.parametrize("prealloc", ["false", "true"])
def test_import_qcow2_to_directory(tmp_path: Path, prealloc: str) -> None:
    raw = tmp_path / "image.raw"
    write_layout(raw, SMALL)
    image = qcow2_of(raw, tmp_path)
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=f"file://{image}",
                                                  DESTINATION=str(dst), OWNER_UID=UID,
                                                  PREALLOCATION=prealloc,
                                                  IMPORTER_IMAGE_SIZE="8Mi"))
    assert p.returncode == 0, p.stderr
    assert json.loads(message) == {"message": "Import Complete",
                                   "preallocationApplied": prealloc == "true"}
    assert os.path.getsize(dst / "disk.img") == 8 * MiB
    assert sha256_prefix(dst / "disk.img", SMALL.size) == sha256(raw)
    if prealloc == "true":
        assert os.stat(dst / "disk.img").st_blocks * 512 >= 8 * MiB


@pytest.mark.blockdev
@pytest.mark.parametrize("prealloc", ["false", "true"])
def test_import_qcow2_to_block_device(tmp_path: Path, loopdev: Callable[..., str],
                                      prealloc: str) -> None:
    raw = tmp_path / "image.raw"
    write_layout(raw, SMALL)
    image = qcow2_of(raw, tmp_path)
    backing = tmp_path / "dev.backing"
    backing.write_bytes(b"\xee" * (SMALL.size + MiB))  # stale bytes the import must zero
    dev = loopdev(backing)
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=dev, OWNER_UID=UID,
                                                  PREALLOCATION=prealloc))
    assert p.returncode == 0, p.stderr
    assert json.loads(message)["preallocationApplied"] is (prealloc == "true")
    assert sha256_prefix(dev, SMALL.size) == sha256(raw)


def test_import_refuses_qcow2_with_backing_file(tmp_path: Path) -> None:
    qemu_img = need_tool("qemu-img")
    base = tmp_path / "base.raw"
    write_layout(base, SMALL)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True, capture_output=True, env=TOOL_ENV)
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(overlay),
                                                  DESTINATION=str(dst), OWNER_UID=UID))
    assert p.returncode == 1
    assert message.startswith(f"Unable to process data: {overlay}: the image has a backing file")
    assert not (dst / "disk.img").exists()


@pytest.mark.blockdev
def test_import_too_small_block_device(tmp_path: Path, loopdev: Callable[..., str]) -> None:
    image = tmp_path / "image.raw"
    write_layout(image, Layout((Segment("data", 4096), Segment("hole", 8 * MiB)), 3))
    backing = tmp_path / "dev.backing"
    backing.write_bytes(b"\x5a" * (4 * MiB))
    dev = loopdev(backing)
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=dev, OWNER_UID=UID))
    assert p.returncode == 1
    assert message.startswith(f"Unable to process data: virtual image size {8 * MiB + 4096} "
                              f"is larger than the reported available storage {4 * MiB}. "
                              f"A larger PVC is required"), message
    with open(dev, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096  # nothing written


def test_import_too_small_filesystem(tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    image = tmp_path / "image.raw"
    write_layout(image, Layout((Segment("data", 4096), Segment("hole", 4 * MiB)), 3))
    dst = tmpfs(4 * MiB)  # usable: 3 MiB after the 6 % overhead
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=str(dst), OWNER_UID=UID))
    assert p.returncode == 1
    assert f"is larger than the reported available storage {3 * MiB}." in message
    assert p.stderr.startswith("cdimover: ") and p.stderr.count("\n") == 1
    assert not (dst / "disk.img").exists()


def test_import_enospc_uses_go_phrase(tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    payload = tmp_path / "big.bin"
    write_layout(payload, Layout((Segment("data", 6 * MiB),), 5))
    archive = tmp_path / "volume.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname="big.bin")
    dst = tmpfs(2 * MiB)
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(archive),
                                                  IMPORTER_CONTENTTYPE="archive",
                                                  DESTINATION=str(dst), OWNER_UID=UID))
    assert p.returncode == 1
    assert message.startswith("Unable to process data: ")
    assert "no space left on device" in message


def test_import_archive(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_text("hello")
    (tree / "top.bin").write_bytes(os.urandom(70000))
    os.symlink("sub/file.txt", tree / "link")
    archive = tmp_path / "volume.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("sub", "top.bin", "link"):
            tar.add(tree / name, arcname=name)
    digest = hashlib.sha512(archive.read_bytes()).hexdigest()
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(archive),
                                                  IMPORTER_CONTENTTYPE="archive",
                                                  IMPORTER_CHECKSUM=f"sha512:{digest}",
                                                  DESTINATION=str(dst), OWNER_UID=UID))
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    assert (dst / "sub" / "file.txt").read_text() == "hello"
    assert (dst / "top.bin").read_bytes() == (tree / "top.bin").read_bytes()
    assert os.readlink(dst / "link") == "sub/file.txt"


def test_import_refuses_compressed_image(tmp_path: Path) -> None:
    image = tmp_path / "image.raw.gz"
    image.write_bytes(b"\x1f\x8b\x08\x00" + bytes(4092))
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=str(dst), OWNER_UID=UID))
    assert p.returncode == 1
    assert "gzip-compressed images are not supported yet" in message
    assert not (dst / "disk.img").exists()


# ---------------------------------------------------------------------------------------------
# Checksums


def test_checksum_mismatch_removes_image(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    wrong = "0" * 64
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=str(dst), OWNER_UID=UID,
                                                  IMPORTER_CHECKSUM=f"sha256:{wrong}"))
    assert p.returncode == 1
    assert message == (f"Unable to process data: checksum mismatch: IMPORTER_CHECKSUM is "
                       f"sha256:{wrong} but {image} has sha256:{sha256(image)}; the written "
                       f"image was removed")
    assert p.stderr.count("\n") == 1 and "checksum mismatch" in p.stderr
    assert not (dst / "disk.img").exists()


@pytest.mark.blockdev
def test_checksum_mismatch_wipes_block_device(tmp_path: Path, loopdev: Callable[..., str]) -> None:
    raw = tmp_path / "image.raw"
    write_layout(raw, SMALL)
    image = qcow2_of(raw, tmp_path)
    dev = volume(tmp_path, "dev", "block", None, loopdev, size=SMALL.size)
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                  DESTINATION=dev, OWNER_UID=UID,
                                                  IMPORTER_CHECKSUM="sha1:" + "1" * 40))
    assert p.returncode == 1
    assert "checksum mismatch" in message
    assert nonzero_blocks(dev, SMALL.size) == set()


# ---------------------------------------------------------------------------------------------
# Metrics and signals


def slow_import(tmp_path: Path, dst: str, popen: Callable[..., subprocess.Popen[str]],
                port: int, *extra: str, **env: str) -> subprocess.Popen[str]:
    """An import of the 64 MiB dense image, 4 KiB per request on one thread: a few seconds."""
    image = tmp_path / "dense.raw"
    if not image.exists():
        write_layout(image, DENSE)
    return popen(pod_args("import", tmp_path, "--threads", "1", "--request-size", "4Ki", *extra,
                          metrics=f"127.0.0.1:{port}"),
                 dict(IMPORTER_ENDPOINT=str(image), DESTINATION=dst, OWNER_UID=UID, **env))


def test_metrics_during_import(tmp_path: Path, popen: Callable[..., subprocess.Popen[str]]) -> None:
    dst = tmp_path / "data"
    dst.mkdir()
    port = free_port()
    image = tmp_path / "dense.raw"
    write_layout(image, DENSE)
    proc = slow_import(tmp_path, str(dst), popen, port, "--metrics-linger", "5",
                       IMPORTER_CHECKSUM=f"sha256:{sha256(image)}")
    url = f"http://127.0.0.1:{port}/metrics"
    values = watch(proc, url, "kubevirt_cdi_import_progress_total", until=lambda v: v >= 100)
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    assert "# HELP kubevirt_cdi_import_progress_total The import progress in percentage" in text
    assert "# TYPE kubevirt_cdi_import_progress_total counter" in text
    wait_for_termination_log(tmp_path)
    proc.send_signal(signal.SIGTERM)  # ends the linger
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert values == sorted(values), values
    assert values[-1] == 100.0
    assert len([v for v in values if 0 < v < 100]) >= 3, values
    assert (tmp_path / "termination-log").read_text() == \
        '{"message":"Import Complete","preallocationApplied":false}'
    assert sha256(dst / "disk.img") == sha256(image)


def test_metrics_over_tls(tmp_path: Path, popen: Callable[..., subprocess.Popen[str]]) -> None:
    openssl = need_tool("openssl")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   env=TOOL_ENV)
    image = tmp_path / "image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    port = free_port()
    proc = popen(pod_args("import", tmp_path, "--metrics-linger", "10",
                          metrics=f"127.0.0.1:{port}"),
                 dict(IMPORTER_ENDPOINT=str(image), DESTINATION=str(dst), OWNER_UID=UID,
                      METRICS_TLS_CERT_FILE=str(cert), METRICS_TLS_KEY_FILE=str(key)))
    context = ssl.create_default_context(cafile=str(cert))
    values = watch(proc, f"https://127.0.0.1:{port}/metrics", "kubevirt_cdi_import_progress_total",
                   context=context, until=lambda v: v >= 100)
    assert values[-1] == 100.0
    assert scrape(f"http://127.0.0.1:{port}/metrics", "x") is None  # no plain HTTP
    wait_for_termination_log(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("sig,status,target", [
    (signal.SIGTERM, 143, "block"), (signal.SIGINT, 130, "filesystem")])
def test_signal_cancels_then_rerun_succeeds(
        tmp_path: Path, popen: Callable[..., subprocess.Popen[str]],
        request: pytest.FixtureRequest, sig: signal.Signals, status: int, target: str) -> None:
    if target == "block":
        dst = volume(tmp_path, "dst", target, None, request.getfixturevalue("loopdev"),
                     size=DENSE.size)
    else:
        (tmp_path / "dst").mkdir()
        dst = str(tmp_path / "dst")
    port = free_port()
    proc = slow_import(tmp_path, dst, popen, port)
    values = watch(proc, f"http://127.0.0.1:{port}/metrics",
                   "kubevirt_cdi_import_progress_total", until=lambda v: v >= 5)
    assert values[-1] < 100, "the import finished before the signal could be sent"
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 5, "cancellation must stop the copy promptly"
    assert proc.returncode == status, err
    assert (tmp_path / "termination-log").read_text() == (
        "Unable to process data: import " + CANCEL_TEXT.format(sig=sig.name, kind="import"))
    assert err.count("\n") == 1 and "run the command again" in err
    image = tmp_path / "dense.raw"
    if target == "block":
        assert sha256_prefix(disk_of(dst), DENSE.size) != sha256(image)
    else:   # the new disk.img was written under a partial name, removed on cancellation
        assert os.listdir(dst) == []
    p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image), DESTINATION=dst,
                                                  OWNER_UID=UID))
    assert p.returncode == 0, p.stderr
    assert json.loads(message)["message"] == "Import Complete"
    assert sha256_prefix(disk_of(dst), DENSE.size) == sha256(image)


def test_metrics_address_in_use_fails(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p, message = run_pod("import", tmp_path, dict(IMPORTER_ENDPOINT=str(image),
                                                      DESTINATION=str(dst), OWNER_UID=UID),
                             metrics=f"127.0.0.1:{port}")
    assert p.returncode == 1
    assert message == f"Unable to process data: 127.0.0.1:{port}: cannot serve metrics: " \
                      f"Address already in use"
    assert not (dst / "disk.img").exists()


# ---------------------------------------------------------------------------------------------
# Helpers, in-process


def test_messages_are_one_line_and_bounded() -> None:
    assert success_message("import", True) == \
        '{"message":"Import Complete","preallocationApplied":true}'
    long = failure_message("clone", ValueError("x\n" * 5000))
    assert "\n" not in long and len(long.encode()) <= MAX_MESSAGE
    wide = failure_message("clone", ValueError("é" * 5000))
    assert len(wide.encode()) <= MAX_MESSAGE and wide.endswith("é")
    enospc = OSError(errno.ENOSPC, "No space left on device (writing 4 MiB)", "/data/disk.img")
    assert failure_message("import", enospc) == \
        "Unable to process data: /data/disk.img: no space left on device (writing 4 MiB)"
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/data/disk.img")
    assert failure_message("import", quota).endswith("disk quota exceeded")
    small = TargetTooSmallError("details", required=10, available=5)
    assert failure_message("clone", small).startswith(
        "Unable to process data: virtual image size 10 is larger than the reported available "
        "storage 5. A larger PVC is required")


def test_progress_counter_is_monotonic_and_clamped() -> None:
    from prometheus_client.exposition import generate_latest

    c = ProgressCounter("clone", UID)
    registry = new_registry(c)
    assert c.set(12.5) == 12.5
    assert c.set(3) == 12.5
    assert c.set(250) == 100.0
    text = generate_latest(registry).decode()
    assert f'kubevirt_cdi_clone_progress_total{{ownerUID="{UID}"}} 100.0' in text
    assert "_created" not in text and "python_" not in text


@pytest.mark.parametrize("text,expected", [
    (":8443", ("", 8443)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9090", ("::1", 9090))])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["8443", "::1:80", "host:http", "host:70000"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics-address"):
        parse_address(text)


def test_sigterm_mid_clone_then_rerun_succeeds(
        tmp_path: Path, loopdev: Callable[..., str],
        popen: Callable[..., subprocess.Popen[str]]) -> None:
    src = volume(tmp_path, "src", "block", DENSE, loopdev)
    dst = tmp_path / "dst"
    dst.mkdir()
    port = free_port()
    proc = popen(pod_args("clone", tmp_path, "--threads", "1", "--request-size", "4Ki",
                          metrics=f"127.0.0.1:{port}"), clone_env(src, str(dst)))
    values = watch(proc, f"http://127.0.0.1:{port}/metrics",
                   "kubevirt_cdi_clone_progress_total", until=lambda v: v >= 5)
    assert values[-1] < 100, "the clone finished before the signal could be sent"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert (tmp_path / "termination-log").read_text() == (
        "Unable to process data: clone " + CANCEL_TEXT.format(sig="SIGTERM", kind="clone"))
    # The new disk was written under a partial name and removed when the clone stopped.
    assert sorted(os.listdir(dst)) == []
    p, message = run_pod("clone", tmp_path, clone_env(src, str(dst)))
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Clone Complete","preallocationApplied":false}'
    assert sha256_prefix(dst / "disk.img", DENSE.size) == sha256_prefix(src, DENSE.size)


def test_metrics_default_to_https_with_a_self_signed_certificate(
        tmp_path: Path, popen: Callable[..., subprocess.Popen[str]]) -> None:
    # CDI's controllers scrape https://POD:8443/metrics without verifying the certificate.
    image = tmp_path / "image.raw"
    write_layout(image, SMALL)
    dst = tmp_path / "data"
    dst.mkdir()
    port = free_port()
    proc = popen(pod_args("import", tmp_path, "--metrics-linger", "10",
                          metrics=f"127.0.0.1:{port}", http=False),
                 dict(IMPORTER_ENDPOINT=str(image), DESTINATION=str(dst), OWNER_UID=UID))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    values = watch(proc, f"https://127.0.0.1:{port}/metrics",
                   "kubevirt_cdi_import_progress_total", context=context,
                   until=lambda v: v >= 100)
    assert values[-1] == 100.0
    assert scrape(f"http://127.0.0.1:{port}/metrics", "x") is None  # no plain HTTP
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    assert "BEGIN CERTIFICATE" in pem
    assert not list(Path(tempfile.gettempdir()).glob("cdimover-metrics-*/tls.key")), \
        "the generated key must not stay on disk"
    wait_for_termination_log(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_import_decides_the_format_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The importer examines the image once (format probe, header, refusals) and hands what it
    # found to the conversion: nothing about the format is read twice.
    from cdimover.ops import convert as convert_mod
    from cdimover.pod.config import import_config
    from cdimover.pod.importer import run_import

    qemu_img = need_tool("qemu-img")
    raw = tmp_path / "image.raw"
    write_layout(raw, SMALL)
    image = tmp_path / "image.qcow2"
    subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(image)], check=True,
                   env=TOOL_ENV)
    dst = tmp_path / "data"
    dst.mkdir()
    calls: list[str] = []
    real = convert_mod.choose_format

    def counting(*args: object, **kwargs: object) -> str:
        calls.append("choose_format")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_mod, "choose_format", counting)
    cfg = import_config({"IMPORTER_ENDPOINT": str(image), "DESTINATION": str(dst)})
    run_import(cfg, ProgressCounter("import", UID))
    assert calls == ["choose_format"]
    assert sha256_prefix(dst / "disk.img", SMALL.size) == sha256_prefix(raw, SMALL.size)
