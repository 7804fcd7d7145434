"""Volume.open and kubevirt clones between CDI volumes: all four mode pairs on loop devices and
directories (tmp, and ext4/xfs mounted from loop files), bytes by sha256 and allocation, CDI's
rules and size edges, in-use detection against real qemu-io/qemu-nbd processes, a mounted device
and an O_EXCL holder, force, a killed clone re-run, disk.img's mode and target_size growth.
Most tests need root and loop devices: they skip locally without them and fail in CI."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import cdimover
from cdimover import CloneValidationError, SourceInUseError, TargetTooSmallError
from cdimover.io import loopdev
from cdimover.errors import TargetInUseError
from cdimover.cdi import volume as volume_mod
from cdimover.sizing import format_size, parse_quantity, required_space, usable_space
from cdimover.cdi.volume import CloneResult, Volume, check_not_in_use, clone
from conftest import TOOL_ENV, need_loop, need_tool
from layouts import Layout, Segment, allocated_blocks, nonzero_blocks, sha256_prefix, \
    write_layout

MiB = 1 << 20

# Data, zeros written as data and holes, 4 KiB aligned: a little over 6 MiB.
LAYOUT = Layout((Segment("data", 1 * MiB), Segment("hole", 2 * MiB), Segment("zero", 512 << 10),
                 Segment("data", 64 << 10), Segment("hole", 1 * MiB), Segment("data", 4096),
                 Segment("hole", 1 * MiB + (512 << 10) - 4096 - (64 << 10)),
                 Segment("data", 64 << 10)), seed=7)
SIZE = LAYOUT.size

MountFs = Callable[..., Path]
LoopFactory = Callable[..., str]


# ---------------------------------------------------------------------------------------------
# helpers


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n


def volume_dir(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    return d


def check_sparse(src: Path, written: Path, size: int) -> None:
    """No block of WRITTEN's first SIZE bytes is allocated where SRC holds only zeros."""
    extra = allocated_blocks(written, 0, size) - nonzero_blocks(src, size)
    assert not extra, f"zero blocks allocated on the target: {sorted(extra)[:10]}"


def fs_dir(kind: str, tmp_path: Path, mounted_fs: MountFs) -> Path:
    """A directory on KIND: "tmp" (pytest's tmp_path), "ext4" or "xfs" (mounted loop files)."""
    if kind == "tmp":
        return tmp_path
    return mounted_fs(kind, 320 * MiB if kind == "xfs" else 64 * MiB)


def device_of(mount_point: Path) -> str:
    """/dev/NAME of the block device mounted at MOUNT_POINT."""
    st = os.stat(mount_point)
    uevent = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/uevent")
    for line in uevent.read_text().splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.split("=", 1)[1]
    raise AssertionError(f"no DEVNAME in {uevent}")


@contextmanager
def running(args: list[str], ready: Callable[[], bool], what: str) -> Iterator[
        subprocess.Popen[bytes]]:
    """Run ARGS with a stdin pipe until READY() holds (10 s at most); on exit end exactly that
    process (stdin closed, then SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=TOOL_ENV)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"{what} exited early ({proc.returncode}): {err}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not become ready")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def in_use(path: str | Path) -> bool:
    try:
        check_not_in_use(os.fspath(path))
    except SourceInUseError:
        return True
    return False


@pytest.fixture
def fake_available(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the free space Volume.open sees for every directory (statvfs f_bavail*f_frsize)."""
    def set_(n: int) -> None:
        monkeypatch.setattr(volume_mod, "_available_bytes", lambda fd: n)
    return set_


@pytest.fixture
def source_disk(tmp_path: Path) -> Path:
    """A Filesystem source volume holding LAYOUT as disk.img."""
    src = volume_dir(tmp_path, "src")
    write_layout(src / "disk.img", LAYOUT)
    return src


# ---------------------------------------------------------------------------------------------
# Volume.open


