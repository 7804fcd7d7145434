"""The container image of deploy/build-image.sh in a real runtime (podman + runc, as root):
its contents, a read-only run as CDI's uid 107 with every capability dropped, a Block ->
Filesystem clone (`pod clone`) and the standalone Job's Filesystem -> Block clone on a loop
device, an HTTP import from a local nginx, and the checked-in upload-server and local-clone
Pod manifests under `podman kube play`: an upload over mutual TLS, the metrics scraped, the
termination message read back through `podman inspect`.  Bytes are checked by sha256."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TOOL_ENV, need_tool
from imagefix import (MiB, QEMU_ID, ROLES, Image, Podman, attach, curl_in, disk, kube_overlay,
                      load_manifest, manifest_env, owned_dir, pod_pid, sha256,
                      termination_file, termination_message, upload_pki, wait_exited,
                      wait_healthy)
from netfix import NginxServer

DEVICE = "/dev/cdi-block-volume"
# What the image holds beyond python3 and shared libraries, and may (see README).
SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "mksh", "busybox", "perl", "ash")
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "ld", "as", "x86_64-linux-gnu-gcc", "tcc")


def same_disk(img: Path, src: Path) -> bool:
    """IMG holds SRC's bytes, then nothing but a hole (a Filesystem target's disk.img grows
    to the requested size, UPLOAD_IMAGE_SIZE)."""
    size = src.stat().st_size
    with open(img, "rb") as f:
        try:
            data_after = os.lseek(f.fileno(), size, os.SEEK_DATA)
        except OSError:
            data_after = None
    return img.stat().st_size >= size and data_after is None and \
        sha256(img, size) == sha256(src)


def volume_args(device: str | None = None, data: Path | None = None, *,
                data_ro: bool = False, term: Path | None = None) -> list[str]:
    args = []
    if device:
        args += ["--device", f"{device}:{DEVICE}"]
    if data:
        args += ["-v", f"{data}:/data{':ro' if data_ro else ''}"]
    if term:
        args += ["-v", f"{term}:/dev/termination-log"]
    return args


def env_args(env: dict[str, str]) -> list[str]:
    return [a for k, v in env.items() for a in ("-e", f"{k}={v}")]


# ---------------------------------------------------------------------------------------------
# The image itself


def test_image_config_and_size(image: Image, podman: Podman) -> None:
    cfg = json.loads(podman("image", "inspect", image.ref).stdout)[0]["Config"]
    assert cfg["User"] == "107:107"
    assert cfg["Entrypoint"] == ["/usr/local/bin/cdimover"]
    assert "8443/tcp" in cfg["ExposedPorts"]
    print(f"\nimage {image.ref}: {image.size / 1e6:.1f} MB, built in "
          f"{'(cached)' if image.build_seconds is None else f'{image.build_seconds:.0f} s'}")
    assert image.size < 160e6, "the image grew: see README, 'The container image'"
    for role, command in ROLES.items():
        cfg = json.loads(podman("image", "inspect", image.role(role)).stdout)[0]["Config"]
        assert cfg["Entrypoint"] == ["/usr/local/bin/cdimover", "pod", command]
        assert cfg["User"] == "107:107" and not cfg.get("Cmd")


def test_image_contents(image: Image, podman: Podman, tmp_path: Path) -> None:
    """python3 and the libraries the core links are there; no shell, no compiler, no
    package manager's maintainer scripts to run them."""
    name = podman.name("export")
    podman("create", "--name", name, image.ref)
    tar = tmp_path / "rootfs.tar"
    podman("export", "--output", str(tar), name)
    with tarfile.open(tar) as t:
        names = {m.name.lstrip("./").rstrip("/"): m for m in t.getmembers()}
    bins = {Path(n).name for n in names
            if n.startswith(("bin/", "usr/bin/", "sbin/", "usr/sbin/", "usr/local/bin/"))}
    assert {"python3", "cdimover"} <= bins
    assert not bins & set(SHELLS), f"shells in the image: {sorted(bins & set(SHELLS))}"
    assert not bins & set(COMPILERS), f"compilers in the image: {sorted(bins & set(COMPILERS))}"
    libs = {Path(n).name.split(".so")[0] for n in names if ".so" in Path(n).name}
    for lib in ("libcurl", "libz", "libzstd", "libdeflate", "libssl", "libcrypto", "liblzma",
                "libffi"):
        assert lib in libs, f"{lib} missing"
    assert not any(n.startswith("usr/share/doc/") for n in names)
    assert "etc/ssl/certs/ca-certificates.crt" in names
    assert "qemu:x:107:107:" in t_read(tar, "etc/passwd")
    status = t_read(tar, "var/lib/dpkg/status")       # what image scanners read
    for package in ("python3", "libcurl4", "libssl3", "libdeflate0"):
        assert f"Package: {package}\nStatus: install ok installed\n" in status


