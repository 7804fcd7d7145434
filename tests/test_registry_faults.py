"""Registry pulls under faults, against the real registry (docker-registry): token auth with a
token endpoint written here (regfix.TokenServer), a token that runs out in the middle of a
blob download, wrong credentials, a manifest whose bytes do not match the digest announced
or pinned (served through a small rewriting proxy), a connection cut mid-blob (resumed with
Range, nothing fetched twice), a blob redirected to another origin (no token sent there).
Oracle: the disk's bytes."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cdimover
from cdimover.errors import AuthenticationError, ImageFormatError
from cdimover.ops.registry import import_registry
from netfix import PASS, Request, Response, cut
from regfix import Layout, Registries, Registry, TokenRegistry, layer_tar

MiB = 1 << 20
BIG = os.urandom(8 * MiB)       # random: the gzip layer is about as large as the disk


def push_big(reg: Registry, d: Path, repo: str) -> str:
    lay = Layout(d)
    lay.tag(lay.image([(layer_tar({"disk": None, "disk/disk.img": BIG}), "gzip")]), "v1")
    reg.push(lay.dir, "v1", repo)
    return f"{repo}:v1"


@pytest.fixture(scope="module")
def plain_big(registry: Registries, tmp_path_factory: pytest.TempPathFactory) -> str:
    return push_big(registry.plain, tmp_path_factory.mktemp("oci-big"), "faults/big")


@pytest.fixture(scope="module")
def token_big(token_registry: TokenRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    return push_big(token_registry.registry, tmp_path_factory.mktemp("oci-token"), "faults/big")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pull(host: str, repo: str, target: Path, **kw: Any) -> Any:
    return import_registry(f"docker://{host}/{repo}", target, insecure_registries=(host,),
                           capacity=64 * MiB, arch="amd64", **kw)


def test_token_auth(token_registry: TokenRegistry, token_big: str, tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    tokens.lifetime = 300
    before = tokens.issued
    r = pull(reg.host, token_big, tmp_path / "t", auth=(reg.user, reg.password))
    assert sha((tmp_path / "t").read_bytes()) == sha(BIG)
    assert tokens.issued - before == 1          # one token for the manifest and the blob
    assert r.bytes_fetched == reg.blob_path(r.layer).stat().st_size
    refused = tokens.refused
    with pytest.raises(AuthenticationError, match="token endpoint answered 401"):
        pull(reg.host, token_big, tmp_path / "u", auth=(reg.user, "wrong-password"))
    with pytest.raises(AuthenticationError, match="token endpoint answered 401"):
        pull(reg.host, token_big, tmp_path / "v")
    assert tokens.refused == refused + 2
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_token_expires_mid_blob(token_registry: TokenRegistry, token_big: str,
                                faultproxy: Callable[..., Any], tmp_path: Path) -> None:
    """The token lives 4 s; the blob's connection is cut after 1 MiB and a 6 s pause: the
    resumed request is answered 401, a new token is fetched and the download goes on from
    where it broke."""
    reg, tokens = token_registry.registry, token_registry.tokens
    # connections: manifest (401), manifest (token), blob (cut), blob resumed
    proxy = faultproxy(("127.0.0.1", reg.port), [PASS, PASS, cut(MiB, pause=6.0)])
    tokens.lifetime = 4
    before = tokens.issued
    try:
        r = pull(f"127.0.0.1:{proxy.port}", token_big, tmp_path / "t",
                 auth=(reg.user, reg.password))
    finally:
        tokens.lifetime = 300
    assert sha((tmp_path / "t").read_bytes()) == sha(BIG)
    conns = proxy.wait_done(4)
    assert conns[2].fired and conns[2].to_client >= MiB
    assert tokens.issued - before == 2          # the first, and one after the 401
    assert r.retries >= 1
    layer_size = reg.blob_path(r.layer).stat().st_size
    assert r.bytes_fetched == layer_size        # resumed, not restarted
    assert conns[3].to_client < layer_size


def test_cut_mid_blob_resumes(registry: Registries, plain_big: str,
                              faultproxy: Callable[..., Any], tmp_path: Path) -> None:
    reg = registry.plain
    # connections: manifest, blob (cut twice), the rest pass
    proxy = faultproxy(("127.0.0.1", reg.port), [PASS, cut(2 * MiB), cut(MiB)])
    r = pull(f"127.0.0.1:{proxy.port}", plain_big, tmp_path / "t")
    assert sha((tmp_path / "t").read_bytes()) == sha(BIG)
    layer_size = reg.blob_path(r.layer).stat().st_size
    assert r.retries == 2
    assert r.bytes_fetched == layer_size


def rewriting_proxy(reg: Registry, tamper: Callable[[Request, bytes, dict[str, str]], bytes]
                    ) -> Callable[[Request], Response]:
    """A registry front that forwards every request to REG and lets TAMPER change the body
    (and headers) of its answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def handle(req: Request) -> Response:
        headers = {k: v for k, v in req.headers.items()
                   if k in ("accept", "range", "authorization")}
        up = urllib.request.Request(f"http://{reg.host}{req.path}", headers=headers,
                                    method=req.method)
        try:
            resp = opener.open(up, timeout=10)
        except urllib.error.HTTPError as e:
            resp = e
        with resp:
            body = resp.read()
            out = {k: resp.headers[k] for k in ("Content-Type", "Content-Range",
                                                "Docker-Content-Digest", "WWW-Authenticate")
                   if resp.headers.get(k)}
            status = resp.status
        body = tamper(req, body, out)
        return Response(body=body, status=status, headers=out)

    return handle


