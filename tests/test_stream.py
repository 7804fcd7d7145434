"""Sequential streams (cdm_stream_fd): a byte stream read to its end from a pipe or a file,
maybe compressed (gzip, xz, zstd; detected by magic bytes), decoded in one pass onto a writer.

The compressors are the command-line tools, so the oracle is independent of the libraries the
core links.  The target must equal the image (sha256) with its zero blocks left as holes; the
digest must equal hashlib's over the bytes as received; truncated or corrupt input, an image
larger than the target and a decompression bomb must fail with the matching exception.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdimover
from cdimover import _native
from cdimover._native import StreamResult, const, lib
from cdimover.errors import (
    CopyCancelled,
    ImageFormatError,
    TargetTooSmallError,
)

from conftest import TOOL_ENV, need_tool
from layouts import (
    Layout,
    Segment,
    allocated_blocks,
    layouts,
    nonzero_blocks,
    sha256_file,
    sha256_prefix,
    write_layout,
)

MiB = 1 << 20
COMPRESSORS = {"none": None, "gzip": ["gzip", "-c", "-1"], "xz": ["xz", "-c", "-0", "-T1"],
               "zstd": ["zstd", "-c", "-q", "-1"]}
CODES = {"none": const("CDM_COMPRESSION_NONE"), "gzip": const("CDM_COMPRESSION_GZIP"),
         "xz": const("CDM_COMPRESSION_XZ"), "zstd": const("CDM_COMPRESSION_ZSTD")}
HASHES = {"md5": const("CDM_HASH_MD5"), "sha1": const("CDM_HASH_SHA1"),
          "sha256": const("CDM_HASH_SHA256"), "sha512": const("CDM_HASH_SHA512")}

# A layout of about 10 MiB: data, zeros written as data, holes, an unaligned tail.
IMAGE = Layout((Segment("data", 3 * MiB + 512), Segment("hole", 2 * MiB),
                Segment("zero", MiB + 4096), Segment("data", 5000), Segment("hole", 3 * MiB),
                Segment("data", 123457)), seed=7)


def compress(kind: str, src: Path, dst: Path) -> Path:
    """DST holding SRC compressed by the command-line tool for KIND (a copy for "none")."""
    cmd = COMPRESSORS[kind]
    if cmd is None:
        dst.write_bytes(src.read_bytes())
        return dst
    need_tool(cmd[0])
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        subprocess.run(cmd, stdin=fin, stdout=fout, check=True, env=TOOL_ENV)
    return dst


def compress_bytes(kind: str, data: bytes) -> bytes:
    cmd = COMPRESSORS[kind]
    if cmd is None:
        return data
    need_tool(cmd[0])
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True,
                          env=TOOL_ENV).stdout


def pipe_of(data: bytes, chunks: Callable[[], int] | None = None) -> tuple[int, threading.Thread]:
    """The read end of a pipe that a thread fills with DATA (in pieces of CHUNKS() bytes),
    then closes.  A reader that stops early makes the thread stop quietly."""
    r, w = os.pipe()

    def feed() -> None:
        try:
            pos = 0
            while pos < len(data):
                n = chunks() if chunks is not None else 1 << 16
                pos += os.write(w, data[pos:pos + n])
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return r, t


def stream(src_fd: int, target: Path, size: int, *, target_is_zero: bool = True,
           path: str | None = None, **kw: object) -> StreamResult:
    """Decode SRC_FD onto a fresh file TARGET of SIZE bytes; the writer is finished on success
    and aborted on failure."""
    with cdimover.Writer(target, size, target_is_zero=target_is_zero) as w:
        native = w._native
        assert native is not None
        return _native.run_stream(w._ctx, src_fd, native, path=path, **kw)  # type: ignore[arg-type]


def stream_bytes(data: bytes, target: Path, size: int, **kw: object) -> StreamResult:
    r, t = pipe_of(data)
    try:
        return stream(r, target, size, **kw)
    finally:
        os.close(r)
        t.join()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "image.raw"
    write_layout(path, IMAGE)
    return path


def assert_sparse_copy(image: Path, target: Path) -> None:
    size = os.path.getsize(image)
    assert os.path.getsize(target) == size
    assert sha256_file(target) == sha256_file(image)
    # Every allocated block of the target holds data: zeros and holes of the image stay holes.
    assert allocated_blocks(target, 0, size) <= nonzero_blocks(image, size)
    assert os.stat(target).st_blocks * 512 < size


@pytest.mark.parametrize("kind", list(COMPRESSORS))
@pytest.mark.parametrize("via", ["pipe", "file"])
def test_stream_roundtrip(tmp_path: Path, image: Path, kind: str, via: str) -> None:
    packed = compress(kind, image, tmp_path / f"image.{kind}")
    target = tmp_path / "target.raw"
    size = os.path.getsize(image)
    if via == "pipe":
        # The tool's own stdout as the source: a real pipe, no seeking.
        cmd = ["cat", str(packed)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=TOOL_ENV)
        assert proc.stdout is not None
        try:
            res = stream(proc.stdout.fileno(), target, size, hash=HASHES["sha256"])
        finally:
            proc.stdout.close()
            proc.wait()
    else:
        fd = os.open(packed, os.O_RDONLY)
        try:
            res = stream(fd, target, size, hash=HASHES["sha256"], path=str(packed))
        finally:
            os.close(fd)
    assert_sparse_copy(image, target)
    assert res.bytes_in == os.path.getsize(packed)
    assert res.bytes_out == res.image_size == size
    assert res.compression == _native.COMPRESSION_NAMES[CODES[kind]]
    assert res.format == "raw"
    assert res.digest == hashlib.sha256(packed.read_bytes()).digest()


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_stream_from_the_compressor(tmp_path: Path, image: Path, kind: str) -> None:
    """The compressor writing straight into the pipe the core reads."""
    cmd = COMPRESSORS[kind]
    assert cmd is not None
    need_tool(cmd[0])
    target = tmp_path / "target.raw"
    with open(image, "rb") as fin:
        proc = subprocess.Popen(cmd, stdin=fin, stdout=subprocess.PIPE, env=TOOL_ENV)
        assert proc.stdout is not None
        try:
            res = stream(proc.stdout.fileno(), target, os.path.getsize(image))
        finally:
            proc.stdout.close()
            assert proc.wait() == 0
    assert_sparse_copy(image, target)
    assert res.compression == _native.COMPRESSION_NAMES[CODES[kind]]


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_concatenated_members(tmp_path: Path, kind: str) -> None:
    """gzip members, xz streams and zstd frames one after the other decode to the
    concatenation, as the tools' -d does."""
    rng = random.Random(kind)
    parts = [rng.randbytes(300_000), bytes(2 * MiB), rng.randbytes(70_001), b"x"]
    packed = b"".join(compress_bytes(kind, p) for p in parts)
    whole = b"".join(parts)
    # The oracle: the tool itself decodes the concatenation to the same bytes.
    cmd = COMPRESSORS[kind]
    assert cmd is not None
    assert subprocess.run([cmd[0], "-dc"], input=packed, stdout=subprocess.PIPE, check=True,
                          env=TOOL_ENV).stdout == whole
    target = tmp_path / "t.raw"
    res = stream_bytes(packed, target, len(whole))
    assert target.read_bytes() == whole
    assert res.bytes_out == len(whole) and res.bytes_in == len(packed)