def test_open_directory_without_disk(tmp_path: Path, fake_available: Callable[[int], None]
                                     ) -> None:
    fake_available(100 * MiB)
    v = Volume.open(tmp_path)
    assert v.mode == "Filesystem" and v.path == str(tmp_path)
    assert v.disk_path == str(tmp_path / "disk.img")
    assert v.virtual_size is None
    assert v.available == 100 * MiB
    assert v.capacity == usable_space(100 * MiB, "0.06")
    v2 = Volume.open(tmp_path, filesystem_overhead="0.2")
    assert v2.capacity == usable_space(100 * MiB, "0.2") < v.capacity


def test_open_directory_counts_the_disk_it_replaces(source_disk: Path,
                                                   fake_available: Callable[[int], None]) -> None:
    fake_available(10 * MiB)
    allocated = os.stat(source_disk / "disk.img").st_blocks * 512
    v = Volume.open(source_disk)
    assert v.virtual_size == SIZE
    assert v.available == 10 * MiB + allocated
    assert v.capacity == usable_space(10 * MiB + allocated, 0.06)


def test_open_directory_real_statvfs(mounted_fs: MountFs) -> None:
    mnt = mounted_fs("ext4", 32 * MiB)
    st = os.statvfs(mnt)
    v = Volume.open(mnt)
    assert v.available == st.f_bavail * st.f_frsize
    assert v.capacity == usable_space(v.available, 0.06)
    assert v.capacity % MiB == 0 and v.capacity < v.available


def test_open_block(tmp_path: Path) -> None:
    need_loop()
    backing = tmp_path / "b.img"
    random_file(backing, 3 * MiB)
    with loopdev.attached(backing) as dev:
        v = Volume.open(dev, filesystem_overhead=0.5)
    assert (v.mode, v.path, v.disk_path) == ("Block", dev, dev)
    assert v.capacity == v.virtual_size == v.available == 3 * MiB
    assert v.filesystem_overhead is None


def test_open_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(CloneValidationError, match="regular file is not a volume") as ei:
        Volume.open(f)
    assert str(f) in str(ei.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CloneValidationError, match="fifo"):
        Volume.open(fifo)
    with pytest.raises(FileNotFoundError) as fe:
        Volume.open(tmp_path / "missing")
    assert fe.value.filename == str(tmp_path / "missing")
    with pytest.raises(CloneValidationError, match="overhead"):
        Volume.open(tmp_path, filesystem_overhead=1.5)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_open_refuses_a_disk_img_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    vol = volume_dir(tmp_path, "vol")
    if kind == "symlink":
        (vol / "disk.img").symlink_to("/etc/passwd")
    else:
        (vol / "disk.img").mkdir()
    with pytest.raises(CloneValidationError, match="not a regular file") as ei:
        Volume.open(vol)
    assert str(vol / "disk.img") in str(ei.value)


