"""``cdimover pod import`` with IMPORTER_SOURCE=registry against a real registry
(docker-registry, images pushed by skopeo): CDI's environment (IMPORTER_ENDPOINT=docker://...,
IMPORTER_ACCESS_KEY_ID/IMPORTER_SECRET_KEY, IMPORTER_CERT_DIR,
IMPORTER_REGISTRY_IMAGE_ARCHITECTURE, http_proxy), the progress metric, termination messages
(success, failures on one line, scratchSpaceRequired), onto a directory and a loop device.
Oracle: qemu-img convert of the QCOW2 disk, or the RAW disk itself."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import TOOL_ENV, need_tool
from netfix import Request, Response, drip
from regfix import Layout, Registries, layer_tar
from test_pod import UID, free_port, pod_args, run_pod, watch
from test_pod import popen  # noqa: F401 (a fixture)

MiB = 1 << 20


def guest_disk() -> bytes:
    """24 MiB with data runs and holes."""
    out = bytearray(24 * MiB)
    for i in (1, 2, 7, 20):
        out[i * MiB:(i + 1) * MiB] = hashlib.sha256(str(i).encode()).digest() * (MiB // 32)
    return bytes(out)


GUEST = guest_disk()
RANDOM = os.urandom(6 * MiB)


@pytest.fixture(scope="module")
def pod_images(registry: Registries, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    """Images pushed once: the QCOW2 of GUEST (gzip layer), its qemu-img oracle, a random RAW
    disk, a multi-arch index, the QCOW2 on the TLS registry."""
    need_tool("qemu-img")
    d = tmp_path_factory.mktemp("pod-images")
    (d / "guest.raw").write_bytes(GUEST)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                    str(d / "guest.raw"), str(d / "guest.qcow2")], env=TOOL_ENV, check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw",
                    str(d / "guest.qcow2"), str(d / "oracle.raw")], env=TOOL_ENV, check=True)
    qcow = (d / "guest.qcow2").read_bytes()
    disk = {"disk": None}
    refs: dict[str, Any] = {"oracle": hashlib.sha256((d / "oracle.raw").read_bytes()).hexdigest()}
    plain, tls = registry.plain, registry.tls
    for name, files in {"qcow2": {**disk, "disk/guest.qcow2": qcow},
                        "random": {**disk, "disk/disk.img": RANDOM}}.items():
        lay = Layout(d / f"oci-{name}")
        lay.tag(lay.image([(layer_tar(files), "gzip")]), "v1")
        plain.push(lay.dir, "v1", f"pod/{name}")
        refs[name] = plain.ref(f"pod/{name}") + ":v1"
    lay = Layout(d / "oci-multi")
    amd = lay.image([(layer_tar({**disk, "disk/disk.img": RANDOM}), "gzip")], "amd64")
    arm = lay.image([(layer_tar({**disk, "disk/guest.qcow2": qcow}), "gzip")], "arm64")
    lay.tag(lay.index([(amd, "amd64"), (arm, "arm64")]), "v1")
    plain.push(lay.dir, "v1", "pod/multi", all_=True)
    refs["multi"] = plain.ref("pod/multi") + ":v1"
    lay = Layout(d / "oci-tls")
    lay.tag(lay.image([(layer_tar({**disk, "disk/guest.qcow2": qcow}), "gzip")]), "v1")
    tls.push(lay.dir, "v1", "pod/secure")
    refs["tls"] = tls.ref("pod/secure") + ":v1"
    return refs


def env_for(registry: Registries, endpoint: str, dst: Path | str, **extra: str) -> dict[str, str]:
    env = dict(IMPORTER_SOURCE="registry", IMPORTER_ENDPOINT=endpoint, DESTINATION=str(dst),
               OWNER_UID=UID, CDIMOVER_INSECURE_REGISTRIES=registry.plain.host,
               SCRATCH_DIR="/nonexistent-scratch", no_proxy="", NO_PROXY="",
               http_proxy="", https_proxy="")
    env.update(extra)
    return env


def cert_dir(tmp_path: Path, registry: Registries) -> Path:
    """IMPORTER_CERT_DIR as CDI mounts it: the TLS registry's CA."""
    assert registry.tls.ca is not None
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(registry.tls.ca.read_bytes())
    return certs