def test_zstd_multi_frame_single_file(tmp_path: Path, image: Path) -> None:
    """A sparse image split in three zstd frames made by separate runs of the tool and
    appended to one stream: holes survive the frame boundaries."""
    need_tool("zstd")
    data = image.read_bytes()
    third = len(data) // 3
    packed = b"".join(compress_bytes("zstd", data[i:j])
                      for i, j in ((0, third), (third, 2 * third), (2 * third, len(data))))
    target = tmp_path / "t.raw"
    stream_bytes(packed, target, len(data))
    assert_sparse_copy(image, target)


@pytest.mark.parametrize("name", list(HASHES))
@pytest.mark.parametrize("kind", ["none", "gzip"])
def test_digests(tmp_path: Path, name: str, kind: str) -> None:
    data = random.Random(name).randbytes(MiB + 17) + bytes(MiB)
    packed = compress_bytes(kind, data)
    res = stream_bytes(packed, tmp_path / "t.raw", len(data), hash=HASHES[name])
    assert res.digest == hashlib.new(name, packed).digest()


def test_no_digest(tmp_path: Path) -> None:
    res = stream_bytes(b"abc", tmp_path / "t.raw", 3)
    assert res.digest == b""


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
@pytest.mark.parametrize("cut", ["half", "tail"])
def test_truncated(tmp_path: Path, kind: str, cut: str) -> None:
    data = random.Random(1).randbytes(400_000) + bytes(MiB)
    packed = compress_bytes(kind, data)
    short = packed[:len(packed) // 2] if cut == "half" else packed[:-3]
    with pytest.raises(ImageFormatError, match="truncated"):
        stream_bytes(short, tmp_path / "t.raw", len(data))


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_corrupt_byte(tmp_path: Path, kind: str) -> None:
    data = random.Random(2).randbytes(400_000) + bytes(MiB)
    packed = bytearray(compress_bytes(kind, data))
    packed[len(packed) // 3] ^= 0x55
    with pytest.raises(ImageFormatError, match=rf"{kind} data is corrupt at input offset \d+"):
        stream_bytes(bytes(packed), tmp_path / "t.raw", len(data))


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_declared_compression_checked(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ImageFormatError, match=f"not {kind}-compressed"):
        stream_bytes(b"plain bytes", tmp_path / "t.raw", 100, compression=CODES[kind])


def test_declared_none_passes_magic_through(tmp_path: Path) -> None:
    packed = compress_bytes("gzip", b"hello")
    target = tmp_path / "t.raw"
    res = stream_bytes(packed, target, len(packed), compression=CODES["none"])
    assert target.read_bytes() == packed
    assert res.compression == "none"


@pytest.mark.parametrize("data", [b"", b"\x1f", b"\xfd7zX", b"QF", b"\x28\xb5\x2f"])
def test_short_streams_are_raw(tmp_path: Path, data: bytes) -> None:
    """Fewer bytes than a magic: RAW, whatever they start with."""
    target = tmp_path / "t.raw"
    res = stream_bytes(data, target, 16)
    assert target.read_bytes() == data + bytes(16 - len(data))
    assert res.format == "raw" and res.compression == "none"
    assert res.bytes_in == res.bytes_out == res.image_size == len(data)


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_qcow2_magic_selects_the_converter(tmp_path: Path, kind: str) -> None:
    """A stream starting with the QCOW2 magic (after decompression) goes to the QCOW2
    converter, which refuses this malformed one; as RAW it would have been written."""
    packed = compress_bytes(kind, b"QFI\xfb" + bytes(1000))
    with pytest.raises(ImageFormatError):
        stream_bytes(packed, tmp_path / "t.raw", MiB)
    res = stream_bytes(packed, tmp_path / "t2.raw", MiB, format=lib.CDM_FORMAT_RAW)
    assert res.format == "raw"


def test_declared_qcow2_checked(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="not a QCOW2"):
        stream_bytes(bytes(4096), tmp_path / "t.raw", MiB, format=lib.CDM_FORMAT_QCOW2)


@pytest.mark.parametrize("kind", ["none", "gzip", "xz", "zstd"])
def test_image_larger_than_target(tmp_path: Path, kind: str) -> None:
    data = random.Random(3).randbytes(5 * MiB)
    packed = compress_bytes(kind, data)
    with pytest.raises(TargetTooSmallError, match=r"larger than the target \(4194304 bytes\)"):
        stream_bytes(packed, tmp_path / "t.raw", 4 * MiB)
    # One byte more than the target is enough to refuse it.
    packed = compress_bytes(kind, data[:4 * MiB + 1])
    with pytest.raises(TargetTooSmallError):
        stream_bytes(packed, tmp_path / "t2.raw", 4 * MiB, format=lib.CDM_FORMAT_RAW)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_decompression_bomb(tmp_path: Path, kind: str) -> None:
    """1 GiB of zeros compressed to a few hundred KiB (xz: 256 MiB, its compressor is slow)
    onto a 16 MiB target stops at the target's size."""
    cmd = COMPRESSORS[kind]
    assert cmd is not None
    need_tool(cmd[0])
    total = (256 if kind == "xz" else 1024) * MiB
    bomb = tmp_path / f"bomb.{kind}"
    with open(bomb, "wb") as out:
        gen = subprocess.Popen(["head", "-c", str(total), "/dev/zero"], stdout=subprocess.PIPE,
                               env=TOOL_ENV)
        subprocess.run(cmd, stdin=gen.stdout, stdout=out, check=True, env=TOOL_ENV)
        assert gen.stdout is not None
        gen.stdout.close()
        gen.wait()
    fd = os.open(bomb, os.O_RDONLY)
    try:
        for fmt in (lib.CDM_FORMAT_AUTO, lib.CDM_FORMAT_RAW):
            with pytest.raises(TargetTooSmallError, match="larger than the target"):
                stream(fd, tmp_path / "t.raw", 16 * MiB, format=fmt)
            os.lseek(fd, 0, os.SEEK_SET)
    finally:
        os.close(fd)
    assert not (tmp_path / "t.raw").exists() or os.path.getsize(tmp_path / "t.raw") <= 16 * MiB


def test_progress_and_cancel(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(8 * MiB)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        seen.append((done, total))
        return False

    r, t = pipe_of(data)
    try:
        res = stream(r, tmp_path / "t.raw", len(data), progress=progress)
    finally:
        os.close(r)
        t.join()
    assert seen and all(total == 0 for _, total in seen)
    assert seen[-1][0] == res.bytes_in == len(data)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    r, t = pipe_of(data)
    try:
        with pytest.raises(CopyCancelled):
            stream(r, tmp_path / "t2.raw", len(data), progress=lambda done, total: True)
    finally:
        os.close(r)
        t.join()


def test_cancel_while_the_pipe_is_silent(tmp_path: Path) -> None:
    """A source that sends nothing: cdm_ctx_cancel from another thread still stops the
    stream (it waits with poll, not a blocking read)."""
    r, w = os.pipe()
    ctx = _native.Context()
    try:
        with cdimover.Writer(tmp_path / "t.raw", MiB, target_is_zero=True, context=ctx) as wr:
            os.write(w, b"abc")
            timer = threading.Timer(0.3, ctx.cancel)
            timer.start()
            start = time.monotonic()
            with pytest.raises(CopyCancelled):
                native = wr._native
                assert native is not None
                _native.run_stream(ctx, r, native)
            assert time.monotonic() - start < 30
            timer.join()
    finally:
        os.close(r)
        os.close(w)
        ctx.close()


def test_read_error_names_the_source(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError) as info:
            stream(fd, tmp_path / "t.raw", MiB, path="/the/source")
        assert info.value.filename == "/the/source"
    finally:
        os.close(fd)


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="unknown compression"):
        stream_bytes(b"x", tmp_path / "t.raw", 1, compression=99)
    with pytest.raises(OSError, match="unknown hash"):
        stream_bytes(b"x", tmp_path / "t2.raw", 1, hash=99)


def chunk_sizes(seed: int) -> Callable[[], int]:
    rng = random.Random(seed)
    return lambda: rng.choice([1, 7, 512, 4095, 65536, 300_000])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large], deadline=None)
