"""Registry imports against a real registry (docker-registry) holding images pushed by skopeo
from OCI layouts written here: RAW and QCOW2 disks in gzip and zstd layers, a multi-arch
index, a disk replaced in an upper layer, whiteouts, two files, none, a subdirectory, a
sparse member, a corrupted blob, TLS with basic auth.  Oracle: the disk file itself (RAW) or
qemu-img convert of it (QCOW2); sha256 and allocation of the target."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdimover.errors import AuthenticationError, ChecksumMismatchError, ImageFormatError, \
    TlsError
from cdimover.io.registry import parse_reference
from cdimover.ops.registry import import_registry
from conftest import TOOL_ENV
from regfix import Layout, Registries, layer_tar

MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    """A disk with data in some MiB and zeros in others."""
    out = bytearray(size)
    for i in range(0, size, MiB):
        if (i // MiB + seed) % 3 != 1:
            chunk = hashlib.sha256(f"{seed}:{i}".encode()).digest() * (MiB // 32)
            out[i:i + MiB] = chunk[:min(MiB, size - i)]
    return bytes(out)


RAW_A = pattern(6 * MiB, 1)
RAW_B = pattern(5 * MiB, 2)
RAW_C = pattern(4 * MiB, 3)


@pytest.fixture(scope="module")
def images(registry: Registries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Every test image, pushed once: name -> docker:// reference (plain registry)."""
    d = tmp_path_factory.mktemp("images")
    qcow = d / "a.qcow2"
    (d / "a.raw").write_bytes(RAW_A)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(d / "a.raw"),
                    str(qcow)], env=TOOL_ENV, check=True)
    sparse_dir = d / "sparse"
    (sparse_dir / "disk").mkdir(parents=True)
    with open(sparse_dir / "disk" / "sparse.img", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(RAW_C[:MiB])
        f.seek(15 * MiB)
        f.write(b"end")
    disk = {"disk": None}
    specs: dict[str, list[tuple[bytes, str]]] = {
        "raw-gzip": [(layer_tar({**disk, "disk/disk.img": RAW_A}), "gzip")],
        "raw-zstd": [(layer_tar({**disk, "disk/disk.img": RAW_A}), "zstd")],
        "raw-plain": [(layer_tar({**disk, "disk/disk.img": RAW_A}), "none")],
        "qcow2-gzip": [(layer_tar({**disk, "disk/disk.qcow2": qcow.read_bytes()}), "gzip")],
        "replaced": [(layer_tar({**disk, "disk/old.img": RAW_B}), "gzip"),
                     (layer_tar({"etc": None, "etc/motd": b"hi"}), "gzip"),
                     (layer_tar({**disk, "disk/.wh.old.img": b"", "disk/new.img": RAW_A}),
                      "zstd")],
        "whiteout": [(layer_tar({**disk, "disk/disk.img": RAW_B}), "gzip"),
                     (layer_tar({".wh.disk": b""}), "gzip")],
        "file-whiteout": [(layer_tar({**disk, "disk/disk.img": RAW_B}), "gzip"),
                          (layer_tar({**disk, "disk/.wh.disk.img": b""}), "gzip")],
        "below": [(layer_tar({**disk, "disk/disk.img": RAW_B}), "gzip"),
                  (layer_tar({"etc": None, "etc/motd": b"hi"}), "gzip")],
        "two-files": [(layer_tar({**disk, "disk/a.img": RAW_A, "disk/b.img": RAW_B}), "gzip")],
        "none": [(layer_tar({"etc": None, "etc/motd": b"hi"}), "gzip")],
        "subdir": [(layer_tar({**disk, "disk/sub": None, "disk/sub/x.img": RAW_B}), "gzip")],
        "sparse": [(layer_tar({}, sparse_from=sparse_dir), "gzip")],
        "corrupt": [(layer_tar({**disk, "disk/disk.img": RAW_C}), "gzip")],
    }
    plain, tls = registry.plain, registry.tls
    refs = {}
    for name, layers in specs.items():
        lay = Layout(d / f"oci-{name}")
        lay.tag(lay.image(layers), "v1")
        plain.push(lay.dir, "v1", f"disks/{name}")
        refs[name] = plain.ref(f"disks/{name}") + ":v1"
    lay = Layout(d / "oci-multi")
    amd = lay.image([(layer_tar({**disk, "disk/disk.img": RAW_A}), "gzip")], "amd64")
    arm = lay.image([(layer_tar({**disk, "disk/disk.img": RAW_B}), "gzip")], "arm64")
    lay.tag(lay.index([(amd, "amd64"), (arm, "arm64")]), "v1")
    plain.push(lay.dir, "v1", "disks/multi", all_=True)
    refs["multi"] = plain.ref("disks/multi") + ":v1"
    lay = Layout(d / "oci-tls")
    lay.tag(lay.image([(layer_tar({**disk, "disk/disk.img": RAW_A}), "gzip")]), "v1")
    tls.push(lay.dir, "v1", "disks/secure")
    refs["tls"] = tls.ref("disks/secure") + ":v1"
    yield refs


def run(ref: str, target: Path, registry: Registries, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("insecure_registries", (registry.plain.host,))
    kw.setdefault("capacity", 64 * MiB)
    return import_registry(ref, target, **kw)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(p: Path) -> str:
    return sha(p.read_bytes())


@pytest.mark.parametrize("name", ["raw-gzip", "raw-zstd", "raw-plain"])
def test_raw(images: dict[str, str], registry: Registries, tmp_path: Path, name: str) -> None:
    t = tmp_path / "t.img"
    r = run(images[name], t, registry)
    assert file_sha(t) == sha(RAW_A)
    assert r.source_format == "raw" and r.member == "disk/disk.img"
    assert r.layers_pulled == 1
    # (skopeo compresses an uncompressed layer when it pushes it)
    assert r.compression == {"raw-gzip": "gzip", "raw-zstd": "zstd", "raw-plain": "gzip"}[name]
    # exactly the layer's bytes were pulled, once
    assert r.bytes_fetched == registry.plain.blob_path(r.layer).stat().st_size
    # zeros stay holes
    assert os.stat(t).st_blocks * 512 < len(RAW_A)


def test_qcow2(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    t = tmp_path / "t.img"
    r = run(images["qcow2-gzip"], t, registry)
    assert r.source_format == "qcow2"
    assert file_sha(t) == sha(RAW_A)


def test_qcow2_beyond_the_memory_bound(images: dict[str, str], registry: Registries,
                                       tmp_path: Path) -> None:
    from cdimover.errors import UnsupportedImageError

    t = tmp_path / "t"
    with pytest.raises(UnsupportedImageError, match="memory limit"):
        run(images["qcow2-gzip"], t, registry, mem_limit=4096)
    assert not t.exists()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = run(images["qcow2-gzip"], t, registry, mem_limit=4096, scratch_dir=str(scratch))
    assert r.strategy == "scratch" and r.source_format == "qcow2"
    assert file_sha(t) == sha(RAW_A)
    assert list(scratch.iterdir()) == []        # the scratch copy is removed
    assert r.layers_pulled == 1 and r.member == "disk/disk.qcow2"


def test_multi_arch(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    r = run(images["multi"], tmp_path / "a", registry, arch="amd64")
    assert file_sha(tmp_path / "a") == sha(RAW_A) and r.platform == "linux/amd64"
    r = run(images["multi"], tmp_path / "b", registry, arch="arm64")
    assert file_sha(tmp_path / "b") == sha(RAW_B) and r.platform == "linux/arm64/v8"
    with pytest.raises(ImageFormatError, match="no image for linux/s390x"):
        run(images["multi"], tmp_path / "c", registry, arch="s390x")


def test_pinned_digest(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    first = run(images["raw-gzip"], tmp_path / "a", registry)
    ref = images["raw-gzip"].rsplit(":", 1)[0] + "@" + first.manifest_digest
    r = run(ref, tmp_path / "b", registry)
    assert r.manifest_digest == first.manifest_digest
    assert file_sha(tmp_path / "b") == sha(RAW_A)


def test_upper_layer_replaces(images: dict[str, str], registry: Registries,
                              tmp_path: Path) -> None:
    r = run(images["replaced"], tmp_path / "t", registry)
    assert r.member == "disk/new.img" and r.layers_pulled == 1
    assert file_sha(tmp_path / "t") == sha(RAW_A)


def test_disk_in_lower_layer(images: dict[str, str], registry: Registries,
                             tmp_path: Path) -> None:
    r = run(images["below"], tmp_path / "t", registry)
    assert r.layers_pulled == 2
    assert file_sha(tmp_path / "t") == sha(RAW_B)


@pytest.mark.parametrize("name,match", [
    ("whiteout", "no disk file"), ("file-whiteout", "no disk file"),
    ("none", "no disk file"), ("two-files", "disk/a.img.*disk/b.img"),
    ("subdir", "sub/x.img")])
def test_no_single_disk(images: dict[str, str], registry: Registries, tmp_path: Path,
                        name: str, match: str) -> None:
    t = tmp_path / "t"
    with pytest.raises(ImageFormatError, match=match):
        run(images[name], t, registry)
    assert not t.exists()


def test_sparse_member(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    t = tmp_path / "t"
    run(images["sparse"], t, registry)
    want = bytearray(16 * MiB)
    want[3 * MiB:4 * MiB] = RAW_C[:MiB]
    want[15 * MiB:15 * MiB + 3] = b"end"
    assert file_sha(t) == sha(bytes(want))
    assert os.stat(t).st_blocks * 512 <= 3 * MiB


def test_corrupt_blob(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    from cdimover.io.registry import RegistryClient
    ref = parse_reference(images["corrupt"])
    layer = RegistryClient(ref, plain_http=True).resolve("amd64").layers[0]
    path = registry.plain.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    t = tmp_path / "t"
    # the gzip decoder stumbles over the flipped bit first; the digest is named as the cause
    with pytest.raises(ChecksumMismatchError, match=rf"layer {layer.digest} does not match its "
                       r"digest: the \d+ bytes received have digest [0-9a-f]{64}.*decoding "
                       r"stopped at a corrupted byte"):
        run(images["corrupt"], t, registry)
    assert not t.exists()
    # a blob cut short (and a byte changed in the last block): the digest, not the truncation
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(ChecksumMismatchError, match="does not match its digest"):
        run(images["corrupt"], t, registry)
    assert not t.exists()


def test_tls_basic_auth(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    tls = registry.tls
    assert tls.ca is not None
    r = run(images["tls"], tmp_path / "t", registry, auth=(tls.user, tls.password),
            ca=str(tls.ca))
    assert file_sha(tmp_path / "t") == sha(RAW_A) and r.layers_pulled == 1
    with pytest.raises(AuthenticationError):
        run(images["tls"], tmp_path / "u", registry, auth=(tls.user, "wrong"), ca=str(tls.ca))
    with pytest.raises(TlsError):
        run(images["tls"], tmp_path / "v", registry, auth=(tls.user, tls.password))


def test_loop_device(images: dict[str, str], registry: Registries, loopdev,  # type: ignore[no-untyped-def]
                     tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(b"\xff" * 8 * MiB)
    dev = loopdev(backing)
    run(images["raw-gzip"], dev, registry, capacity=None)
    with open(dev, "rb") as f:
        assert sha(f.read(len(RAW_A))) == sha(RAW_A)   # zeros written over the 0xff too


def test_parse_reference() -> None:
    r = parse_reference("docker://127.0.0.1:5000/a/b:v1")
    assert (r.registry, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "a/b", "v1", None)
    r = parse_reference("docker://quay.io/x/y@sha256:" + "0" * 64)
    assert r.reference == "sha256:" + "0" * 64
    r = parse_reference("docker://fedora")
    assert (r.registry, r.repository, r.tag) == ("registry-1.docker.io", "library/fedora",
                                                 "latest")
    for bad in ("docker://h:1/UPPER", "docker://h:1/x@sha256:12", "http://x/y",
                "docker://h:1/x:bad tag"):
        with pytest.raises(ValueError):
            parse_reference(bad)


def test_cli(images: dict[str, str], registry: Registries, tmp_path: Path) -> None:
    import json
    import sys
    env = {**os.environ, "CDIMOVER_INSECURE_REGISTRIES": registry.plain.host}
    out = subprocess.run([sys.executable, "-m", "cdimover", "info", "--json", "--arch", "arm64",
                          images["multi"]], env=env, check=True, capture_output=True,
                         text=True).stdout
    doc = json.loads(out)
    assert doc["platform"] == "linux/arm64/v8" and len(doc["layers"]) == 1
    t = tmp_path / "t"
    out = subprocess.run([sys.executable, "-m", "cdimover", "import", "--json", "--capacity",
                          "64M", "--insecure-registry", registry.plain.host, images["raw-zstd"],
                          str(t)], env=env, check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["member"] == "disk/disk.img"
    assert file_sha(t) == sha(RAW_A)
