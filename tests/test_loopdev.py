"""cdimover.io.loopdev against real loop devices (root), plus the backing-file and manifest helpers.

Every test that attaches detaches in teardown, even on failure, and only ever devices it attached
itself: an autouse fixture fails the test if any loop device is still bound to a file under its
tmp_path (and detaches that device, which can only be the test's own). Devices are never found or
detached by pattern, so teammates' devices attached concurrently are left alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import need, need_loop, need_tool

from cdimover.io import loopdev
from cdimover.io.loopdev import LoopFlag

MiB = 1 << 20
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81


# ---------------------------------------------------------------------------------------------
# helpers


def bound_backing(device: str) -> str | None:
    """The sysfs backing_file of DEVICE, or None when nothing is attached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except FileNotFoundError:
        return None


def devices_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies under ROOT (so were attached by this test)."""
    prefix = os.path.realpath(root) + os.sep
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("loop"):
            backing = bound_backing(f"/dev/{name}")
            if backing is not None and backing.startswith(prefix):
                found.append(f"/dev/{name}")
    return found


def assert_detached(device: str, backing: Path) -> None:
    """DEVICE no longer shows BACKING. It may be unbound (ENXIO) or, as a concurrent process may
    take the freed device at once, bound to somebody else's file."""
    real = os.path.realpath(backing)
    assert bound_backing(device) != real
    try:
        got = loopdev.info(device)
    except OSError as e:
        assert e.errno == errno.ENXIO
        assert e.filename == device
    else:
        assert got.backing_file != real


def sparse(path: Path, size: int) -> Path:
    loopdev.create_backing_file(path, size)
    return path


@pytest.fixture
def root_loop(tmp_path: Path) -> Iterator[Path]:
    """Requires root and loop devices; after the test, fails if anything under tmp_path is still
    attached (detaching those, which only this test can have attached)."""
    need_loop()
    yield tmp_path
    leaked = devices_under(tmp_path)
    for dev in leaked:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
    assert not leaked, f"loop devices left attached: {leaked}"


@pytest.fixture
def spare_loop(tmp_path: Path) -> Iterator[int]:
    """A fresh, unbound loop device made with LOOP_CTL_ADD at a high number (GET_FREE hands out
    the lowest free one, so nobody else attaches to it); removed with LOOP_CTL_REMOVE."""
    need_loop()
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    number = None
    try:
        for candidate in range(400 + os.getpid() % 400, 2000):
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_ADD, candidate)
                break
            except FileExistsError:
                continue
        need(number is not None, "LOOP_CTL_ADD found no free number")
        assert number is not None
        yield number
    finally:
        if number is not None:
            try:
                fcntl.ioctl(ctl, LOOP_CTL_REMOVE, number)
            except OSError:
                pass
        os.close(ctl)


# ---------------------------------------------------------------------------------------------
# layouts


def test_struct_sizes() -> None:
    assert loopdev._LOOP_INFO64.size == 232
    assert loopdev._LOOP_CONFIG.size == 304
    assert loopdev.LO_NAME_SIZE == 64
    assert [int(f) for f in LoopFlag] == [1, 4, 8, 16]