def test_volume_and_result_are_frozen(tmp_path: Path) -> None:
    v = Volume.open(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.capacity = 1  # type: ignore[misc]
    assert not hasattr(v, "__dict__")
    fields = {f.name for f in dataclasses.fields(CloneResult)}
    assert {"source_mode", "target_mode", "source_path", "target_path", "virtual_size",
            "bytes_written", "bytes_zeroed", "preallocation_applied", "elapsed", "copy",
            "files"} <= fields
    assert "__slots__" in CloneResult.__dict__


# ---------------------------------------------------------------------------------------------
# The four pairs


@pytest.mark.parametrize("fs", ["tmp", "ext4", "xfs"])
def test_block_to_filesystem(tmp_path: Path, mounted_fs: MountFs, fs: str) -> None:
    need_loop()
    backing = tmp_path / "src.img"
    write_layout(backing, LAYOUT)
    target = volume_dir(fs_dir(fs, tmp_path, mounted_fs), "pvc")
    with loopdev.attached(backing) as dev:
        r = clone(dev, target)
    disk = target / "disk.img"
    assert (r.source_mode, r.target_mode, r.source_path, r.target_path) == (
        "Block", "Filesystem", dev, str(target))
    assert r.virtual_size == SIZE == disk.stat().st_size == r.disk_size
    assert sha256_prefix(disk, SIZE) == sha256_prefix(backing, SIZE)
    check_sparse(backing, disk, SIZE)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o660
    assert r.copy is not None and r.copy.target == str(disk)
    assert r.bytes_written == r.copy.bytes_written > 0
    assert r.files == 0 and not r.preallocation_applied and r.elapsed > 0


@pytest.mark.parametrize("fs", ["tmp", "ext4"])
def test_filesystem_to_block(tmp_path: Path, mounted_fs: MountFs, fs: str) -> None:
    need_loop()
    src = volume_dir(fs_dir(fs, tmp_path, mounted_fs), "src")
    write_layout(src / "disk.img", LAYOUT)
    backing = tmp_path / "tgt.img"
    random_file(backing, SIZE + 2 * MiB)          # a bigger, dirty device
    tail = backing.read_bytes()[SIZE:]
    with loopdev.attached(backing) as dev:
        r = clone(src, dev)
    assert (r.source_mode, r.target_mode, r.target_path) == ("Filesystem", "Block", dev)
    assert r.disk_size is None and r.virtual_size == SIZE
    assert sha256_prefix(backing, SIZE) == sha256_prefix(src / "disk.img", SIZE)
    assert backing.read_bytes()[SIZE:] == tail, "bytes past the source size were touched"
    check_sparse(src / "disk.img", backing, SIZE)
    assert r.bytes_zeroed > 0


@pytest.mark.parametrize("fs", ["tmp", "ext4", "xfs", "ext4->tmp"])
def test_filesystem_to_filesystem(tmp_path: Path, mounted_fs: MountFs, fs: str) -> None:
    if fs == "ext4->tmp":
        src = volume_dir(mounted_fs("ext4", 64 * MiB), "src")
        tgt = volume_dir(tmp_path, "tgt")
    else:
        base = fs_dir(fs, tmp_path, mounted_fs)
        src, tgt = volume_dir(base, "src"), volume_dir(base, "tgt")
    write_layout(src / "disk.img", LAYOUT)
    r = clone(src, tgt)
    disk = tgt / "disk.img"
    assert (r.source_mode, r.target_mode) == ("Filesystem", "Filesystem")
    assert sha256_prefix(disk, SIZE) == sha256_prefix(src / "disk.img", SIZE)
    assert disk.stat().st_size == SIZE
    assert stat.S_IMODE(disk.stat().st_mode) == 0o660
    assert r.copy is not None
    if fs == "xfs":
        # One filesystem with reflinks: the extents are shared, zeros written as data included.
        assert r.copy.reflinked
        assert allocated_blocks(disk, 0, SIZE) == allocated_blocks(src / "disk.img", 0, SIZE)
    else:
        check_sparse(src / "disk.img", disk, SIZE)


def test_block_to_block(tmp_path: Path) -> None:
    need_loop()
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    write_layout(src, LAYOUT)
    random_file(tgt, SIZE)
    with loopdev.attached(src) as sdev, loopdev.attached(tgt) as tdev:
        r = clone(Volume.open(sdev), tdev)
    assert (r.source_mode, r.target_mode) == ("Block", "Block")
    assert sha256_prefix(tgt, SIZE) == sha256_prefix(src, SIZE)
    check_sparse(src, tgt, SIZE)


# ---------------------------------------------------------------------------------------------
# Rules


def test_unknown_content_type(source_disk: Path, tmp_path: Path) -> None:
    with pytest.raises(CloneValidationError, match="ContentType not one of: kubevirt, archive"):
        clone(source_disk, volume_dir(tmp_path, "t"), content_type="Kubevirt")


def test_source_without_disk(tmp_path: Path) -> None:
    empty, tgt = volume_dir(tmp_path, "empty"), volume_dir(tmp_path, "t")
    with pytest.raises(CloneValidationError, match="no disk image to clone"):
        clone(empty, tgt)
    assert not (tgt / "disk.img").exists()


def test_same_volume(source_disk: Path, tmp_path: Path) -> None:
    with pytest.raises(CloneValidationError, match="same directory"):
        clone(source_disk, source_disk)
    need_loop()
    backing = tmp_path / "b.img"
    random_file(backing, MiB)
    with loopdev.attached(backing) as dev:
        with pytest.raises(CloneValidationError, match="same device"):
            clone(dev, dev)


def test_block_target_too_small(tmp_path: Path, source_disk: Path) -> None:
    need_loop()
    backing = tmp_path / "small.img"
    random_file(backing, 2 * MiB)
    before = backing.read_bytes()
    src = volume_dir(tmp_path, "src4")
    with open(src / "disk.img", "wb") as f:
        f.truncate(4 * MiB)
    with loopdev.attached(backing) as dev:
        with pytest.raises(TargetTooSmallError) as ei:
            clone(src, dev)
    assert ("target holds 2.0 MiB (2097152 bytes) but the image needs 4.0 MiB (4194304 bytes)"
            in str(ei.value))
    assert (ei.value.required, ei.value.available) == (4 * MiB, 2 * MiB)
    assert dev in str(ei.value)
    assert backing.read_bytes() == before, "nothing may be written before the size check"


def test_block_target_exact_edge(tmp_path: Path) -> None:
    need_loop()
    backing = tmp_path / "dev.img"
    random_file(backing, 2 * MiB)
    src = volume_dir(tmp_path, "src")
    with loopdev.attached(backing) as dev:
        for size, fits in ((2 * MiB, True), (2 * MiB + 1, False)):
            random_file(src / "disk.img", size)
            if fits:
                clone(src, dev)
                assert sha256_prefix(backing, size) == sha256_prefix(src / "disk.img", size)
            else:
                with pytest.raises(TargetTooSmallError) as ei:
                    clone(src, dev)
                assert (ei.value.required, ei.value.available) == (size, 2 * MiB)


def minimal_available(size: int, overhead: str) -> int:
    """The least free space whose usable space holds SIZE bytes, found from required_space
    (CDI's RoundUp/ceil formulas are not exact inverses: required_space may exceed it by a
    byte or so, never fall short)."""
    a = required_space(size, overhead)
    assert usable_space(a, overhead) >= size
    while a > 0 and usable_space(a - 1, overhead) >= size:
        a -= 1
    assert required_space(size, overhead) - a < 2
    return a


@pytest.mark.parametrize("size", [4 * MiB, 4 * MiB + 1, 4 * MiB - 1])
@pytest.mark.parametrize("overhead", ["0.06", "0"])
def test_filesystem_target_edge_of_the_overhead_formula(
        tmp_path: Path, fake_available: Callable[[int], None], size: int,
        overhead: str) -> None:
    src = volume_dir(tmp_path, "src")
    with open(src / "disk.img", "wb") as f:
        f.truncate(size)
        f.seek(size - 1)
        f.write(b"\1")
    edge = minimal_available(size, overhead)
    tgt = volume_dir(tmp_path, "tgt")

    fake_available(edge - 1)
    room = usable_space(edge - 1, overhead)
    assert room < size and room % MiB == 0
    with pytest.raises(TargetTooSmallError) as ei:
        clone(src, tgt, filesystem_overhead=overhead)
    assert (ei.value.required, ei.value.available) == (size, room)
    assert (f"target holds {format_size(room)} ({room} bytes) but the image needs "
            f"{format_size(size)} ({size} bytes)" in str(ei.value))
    assert f"{edge - 1} bytes) available with filesystem overhead {overhead}" in str(ei.value)
    assert not (tgt / "disk.img").exists(), "nothing may be written before the size check"

    fake_available(edge)
    r = clone(src, tgt, filesystem_overhead=overhead)
    assert r.virtual_size == size
    assert sha256_prefix(tgt / "disk.img", size) == sha256_prefix(src / "disk.img", size)


def test_replaced_disk_img_counts_as_room(tmp_path: Path, source_disk: Path,
                                          fake_available: Callable[[int], None]) -> None:
    # A full filesystem whose old (or partial) disk.img would be replaced still takes the clone.
    tgt = volume_dir(tmp_path, "tgt")
    random_file(tgt / "disk.img", SIZE + 2 * MiB)
    fake_available(0)
    assert Volume.open(tgt).capacity >= SIZE
    clone(source_disk, tgt)
    assert sha256_prefix(tgt / "disk.img", SIZE) == sha256_prefix(source_disk / "disk.img", SIZE)
    assert (tgt / "disk.img").stat().st_size == SIZE


# ---------------------------------------------------------------------------------------------
# target_size, mode, preallocation


@pytest.mark.parametrize("target_size", [SIZE + 3 * MiB, "12Mi", "12582912", SIZE])
def test_target_size_grows_the_disk(tmp_path: Path, source_disk: Path,
                                    target_size: int | str) -> None:
    tgt = volume_dir(tmp_path, "tgt")
    r = clone(source_disk, tgt, target_size=target_size)
    want = parse_quantity(target_size)
    disk = tgt / "disk.img"
    assert disk.stat().st_size == want == r.disk_size
    assert r.virtual_size == SIZE
    assert sha256_prefix(disk, SIZE) == sha256_prefix(source_disk / "disk.img", SIZE)
    with open(disk, "rb") as f:
        f.seek(SIZE)
        assert f.read().count(0) == want - SIZE
    assert not allocated_blocks(disk, SIZE, want - SIZE), "the grown tail must stay a hole"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o660


def test_target_size_refusals(tmp_path: Path, source_disk: Path,
                              fake_available: Callable[[int], None]) -> None:
    tgt = volume_dir(tmp_path, "tgt")
    with pytest.raises(CloneValidationError, match="smaller than the source's virtual size"):
        clone(source_disk, tgt, target_size=SIZE - 1)
    with pytest.raises(CloneValidationError, match="target_size"):
        clone(source_disk, tgt, target_size="12MB")
    fake_available(required_space(16 * MiB))
    with pytest.raises(TargetTooSmallError) as ei:
        clone(source_disk, tgt, target_size="17Mi")
    assert (ei.value.required, ei.value.available) == (17 * MiB, 16 * MiB)
    assert "target holds 16.0 MiB (16777216 bytes) but the requested target_size needs 17.0 MiB" \
        in str(ei.value)
    assert not (tgt / "disk.img").exists()
    clone(source_disk, tgt, target_size="16Mi")
    assert (tgt / "disk.img").stat().st_size == 16 * MiB


def test_target_size_with_a_block_target(tmp_path: Path, source_disk: Path) -> None:
    need_loop()
    backing = tmp_path / "t.img"
    random_file(backing, SIZE)
    with loopdev.attached(backing) as dev:
        with pytest.raises(CloneValidationError, match="Filesystem targets only"):
            clone(source_disk, dev, target_size=SIZE)


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o000])
def test_disk_img_mode_is_0660(tmp_path: Path, source_disk: Path, umask: int) -> None:
    tgt = volume_dir(tmp_path, "tgt")
    old = os.umask(umask)
    try:
        clone(source_disk, tgt)
        assert stat.S_IMODE((tgt / "disk.img").stat().st_mode) == 0o660
        # An old disk.img with another mode is replaced as CDI's would be: 0660.
        os.chmod(tgt / "disk.img", 0o604)
        clone(source_disk, tgt)
        assert stat.S_IMODE((tgt / "disk.img").stat().st_mode) == 0o660
    finally:
        os.umask(old)