def sha_prefix(path: Path | str, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def test_pod_registry_qcow2_onto_a_directory(pod_images: dict[str, Any], registry: Registries,
                                             tmp_path: Path) -> None:
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, env_for(registry, pod_images["qcow2"], dst,
                                                      IMPORTER_IMAGE_SIZE="40Mi"))
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    disk = dst / "disk.img"
    assert os.path.getsize(disk) == 40 * MiB
    assert sha_prefix(disk, len(GUEST)) == pod_images["oracle"]
    assert os.stat(disk).st_blocks * 512 <= 5 * MiB        # 4 MiB of data; holes stay holes


def test_pod_registry_tls_basic_auth_onto_a_loop_device(
        pod_images: dict[str, Any], registry: Registries, tmp_path: Path,
        loopdev: Callable[..., str]) -> None:
    tls = registry.tls
    certs = cert_dir(tmp_path, registry)
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\xff" * (32 * MiB))
    dev = loopdev(backing)
    p, message = run_pod("import", tmp_path, env_for(
        registry, pod_images["tls"], dev, IMPORTER_ACCESS_KEY_ID=tls.user,
        IMPORTER_SECRET_KEY=tls.password, IMPORTER_CERT_DIR=str(certs)))
    assert p.returncode == 0, p.stderr
    assert json.loads(message)["message"] == "Import Complete"
    assert sha_prefix(dev, len(GUEST)) == pod_images["oracle"]   # zeros written over 0xff
    assert tls.password not in p.stdout + p.stderr + message
    # INSECURE_TLS: no CA needed (still HTTPS: the registry speaks nothing else)
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, env_for(
        registry, pod_images["tls"], dst, IMPORTER_ACCESS_KEY_ID=tls.user,
        IMPORTER_SECRET_KEY=tls.password, INSECURE_TLS="true"))
    assert p.returncode == 0, p.stderr
    assert sha_prefix(dst / "disk.img", len(GUEST)) == pod_images["oracle"]


def test_pod_registry_architecture_and_pinned_digest(pod_images: dict[str, Any],
                                                     registry: Registries,
                                                     tmp_path: Path) -> None:
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, env_for(
        registry, pod_images["multi"], dst, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="arm64"))
    assert p.returncode == 0, p.stderr
    assert sha_prefix(dst / "disk.img", len(GUEST)) == pod_images["oracle"]
    out = subprocess.run(["python3", "-m", "cdimover", "info", "--json", "--arch", "amd64",
                          "--insecure-registry", registry.plain.host, pod_images["multi"]],
                         check=True, capture_output=True, text=True).stdout
    digest = json.loads(out)["manifest_digest"]
    (dst / "disk.img").unlink()
    pinned = pod_images["multi"].rsplit(":", 1)[0] + "@" + digest
    p, message = run_pod("import", tmp_path, env_for(registry, pinned, dst))
    assert p.returncode == 0, p.stderr
    assert (dst / "disk.img").read_bytes() == RANDOM


def test_pod_registry_failures_are_one_line(pod_images: dict[str, Any], registry: Registries,
                                            tmp_path: Path) -> None:
    tls = registry.tls
    certs = cert_dir(tmp_path, registry)
    dst = tmp_path / "data"
    dst.mkdir()
    missing = pod_images["qcow2"].rsplit(":", 1)[0] + ":nosuchtag"
    for endpoint, extra, expected in [
            (missing, {}, "not found in the registry"),
            (pod_images["tls"], {"IMPORTER_ACCESS_KEY_ID": tls.user,
                                 "IMPORTER_SECRET_KEY": "wrong-secret",
                                 "IMPORTER_CERT_DIR": str(certs)},
             "refused the user and password"),
            (pod_images["tls"], {"IMPORTER_ACCESS_KEY_ID": tls.user,
                                 "IMPORTER_SECRET_KEY": "wrong-secret"}, "TLS"),
            (pod_images["qcow2"], {"IMPORTER_CHECKSUM": "sha256:" + "0" * 64},
             "verified by its digests"),
            ("http://example.invalid/x.img", {}, "IMPORTER_SOURCE=registry needs a docker://")]:
        p, message = run_pod("import", tmp_path, env_for(registry, endpoint, dst, **extra))
        assert p.returncode == 1, (endpoint, p.stderr)
        assert message.startswith("Unable to process data: "), message
        assert expected in message and "\n" not in message.strip(), message
        assert "wrong-secret" not in message + p.stderr
    assert os.listdir(dst) == []