def test_struct_layout_matches_kernel_header(tmp_path: Path) -> None:
    """Compile offsetof() against <linux/loop.h> and compare with the struct formats."""
    cc = need_tool("cc")
    need(os.path.exists("/usr/include/linux/loop.h"), "needs linux/loop.h (linux-libc-dev)")
    src = tmp_path / "layout.c"
    src.write_text(r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/loop.h>
#include <linux/fs.h>
#define F(s, m) printf(#m " %zu\n", offsetof(struct s, m))
int main(void) {
    printf("sizeof_info64 %zu\nsizeof_config %zu\n", sizeof(struct loop_info64), sizeof(struct loop_config));
    F(loop_info64, lo_offset); F(loop_info64, lo_sizelimit); F(loop_info64, lo_number);
    F(loop_info64, lo_flags); F(loop_info64, lo_file_name); F(loop_info64, lo_init);
    F(loop_config, block_size); F(loop_config, info); F(loop_config, __reserved);
    printf("LOOP_CONFIGURE %d\nLOOP_CTL_GET_FREE %d\nLOOP_SET_BLOCK_SIZE %d\n",
           LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_SET_BLOCK_SIZE);
    printf("BLKSSZGET %lu\nBLKGETSIZE64 %lu\n", (unsigned long)BLKSSZGET,
           (unsigned long)BLKGETSIZE64);
    return 0;
}
""")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    c = {k: int(v) for k, v in out.items()}

    off = struct.calcsize
    assert c["sizeof_info64"] == loopdev._LOOP_INFO64.size == 232
    assert c["sizeof_config"] == loopdev._LOOP_CONFIG.size == 304
    assert c["lo_offset"] == off("=3Q")
    assert c["lo_sizelimit"] == off("=4Q")
    assert c["lo_number"] == off("=5Q")
    assert c["lo_flags"] == off("=5Q3I")
    assert c["lo_file_name"] == off("=5Q4I")
    assert c["lo_init"] == off("=5Q4I64s64s32s")
    assert c["block_size"] == off("=I")
    assert c["info"] == off("=2I")
    assert c["__reserved"] == off(f"=2I{loopdev._LOOP_INFO64.size}s")
    assert c["LOOP_CONFIGURE"] == loopdev.LOOP_CONFIGURE
    assert c["LOOP_CTL_GET_FREE"] == loopdev.LOOP_CTL_GET_FREE
    assert c["LOOP_SET_BLOCK_SIZE"] == loopdev.LOOP_SET_BLOCK_SIZE
    assert c["BLKSSZGET"] == loopdev.BLKSSZGET
    assert c["BLKGETSIZE64"] == loopdev.BLKGETSIZE64


def test_pack_info_truncates_file_name() -> None:
    raw = loopdev._unpack_info(loopdev._pack_info(
        offset=4096, sizelimit=MiB, flags=LoopFlag.READ_ONLY, file_name=b"/x" * 100))
    assert raw.offset == 4096 and raw.sizelimit == MiB and raw.flags == 1
    assert raw.file_name == ("/x" * 100)[:63]


# ---------------------------------------------------------------------------------------------
# backing files


def test_create_backing_file_sparse(tmp_path: Path) -> None:
    p = tmp_path / "sparse.img"
    loopdev.create_backing_file(p, 16 * MiB)
    st = p.stat()
    assert st.st_size == 16 * MiB
    assert st.st_blocks * 512 < MiB  # essentially nothing allocated


def test_create_backing_file_zero(tmp_path: Path) -> None:
    p = tmp_path / "zero.img"
    size = 3 * MiB + 512  # not a whole number of chunks
    loopdev.create_backing_file(p, size, fill="zero")
    st = p.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 >= size  # every byte written
    assert p.read_bytes() == bytes(size)


def test_create_backing_file_refuses_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(b"keep me")
    with pytest.raises(FileExistsError) as ei:
        loopdev.create_backing_file(p, MiB)
    assert ei.value.filename == str(p)
    assert p.read_bytes() == b"keep me"

    loopdev.create_backing_file(p, MiB, fill="zero", overwrite=True)
    assert p.read_bytes() == bytes(MiB)
    loopdev.create_backing_file(p, 2 * MiB, overwrite=True)
    assert p.stat().st_size == 2 * MiB


def test_create_backing_file_overwrite_only_regular_files(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(OSError) as ei:
        loopdev.create_backing_file(d, MiB, overwrite=True)
    assert ei.value.filename == str(d)


@pytest.mark.parametrize("size", [0, -512, 1000, 513])
def test_create_backing_file_bad_size(tmp_path: Path, size: int) -> None:
    p = tmp_path / "bad.img"
    with pytest.raises(ValueError):
        loopdev.create_backing_file(p, size)
    assert not p.exists()


def test_create_backing_file_bad_fill(tmp_path: Path) -> None:
    p = tmp_path / "bad.img"
    with pytest.raises(ValueError):
        loopdev.create_backing_file(p, MiB, fill="random")
    assert not p.exists()


# ---------------------------------------------------------------------------------------------
# attach / info / detach


@pytest.mark.blockdev
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_attach_info(root_loop: Path, sector_size: int) -> None:
    img = sparse(root_loop / "disk.img", 8 * MiB)
    with loopdev.attached(img, sector_size=sector_size) as dev:
        assert dev.startswith("/dev/loop") and dev[len("/dev/loop"):].isdigit()
        got = loopdev.info(dev)
        st = img.stat()
        assert got.device == dev
        assert got.backing_file == os.path.realpath(img)
        assert got.backing_device == st.st_dev
        assert got.backing_inode == st.st_ino
        assert got.sector_size == sector_size
        assert got.size == 8 * MiB
        assert (got.offset, got.sizelimit) == (0, 0)
        assert not got.read_only and not got.direct_io
        assert got.flags == LoopFlag(0)
    assert_detached(dev, img)


@pytest.mark.blockdev
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_write_through_device_read_through_file(root_loop: Path, sector_size: int) -> None:
    img = sparse(root_loop / "disk.img", 8 * MiB)
    data = os.urandom(256 * 1024)
    with loopdev.attached(img, sector_size=sector_size) as dev:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            assert os.pwrite(fd, data, 3 * MiB) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(img, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(len(data)) == data
    assert_detached(dev, img)


@pytest.mark.blockdev
def test_read_through_device_sees_file(root_loop: Path) -> None:
    img = sparse(root_loop / "disk.img", 4 * MiB)
    data = os.urandom(MiB)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(data)
    with loopdev.attached(img) as dev:
        with open(dev, "rb") as f:
            blob = f.read()
    assert blob == bytes(MiB) + data + bytes(2 * MiB)


@pytest.mark.blockdev
def test_offset_and_sizelimit(root_loop: Path) -> None:
    img = root_loop / "disk.img"
    pattern = bytes(range(256)) * (8 * MiB // 256)
    img.write_bytes(pattern)
    with loopdev.attached(img, offset=MiB, sizelimit=2 * MiB) as dev:
        got = loopdev.info(dev)
        assert (got.offset, got.sizelimit, got.size) == (MiB, 2 * MiB, 2 * MiB)
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            assert os.pread(fd, 4096, 0) == pattern[MiB:MiB + 4096]
            os.pwrite(fd, b"\xa5" * 4096, 2 * MiB - 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    blob = img.read_bytes()
    assert blob[3 * MiB - 4096:3 * MiB] == b"\xa5" * 4096
    assert blob[3 * MiB:] == pattern[3 * MiB:]
    assert blob[:3 * MiB - 4096] == pattern[:3 * MiB - 4096]


@pytest.mark.blockdev
def test_read_only_refuses_writes(root_loop: Path) -> None:
    img = sparse(root_loop / "disk.img", 4 * MiB)
    with loopdev.attached(img, read_only=True) as dev:
        got = loopdev.info(dev)
        assert got.read_only and LoopFlag.READ_ONLY in got.flags
        with pytest.raises(OSError) as ei:
            fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"\xff" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert ei.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert img.read_bytes() == bytes(4 * MiB)


@pytest.mark.blockdev
def test_direct_io_round_trip(root_loop: Path) -> None:
    img = sparse(root_loop / "disk.img", 4 * MiB)
    data = os.urandom(64 * 1024)
    with loopdev.attached(img, sector_size=4096, direct_io=True) as dev:
        got = loopdev.info(dev)
        # the kernel keeps buffered I/O where the file system cannot do O_DIRECT
        assert got.direct_io == (LoopFlag.DIRECT_IO in got.flags)
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(len(data)) == data


@pytest.mark.blockdev
def test_long_backing_path_reported_whole(root_loop: Path) -> None:
    deep = root_loop / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    img = sparse(deep / "disk.img", MiB)
    assert len(os.fsencode(os.path.realpath(img))) > 63
    with loopdev.attached(img) as dev:
        assert loopdev.info(dev).backing_file == os.path.realpath(img)


@pytest.mark.blockdev
def test_context_manager_detaches_when_body_raises(root_loop: Path) -> None:
    img = sparse(root_loop / "disk.img", MiB)
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with loopdev.attached(img) as dev:
            seen.append(dev)
            assert bound_backing(dev) == os.path.realpath(img)
            raise RuntimeError("boom")
    assert_detached(seen[0], img)


@pytest.mark.blockdev
def test_detach_twice_is_noop(root_loop: Path) -> None:
    img = sparse(root_loop / "disk.img", MiB)
    dev = loopdev.attach(img)
    try:
        assert bound_backing(dev) == os.path.realpath(img)
    finally:
        loopdev.detach(dev)
    assert_detached(dev, img)


@pytest.mark.blockdev
def test_detach_while_held_open_completes_on_last_close(
        root_loop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel never answers LOOP_CLR_FD with EBUSY any more: it marks the device autoclear
    # and unbinds it when the last opener (here: us, as udev's blkid would be) closes it.
    monkeypatch.setattr(loopdev, "_DETACH_ATTEMPTS", 5)
    img = sparse(root_loop / "disk.img", MiB)
    dev = loopdev.attach(img)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            loopdev.detach(dev)  # returns after a short wait
            assert bound_backing(dev) == os.path.realpath(img)
            assert LoopFlag.AUTOCLEAR in loopdev.info(dev).flags
        finally:
            os.close(fd)
        assert_detached(dev, img)
    finally:
        if bound_backing(dev) == os.path.realpath(img):  # still ours: the test failed early
            loopdev.detach(dev)


@pytest.mark.blockdev
def test_detach_and_info_on_unbound_device(spare_loop: int, tmp_path: Path) -> None:
    # /dev/loopN of a device nobody can be using: GET_FREE never hands out this high number
    node = loopdev._ensure_node(spare_loop, str(tmp_path))
    loopdev.detach(node)  # ENXIO: nothing attached, silently fine
    loopdev.detach(node)
    with pytest.raises(OSError) as ei:
        loopdev.info(node)
    assert ei.value.errno == errno.ENXIO
    assert ei.value.filename == node


@pytest.mark.blockdev
def test_ensure_node_creates_missing_node(spare_loop: int, tmp_path: Path) -> None:
    path = loopdev._ensure_node(spare_loop, str(tmp_path))
    assert path == str(tmp_path / f"loop{spare_loop}")
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode)
    assert os.major(st.st_rdev) == loopdev.LOOP_MAJOR
    with open(f"/sys/block/loop{spare_loop}/dev", encoding="ascii") as f:
        assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == f.read().strip()
    # an existing node is kept as it is
    assert loopdev._ensure_node(spare_loop, str(tmp_path)) == path
    assert os.stat(path).st_ino == st.st_ino


@pytest.mark.blockdev
def test_ensure_node_refuses_wrong_file(spare_loop: int, tmp_path: Path) -> None:
    (tmp_path / f"loop{spare_loop}").write_bytes(b"")
    with pytest.raises(OSError) as ei:
        loopdev._ensure_node(spare_loop, str(tmp_path))
    assert ei.value.errno == errno.ENOTBLK


def test_detach_refuses_non_loop(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"")
    with pytest.raises(OSError) as ei:
        loopdev.detach(f)
    assert ei.value.errno == errno.ENOTBLK and ei.value.filename == str(f)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # refused before open(), which would block
        loopdev.detach(fifo)
    with pytest.raises(OSError):
        loopdev.info("/dev/null")


def test_detach_refuses_other_block_device() -> None:
    need(os.geteuid() == 0, "needs root")
    disks = [f"/dev/{n}" for n in os.listdir("/sys/block")
             if not n.startswith("loop") and os.path.exists(f"/dev/{n}")]
    if not disks:
        pytest.skip("no non-loop block device node")
    with pytest.raises(OSError) as ei:
        loopdev.detach(disks[0])
    assert ei.value.errno == errno.EINVAL


@pytest.mark.blockdev
def test_attach_missing_backing(root_loop: Path) -> None:
    missing = root_loop / "missing.img"
    with pytest.raises(FileNotFoundError) as ei:
        loopdev.attach(missing)
    assert ei.value.filename == str(missing)


@pytest.mark.parametrize("kw", [
    {"sector_size": 1000}, {"sector_size": 256}, {"sector_size": 131072},
    {"offset": -1}, {"sizelimit": -4096}, {"sector_size": True},
])
def test_attach_bad_arguments(tmp_path: Path, kw: dict[str, Any]) -> None:
    img = sparse(tmp_path / "disk.img", MiB)
    with pytest.raises(ValueError):
        loopdev.attach(img, **kw)


# ---------------------------------------------------------------------------------------------
# the fallbacks and the GET_FREE/CONFIGURE race


@pytest.mark.blockdev
def test_legacy_fallback(root_loop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_configure(*args: object, **kw: object) -> None:
        calls.append(1)
        raise OSError(errno.ENOTTY, "LOOP_CONFIGURE unsupported")

    monkeypatch.setattr(loopdev, "_loop_configure", no_configure)
    img = root_loop / "disk.img"
    img.write_bytes(os.urandom(4 * MiB))
    with loopdev.attached(img, sector_size=4096, offset=MiB, sizelimit=2 * MiB,
                          read_only=True) as dev:
        got = loopdev.info(dev)
        assert calls
        assert (got.sector_size, got.offset, got.sizelimit, got.size) == (4096, MiB, 2 * MiB,
                                                                           2 * MiB)
        assert got.read_only
        assert got.backing_file == os.path.realpath(img)
        with open(dev, "rb") as f:
            assert f.read(4096) == img.read_bytes()[MiB:MiB + 4096]
    assert_detached(dev, img)


@pytest.mark.blockdev
def test_legacy_failure_undoes_set_fd(root_loop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_ioctl = fcntl.ioctl

    def ioctl(fd: int, request: int, *args: Any) -> Any:
        if request == loopdev.LOOP_CONFIGURE:
            raise OSError(errno.EINVAL, "old kernel")
        if request == loopdev.LOOP_SET_BLOCK_SIZE:
            raise OSError(errno.EINVAL, "refused")
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(loopdev, "fcntl", types.SimpleNamespace(ioctl=ioctl))
    img = sparse(root_loop / "disk.img", MiB)
    with pytest.raises(OSError) as ei:
        loopdev.attach(img, sector_size=4096)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.filename2 == str(img)
    assert devices_under(root_loop) == []  # LOOP_CLR_FD ran


def _busy_then_free(monkeypatch: pytest.MonkeyPatch, busy: int, times: int) -> list[int]:
    """Make loopdev's GET_FREE answer BUSY (an attached device) TIMES times, then truthfully."""
    real = loopdev._get_free
    handed: list[int] = []

    def get_free(ctl_fd: int) -> int:
        n = busy if len(handed) < times else real(ctl_fd)
        handed.append(n)
        return n

    monkeypatch.setattr(loopdev, "_get_free", get_free)
    return handed


@pytest.mark.blockdev
@pytest.mark.parametrize("legacy", [False, True])
def test_race_for_free_device_retries(root_loop: Path, monkeypatch: pytest.MonkeyPatch,
                                      legacy: bool) -> None:
    first = sparse(root_loop / "first.img", MiB)
    second = sparse(root_loop / "second.img", 2 * MiB)
    with loopdev.attached(first) as taken:
        number = int(taken[len("/dev/loop"):])
        handed = _busy_then_free(monkeypatch, number, 3)
        if legacy:
            monkeypatch.setattr(loopdev, "_loop_configure", _raise_enotty)
        with loopdev.attached(second) as dev:
            assert handed[:3] == [number] * 3 and len(handed) == 4
            assert dev != taken
            assert loopdev.info(dev).backing_file == os.path.realpath(second)
            # the device another "process" took was not disturbed
            assert loopdev.info(taken).backing_file == os.path.realpath(first)
            assert loopdev.info(taken).size == MiB


def _raise_enotty(*args: object, **kw: object) -> None:
    raise OSError(errno.ENOTTY, "LOOP_CONFIGURE unsupported")


@pytest.mark.blockdev
def test_race_gives_up_after_bounded_attempts(root_loop: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = sparse(root_loop / "first.img", MiB)
    second = sparse(root_loop / "second.img", MiB)
    monkeypatch.setattr(loopdev, "_ATTACH_BACKOFF", 0.0)
    with loopdev.attached(first) as taken:
        handed = _busy_then_free(monkeypatch, int(taken[len("/dev/loop"):]), 10**6)
        with pytest.raises(OSError) as ei:
            loopdev.attach(second)
        assert ei.value.errno == errno.EBUSY
        assert ei.value.filename == str(second)
        assert len(handed) == loopdev._ATTACH_ATTEMPTS
        assert loopdev.info(taken).backing_file == os.path.realpath(first)


# ---------------------------------------------------------------------------------------------
# the PersistentVolume manifest


def _match(doc: dict[str, Any]) -> dict[str, Any]:
    expr: dict[str, Any] = doc["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]
    return expr


def test_manifest_fields() -> None:
    text = loopdev.persistent_volume_manifest("seed-pv-0", "/dev/loop3", "node-a", 10 << 30)
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "v1" and doc["kind"] == "PersistentVolume"
    assert doc["metadata"]["name"] == "seed-pv-0"
    spec = doc["spec"]
    assert spec["capacity"] == {"storage": "10Gi"}
    assert spec["volumeMode"] == "Block"
    assert spec["local"] == {"path": "/dev/loop3"}
    assert spec["storageClassName"] == "local-block"
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["accessModes"] == ["ReadWriteOnce"]
    assert _match(doc) == {"key": "kubernetes.io/hostname", "operator": "In",
                           "values": ["node-a"]}


def test_manifest_options_and_yaml_quoting() -> None:
    doc = yaml.safe_load(loopdev.persistent_volume_manifest(
        "pv.example", "/dev/loop12", "true", "1500M", storage_class="fast.local",
        access_modes=["ReadWriteOnce", "ReadOnlyMany"], reclaim_policy="Delete"))
    assert _match(doc)["values"] == ["true"]  # a string, not YAML's boolean
    assert doc["spec"]["capacity"]["storage"] == "1500M"
    assert doc["spec"]["storageClassName"] == "fast.local"
    assert doc["spec"]["accessModes"] == ["ReadWriteOnce", "ReadOnlyMany"]
    assert doc["spec"]["persistentVolumeReclaimPolicy"] == "Delete"


@pytest.mark.parametrize(("size", "quantity"), [
    (1 << 30, "1Gi"), (3 << 20, "3Mi"), (5 << 40, "5Ti"), (2048, "2Ki"), (1536, "1536"),
    (1000, "1000"), ((1 << 30) + 512, str((1 << 30) + 512)), ("10Gi", "10Gi"), ("1e9", "1e9"),
])
def test_manifest_quantities(size: int | str, quantity: str) -> None:
    doc = yaml.safe_load(loopdev.persistent_volume_manifest("pv", "/dev/loop0", "n", size))
    assert doc["spec"]["capacity"]["storage"] == quantity


@pytest.mark.parametrize("name", [
    "", "Upper", "under_score", "-lead", "trail-", "a..b", ".a", "a" * 254, "spa ce",
])
def test_manifest_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        loopdev.persistent_volume_manifest(name, "/dev/loop0", "node", MiB)


def test_manifest_accepts_long_subdomain() -> None:
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    assert len(name) == 253
    doc = yaml.safe_load(loopdev.persistent_volume_manifest(name, "/dev/loop0", "node", MiB))
    assert doc["metadata"]["name"] == name


@pytest.mark.parametrize("kw", [
    {"size": 0}, {"size": -1}, {"size": True}, {"size": "abc"}, {"size": "-1Gi"},
    {"size": "0"}, {"device_path": "dev/loop0"}, {"node": ""}, {"node": "bad node"},
    {"storage_class": "Local_Block"}, {"access_modes": []}, {"access_modes": "ReadWriteOnce"},
    {"access_modes": ["ReadWriteSometimes"]}, {"reclaim_policy": "Keep"},
])
def test_manifest_rejects_bad_fields(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"name": "pv", "device_path": "/dev/loop0", "node": "node",
                            "size": MiB}
    args.update(kw)
    with pytest.raises(ValueError):
        loopdev.persistent_volume_manifest(**args)

