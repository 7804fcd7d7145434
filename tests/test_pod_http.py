"""``cdimover pod import`` with IMPORTER_SOURCE=http against a real nginx: CDI's environment
(basic auth from IMPORTER_ACCESS_KEY_ID/IMPORTER_SECRET_KEY, IMPORTER_CERT_DIR, extra headers
from IMPORTER_EXTRA_HEADER_<n> and secret header files, IMPORTER_CHECKSUM), its termination
messages, and secrets kept out of what the pod prints."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from test_pod import UID, run_pod

from conftest import TOOL_ENV, need_tool

MiB = 1 << 20


def qcow2_bytes(tmp_path: Path) -> tuple[bytes, bytes]:
    """(QCOW2 image, its RAW guest disk) of 32 MiB with two data runs."""
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(30 * MiB)
        f.write(b"\x77" * MiB)
    img = tmp_path / "guest.qcow2"
    subprocess.run([need_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2",
                    str(raw), str(img)], check=True, env=TOOL_ENV)
    data = img.read_bytes(), raw.read_bytes()
    img.unlink()
    raw.unlink()
    return data


def test_pod_http_import_with_auth_ca_headers_and_checksum(nginx: Any, tmp_path: Path) -> None:
    image, guest = qcow2_bytes(tmp_path)
    name = nginx.put(image, name=f"{tmp_path.name}.qcow2")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "tls.crt").write_bytes(nginx.ca_file.read_bytes())
    secret_headers = tmp_path / "extraheaders" / "0"
    secret_headers.mkdir(parents=True)
    (secret_headers / "token").write_text("X-Test-Header: from-secret\n")
    dst = tmp_path / "data"
    dst.mkdir()
    sha = hashlib.sha256(image).hexdigest()
    env = dict(IMPORTER_SOURCE="http", IMPORTER_ENDPOINT=nginx.url(f"auth/{name}", "https"),
               IMPORTER_ACCESS_KEY_ID=nginx.user, IMPORTER_SECRET_KEY=nginx.password,
               IMPORTER_CERT_DIR=str(certs), IMPORTER_EXTRA_HEADERS_DIR=str(tmp_path / "extraheaders"),
               IMPORTER_CHECKSUM=f"sha256:{sha}", DESTINATION=str(dst), OWNER_UID=UID,
               IMPORTER_IMAGE_SIZE="40Mi")
    p, message = run_pod("import", tmp_path, env)
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    disk = dst / "disk.img"
    assert os.path.getsize(disk) == 40 * MiB
    with open(disk, "rb") as f:
        assert f.read(32 * MiB) == guest
    assert os.stat(disk).st_blocks * 512 <= 5 * MiB     # holes stay holes
    entries = nginx.log_entries(name, expect=1)
    assert entries and all(e["auth_present"] and e["x_test_header"] == "from-secret"
                           for e in entries)
    assert nginx.password not in p.stdout + p.stderr + message


def test_pod_http_checksum_mismatch_removes_the_disk(nginx: Any, tmp_path: Path) -> None:
    name = nginx.put(os.urandom(2 * MiB))
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, dict(
        IMPORTER_SOURCE="http", IMPORTER_ENDPOINT=nginx.url(name), DESTINATION=str(dst),
        OWNER_UID=UID, IMPORTER_CHECKSUM="md5:" + "0" * 32))
    assert p.returncode == 1
    assert message.startswith("Unable to process data: ")
    assert "md5 of the downloaded file" in message
    assert os.listdir(dst) == []


def test_pod_http_errors_are_one_line(nginx: Any, tmp_path: Path) -> None:
    dst = tmp_path / "data"
    dst.mkdir()
    name = nginx.put(b"y" * 8192)
    for endpoint, extra, expected in [
            (nginx.url("missing.img"), {}, "404 Not Found"),
            (nginx.url(f"auth/{name}"), {"IMPORTER_ACCESS_KEY_ID": nginx.user,
                                         "IMPORTER_SECRET_KEY": "wrong-secret"},
             "wrong user name or password"),
            (nginx.url(name, "https"), {}, "not trusted")]:
        p, message = run_pod("import", tmp_path, dict(
            IMPORTER_SOURCE="http", IMPORTER_ENDPOINT=endpoint, DESTINATION=str(dst),
            OWNER_UID=UID, **extra))
        assert p.returncode == 1, p.stderr
        assert expected in message and "\n" not in message.strip()
        assert "wrong-secret" not in message + p.stderr
    assert os.listdir(dst) == []


def test_pod_http_volume_too_small(nginx: Any, tmp_path: Path, loopdev: Any) -> None:
    name = nginx.put(os.urandom(MiB) + bytes(7 * MiB))
    backing = tmp_path / "dev.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    dev = loopdev(backing)
    p, message = run_pod("import", tmp_path, dict(
        IMPORTER_SOURCE="http", IMPORTER_ENDPOINT=nginx.url(name), DESTINATION=dev,
        OWNER_UID=UID))
    assert p.returncode == 1
    assert "target holds 4.0 MiB" in message or "larger than" in message, message


def test_pod_http_scratch_space(nginx: Any, tmp_path: Path) -> None:
    """A QCOW2 streamed (no ranges) that needs more than the memory bound: without a scratch
    volume the pod asks for one (scratchSpaceRequired, exit 0, nothing written); with
    SCRATCH_DIR it converts from there."""
    image, guest = qcow2_bytes(tmp_path)
    name = nginx.put(image, name=f"{tmp_path.name}-scratch.qcow2")
    dst = tmp_path / "data"
    dst.mkdir()
    env = dict(IMPORTER_SOURCE="http", IMPORTER_ENDPOINT=nginx.url(f"noranges/{name}"),
               DESTINATION=str(dst), OWNER_UID=UID, SCRATCH_DIR=str(tmp_path / "none"))
    p, message = run_pod("import", tmp_path, env, "--mem-limit", "4096")
    assert p.returncode == 0, p.stderr
    assert message.startswith('{"message":"Unable to process data: scratch space required')
    assert message.endswith('"scratchSpaceRequired":true}')
    assert os.listdir(dst) == []
    (tmp_path / "none").mkdir()
    p, message = run_pod("import", tmp_path, env, "--mem-limit", "4096")
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    assert (dst / "disk.img").read_bytes() == guest
    assert os.listdir(tmp_path / "none") == []
