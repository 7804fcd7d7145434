"""A real container registry for the registry-import tests, as pytest fixtures (registered by
conftest.py), and the images they push.

- `registry` (session): two `docker-registry serve` processes (the distribution project's
  registry, Debian's docker-registry) on 127.0.0.1 with ephemeral ports and storage in temp
  directories: one plain HTTP (reached as an insecure registry), one HTTPS (a throwaway CA from
  netfix.make_certs) with htpasswd basic auth (bcrypt, `htpasswd -B`).  Stopped by PID.
- `Image`: an OCI image layout written by the test (layer tars made with tarfile or GNU tar,
  gzip or zstd, a config, a manifest, index.json and oci-layout) and pushed with
  `skopeo copy`; a multi-arch index is pushed with `skopeo copy --all`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TOOL_ENV, need_tool
from netfix import HOST, free_port, make_certs, stop_process, wait_port

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER + "+gzip", "zstd": OCI_LAYER + "+zstd"}


@dataclass
class Registry:
    """One registry process: its address, storage root and (TLS) credentials."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    tls: bool
    user: str = ""
    password: str = ""
    ca: Path | None = None

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    def ref(self, repo: str) -> str:
        return f"docker://{self.host}/{repo}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def push(self, layout: Path, tag: str, repo: str, *, all_: bool = False) -> None:
        args = ["skopeo", "copy", "-q", "--insecure-policy"]
        if all_:
            args.append("--all")
        if self.tls:
            args += ["--dest-cert-dir", str(self.ca.parent) if self.ca else "",
                     "--dest-creds", f"{self.user}:{self.password}"]
        else:
            args += ["--dest-tls-verify=false"]
        args += [f"oci:{layout}:{tag}", f"docker://{self.host}/{repo}:{tag}"]
        subprocess.run(args, env=TOOL_ENV, check=True, capture_output=True, timeout=120)


def _config(d: Path, *, tls: bool, port: int, htpasswd: Path | None) -> Path:
    lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {d / 'data'}",
             "http:", f"  addr: {HOST}:{port}", f"  secret: {secrets.token_hex(16)}"]
    if tls:
        lines += ["  tls:", f"    certificate: {d / 'server.pem'}",
                  f"    key: {d / 'server.key'}",
                  "auth:", "  htpasswd:", "    realm: cdimover-test", f"    path: {htpasswd}"]
    (d / "config.yml").write_text("\n".join(lines) + "\n")
    return d / "config.yml"


def _start(d: Path, *, tls: bool, htpasswd: Path | None) -> tuple[int, subprocess.Popen[bytes]]:
    for _ in range(5):
        port = free_port()
        cfg = _config(d, tls=tls, port=port, htpasswd=htpasswd)
        with open(d / "stderr.log", "wb") as err:
            proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], env=TOOL_ENV,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        if wait_port(port, lambda: proc.poll() is None):
            return port, proc
        stop_process(proc)
    raise RuntimeError(f"docker-registry did not start: {(d / 'stderr.log').read_text()}")


@dataclass
class Registries:
    plain: Registry
    tls: Registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    need_tool("docker-registry")
    need_tool("skopeo")
    need_tool("htpasswd")
    need_tool("openssl")
    d1 = tmp_path_factory.mktemp("registry-plain")
    d2 = tmp_path_factory.mktemp("registry-tls")
    make_certs(d2)
    user, password = "cdi", secrets.token_urlsafe(12)
    subprocess.run(["htpasswd", "-B", "-b", "-c", str(d2 / "htpasswd"), user, password],
                   env=TOOL_ENV, check=True, capture_output=True)
    # skopeo's --dest-cert-dir takes *.crt as CAs
    (d2 / "certs").mkdir()
    (d2 / "certs" / "ca.crt").write_bytes((d2 / "ca.pem").read_bytes())
    procs = []
    try:
        p1, proc1 = _start(d1, tls=False, htpasswd=None)
        procs.append(proc1)
        p2, proc2 = _start(d2, tls=True, htpasswd=d2 / "htpasswd")
        procs.append(proc2)
        yield Registries(
            plain=Registry(p1, d1 / "data", proc1, False),
            tls=Registry(p2, d2 / "data", proc2, True, user, password,
                         d2 / "certs" / "ca.crt"))
    finally:
        for p in procs:
            stop_process(p)


# ---- images ------------------------------------------------------------------------------

def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, 1, mtime=0)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-1", "-c"], input=data, check=True,
                              capture_output=True).stdout
    return data


def layer_tar(files: dict[str, bytes | None], *, sparse_from: Path | None = None) -> bytes:
    """A layer: NAME -> content (None: a directory), in order; SPARSE_FROM: a directory
    archived with GNU tar --sparse (pax) instead."""
    if sparse_from is not None:
        return subprocess.run(["tar", "-C", str(sparse_from), "--sparse", "--format=pax",
                               "-cf", "-", "."], check=True, capture_output=True).stdout
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 107
            info.mtime = 0
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


class Layout:
    """An OCI image layout under DIR: blobs written as they are added."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        (d / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.dir / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def image(self, layers: list[tuple[bytes, str]], arch: str = "amd64") -> dict[str, object]:
        """A manifest over LAYERS ((tar bytes, compression), base first): its descriptor."""
        descs, diff_ids = [], []
        for tar, how in layers:
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
            descs.append({"mediaType": MEDIA[how], **self.blob(compress(tar, how))})
        config = json.dumps({"architecture": arch, "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               **self.blob(config)},
                    "layers": descs}
        return {"mediaType": manifest["mediaType"],
                **self.blob(json.dumps(manifest).encode())}

    def index(self, images: list[tuple[dict[str, object], str]]) -> dict[str, object]:
        """An image index over (manifest descriptor, arch) pairs: its descriptor."""
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{**desc, "platform": {"os": "linux", "architecture": arch,
                                                   **({"variant": "v8"} if arch == "arm64"
                                                      else {})}}
                             for desc, arch in images]}
        return {"mediaType": doc["mediaType"], **self.blob(json.dumps(doc).encode())}

    def tag(self, desc: dict[str, object], tag: str) -> None:
        index_path = self.dir / "index.json"
        doc = {"schemaVersion": 2, "manifests": []}
        if index_path.exists():
            doc = json.loads(index_path.read_text())
        doc["manifests"].append({**desc, "annotations": {
            "org.opencontainers.image.ref.name": tag}})
        index_path.write_text(json.dumps(doc))


def wait_ready(reg: Registry, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("registry not ready")