@given(layout=layouts(max_segments=8, max_len=512 * 1024),
       kind=st.sampled_from(list(COMPRESSORS)), seed=st.integers(0, 2**32 - 1),
       extra=st.sampled_from([0, 1, 4096, 3 * MiB]))
def test_random_layouts(tmp_path_factory: pytest.TempPathFactory, layout: Layout, kind: str,
                        seed: int, extra: int) -> None:
    """Random sparse layouts, compressed or not, written into the pipe in random pieces,
    onto a target of the image's size or larger: the target's first bytes equal the image
    and its zero blocks are holes."""
    tmp = tmp_path_factory.mktemp("lay")
    src = tmp / "src.raw"
    write_layout(src, layout)
    packed = compress_bytes(kind, src.read_bytes())
    target = tmp / "t.raw"
    r, t = pipe_of(packed, chunk_sizes(seed))
    try:
        res = stream(r, target, layout.size + extra)
    finally:
        os.close(r)
        t.join()
    assert res.image_size == layout.size and res.bytes_in == len(packed)
    assert sha256_prefix(target, layout.size) == sha256_file(src)
    assert os.path.getsize(target) == layout.size + extra
    assert not any(open(target, "rb").read()[layout.size:])
    assert allocated_blocks(target, 0, layout.size + extra) <= nonzero_blocks(
        target, layout.size + extra)