def test_preallocation(tmp_path: Path, source_disk: Path) -> None:
    tgt = volume_dir(tmp_path, "tgt")
    r = clone(source_disk, tgt, preallocation=True, target_size=SIZE + MiB)
    disk = tgt / "disk.img"
    assert r.preallocation_applied and r.copy is not None and r.copy.preallocation == "falloc"
    assert disk.stat().st_blocks * 512 >= SIZE + MiB
    assert sha256_prefix(disk, SIZE) == sha256_prefix(source_disk / "disk.img", SIZE)
    r2 = clone(source_disk, volume_dir(tmp_path, "tgt2"))
    assert not r2.preallocation_applied


# ---------------------------------------------------------------------------------------------
# In use


def test_disk_locked_by_qemu_io(tmp_path: Path, source_disk: Path) -> None:
    qemu_io = need_tool("qemu-io")
    disk = source_disk / "disk.img"
    tgt = volume_dir(tmp_path, "tgt")
    assert not in_use(source_disk)
    with running([qemu_io, "-f", "raw", str(disk)], lambda: in_use(source_disk), "qemu-io"):
        with pytest.raises(SourceInUseError) as ei:
            clone(source_disk, tgt)
        assert str(disk) in str(ei.value)
        assert "locked by another process (a running QEMU?)" in str(ei.value)
        assert not (tgt / "disk.img").exists(), "nothing may be written for a busy source"
        r = clone(source_disk, tgt, force=True)
        assert r.virtual_size == SIZE
    assert sha256_prefix(tgt / "disk.img", SIZE) == sha256_prefix(disk, SIZE)
    assert not in_use(source_disk), "the lock goes with the process"
    clone(source_disk, tgt)