def test_manifest_digest_mismatch(registry: Registries, plain_big: str,
                                  rawhttp: Callable[..., Any], tmp_path: Path) -> None:
    reg = registry.plain
    good = pull(reg.host, plain_big, tmp_path / "ok")

    def add_space(req: Request, body: bytes, headers: dict[str, str]) -> bytes:
        return body + b" " if "/manifests/" in req.path else body     # still valid JSON

    def add_space_no_digest(req: Request, body: bytes, headers: dict[str, str]) -> bytes:
        headers.pop("Docker-Content-Digest", None)
        return add_space(req, body, headers)

    # a tag: the registry's Docker-Content-Digest no longer matches the bytes
    srv = rawhttp(rewriting_proxy(reg, add_space))
    host = f"127.0.0.1:{srv.port}"
    with pytest.raises(ImageFormatError, match=f"manifest's sha256 is sha256:[0-9a-f]{{64}}, "
                       f"the registry announced {good.manifest_digest}"):
        pull(host, plain_big, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    # a pinned digest: checked against the reference even when no digest is announced
    srv = rawhttp(rewriting_proxy(reg, add_space_no_digest))
    host = f"127.0.0.1:{srv.port}"
    pinned = plain_big.split(":")[0] + "@" + good.manifest_digest
    with pytest.raises(ImageFormatError, match=f"announced {good.manifest_digest}"):
        pull(host, pinned, tmp_path / "u")
    assert not (tmp_path / "u").exists()
    # the same front with the bytes untouched: accepted
    srv = rawhttp(rewriting_proxy(reg, lambda req, body, headers: body))
    r = pull(f"127.0.0.1:{srv.port}", pinned, tmp_path / "v")
    assert r.manifest_digest == good.manifest_digest
    assert sha((tmp_path / "v").read_bytes()) == sha(BIG)
    # every request, the manifest's (urllib) and the blob's (libcurl), names cdimover
    assert {r.headers.get("user-agent") for r in srv.requests} == {
        f"cdimover/{cdimover.__version__}"}
    assert any("/manifests/" in r.path for r in srv.requests)
    assert any("/blobs/" in r.path for r in srv.requests)


def test_blob_redirect_gets_no_credentials(token_registry: TokenRegistry, token_big: str,
                                           rawhttp: Callable[..., Any], tmp_path: Path) -> None:
    """A registry that sends blobs to object storage (307 to another origin): the token goes
    to the registry only, never to the storage host."""
    reg, tokens = token_registry.registry, token_registry.tokens
    tokens.lifetime = 300
    storage_seen: list[Request] = []

    def storage(req: Request) -> Response:
        storage_seen.append(req)
        digest = req.path.rsplit("/", 1)[-1]
        return Response(body=reg.blob_path(digest).read_bytes())

    store = rawhttp(storage)
    front_seen: list[Request] = []

    forward = rewriting_proxy(reg, lambda req, body, headers: body)

    def front(req: Request) -> Response:
        front_seen.append(req)
        if "/blobs/" in req.path and "authorization" in req.headers:
            digest = req.path.rsplit("/", 1)[-1]
            return Response(status=307, headers={"Location": store.url(f"/store/{digest}")})
        return forward(req)

    srv = rawhttp(front)
    r = pull(f"127.0.0.1:{srv.port}", token_big, tmp_path / "t", auth=(reg.user, reg.password))
    assert sha((tmp_path / "t").read_bytes()) == sha(BIG)
    assert r.bytes_fetched == reg.blob_path(r.layer).stat().st_size
    assert any("/blobs/" in q.path and "authorization" in q.headers for q in front_seen)
    assert storage_seen and all("authorization" not in q.headers for q in storage_seen)