def test_pod_registry_corrupted_layer(registry: Registries, tmp_path: Path) -> None:
    lay = Layout(tmp_path / "oci")
    desc = lay.image([(layer_tar({"disk": None, "disk/disk.img": RANDOM[:2 * MiB]}), "gzip")])
    lay.tag(desc, "v1")
    registry.plain.push(lay.dir, "v1", "pod/corrupt")
    manifest = json.loads((lay.dir / "blobs" / "sha256" / str(desc["digest"])[7:]).read_text())
    layer = manifest["layers"][0]["digest"]
    blob = registry.plain.blob_path(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x20
    blob.write_bytes(bytes(data))
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, env_for(
        registry, registry.plain.ref("pod/corrupt") + ":v1", dst))
    assert p.returncode == 1
    assert f"layer {layer} does not match its digest" in message, message
    assert os.listdir(dst) == []


def test_pod_registry_scratch(pod_images: dict[str, Any], registry: Registries,
                              tmp_path: Path) -> None:
    """A QCOW2 that cannot be converted within the memory bound: without a scratch volume the
    pod asks for one (CDI's scratchSpaceRequired, exit 0); with one it converts from there."""
    dst = tmp_path / "data"
    dst.mkdir()
    p, message = run_pod("import", tmp_path, env_for(registry, pod_images["qcow2"], dst),
                         "--mem-limit", "4096")
    assert p.returncode == 0, p.stderr
    doc = json.loads(message)
    assert doc["scratchSpaceRequired"] is True
    assert "scratch space required" in doc["message"]
    assert os.listdir(dst) == []
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = env_for(registry, pod_images["qcow2"], dst)
    env["SCRATCH_DIR"] = str(scratch)
    p, message = run_pod("import", tmp_path, env, "--mem-limit", "4096")
    assert p.returncode == 0, p.stderr
    assert json.loads(message)["message"] == "Import Complete"
    assert sha_prefix(dst / "disk.img", len(GUEST)) == pod_images["oracle"]
    assert list(scratch.iterdir()) == []


def test_pod_registry_progress_metric(pod_images: dict[str, Any], registry: Registries,
                                      tmp_path: Path, faultproxy: Callable[..., Any],
                                      popen: Callable[..., subprocess.Popen[str]]) -> None:
    """The blob arrives slowly (through a dripping proxy): the metric climbs, never falls,
    and ends at 100."""
    proxy = faultproxy(("127.0.0.1", registry.plain.port), then=drip(64 << 10, 128 << 10, 0.1))
    host = f"127.0.0.1:{proxy.port}"
    endpoint = pod_images["random"].replace(registry.plain.host, host)
    dst = tmp_path / "data"
    dst.mkdir()
    port = free_port()
    env = env_for(registry, endpoint, dst, CDIMOVER_INSECURE_REGISTRIES=host)
    proc = popen(pod_args("import", tmp_path, "--metrics-linger", "2",
                          metrics=f"127.0.0.1:{port}"), env)
    values = watch(proc, f"http://127.0.0.1:{port}/metrics",
                   "kubevirt_cdi_import_progress_total", until=lambda v: v >= 100)
    proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert values == sorted(values) and values[-1] == 100
    assert any(0 < v < 100 for v in values), values
    assert (dst / "disk.img").read_bytes() == RANDOM


def test_pod_registry_through_http_proxy(pod_images: dict[str, Any], registry: Registries,
                                         tmp_path: Path, rawhttp: Callable[..., Any]) -> None:
    """http_proxy as CDI sets it: the manifest and the blob both go through the proxy."""
    seen: list[str] = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def proxy(req: Request) -> Response:
        seen.append(req.path)           # absolute-form: the whole URL
        headers = {k: v for k, v in req.headers.items()
                   if k in ("accept", "range", "authorization")}
        try:
            resp = opener.open(urllib.request.Request(req.path, headers=headers), timeout=10)
        except urllib.error.HTTPError as e:
            resp = e
        with resp:
            out = {k: resp.headers[k] for k in ("Content-Type", "Content-Range",
                                                "Docker-Content-Digest") if resp.headers.get(k)}
            return Response(body=resp.read(), status=resp.status, headers=out)

    srv = rawhttp(proxy)
    dst = tmp_path / "data"
    dst.mkdir()
    env = env_for(registry, pod_images["random"], dst)
    env["http_proxy"] = srv.url("")
    p, message = run_pod("import", tmp_path, env)
    assert p.returncode == 0, p.stderr
    assert (dst / "disk.img").read_bytes() == RANDOM
    assert any("/manifests/" in s for s in seen) and any("/blobs/sha256:" in s for s in seen)
    assert all(s.startswith(f"http://{registry.plain.host}/v2/") for s in seen), seen
