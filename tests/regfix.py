"""A real container registry for the registry-import tests, as pytest fixtures (registered by
conftest.py), and the images they push.

- `registry` (session): two `docker-registry serve` processes (the distribution project's
  registry, Debian's docker-registry) on 127.0.0.1 with ephemeral ports and storage in temp
  directories: one plain HTTP (reached as an insecure registry), one HTTPS (a throwaway CA from
  netfix.make_certs) with htpasswd basic auth (bcrypt, `htpasswd -B`).  Stopped by PID.
- `token_registry` (session): a third registry in the token mode (`auth.token`, plain HTTP)
  with its token endpoint, `TokenServer`: a thread of this process that checks basic
  credentials and signs JWTs (RS256 through `openssl dgst`, the certificate in the x5c
  header and in the registry's rootcertbundle); tests shorten the tokens' lives.
- `Image`: an OCI image layout written by the test (layer tars made with tarfile or GNU tar,
  gzip or zstd, a config, a manifest, index.json and oci-layout) and pushed with
  `skopeo copy`; a multi-arch index is pushed with `skopeo copy --all`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import secrets
import subprocess
import tarfile
import threading
import time
import urllib.parse
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
            args += ["--dest-cert-dir", str(self.ca.parent) if self.ca else ""]
        else:
            args += ["--dest-tls-verify=false"]
        if self.user:
            args += ["--dest-creds", f"{self.user}:{self.password}"]
        args += [f"oci:{layout}:{tag}", f"docker://{self.host}/{repo}:{tag}"]
        subprocess.run(args, env=TOOL_ENV, check=True, capture_output=True, timeout=120)


def _config(d: Path, *, tls: bool, port: int, htpasswd: Path | None,
            auth: list[str] | None = None) -> Path:
    lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {d / 'data'}",
             "http:", f"  addr: {HOST}:{port}", f"  secret: {secrets.token_hex(16)}"]
    if tls:
        lines += ["  tls:", f"    certificate: {d / 'server.pem'}",
                  f"    key: {d / 'server.key'}",
                  "auth:", "  htpasswd:", "    realm: cdimover-test", f"    path: {htpasswd}"]
    if auth:
        lines += ["auth:", *auth]
    (d / "config.yml").write_text("\n".join(lines) + "\n")
    return d / "config.yml"


def _start(d: Path, *, tls: bool, htpasswd: Path | None,
           auth: list[str] | None = None) -> tuple[int, subprocess.Popen[bytes]]:
    for _ in range(5):
        port = free_port()
        cfg = _config(d, tls=tls, port=port, htpasswd=htpasswd, auth=auth)
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


def need_registry_tools(*more: str) -> None:
    for tool in ("docker-registry", "skopeo", "openssl", *more):
        need_tool(tool)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    need_registry_tools("htpasswd")
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


# ---- token authentication ------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token endpoint for the registry's token auth, in a thread on 127.0.0.1: basic
    credentials checked (401 otherwise), the scope asked for granted, JWTs signed RS256 by
    `openssl dgst` with a key and self-signed certificate made here (the certificate goes in
    the token's x5c header and is the registry's rootcertbundle).

    `lifetime` (seconds) is how long the next tokens stay valid; the registry grants 60 s of
    leeway past `exp`, so shorter lives are made by back-dating `exp`.  `expires_in` in the
    answer always says 300 (a token that runs out early, as after clock skew).  `issued`
    counts the tokens handed out, `refused` the requests refused."""

    SERVICE = "cdimover-registry"
    ISSUER = "cdimover-token-issuer"
    LEEWAY = 60

    def __init__(self, d: Path, user: str, password: str) -> None:
        self.dir, self.user, self.password = d, user, password
        self.key, self.cert = d / "token.key", d / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(self.key), "-out", str(self.cert), "-days", "2", "-subj",
                        "/CN=cdimover-token-issuer"], env=TOOL_ENV, check=True,
                       capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             env=TOOL_ENV, check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.lifetime: float = 300.0
        self.issued = 0
        self.refused = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.answer(self)

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://{HOST}:{self.port}/token"

    def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing.encode(), env=TOOL_ENV, check=True,
                             capture_output=True).stdout
        return f"{signing}.{_b64url(sig)}"

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if h.headers.get("Authorization") != want:
            with self._lock:
                self.refused += 1
            h.send_response(401)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        with self._lock:
            self.issued += 1
            lifetime = self.lifetime
        exp = now + lifetime if lifetime >= self.LEEWAY else now - self.LEEWAY + lifetime
        token = self.sign({"iss": self.ISSUER, "sub": self.user, "aud": self.SERVICE,
                           "exp": int(exp), "nbf": now - 5, "iat": now - 5,
                           "jti": secrets.token_hex(8), "access": access})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@dataclass
class TokenRegistry:
    registry: Registry
    tokens: TokenServer


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """A plain-HTTP registry with token auth, and its token endpoint (TokenServer)."""
    need_registry_tools()
    d = tmp_path_factory.mktemp("registry-token")
    tokens = TokenServer(d, "cdi", secrets.token_urlsafe(12))
    proc = None
    try:
        port, proc = _start(d, tls=False, htpasswd=None, auth=[
            "  token:", f"    realm: {tokens.realm}", f"    service: {tokens.SERVICE}",
            f"    issuer: {tokens.ISSUER}", f"    rootcertbundle: {tokens.cert}"])
        yield TokenRegistry(Registry(port, d / "data", proc, False, tokens.user,
                                     tokens.password), tokens)
    finally:
        if proc is not None:
            stop_process(proc)
        tokens.close()


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