@pytest.fixture
def loaded_writer(tmp_path: Path) -> Iterator[cdimover.Writer]:
    with cdimover.Writer(tmp_path / "busy.raw", MiB) as w:
        yield w


def test_context_held_by_the_writer(loaded_writer: cdimover.Writer) -> None:
    """run_stream holds the writer's context too: another operation on it is refused."""
    other = _native.Context()
    r, w = os.pipe()
    try:
        os.close(w)
        with loaded_writer._ctx._lock:
            native = loaded_writer._native
            assert native is not None
            with pytest.raises(RuntimeError, match="one operation at a time"):
                _native.run_stream(other, r, native)
    finally:
        os.close(r)
        other.close()


def test_push_api_decodes_a_qcow2_pushed_in_pieces(tmp_path: Path) -> None:
    """cdm_stream_open/push/finish: a QCOW2 (with compressed clusters) pushed in uneven
    pieces converts to qemu-img's output; after a failure every later call fails again."""
    qemu_img = need_tool("qemu-img")
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(6 << 20)
        f.write(b"text " * 50000)
    img = tmp_path / "src.qcow2"
    subprocess.run([qemu_img, "convert", "-q", "-c", "-O", "qcow2", str(raw), str(img)],
                   check=True, env=TOOL_ENV)
    data = img.read_bytes()
    out = tmp_path / "out.raw"
    with cdimover.Writer(str(out), 8 << 20, target_is_zero=True) as w:
        native = w._writer()
        s = _native.NativeStream(w._ctx, native, _native.new_stream_opts(hash="sha256"))
        try:
            pos, rnd = 0, random.Random(7)
            while pos < len(data):
                n = rnd.choice([1, 7, 4096, 65536, 1 << 20])
                s.push(data[pos:pos + n])
                pos += n
            res = s.finish()
        finally:
            s.free()
    assert res.format == "qcow2" and res.image_size == 8 << 20
    assert res.bytes_in == len(data)
    assert res.digest == hashlib.sha256(data).digest()
    assert out.read_bytes() == raw.read_bytes()
    bad = tmp_path / "bad.raw"
    with pytest.raises(cdimover.ImageFormatError):
        with cdimover.Writer(str(bad), 8 << 20) as w:
            s = _native.NativeStream(w._ctx, w._writer(), _native.new_stream_opts(format="qcow2"))
            try:
                with pytest.raises(cdimover.ImageFormatError):
                    s.push(b"not a qcow2 image at all" * 10)
                    s.finish()
                s.push(b"more")             # the first failure again
            finally:
                s.free()