def t_read(tar: Path, member: str) -> str:
    with tarfile.open(tar) as t:
        f = t.extractfile(member) or t.extractfile("./" + member)
        assert f is not None
        return f.read().decode()


def test_runs_restricted_and_read_only(image: Image, podman: Podman) -> None:
    probe = ("import os, json\n"
             "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines()"
             " if ':\\t' in l)\n"
             "try:\n    open('/etc/x', 'w'); ro = False\nexcept OSError as e:\n    ro = e.errno\n"
             "print(json.dumps([os.getuid(), os.getgid(), st['CapEff'], st['NoNewPrivs'], ro]))\n")
    r = podman.run(image.ref, "-c", probe, name=podman.name("probe"),
                   options=["--network", "none", "--entrypoint", "/usr/bin/python3"])
    assert r.returncode == 0, r.stderr
    uid, gid, cap_eff, nnp, ro = json.loads(r.stdout)
    assert (uid, gid) == (107, 107)
    assert int(cap_eff, 16) == 0 and nnp.strip() == "1"
    assert ro == 30                     # EROFS
    r = podman.run(image.ref, "--version", name=podman.name("version"),
                   options=["--network", "none"])
    assert r.returncode == 0 and r.stdout.startswith("cdimover ")


# ---------------------------------------------------------------------------------------------
# The pod programs under podman run


def test_clone_block_to_filesystem(image: Image, loopdev: Callable[..., str],
                                   podman: Podman, tmp_path: Path) -> None:
    """`pod clone` with deploy/clone-block-to-filesystem.yaml's environment."""
    src = disk(tmp_path / "src.img")
    dev = attach(loopdev, src)
    data, term = owned_dir(tmp_path / "data"), termination_file(tmp_path / "term")
    env = manifest_env("clone-block-to-filesystem.yaml")
    r = podman.run(image.ref, "pod", "clone", name=podman.name("clone"),
                   options=["--network", "none", *env_args(env),
                            *volume_args(dev, data, term=term)])
    assert r.returncode == 0, r.stderr
    assert json.loads(term.read_text()) == {"message": "Clone Complete",
                                            "preallocationApplied": False}
    img = data / "disk.img"
    assert same_disk(img, src)
    assert img.stat().st_uid == QEMU_ID
    assert img.stat().st_blocks * 512 < 16 * MiB          # the holes stayed holes


def test_job_clone_filesystem_to_block(image: Image, loopdev: Callable[..., str],
                                       podman: Podman, tmp_path: Path) -> None:
    """deploy/clone-job.yaml's command: a standalone `cdimover clone`, the source read-only."""
    args = load_manifest("clone-job.yaml")["spec"]["template"]["spec"]["containers"][0]["args"]
    data = owned_dir(tmp_path / "data")
    src = disk(data / "disk.img", seed=3)
    os.chown(src, QEMU_ID, QEMU_ID)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    dev = attach(loopdev, target)
    r = podman.run(image.ref, *args, name=podman.name("job"),
                   options=["--network", "none", *volume_args(dev, data, data_ro=True)])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert (result["source_mode"], result["target_mode"]) == ("Filesystem", "Block")
    size = src.stat().st_size
    assert sha256(Path(dev), size) == sha256(src)