def test_disk_served_by_qemu_nbd(tmp_path: Path, source_disk: Path) -> None:
    qemu_nbd = need_tool("qemu-nbd")
    sock = tmp_path / "nbd.sock"
    args = [qemu_nbd, "-t", "-f", "raw", "-k", str(sock), str(source_disk / "disk.img")]
    with running(args, lambda: in_use(source_disk), "qemu-nbd"):
        with pytest.raises(SourceInUseError, match="a running QEMU"):
            clone(source_disk, volume_dir(tmp_path, "tgt"))
    assert not in_use(source_disk)


def test_mounted_block_device(tmp_path: Path, mounted_fs: MountFs) -> None:
    mnt = mounted_fs("ext4", 16 * MiB)
    (mnt / "hello").write_text("hello")
    dev = device_of(mnt)
    tgt = volume_dir(tmp_path, "tgt")
    with pytest.raises(SourceInUseError) as ei:
        clone(dev, tgt)
    assert dev in str(ei.value) and "mounted" in str(ei.value)
    assert not (tgt / "disk.img").exists()
    r = clone(dev, tgt, force=True)
    assert r.virtual_size == 16 * MiB == (tgt / "disk.img").stat().st_size


def test_block_device_held_exclusively(tmp_path: Path) -> None:
    need_loop()
    backing = tmp_path / "src.img"
    write_layout(backing, LAYOUT)
    holder = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); "
              "print('held', flush=True); sys.stdin.read()")
    with loopdev.attached(backing) as dev:
        with running([sys.executable, "-c", holder, dev], lambda: in_use(dev), "O_EXCL holder"):
            with pytest.raises(SourceInUseError, match="held open exclusively"):
                clone(dev, volume_dir(tmp_path, "tgt"))
        assert not in_use(dev)
        clone(dev, tmp_path / "tgt")
    assert sha256_prefix(tmp_path / "tgt" / "disk.img", SIZE) == sha256_prefix(backing, SIZE)


