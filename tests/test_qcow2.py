"""QCOW2 -> RAW conversion against the oracle, qemu-img.

Images are made by ``qemu-img create`` and written by ``qemu-io`` (every cluster size, v2 and
v3, compressed zlib and zstd clusters, extended L2 entries, zero clusters, preallocation,
snapshots, odd sizes, random writes from hypothesis).  cdimover's output must equal
``qemu-img convert -O raw`` byte for byte and hold no more data (SEEK_DATA) than qemu's.
``inspect()`` must agree with ``qemu-img info --output=json``.  Hostile images are in
test_qcow2_hostile.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdimover import ImageFormatError, ScanMethod, TargetTooSmallError, UnsafeImageError
from cdimover import UnsupportedImageError
from cdimover import ImageInfo, convert
from cdimover.formats.qcow2 import info_json, inspect
from conftest import TOOL_ENV, need, need_tool, qemu_img_create
from layouts import sha256_file as sha256
from pagecache import drop, resident_bytes

MiB = 1 << 20
# qemu tools must not inherit a sanitizer runtime preloaded for the extension (they hang).


# ---- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qemu() -> tuple[str, str]:
    return need_tool("qemu-img"), need_tool("qemu-io")


def make_image(qemu: tuple[str, str], path: Path, size: int, opts: str = "",
               cmds: list[str] | tuple[str, ...] = ()) -> Path:
    """qemu-img create -f qcow2 -o OPTS PATH SIZE, then one qemu-io run of CMDS."""
    args = [qemu[0], "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    subprocess.run(args + [str(path), str(size)], check=True, capture_output=True, env=TOOL_ENV)
    if cmds:
        io = [qemu[1], "-f", "qcow2"]
        for c in cmds:
            io += ["-c", c]
        r = subprocess.run(io + [str(path)], check=True, capture_output=True, text=True,
                           env=TOOL_ENV)
        assert "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
    return path


def qemu_convert(qemu: tuple[str, str], img: Path, out: Path) -> Path:
    subprocess.run([qemu[0], "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)],
                   check=True, capture_output=True, env=TOOL_ENV)
    return out


def qemu_info(qemu: tuple[str, str], img: Path) -> dict[str, Any]:
    r = subprocess.run([qemu[0], "info", "--output=json", str(img)], check=True,
                       capture_output=True, text=True, env=TOOL_ENV)
    return dict(json.loads(r.stdout))



def data_bytes(path: Path | str) -> int:
    """Bytes of PATH inside SEEK_DATA extents."""
    total = 0
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    return total


def check_against_qemu(qemu: tuple[str, str], img: Path, tmp: Path, tag: str = "") -> Any:
    """Convert IMG with cdimover and with qemu-img; same bytes, no more data than qemu."""
    ours, ref = tmp / f"ours{tag}.raw", tmp / f"ref{tag}.raw"
    result = convert(img, ours, source_format="qcow2")
    qemu_convert(qemu, img, ref)
    assert os.path.getsize(ours) == os.path.getsize(ref) == result.virtual_size
    assert sha256(ours) == sha256(ref), f"{img.name}: output differs from qemu-img convert"
    assert data_bytes(ours) <= data_bytes(ref), f"{img.name}: less sparse than qemu-img"
    assert result.scan_method == ScanMethod.QCOW2
    assert result.source_format == "qcow2"
    # Compressed clusters share sectors, so a few bytes are read twice; nothing is read more.
    assert result.bytes_read <= os.path.getsize(img) * 1.2 + 4096
    ours.unlink()
    ref.unlink()
    return result


def test_metadata_is_read_past_the_page_cache(qemu: tuple[str, str], tmp_path: Path) -> None:
    """64 GiB with one cluster in every 512 MiB: 128 L2 tables (8 MiB) to scan.  The conversion
    reads them with O_DIRECT, a table at a time, so the image leaves next to nothing in the page
    cache, where a pod's memory limit would count it; the output is qemu's."""
    n = 128
    cmds = [f"write -P {i % 250 + 1} {i * 512 * MiB + (i % 7) * MiB} 64k" for i in range(n)]
    img = make_image(qemu, tmp_path / "wide.qcow2", 64 << 30, "cluster_size=65536", cmds)
    drop(img)
    need(resident_bytes(img) < 1 * MiB, "a filesystem whose clean pages can be dropped")
    with open(img, "rb") as f:          # plain reads stay cached here: the check can fail
        f.read(8 * MiB)
    need(resident_bytes(img) >= 8 * MiB, "a page cache that keeps what was read")
    drop(img)

    out = tmp_path / "wide.raw"
    result = convert(img, out, source_format="qcow2")
    assert resident_bytes(img) < 1 * MiB
    assert result.virtual_size == 64 << 30
    assert data_bytes(out) == n * 64 * 1024
    r = subprocess.run([qemu[0], "compare", "-f", "qcow2", "-F", "raw", str(img), str(out)],
                       capture_output=True, text=True, env=TOOL_ENV)
    assert r.returncode == 0, r.stdout + r.stderr


def pattern_cmds(c: int, size: int) -> list[str]:
    """A mix for cluster size C: data, partial data, compressed, zeros (-z and written),
    overwritten compressed, discard and the last sector."""
    cmds = [
        f"write -P 0xa5 0 {3 * c}",
        f"write -P 0x5a {5 * c + 512} 1024" if c >= 4096 else f"write -P 0x5a {5 * c} {c}",
        f"write -c -P 0x3c {8 * c} {c}",
        f"write -z {10 * c} {2 * c}",
        f"write -P 0 {13 * c} {c}",
        f"write -c -P 0x42 {14 * c} {c}",
        f"write -P 0x99 {14 * c} 512",
        f"discard {c} {c}",
        f"write -P 0x77 {size - 512} 512",
    ]
    return cmds


# ---- the matrix -----------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_every_cluster_size(qemu: tuple[str, str], tmp_path: Path, cluster_bits: int,
                            compat: str) -> None:
    c = 1 << cluster_bits
    size = 16 * c + 512
    img = make_image(qemu, tmp_path / "img.qcow2", size, f"cluster_size={c},compat={compat}",
                     pattern_cmds(c, size))
    check_against_qemu(qemu, img, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
def test_compressed_image(qemu: tuple[str, str], tmp_path: Path, ctype: str,
                          cluster: int) -> None:
    """A whole image compressed with qemu-img convert -c, like a cloud image; the size is odd
    so the last compressed cluster is partial."""
    size = 6 * MiB + 3 * 512
    raw = tmp_path / "src.raw"
    rnd = __import__("random").Random(cluster)
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 256 * 1024):
            f.seek(off)
            kind = rnd.randrange(4)
            if kind == 0:
                f.write(rnd.randbytes(70000))                  # incompressible
            elif kind == 1:
                f.write(bytes([rnd.randrange(256)]) * 90000)   # compressible
            elif kind == 2:
                f.write(b"cdimover " * 5000)
        f.seek(size - 700)
        f.write(b"tail" * 175)
    img = tmp_path / "img.qcow2"
    subprocess.run([qemu[0], "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"cluster_size={cluster},compression_type={ctype}", str(raw), str(img)],
                   check=True, capture_output=True, env=TOOL_ENV)
    assert inspect(img).compression_type == ctype
    result = check_against_qemu(qemu, img, tmp_path)
    assert result.bytes_read < os.path.getsize(raw)


CLUSTER_KINDS = st.sampled_from(["random", "text", "repeat", "zeros", "hole"])


def _cluster_bytes(kind: str, index: int, length: int) -> bytes:
    rnd = __import__("random").Random(index)
    if kind == "random":                    # incompressible: stored as a plain cluster
        return rnd.randbytes(length)
    if kind == "text":                      # compresses about 2:1 .. 4:1
        words = [rnd.randbytes(rnd.randrange(2, 9)).hex() for _ in range(64)]
        text = " ".join(rnd.choice(words) for _ in range(length // 4)).encode()
        return text[:length]
    if kind == "repeat":                    # compresses to almost nothing
        return bytes([index % 251 + 1]) * length
    return bytes(length)                    # zeros: qemu-img leaves them unallocated


@given(kinds=st.lists(CLUSTER_KINDS, min_size=1, max_size=96),
       bits=st.sampled_from([12, 16]), ctype=st.sampled_from(["zlib", "zstd"]),
       tail=st.integers(0, 7))
def test_compressed_spans_match_qemu(qemu: tuple[str, str], tmp_path: Path, kinds: list[str],
                                     bits: int, ctype: str, tail: int) -> None:
    """Compressed clusters are read in spans (one pread for many clusters, plain clusters
    between them included): any mix of compressed, plain, zero and unallocated clusters, a
    partial last cluster, and request sizes that cut spans at item ends or make them hit the
    span limit, with one and with several threads, must give back the bytes of the raw disk
    that qemu-img compressed."""
    c = 1 << bits
    unit = 64 * 1024                        # each kind covers 64 KiB: 16 clusters or one
    size = len(kinds) * unit - tail * 512
    d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i, kind in enumerate(kinds):
            if kind != "hole":
                f.seek(i * unit)
                f.write(_cluster_bytes(kind, i, min(unit, size - i * unit)))
    img = d / "img.qcow2"
    subprocess.run([qemu[0], "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"cluster_size={c},compression_type={ctype}", str(raw), str(img)],
                   check=True, capture_output=True, env=TOOL_ENV)
    want = sha256(raw)
    for request, threads in ((64 * 1024, 3), (1 * MiB, 1), (16 * MiB, 2)):
        out = d / f"out-{request}-{threads}.raw"
        result = convert(img, out, source_format="qcow2", request_size=request,
                         threads=threads)
        assert sha256(out) == want, f"{kinds} {bits} {ctype}: request {request}"
        assert data_bytes(out) <= data_bytes(raw)
        # every host byte is read once, give or take per span the 4 KiB alignment at both
        # ends and a gap of at most one cluster; spans end at items and at zero runs
        spans = size // request + len(kinds) + 2
        assert result.bytes_read <= os.path.getsize(img) + (8192 + c) * spans
        out.unlink()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.mark.parametrize("cluster", [16384, 65536, 2 * MiB])
def test_extended_l2_subclusters(qemu: tuple[str, str], tmp_path: Path, cluster: int) -> None:
    sc = cluster // 32
    size = 8 * cluster
    cmds = [
        f"write -P 0x11 {sc} {sc}",                      # one subcluster
        f"write -P 0x12 {3 * sc + 512} 512",   # a sector inside a subcluster
        f"write -z {5 * sc} {2 * sc}",                   # zero subclusters
        f"write -P 0x13 {cluster - sc} {2 * sc}",        # across a cluster boundary
        f"write -c -P 0x14 {3 * cluster} {cluster}",     # compressed cluster
        f"write -P 0x15 {4 * cluster} {cluster}",        # full cluster
        f"write -z {4 * cluster + 2 * sc} {sc}",         # zero inside an allocated cluster
        f"discard {4 * cluster + 4 * sc} {sc}",
        f"write -P 0x16 {size - 512} 512",
    ]
    img = make_image(qemu, tmp_path / "img.qcow2", size,
                     f"cluster_size={cluster},extended_l2=on", cmds)
    assert inspect(img).extended_l2
    check_against_qemu(qemu, img, tmp_path)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("extl2", [False, True])
def test_preallocated_images(qemu: tuple[str, str], tmp_path: Path, mode: str,
                             extl2: bool) -> None:
    size = 8 * MiB
    opts = f"preallocation={mode}" + (",extended_l2=on" if extl2 else "")
    cmds = ["write -P 0x21 0 100k", "write -z 1M 128k", f"write -P 0x22 {size - 4096} 4096"]
    img = make_image(qemu, tmp_path / "img.qcow2", size, opts, cmds)
    result = check_against_qemu(qemu, img, tmp_path)
    # Preallocated but unwritten clusters are holes of the image file: not read.
    assert result.bytes_read < size


def test_internal_snapshots_convert_the_active_layer(qemu: tuple[str, str],
                                                     tmp_path: Path) -> None:
    img = make_image(qemu, tmp_path / "img.qcow2", 4 * MiB, "", ["write -P 1 0 1M"])
    subprocess.run([qemu[0], "snapshot", "-c", "first", str(img)], check=True, env=TOOL_ENV)
    subprocess.run([qemu[1], "-c", "write -P 2 512k 1M", "-c", "write -z 0 64k", str(img)],
                   check=True, capture_output=True, env=TOOL_ENV)
    subprocess.run([qemu[0], "snapshot", "-c", "second", str(img)], check=True, env=TOOL_ENV)
    subprocess.run([qemu[1], "-c", "write -c -P 3 2M 64k", str(img)], check=True,
                   capture_output=True, env=TOOL_ENV)
    info = inspect(img)
    assert info.nb_snapshots == 2
    check_against_qemu(qemu, img, tmp_path)
    with open(tmp_path / "o.raw", "wb"):
        pass
    convert(img, tmp_path / "o.raw")
    with open(tmp_path / "o.raw", "rb") as f:
        data = f.read()
    assert data[:65536] == bytes(65536)
    assert data[600 * 1024] == 2 and data[2 * MiB] == 3


@pytest.mark.parametrize("size", [512, 1536, 65536 + 512, 3 * 2 * MiB - 512, 0])
def test_odd_sizes(qemu: tuple[str, str], tmp_path: Path, size: int) -> None:
    cmds = [f"write -P 0x31 0 {min(size, 512)}"]
    if size >= 65536 + 512:
        last = size // 65536 * 65536
        cmds.append(f"write -c -P 0x33 {last} {size - last}")   # compressed partial cluster
    else:
        cmds.append(f"write -P 0x32 {max(size - 512, 0)} 512")
    img = make_image(qemu, tmp_path / "img.qcow2", size, "", cmds if size else [])
    check_against_qemu(qemu, img, tmp_path)


def test_dirty_bitmaps_and_unknown_compatible_bits(qemu: tuple[str, str],
                                                   tmp_path: Path) -> None:
    """The dirty bit, a bitmaps extension, unknown compatible and autoclear bits are ignored."""
    img = make_image(qemu, tmp_path / "img.qcow2", 4 * MiB, "lazy_refcounts=on",
                     ["write -P 7 0 1M", "write -c -P 8 2M 64k"])
    subprocess.run([qemu[0], "bitmap", "--add", str(img), "b0"], check=True, env=TOOL_ENV)
    info = inspect(img)
    assert info.bitmaps and info.lazy_refcounts
    ref = qemu_convert(qemu, img, tmp_path / "ref.raw")
    with open(img, "r+b") as f:
        f.seek(72)
        incompat, compat, autoclear = struct.unpack(">QQQ", f.read(24))
        f.seek(72)
        f.write(struct.pack(">QQQ", incompat | 1, compat | 0xfffe << 8, autoclear | 1 << 40))
    info = inspect(img)
    assert info.dirty
    result = convert(img, tmp_path / "ours.raw", source_format="qcow2")
    assert sha256(tmp_path / "ours.raw") == sha256(ref)
    assert result.virtual_size == 4 * MiB


def test_large_empty_virtual_size_is_fast(qemu: tuple[str, str], tmp_path: Path) -> None:
    """Time follows the allocated metadata: an empty 1 TiB image is a handful of hole items."""
    size = 1 << 40
    img = make_image(qemu, tmp_path / "img.qcow2", size, "",
                     ["write -P 0x41 0 4096", f"write -c -P 0x42 {size // 2} 64k",
                      f"write -P 0x43 {size - 4096} 4096"])
    out = tmp_path / "out.raw"
    t0 = time.monotonic()
    result = convert(img, out)
    assert time.monotonic() - t0 < 20
    assert os.path.getsize(out) == size
    assert data_bytes(out) <= 3 * 65536
    with open(out, "rb") as f:
        assert f.read(4096) == b"\x41" * 4096
        f.seek(size // 2)
        assert f.read(65536) == b"\x42" * 65536
        f.seek(size - 4096)
        assert f.read() == b"\x43" * 4096
    assert result.bytes_written == 4096 + 65536 + 4096


# ---- random writes (hypothesis) -------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["write", "zero", "zero-unmap", "compress", "discard", "zeros"]),
              st.integers(0, 63), st.integers(1, 5), st.integers(0, 7)),
    min_size=1, max_size=12)


@given(ops=OPS, layout=st.sampled_from([(12, False, "zlib"), (16, False, "zlib"),
                                        (16, True, "zstd"), (14, True, "zlib"),
                                        (9, False, "zstd")]),
       compat=st.sampled_from(["1.1", "0.10"]))
def test_random_writes_match_qemu(qemu: tuple[str, str], tmp_path: Path,
                                  ops: list[tuple[str, int, int, int]],
                                  layout: tuple[int, bool, str], compat: str) -> None:
    bits, extl2, ctype = layout
    c = 1 << bits
    if compat == "0.10":
        extl2, ctype = False, "zlib"
    size = 64 * c - 512 * (bits % 3)
    cmds = []
    for kind, cl, n, sub in ops:
        off = cl * c
        length = min(n * c, size - off)
        if length <= 0:
            continue
        if kind == "compress":   # qemu compresses only into unallocated clusters
            length = min(c, size - off)
            cmds.append(f"discard {off} {length}")
            cmds.append(f"write -c -P {cl + 1} {off} {length}")
        elif kind == "write":
            # start and end inside clusters (sector granularity) to exercise COW/subclusters
            start = off + sub * (c // 8) // 512 * 512
            end = max(start + 512, off + length - sub * 512)
            cmds.append(f"write -P {0x80 + cl} {start} {min(end, size) - start}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        elif kind == "zero-unmap":
            cmds.append(f"write -z -u {off} {length}")
        elif kind == "zeros":
            cmds.append(f"write -P 0 {off} {length}")
        else:
            cmds.append(f"discard {off} {length}")
    opts = f"cluster_size={c},compat={compat}"
    if compat == "1.1":
        opts += f",compression_type={ctype}" + (",extended_l2=on" if extl2 else "")
    d = tmp_path / f"h{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    img = make_image(qemu, d / "img.qcow2", size, opts, cmds)
    check_against_qemu(qemu, img, d)
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


# ---- inspect() vs qemu-img info -------------------------------------------------------------

def _comparable(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[dict[str, Any],
                                                                      dict[str, Any]]:
    theirs = json.loads(json.dumps(theirs))
    for key in ("full-backing-filename", "snapshots", "children"):
        theirs.pop(key, None)
    data = theirs.get("format-specific", {}).get("data", {})
    data.pop("bitmaps", None)
    if "encrypt" in data:
        data["encrypt"] = {"format": data["encrypt"]["format"]}
    return ours, theirs


INFO_IMAGES: dict[str, tuple[str, list[str]]] = {
    "v2": ("compat=0.10,cluster_size=4096", ["write -P 1 0 64k"]),
    "v3": ("", ["write -P 1 0 64k", "write -c -P 2 1M 64k"]),
    "zstd": ("compression_type=zstd", ["write -c -P 2 0 64k"]),
    "extl2": ("extended_l2=on,cluster_size=2M", ["write -P 1 4k 4k"]),
    "lazy": ("lazy_refcounts=on,refcount_bits=64", []),
    "refcount1": ("refcount_bits=1,cluster_size=512", []),
    "backing": ("backing_file=/etc/passwd,backing_fmt=raw", []),
    "datafile": ("data_file={dir}/data.raw", []),
    "datafile-raw": ("data_file={dir}/data2.raw,data_file_raw=on", []),
    "aes": ("compat=0.10,encryption=on,encrypt.key-secret=sec0", []),
    "luks": ("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", []),
}


@pytest.mark.parametrize("name", sorted(INFO_IMAGES))
def test_inspect_matches_qemu_img_info(qemu: tuple[str, str], tmp_path: Path,
                                       name: str) -> None:
    opts, cmds = INFO_IMAGES[name]
    opts = opts.format(dir=tmp_path)
    img = tmp_path / f"{name}.qcow2"
    args = [qemu[0], "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456"]
    if opts:
        args += ["-o", opts]
    if "backing_file" in opts:
        args += ["-u"]
    qemu_img_create(args + [str(img), str(4 * MiB)])
    if cmds:
        io = [qemu[1]]
        for c in cmds:
            io += ["-c", c]
        subprocess.run(io + [str(img)], check=True, capture_output=True, env=TOOL_ENV)
    info = inspect(img)
    assert isinstance(info, ImageInfo) and info.format == "qcow2"
    ours, theirs = _comparable(info_json(info), qemu_info(qemu, img))
    assert ours == theirs
    if name in ("aes", "luks"):
        assert info.encrypted
        with pytest.raises(UnsupportedImageError):
            convert(img, tmp_path / "out.raw")
    if name in ("backing", "datafile", "datafile-raw"):
        with pytest.raises(UnsafeImageError):
            convert(img, tmp_path / "out.raw")
        assert not (tmp_path / "out.raw").exists()


def test_inspect_raw_and_snapshot_images(qemu: tuple[str, str], tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * MiB)
        f.write(b"x" * 8192)
    ours, theirs = _comparable(info_json(inspect(raw)), qemu_info(qemu, raw))
    assert ours == theirs
    img = make_image(qemu, tmp_path / "s.qcow2", MiB, "", ["write -P 1 0 4k"])
    subprocess.run([qemu[0], "snapshot", "-c", "a", str(img)], check=True, env=TOOL_ENV)
    ours, theirs = _comparable(info_json(inspect(img)), qemu_info(qemu, img))
    assert ours == theirs
    assert inspect(img).nb_snapshots == 1


# ---- format probing and API contract --------------------------------------------------------

def test_format_probing(qemu: tuple[str, str], tmp_path: Path) -> None:
    img = make_image(qemu, tmp_path / "img.qcow2", 2 * MiB, "", ["write -P 5 0 64k"])
    # "raw" copies the container byte for byte, header and all.
    r = convert(img, tmp_path / "copy.raw", source_format="raw")
    assert r.source_format == "raw"
    assert sha256(tmp_path / "copy.raw") == sha256(img)
    info = inspect(img, format="raw")
    assert info.format == "raw" and info.virtual_size == os.path.getsize(img)
    # "auto" finds the magic.
    r = convert(img, tmp_path / "auto.raw")
    assert r.source_format == "qcow2" and r.virtual_size == 2 * MiB
    assert inspect(img).format == "qcow2"
    # A raw disk: "auto" copies it, "qcow2" refuses it before creating the target.
    raw = tmp_path / "auto.raw"
    r = convert(raw, tmp_path / "again.raw")
    assert r.source_format == "raw"
    assert sha256(tmp_path / "again.raw") == sha256(raw)
    with pytest.raises(ImageFormatError, match="magic"):
        convert(raw, tmp_path / "never.raw", source_format="qcow2")
    assert not (tmp_path / "never.raw").exists()
    with pytest.raises(ImageFormatError):
        inspect(raw, format="qcow2")
    with pytest.raises(ValueError):
        convert(img, tmp_path / "x.raw", source_format="vmdk")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        convert(img, tmp_path / "x.raw", preallocation="metadata")


def test_refused_image_leaves_existing_target_alone(qemu: tuple[str, str],
                                                    tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    subprocess.run([qemu[0], "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F",
                    "raw", str(img), str(MiB)], check=True, env=TOOL_ENV)
    target = tmp_path / "keep.raw"
    target.write_bytes(b"precious" * 1000)
    with pytest.raises(UnsafeImageError, match="backing file"):
        convert(img, target)
    assert target.read_bytes() == b"precious" * 1000


def test_opens_no_file_but_source_and_target(qemu: tuple[str, str], tmp_path: Path) -> None:
    img = make_image(qemu, tmp_path / "img.qcow2", 64 * MiB, "",
                     ["write -P 1 0 8M", "write -c -P 2 16M 4M", "write -P 3 40M 8M"])
    out = tmp_path / "out.raw"
    before = set(os.listdir("/proc/self/fd"))
    seen: set[str] = set()

    def progress(done: int, total: int) -> None:
        for fd in set(os.listdir("/proc/self/fd")) - before:
            try:
                seen.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass

    result = convert(img, out, progress=progress)
    # The source, the target being written (under its partial name until complete) and the
    # directory that holds the target; nothing else.
    allowed = {str(img), f"{out}.cdimover-partial", str(tmp_path)}
    assert seen and seen <= allowed, seen
    assert not (tmp_path / "out.raw.cdimover-partial").exists()
    assert result.virtual_size == 64 * MiB


def test_progress_and_stats(qemu: tuple[str, str], tmp_path: Path) -> None:
    img = make_image(qemu, tmp_path / "img.qcow2", 32 * MiB, "",
                     ["write -P 1 0 12M", "write -c -P 2 16M 1M", "write -P 0 20M 1M"])
    calls: list[tuple[int, int]] = []
    result = convert(img, tmp_path / "out.raw", progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (32 * MiB, 32 * MiB)
    assert all(t == 32 * MiB for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert result.bytes_written == 13 * MiB
    assert result.bytes_zero_data == MiB
    assert result.bytes_skipped >= 32 * MiB - 14 * MiB
    assert result.target_allocated is not None and result.target_allocated <= 14 * MiB


# ---- block-device target ---------------------------------------------------------------------

@pytest.mark.blockdev
def test_loop_device_target(qemu: tuple[str, str], tmp_path: Path, loopdev: Any) -> None:
    size = 16 * MiB
    img = make_image(qemu, tmp_path / "img.qcow2", size, "cluster_size=4096",
                     pattern_cmds(4096, size) + ["write -c -P 9 8M 4k", "write -z 9M 1M"])
    ref = qemu_convert(qemu, img, tmp_path / "ref.raw")
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\xee" * (size + MiB))           # stale data everywhere
    dev = loopdev(backing)
    result = convert(img, dev)
    assert result.bytes_zeroed > 0                        # holes had to be zeroed
    with open(dev, "rb") as f:
        got = f.read(size)
        tail = f.read()
    assert hashlib.sha256(got).hexdigest() == sha256(ref)
    assert tail == b"\xee" * MiB                          # past the virtual size: untouched
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    with pytest.raises(TargetTooSmallError):
        convert(img, loopdev(small))


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_convert_with_preallocation(qemu: tuple[str, str], tmp_path: Path, mode: str) -> None:
    size = 8 * MiB
    img = make_image(qemu, tmp_path / "p.qcow2", size, "cluster_size=65536",
                     pattern_cmds(65536, size))
    ref = qemu_convert(qemu, img, tmp_path / "ref.raw")
    out = tmp_path / "out.raw"
    r = convert(img, out, preallocation=mode, target_size=size + MiB)
    assert r.preallocation_applied and r.preallocation == mode
    assert os.path.getsize(out) == size + MiB == r.target_size
    with open(out, "rb") as f:
        assert hashlib.sha256(f.read(size)).hexdigest() == sha256(ref)
        assert f.read() == bytes(MiB)
    assert os.stat(out).st_blocks * 512 >= size + MiB
    if mode == "full":
        assert data_bytes(out) == size + MiB      # every block written, no unwritten extents