def test_http_import(image: Image, podman: Podman, tmp_path: Path,
                     nginx: NginxServer) -> None:
    """The importer image as CDI starts it (`-v=1`, the environment of
    deploy/import-http.yaml), from a QCOW2 on nginx at 127.0.0.1 (host network: the container
    reaches the host's loopback).  The metrics endpoint listens on an ephemeral loopback port
    rather than the host's 8443, over HTTPS with the certificate the image's native core makes
    at start."""
    qemu_img = need_tool("qemu-img")
    raw = disk(tmp_path / "src.raw", seed=5)
    qcow2 = tmp_path / "src.qcow2"
    subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True,
                   env=TOOL_ENV, capture_output=True)
    env = manifest_env("import-http.yaml")
    env["IMPORTER_ENDPOINT"] = nginx.url(nginx.put(qcow2.read_bytes()))
    env["IMPORTER_IMAGE_SIZE"] = str(raw.stat().st_size)
    data, term = owned_dir(tmp_path / "data"), termination_file(tmp_path / "term")
    r = podman.run(image.role("importer"), "-v=1", "--metrics-address", "127.0.0.1:0",
                   name=podman.name("import"),
                   options=["--network", "host", *env_args(env), *volume_args(data=data,
                                                                              term=term)])
    assert r.returncode == 0, r.stderr
    assert re.search(r"serving progress metrics on https://127\.0\.0\.1:\d+/metrics",
                     r.stderr), r.stderr
    assert json.loads(term.read_text())["message"] == "Import Complete"
    assert sha256(data / "disk.img") == sha256(raw)


# ---------------------------------------------------------------------------------------------
# The checked-in Pod manifests under podman kube play


@pytest.fixture
def upload_tls(tmp_path: Path) -> dict[str, Path]:
    return upload_pki(tmp_path)


def test_kube_play_upload_server(image: Image, loopdev: Callable[..., str],
                                 podman: Podman, tmp_path: Path,
                                 upload_tls: dict[str, Path]) -> None:
    """deploy/upload-server.yaml on a loop device: metrics scraped, a QCOW2 uploaded with
    curl over mutual TLS inside the pod's network namespace, the server exits 0 and its
    termination message says so."""
    qemu_img = need_tool("qemu-img")
    raw = disk(tmp_path / "up.raw", seed=11)
    qcow2 = tmp_path / "up.qcow2"
    subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True,
                   env=TOOL_ENV, capture_output=True)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    dev = attach(loopdev, target)
    manifest = load_manifest("upload-server.yaml")
    claim = manifest["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    term = termination_file(tmp_path / "term")
    pod = kube_overlay(manifest, image.ref, claims={claim: dev}, termination_log=term,
                       files={"cdi-upload-upload-target": str(upload_tls["tls"])})
    podman.play(pod, tmp_path, "--network", "none")
    name = f"{pod['metadata']['name']}-{pod['spec']['containers'][0]['name']}"
    pid = pod_pid(podman, pod["metadata"]["name"])
    ca = str(upload_tls["ca"])
    wait_healthy(pid, upload_tls["ca"])

    metrics = curl_in(pid, "--cacert", ca, "https://127.0.0.1:8443/metrics")
    assert metrics.returncode == 0, metrics.stderr
    owner = manifest_env("upload-server.yaml")["OWNER_UID"]
    assert f'ownerUID="{owner}"' in metrics.stdout.decode()

    up = curl_in(pid, "--fail", "--cacert", ca, "--cert", str(upload_tls["cert"]),
                 "--key", str(upload_tls["key"]), "-X", "POST", "--data-binary",
                 f"@{qcow2}", "https://127.0.0.1:8443/v1beta1/upload")
    assert up.returncode == 0, up.stderr
    assert wait_exited(podman, name) == 0
    assert json.loads(termination_message(podman, name)) == {
        "message": "Upload Complete", "preallocationApplied": False}
    assert sha256(Path(dev), raw.stat().st_size) == sha256(raw)


def test_kube_play_local_clone(image: Image, loopdev: Callable[..., str],
                               podman: Podman, tmp_path: Path) -> None:
    """deploy/clone-block-to-filesystem.yaml: a loop device into a directory."""
    src = disk(tmp_path / "src.img", seed=17)
    dev = attach(loopdev, src)
    data, term = owned_dir(tmp_path / "data"), termination_file(tmp_path / "term")
    manifest = load_manifest("clone-block-to-filesystem.yaml")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in manifest["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    pod = kube_overlay(manifest, image.ref, claims=dict(zip(claims, [dev, str(data)])),
                       files={}, termination_log=term)
    podman.play(pod, tmp_path, "--network", "none")
    name = f"{pod['metadata']['name']}-{pod['spec']['containers'][0]['name']}"
    assert wait_exited(podman, name) == 0
    assert json.loads(termination_message(podman, name))["message"] == "Clone Complete"
    assert same_disk(data / "disk.img", src)