def test_block_device_locked_by_qemu_io(tmp_path: Path) -> None:
    need_loop()
    qemu_io = need_tool("qemu-io")
    backing = tmp_path / "src.img"
    write_layout(backing, LAYOUT)
    with loopdev.attached(backing) as dev:
        with running([qemu_io, "-f", "raw", dev], lambda: in_use(dev), "qemu-io"):
            with pytest.raises(SourceInUseError, match=r"locked by .*a running QEMU"):
                clone(dev, volume_dir(tmp_path, "tgt"))


def test_source_not_claimed_target_claimed_during_the_copy(tmp_path: Path) -> None:
    # The O_EXCL probe of the source is closed before copying (another exclusive opener of
    # the source can come and go), while the target device is claimed for the whole copy:
    # nobody can mount it or claim it meanwhile.
    need_loop()
    src_b, tgt_b = tmp_path / "src.img", tmp_path / "tgt.img"
    random_file(src_b, 12 * MiB)
    random_file(tgt_b, 12 * MiB)
    seen: list[int] = []
    with loopdev.attached(src_b) as sdev, loopdev.attached(tgt_b) as tdev:
        def probe(done: int, total: int) -> None:
            fd = os.open(sdev, os.O_RDONLY | os.O_EXCL)
            os.close(fd)
            with pytest.raises(OSError) as ei:
                os.close(os.open(tdev, os.O_RDONLY | os.O_EXCL))
            assert ei.value.errno == errno.EBUSY
            seen.append(done)

        clone(sdev, tdev, progress=probe)
        os.close(os.open(tdev, os.O_RDONLY | os.O_EXCL))    # released after the clone
    assert seen, "the progress callback never ran"
    assert sha256_prefix(tgt_b, 12 * MiB) == sha256_prefix(src_b, 12 * MiB)


