"""Header rules that qemu enforces: a backing-format extension without a backing file, a
backing format longer than qemu's 15 bytes, and the "raw external data" autoclear bit without
the external-data-file incompatible bit are malformed images (ImageFormatError), refused by
inspect and convert alike, before the target is created.  Images are made by qemu-img and then
patched byte by byte.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

import cdimover as qcow2  # inspect() and convert()
from cdimover.errors import ImageFormatError, UnsafeImageError
from conftest import TOOL_ENV, need_tool

BACKING_FORMAT = 0xE2792ACA
DATA_FILE = 0x44415441


def qemu_img(*args: str) -> None:
    subprocess.run([need_tool("qemu-img"), *args], check=True, env=TOOL_ENV,
                   capture_output=True)


def extensions(data: bytes) -> list[tuple[int, bytes]]:
    """The header extensions of the v3 image DATA, up to the end marker."""
    pos = struct.unpack_from(">I", data, 100)[0]
    out = []
    while pos + 8 <= 4096:
        typ, length = struct.unpack_from(">II", data, pos)
        if typ == 0:
            break
        out.append((typ, data[pos + 8:pos + 8 + length]))
        pos += 8 + (length + 7) // 8 * 8
    return out


def rewrite(data: bytes, exts: list[tuple[int, bytes]], backing: bytes | None) -> bytes:
    """DATA with its extension area replaced by EXTS and the backing file name set to BACKING
    (None: no backing file), placed after the extensions."""
    buf = bytearray(data)
    hlen = struct.unpack_from(">I", buf, 100)[0]
    buf[hlen:4096] = bytes(4096 - hlen)
    pos = hlen
    for typ, payload in exts:
        struct.pack_into(">II", buf, pos, typ, len(payload))
        buf[pos + 8:pos + 8 + len(payload)] = payload
        pos += 8 + (len(payload) + 7) // 8 * 8
    pos += 8                                   # the end marker (zeros)
    if backing is None:
        struct.pack_into(">QI", buf, 8, 0, 0)
    else:
        buf[pos:pos + len(backing)] = backing
        struct.pack_into(">QI", buf, 8, pos, len(backing))
    return bytes(buf)


@pytest.fixture
def backed(tmp_path: Path) -> bytes:
    """A v3 image with a backing file and a backing-format extension, made by qemu-img."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    img = tmp_path / "backed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(img), "1M")
    data = img.read_bytes()
    assert (BACKING_FORMAT, b"raw") in extensions(data)
    return data


def refused_as_malformed(path: Path, tmp_path: Path, words: str) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(ImageFormatError) as e:
        qcow2.inspect(path, format="qcow2")
    assert words in str(e.value)
    with pytest.raises(ImageFormatError) as e:
        qcow2.convert(path, out, source_format="qcow2")
    assert words in str(e.value)
    assert not out.exists()


def test_backing_format_without_backing_file(backed: bytes, tmp_path: Path) -> None:
    img = tmp_path / "fmt-alone.qcow2"
    img.write_bytes(rewrite(backed, extensions(backed), backing=None))
    refused_as_malformed(img, tmp_path, "without a backing file")


@pytest.mark.parametrize("length, ok", [(3, True), (15, True), (16, False), (63, False)])
def test_backing_format_length(backed: bytes, tmp_path: Path, length: int, ok: bool) -> None:
    exts = [(t, b"q" * length if t == BACKING_FORMAT else p) for t, p in extensions(backed)]
    img = tmp_path / f"fmt-{length}.qcow2"
    img.write_bytes(rewrite(backed, exts, backing=b"/nonexistent/base.raw"))
    if ok:
        info = qcow2.inspect(img, format="qcow2")
        assert info.backing_format == "q" * length
        assert info.backing_file == "/nonexistent/base.raw"
        with pytest.raises(UnsafeImageError):      # still never follows the backing file
            qcow2.convert(img, tmp_path / "out.raw", source_format="qcow2")
    else:
        refused_as_malformed(img, tmp_path, f"{length} bytes long (at most 15)")


def test_raw_external_data_bit_without_data_file(tmp_path: Path) -> None:
    img = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    buf = bytearray(img.read_bytes())
    struct.pack_into(">Q", buf, 88, struct.unpack_from(">Q", buf, 88)[0] | 2)
    img.write_bytes(bytes(buf))
    refused_as_malformed(img, tmp_path, "raw external data bit")


def test_raw_external_data_with_its_data_file_is_unsafe_not_malformed(tmp_path: Path) -> None:
    img = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file={tmp_path / 'data.raw'},data_file_raw=on", str(img), "1M")
    data = img.read_bytes()
    incompat, _, autoclear = struct.unpack_from(">QQQ", data, 72)
    assert incompat & 4 and autoclear & 2
    info = qcow2.inspect(img, format="qcow2")
    assert info.data_file_raw and info.data_file == str(tmp_path / "data.raw")
    with pytest.raises(UnsafeImageError):
        qcow2.convert(img, tmp_path / "out.raw", source_format="qcow2")

    # The same image without the incompatible bit: the raw bit now stands alone.
    buf = bytearray(data)
    struct.pack_into(">Q", buf, 72, incompat & ~4)
    buf = bytearray(rewrite(bytes(buf), [e for e in extensions(data) if e[0] != DATA_FILE],
                            backing=None))
    bad = tmp_path / "raw-bit-alone.qcow2"
    bad.write_bytes(bytes(buf))
    refused_as_malformed(bad, tmp_path, "raw external data bit")
