"""The reader/writer seam of the native core, seen from Python: a source that shrinks during a
copy or a conversion is an error naming the source (EIO), never a finished copy -- whether the
reads run into the new end of file or the extent map mistakes the lost tail for a hole.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


import cdimover
import cdimover as qcow2  # inspect() and convert()
from conftest import TOOL_ENV, need_tool

MiB = 1 << 20


def write_data(path: Path, ranges: list[tuple[int, int]], size: int) -> None:
    """A sparse file of SIZE bytes with random data in RANGES (offset, length)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in ranges:
            f.seek(off)
            f.write(os.urandom(length))


def truncating(path: Path, new_size: int) -> tuple[Callable[[int, int], None], list[int]]:
    """A progress callback that truncates PATH to NEW_SIZE at its first call mid-copy."""
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        if not calls and 0 < done < total:
            os.truncate(path, new_size)
        calls.append(done)

    return progress, calls


@pytest.mark.parametrize("layout, cut, words", [
    # Data all the way: reads run into the new end of the file.
    ([(0, 24 * MiB)], 8 * MiB, "source ended at offset"),
    # Data, then a hole, then data: after the cut SEEK_DATA answers ENXIO, which reads like
    # a trailing hole; only the size check at the end notices.
    ([(0, 8 * MiB), (16 * MiB, 8 * MiB)], 8 * MiB, "the source changed size during the copy"),
])
def test_copy_of_a_shrinking_source_fails(tmp_path: Path, layout: list[tuple[int, int]],
                                          cut: int, words: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_data(src, layout, 24 * MiB)
    progress, calls = truncating(src, cut)
    with pytest.raises(OSError) as e:
        cdimover.copy(src, dst, reflink="never", request_size=64 << 10, threads=1,
                      progress=progress)
    assert calls, "the progress callback never ran"
    assert e.value.errno == errno.EIO
    assert e.value.filename == str(src)
    assert words in str(e.value)
    assert os.path.getsize(src) == cut


def test_copy_of_a_stable_source_passes_the_size_check(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_data(src, [(0, 8 * MiB), (16 * MiB, 8 * MiB)], 24 * MiB)
    r = cdimover.copy(src, dst, reflink="never", request_size=64 << 10, threads=1)
    assert r.bytes_read == 16 * MiB
    assert src.read_bytes() == dst.read_bytes()


@pytest.mark.parametrize("cut_fraction", [0.5, 0.9])
def test_convert_of_a_shrinking_qcow2_fails(tmp_path: Path, cut_fraction: float) -> None:
    raw, img, out = tmp_path / "src.raw", tmp_path / "src.qcow2", tmp_path / "out.raw"
    write_data(raw, [(0, 8 * MiB), (12 * MiB, 8 * MiB)], 24 * MiB)
    subprocess.run([need_tool("qemu-img"), "convert", "-q", "-O", "qcow2", str(raw), str(img)],
                   check=True, env=TOOL_ENV)
    cut = int(os.path.getsize(img) * cut_fraction) // 512 * 512
    progress, calls = truncating(img, cut)
    with pytest.raises(OSError) as e:
        qcow2.convert(img, out, source_format="qcow2", request_size=64 << 10, threads=1,
                      progress=progress)
    assert calls, "the progress callback never ran"
    assert e.value.errno == errno.EIO
    assert e.value.filename == str(img)
    assert "source ended at offset" in str(e.value) or "changed size" in str(e.value)