def test_target_claimed_by_another_is_refused(tmp_path: Path) -> None:
    need_loop()
    src_b, tgt_b = tmp_path / "src.img", tmp_path / "tgt.img"
    random_file(src_b, 4 * MiB)
    random_file(tgt_b, 4 * MiB)
    before = sha256_prefix(tgt_b, 4 * MiB)
    with loopdev.attached(src_b) as sdev, loopdev.attached(tgt_b) as tdev:
        held = os.open(tdev, os.O_RDONLY | os.O_EXCL)
        try:
            with pytest.raises(TargetInUseError, match="in use"):
                clone(sdev, tdev)
        finally:
            os.close(held)
    assert sha256_prefix(tgt_b, 4 * MiB) == before


# ---------------------------------------------------------------------------------------------
# Failure and re-run

# The progress callback runs beside the workers, not in their way: a slow copy (one thread,
# 4 KiB requests) is what keeps the clone running until the kill.
KILLED_CLONE = """
import pathlib, sys
from cdimover.cdi.volume import clone
marker = pathlib.Path(sys.argv[3])
def seen(done, total):
    marker.write_text(f"{done}/{total}")
clone(sys.argv[1], sys.argv[2], progress=seen, threads=1, request_size=4096)
"""


def kill_mid_clone(src: Path, tgt: Path, marker: Path) -> int:
    """Run a slow clone of SRC into TGT in a child and SIGKILL it once it made progress
    (MARKER appears); the child's pid."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLONE, str(src), str(tgt), str(marker)])
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert proc.poll() is None, "the clone ended before it could be killed"
            assert time.monotonic() < deadline, "no progress from the clone"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.pid


def test_killed_clone_is_rerun(tmp_path: Path, mounted_fs: MountFs) -> None:
    need_loop()
    src = volume_dir(tmp_path, "src")
    size = 40 * MiB
    random_file(src / "disk.img", size)
    tgt = volume_dir(mounted_fs("ext4", 96 * MiB), "pvc")   # another filesystem: no reflink
    marker = tmp_path / "progress"
    kill_mid_clone(src, tgt, marker)
    # The new disk was being written under a partial name: nothing named disk.img yet, and the
    # partial file is not taken for a disk.
    partial = tgt / "disk.img.cdimover-partial"
    assert sorted(os.listdir(tgt)) == ["disk.img.cdimover-partial"]
    assert sha256_prefix(partial, size) != sha256_prefix(src / "disk.img", size), \
        "the clone was not killed mid-way"
    assert Volume.open(tgt).virtual_size is None
    r = clone(src, tgt)
    assert r.virtual_size == size
    assert sorted(os.listdir(tgt)) == ["disk.img"]
    disk = tgt / "disk.img"
    assert disk.stat().st_size == size
    assert sha256_prefix(disk, size) == sha256_prefix(src / "disk.img", size)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o660


def test_killed_clone_over_an_existing_disk_is_marked(tmp_path: Path,
                                                      mounted_fs: MountFs) -> None:
    need_loop()
    src = volume_dir(tmp_path, "src")
    size = 40 * MiB
    random_file(src / "disk.img", size)
    tgt = volume_dir(mounted_fs("ext4", 96 * MiB), "pvc")
    random_file(tgt / "disk.img", 8 * MiB)            # an older disk, replaced in place
    marker = tmp_path / "progress"
    pid = kill_mid_clone(src, tgt, marker)
    # The half-written disk says so: an xattr naming the job, and a clone from it is refused.
    mark = json.loads(os.getxattr(tgt / "disk.img", "user.cdimover.incomplete"))
    assert mark["pid"] == pid
    vol = Volume.open(tgt)
    assert vol.incomplete is not None and str(pid) in vol.incomplete
    other = volume_dir(tmp_path, "other")
    with pytest.raises(CloneValidationError, match="incomplete"):
        clone(vol, other)
    clone(src, tgt)
    assert "user.cdimover.incomplete" not in os.listxattr(tgt / "disk.img")
    assert Volume.open(tgt).incomplete is None
    assert sha256_prefix(tgt / "disk.img", size) == sha256_prefix(src / "disk.img", size)


def test_cancelled_clone_is_rerun(tmp_path: Path) -> None:
    need_loop()
    backing = tmp_path / "src.img"
    random_file(backing, 16 * MiB)
    tgt = volume_dir(tmp_path, "tgt")
    with loopdev.attached(backing) as dev:
        with pytest.raises(cdimover.CopyCancelled):
            clone(dev, tgt, progress=lambda done, total: True)
        assert sorted(os.listdir(tgt)) == []     # the partial disk was removed
        calls: list[tuple[int, int]] = []
        clone(dev, tgt, progress=lambda done, total: calls.append((done, total)))
    assert calls and all(total == 16 * MiB for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert sha256_prefix(tgt / "disk.img", 16 * MiB) == sha256_prefix(backing, 16 * MiB)


def test_failed_clone_names_the_target(tmp_path: Path, mounted_fs: MountFs) -> None:
    # A full filesystem (the size check passed on a stale Volume) fails before writing, naming
    # the target; once the room is there the same call succeeds.
    need_loop()
    mnt = mounted_fs("ext4", 16 * MiB)
    tgt = volume_dir(mnt, "pvc")
    src = volume_dir(tmp_path, "src")
    random_file(src / "disk.img", 10 * MiB)
    filler = mnt / "filler"
    random_file(filler, 8 * MiB)
    stale = dataclasses.replace(Volume.open(tgt), capacity=1 << 40)
    with pytest.raises(TargetTooSmallError) as ei:
        clone(src, stale)
    assert str(tgt / "disk.img") in str(ei.value) and ei.value.required == 10 * MiB
    assert sorted(os.listdir(tgt)) == []
    filler.unlink()
    clone(src, tgt)
    assert sha256_prefix(tgt / "disk.img", 10 * MiB) == sha256_prefix(src / "disk.img", 10 * MiB)


def test_overhead_checked_for_volumes_as_for_paths(tmp_path: Path) -> None:
    src, dst = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "dst")
    random_file(src / "disk.img", MiB)
    for bad in (2, -0.1, "abc"):
        with pytest.raises(CloneValidationError, match="overhead"):
            clone(src, dst, filesystem_overhead=bad)  # type: ignore[arg-type]
        with pytest.raises(CloneValidationError, match="overhead"):
            clone(Volume.open(src), Volume.open(dst), filesystem_overhead=bad)  # type: ignore[arg-type]
    assert os.listdir(dst) == []
