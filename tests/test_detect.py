"""The one format probe: every container made by its own tool (qemu-img, gzip, xz, zstd,
bzip2, tar) is recognised by detect() and refused by every entry point (inspect, convert,
copy, the CLI's info/convert/copy, the pod importer) with UnsupportedImageError naming the
format; RAW, ISO 9660 and QCOW2 are not containers; random bytes are RAW."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cdimover
from cdimover import ImageFormatError, UnsupportedImageError
from cdimover.io import detect as detect_mod
from cdimover.cli import main
from cdimover.io.detect import FORMATS, HEAD_SIZE, Detected, detect, detect_path
from conftest import TOOL_ENV, need_tool, qemu_img_create
from layouts import sha256_file as sha256

MiB = 1 << 20



def _run(*args: str | Path, **kw: object) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, env=TOOL_ENV,
                   **kw)  # type: ignore[call-overload]


def _raw_payload(path: Path) -> Path:
    """A 1 MiB RAW disk with data that is neither zero nor a known magic."""
    data = bytearray(MiB)
    data[512:4096] = b"payload " * 448
    data[600 * 1024:601 * 1024] = os.urandom(1024)
    path.write_bytes(bytes(data))
    return path


def _qemu_create(d: Path, fmt: str, name: str, *opts: str) -> Path:
    out = d / name
    _run(need_tool("qemu-img"), "create", "-q", "-f", fmt, *opts, out, "1M")
    return out


def _luks(d: Path) -> Path:
    out = d / "d.luks"
    qemu_img_create([need_tool("qemu-img"), "create", "-q", "-f", "luks", "--object",
                     "secret,id=s,data=x", "-o", "key-secret=s,iter-time=10", str(out), "1M"])
    return out


def _compressed(d: Path, tool: str, suffix: str) -> Path:
    raw = _raw_payload(d / f"payload-{tool}.raw")
    out = Path(f"{raw}{suffix}")
    if tool == "zstd":
        _run(need_tool(tool), "-q", "-k", raw, "-o", out)
    else:
        _run(need_tool(tool), "-k", "-q", raw)
    return out


def _tar(d: Path) -> Path:
    raw = _raw_payload(d / "payload-tar.raw")
    out = d / "disk.tar"
    _run(need_tool("tar"), "-C", d, "-cf", out, raw.name)
    return out


# format -> (maker, expected detected format)
CONTAINERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "vmdk": (lambda d: _qemu_create(d, "vmdk", "d.vmdk"), "vmdk"),
    "vmdk-descriptor": (lambda d: _qemu_create(d, "vmdk", "flat.vmdk", "-o",
                                               "subformat=monolithicFlat"), "vmdk"),
    "vhd-dynamic": (lambda d: _qemu_create(d, "vpc", "d.vhd"), "vhd"),
    "vhd-fixed": (lambda d: _qemu_create(d, "vpc", "fixed.vhd", "-o", "subformat=fixed"),
                  "vhd"),
    "vhdx": (lambda d: _qemu_create(d, "vhdx", "d.vhdx"), "vhdx"),
    "vdi": (lambda d: _qemu_create(d, "vdi", "d.vdi"), "vdi"),
    "qed": (lambda d: _qemu_create(d, "qed", "d.qed"), "qed"),
    "qcow1": (lambda d: _qemu_create(d, "qcow", "d.qcow"), "qcow"),
    "parallels": (lambda d: _qemu_create(d, "parallels", "d.parallels"), "parallels"),
    "luks": (_luks, "luks"),
    "gzip": (lambda d: _compressed(d, "gzip", ".gz"), "gzip"),
    "xz": (lambda d: _compressed(d, "xz", ".xz"), "xz"),
    "zstd": (lambda d: _compressed(d, "zstd", ".zst"), "zstd"),
    "bzip2": (lambda d: _compressed(d, "bzip2", ".bz2"), "bzip2"),
    "tar": (_tar, "tar"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """Factory: images(name) -> the container NAME of CONTAINERS, made once per module."""
    d = tmp_path_factory.mktemp("containers")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = CONTAINERS[name][0](d)
        return made[name]

    yield get


@pytest.fixture(scope="module")
def qcow2_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qemu_img, qemu_io = need_tool("qemu-img"), need_tool("qemu-io")
    img = tmp_path_factory.mktemp("qcow2") / "disk.qcow2"
    _run(qemu_img, "create", "-q", "-f", "qcow2", img, "4M")
    _run(qemu_io, "-c", "write -P 7 1M 64k", img)
    return img


def _iso(d: Path) -> Path:
    """An ISO 9660 image: a primary volume descriptor at sector 16, built by hand."""
    out = d / "cd.iso"
    data = bytearray(64 * 1024)
    data[0x8000:0x8007] = b"\x01CD001\x01"
    out.write_bytes(bytes(data))
    return out


def _genisoimage(d: Path) -> Path:
    """An ISO 9660 image made by genisoimage."""
    out = d / "gen.iso"
    (d / "isodir").mkdir(exist_ok=True)
    (d / "isodir" / "hello.txt").write_text("hello\n")
    _run(need_tool("genisoimage"), "-quiet", "-o", out, d / "isodir")
    return out


# ---- detect() ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_detect_containers(images: Callable[[str], Path], name: str) -> None:
    found = detect_path(images(name))
    assert found.format == CONTAINERS[name][1]
    assert found.container
    assert found.format in FORMATS


def test_detect_vhd_fixed_footer_is_at_the_end(images: Callable[[str], Path]) -> None:
    path = images("vhd-fixed")
    data = path.read_bytes()
    assert not data.startswith(b"conectix") and data[-512:].startswith(b"conectix")
    assert detect_path(path).description == "VHD (vpc, fixed)"


def test_detect_raw_qcow2_iso(tmp_path: Path, qcow2_image: Path) -> None:
    raw = _raw_payload(tmp_path / "d.raw")
    assert detect_path(raw) == Detected("raw", "RAW", False)
    q = detect_path(qcow2_image)
    assert (q.format, q.container, q.description) == ("qcow2", False, "QCOW2 version 3")
    iso = detect_path(_iso(tmp_path))
    assert (iso.format, iso.container, iso.is_raw) == ("iso", False, True)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert detect_path(empty).format == "raw"


def test_qcow2_magic_with_unknown_version_is_left_to_the_validator(tmp_path: Path) -> None:
    p = tmp_path / "v9.qcow2"
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + bytes(4088))
    assert detect_path(p).format == "qcow2"
    with pytest.raises(ImageFormatError, match="QCOW2 version 9") as e:
        cdimover.inspect(p)
    assert "(format" not in str(e.value)     # the header validator's word, not the probe's


def test_detect_reads_only_small_headers(images: Callable[[str], Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    real = os.pread

    def spy(fd: int, n: int, off: int) -> bytes:
        reads.append((n, off))
        return real(fd, n, off)

    monkeypatch.setattr(detect_mod.os, "pread", spy)
    path = images("vhdx")          # 8 MiB, recognised at offset 0: one read
    assert detect_path(path).format == "vhdx"
    assert reads == [(HEAD_SIZE, 0)]
    reads.clear()
    big = path.parent / "sparse.raw"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    assert detect_path(big).format == "raw"
    assert len(reads) == 3 and sum(n for n, _ in reads) <= HEAD_SIZE + 512 + 8
    assert {off for _, off in reads} == {0, (1 << 30) - 512, 0x8001}


# Signatures the probe looks for: (offset from the start, or from the end when negative).
_SIGNATURES = [(0, b"QFI\xfb"), (0, b"QED\x00"), (0, b"KDMV"), (0, b"COWD"),
               (0, b"# Disk DescriptorFile"), (0, b"vhdxfile"), (0, b"conectix"),
               (64, b"\x7f\x10\xda\xbe"), (0, b"WithoutFreeSpace"), (0, b"WithouFreSpacExt"),
               (0, b"LUKS\xba\xbe"), (0, b"\x1f\x8b\x08"), (0, b"\xfd7zXZ\x00"),
               (0, b"\x28\xb5\x2f\xfd"), (0, b"BZh"), (257, b"ustar"), (-512, b"conectix"),
               (-512, b"koly"), (0x8001, b"CD001")]


def _has_signature(data: bytes) -> bool:
    for off, magic in _SIGNATURES:
        at = len(data) + off if off < 0 else off
        if at >= 0 and data[at:at + len(magic)] == magic:
            return True
    return False


@given(st.binary(min_size=0, max_size=9000))
def test_random_bytes_are_raw(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "random.img"
    p.write_bytes(data)
    found = detect_path(p)
    if not _has_signature(data):
        assert found == Detected("raw", "RAW", False)


_PLANTED = [sig for sig in _SIGNATURES[1:16] if sig[1] != b"BZh"] + [
    (0, b"BZh9\x31\x41\x59\x26\x53\x59"), (0, b"QFI\xfb\x00\x00\x00\x01")]


@given(st.binary(min_size=300, max_size=5000), st.sampled_from(_PLANTED))
def test_planted_signature_is_found(tmp_path: Path, data: bytes,
                                    sig: tuple[int, bytes]) -> None:
    off, magic = sig
    buf = bytearray(data)
    buf[off:off + len(magic)] = magic
    p = tmp_path / "planted.img"
    p.write_bytes(bytes(buf))
    found = detect_path(p)
    assert found.container and found.format != "raw"


# ---- every entry point refuses every container -----------------------------------------------

@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_api_refuses_containers(images: Callable[[str], Path], tmp_path: Path,
                                name: str) -> None:
    path = images(name)
    fmt = CONTAINERS[name][1]
    out = tmp_path / "out.raw"
    for call in (lambda: cdimover.inspect(path),
                 lambda: cdimover.convert(path, out),
                 lambda: cdimover.copy(path, out)):
        with pytest.raises(UnsupportedImageError, match=f"format {fmt};") as e:
            call()
        assert str(e.value).startswith(f"{path}: ")
        assert not out.exists()
    # Said to be RAW, the bytes are taken as they are.
    assert cdimover.inspect(path, format="raw").format == "raw"
    cdimover.copy(path, out, source_format="raw")
    assert sha256(out) == sha256(path)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_cli_refuses_containers(images: Callable[[str], Path], tmp_path: Path, name: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = images(name)
    fmt = CONTAINERS[name][1]
    out = tmp_path / "out.raw"
    for argv in (["info", str(path)], ["convert", str(path), str(out)],
                 ["copy", str(path), str(out)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"cdimover: {path}: ") and err.count("\n") == 1, err
        assert f"(format {fmt};" in err
        assert not out.exists()


def test_console_script_refuses_vmdk(images: Callable[[str], Path], tmp_path: Path) -> None:
    path = images("vmdk")
    for cmd in (["info", str(path)], ["convert", str(path), str(tmp_path / "o")]):
        r = subprocess.run([sys.executable, "-m", "cdimover", *cmd], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "VMDK" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_pod_import_refuses_containers(images: Callable[[str], Path], tmp_path: Path,
                                       name: str) -> None:
    path = images(name)
    dst = tmp_path / "data"
    dst.mkdir()
    log = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMPORTER_", "DESTINATION"))}
    env.update(IMPORTER_ENDPOINT=str(path), DESTINATION=str(dst))
    r = subprocess.run([sys.executable, "-m", "cdimover", "pod", "import", "--termination-log",
                        str(log), "--metrics-address", "none"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    message = log.read_text()
    assert message.startswith("Unable to process data: ")
    assert f"(format {CONTAINERS[name][1]};" in message
    assert "not supported yet" in message
    assert not (dst / "disk.img").exists()


# ---- RAW and QCOW2 -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_iso, _genisoimage], ids=["by-hand", "genisoimage"])
def test_iso_is_raw_everywhere(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    iso = make(tmp_path)
    assert detect_path(iso).format == "iso"
    assert cdimover.inspect(iso).format == "raw"
    r = cdimover.copy(iso, tmp_path / "a.raw")
    assert r.source_format == "raw" and sha256(tmp_path / "a.raw") == sha256(iso)
    cdimover.convert(iso, tmp_path / "b.raw")
    assert sha256(tmp_path / "b.raw") == sha256(iso)


def test_copy_refuses_qcow2_unless_raw(qcow2_image: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"keep me")
    with pytest.raises(UnsupportedImageError, match="QCOW2 version 3.*source_format='raw'"):
        cdimover.copy(qcow2_image, out)
    assert out.read_bytes() == b"keep me"       # refused before the target was opened
    r = cdimover.copy(qcow2_image, out, source_format="raw")
    assert r.source_format == "raw" and sha256(out) == sha256(qcow2_image)
    with pytest.raises(ValueError, match="source_format"):
        cdimover.copy(qcow2_image, out, source_format="qcow2")

    out.unlink()
    assert main(["copy", str(qcow2_image), str(out)]) == 1
    err = capsys.readouterr().err
    assert "QCOW2" in err and "-f raw" in err and "cdimover convert" in err
    assert "source_format" not in err and not out.exists()
    assert main(["copy", "-q", "-f", "raw", str(qcow2_image), str(out)]) == 0
    assert sha256(out) == sha256(qcow2_image)
    # convert still converts it, and -f raw there still copies it byte for byte
    assert cdimover.convert(qcow2_image, tmp_path / "guest.raw").source_format == "qcow2"
    cdimover.convert(qcow2_image, tmp_path / "bytes.raw", source_format="raw")
    assert sha256(tmp_path / "bytes.raw") == sha256(qcow2_image)


@pytest.mark.blockdev
def test_block_devices_are_probed(qcow2_image: Path, images: Callable[[str], Path],
                                  tmp_path: Path, loopdev: Callable[..., str]) -> None:
    backing = tmp_path / "dev.img"
    data = qcow2_image.read_bytes()
    backing.write_bytes(data + bytes(-len(data) % 4096))
    dev = loopdev(backing)
    assert detect_path(dev).format == "qcow2"
    r = cdimover.convert(dev, tmp_path / "guest.raw")
    assert r.source_format == "qcow2" and r.virtual_size == 4 * MiB
    guest = (tmp_path / "guest.raw").read_bytes()
    assert guest[MiB:MiB + 65536] == b"\x07" * 65536
    with pytest.raises(UnsupportedImageError, match="QCOW2"):
        cdimover.copy(dev, tmp_path / "copy.raw")
    cdimover.copy(dev, tmp_path / "copy.raw", source_format="raw")
    assert sha256(tmp_path / "copy.raw") == sha256(backing)

    fixed = images("vhd-fixed")           # the footer is found at the device's end too
    dev2 = loopdev(fixed)
    assert os.path.getsize(fixed) % 512 == 0
    with pytest.raises(UnsupportedImageError, match="format vhd;"):
        cdimover.convert(dev2, tmp_path / "vhd.raw")


def test_clone_copies_a_disk_whose_bytes_look_like_qcow2(tmp_path: Path,
                                                         qcow2_image: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    shutil.copyfile(qcow2_image, src / "disk.img")
    cdimover.clone(str(src), str(dst))
    assert sha256(dst / "disk.img") == sha256(src / "disk.img")


def test_archive_clone_copies_image_files_in_the_tree(tmp_path: Path,
                                                      qcow2_image: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    shutil.copyfile(qcow2_image, src / "backup.qcow2")
    (src / "notes.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    cdimover.clone(str(src), str(dst), content_type="archive")
    assert sha256(dst / "backup.qcow2") == sha256(qcow2_image)
    assert (dst / "notes.txt.gz").read_bytes() == (src / "notes.txt.gz").read_bytes()
