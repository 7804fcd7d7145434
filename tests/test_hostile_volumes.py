"""Volumes and targets handled as an attacker would hand them over: links swapped in while a
job runs, links where a volume or disk should be, sources that shrink, two jobs on one target,
mounted and read-only devices, images that cannot fit an existing file.

The swap races run as root and as uid 107 without capabilities (CDI's pods), each in a child
process started with setpriv.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import cdimover
from cdimover.io import loopdev
from cdimover.errors import (
    CloneValidationError,
    ConfigurationError,
    TargetInUseError,
    UnsafeVolumeError,
)
from cdimover.pod import clone_config, import_config
from cdimover.cdi.volume import Volume, clone
from conftest import TOOL_ENV, need_loop, need_root, need_tool
from layouts import sha256_file

KiB, MiB = 1 << 10, 1 << 20
QEMU_UID = 107
TRIALS = 300

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


MIN_SWAPS = 100


def _racer(a: bytes, b: bytes, stop: str, count: mmap.mmap) -> None:
    """Swap names A and B with renameat2(RENAME_EXCHANGE) until STOP exists (at most 120 s),
    each state held for a random while of up to about a clone's duration, so that a job
    often inspects one state and opens the other; the number of swaps so far kept in COUNT."""
    swaps, deadline = 0, time.monotonic() + 120
    rng = random.Random(4517)
    while not os.path.exists(stop) and time.monotonic() < deadline:
        for _ in range(20):
            if _libc.renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE) == 0:
                swaps += 1
                struct.pack_into("=Q", count, 0, swaps)
            until = time.perf_counter() + rng.random() * 0.0015
            while time.perf_counter() < until:
                pass


def _race(base: Path, side: str, trials: int) -> tuple[int, int, int, int, int]:
    """At least TRIALS clones of BASE/src into BASE/dst while a forked racer swaps disk.img of
    SIDE's volume with a symlink to BASE/outside.img; the clones start once the racer has
    swapped and go on until it has swapped MIN_SWAPS times (at most 60 s), however the two
    processes were scheduled: (clones, escapes, successes, refusals, swaps)."""
    src, dst = base / "src", base / "dst"
    swapped = src if side == "source" else dst
    stop = base / "stop"
    count = mmap.mmap(-1, 8)        # anonymous and shared across the fork

    def swaps() -> int:
        return int(struct.unpack_from("=Q", count, 0)[0])

    pid = os.fork()
    if pid == 0:        # the racer
        try:
            _racer(bytes(swapped / "disk.img"), bytes(swapped / "evil"), str(stop), count)
        finally:
            os._exit(0)
    secret = sha256_file(base / "outside.img")
    clones = escapes = successes = refusals = 0
    try:
        deadline = time.monotonic() + 60
        while swaps() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        while (clones < trials or swaps() < MIN_SWAPS) and time.monotonic() < deadline:
            clones += 1
            try:
                clone(src, dst, force=True)
            except (cdimover.CdimoverError, OSError):
                refusals += 1
                continue
            successes += 1
            if side == "source" and sha256_file(dst / "disk.img") == secret:
                escapes += 1
        if side == "target" and sha256_file(base / "outside.img") != secret:
            escapes += 1
    finally:
        stop.touch()
        os.waitpid(pid, 0)
    return clones, escapes, successes, refusals, swaps()


def _run_as(user: str, fn: Callable[..., tuple[int, ...]], *args: object) -> tuple[int, ...]:
    """FN(*ARGS) in a forked child running as USER: "root", or "uid107" (uid and gid 107, no
    supplementary groups, no capabilities left); its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            if user != "root":
                os.setgroups([])
                os.setresgid(QEMU_UID, QEMU_UID, QEMU_UID)
                os.setresuid(QEMU_UID, QEMU_UID, QEMU_UID)
                caps = next(line for line in Path("/proc/self/status").read_text().splitlines()
                            if line.startswith("CapEff:"))
                assert int(caps.split()[1], 16) == 0, caps
            os.write(w, repr(fn(*args)).encode())
            status = 0
        except BaseException as e:  # noqa: BLE001 - reported through the pipe
            os.write(w, f"ERROR {type(e).__name__}: {e}".encode())
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert status == 0, out
    result = eval(out)  # noqa: S307 - a tuple of ints written by the child above
    assert isinstance(result, tuple)
    return result


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that uid 107 can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="cdimover-hostile-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("user", ["root", "uid107"])
@pytest.mark.parametrize("side", ["source", "target"])
def test_symlink_swap_race_never_escapes(shared_dir: Path, side: str, user: str) -> None:
    need_root()
    import cdimover.cdi.k8s  # noqa: F401 - loaded before the fork: uid 107 cannot read /root
    base = shared_dir
    (base / "src").mkdir()
    (base / "dst").mkdir()
    good = os.urandom(64 * KiB)
    secret = b"SECRET-" * (64 * KiB // 7) + b"x" * (64 * KiB % 7)
    (base / "outside.img").write_bytes(secret)       # the pod's own file (a token, say)
    (base / "src" / "disk.img").write_bytes(good)
    swapped = base / ("src" if side == "source" else "dst")
    if side == "target":
        (swapped / "disk.img").write_bytes(os.urandom(64 * KiB))
    os.symlink(base / "outside.img", swapped / "evil")
    if user != "root":
        for p in [base, *base.rglob("*")]:
            os.lchown(p, QEMU_UID, QEMU_UID)
    clones, escapes, successes, refusals, swaps = _run_as(user, _race, base, side, TRIALS)
    assert swaps >= MIN_SWAPS, f"the racer swapped {swaps} times in 60 s"
    assert clones >= TRIALS
    assert escapes == 0, f"{escapes} of {clones} clones went through the link"
    assert successes + refusals == clones
    assert successes > 0, "no clone succeeded: the test shows nothing"
    assert (base / "outside.img").read_bytes() == secret


def _disk_img_symlink_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"token" * 1000)
    os.symlink(secret, src / "disk.img")
    with pytest.raises(CloneValidationError, match="symbolic link"):
        clone(src, dst)
    assert os.listdir(dst) == []


def _volume_path_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "disk.img").write_bytes(b"x" * 4096)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(UnsafeVolumeError, match="symbolic link"):
        Volume.open(tmp_path / "link")
    assert Volume.open(tmp_path / "link", follow_symlinks=True).virtual_size == 4096


def _volume_swapped_after_inspection_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "disk.img").write_bytes(os.urandom(8192))
    vol = Volume.open(src)
    (src / "disk.img").rename(src / "old.img")
    (src / "disk.img").write_bytes(b"other" * 1000)
    with pytest.raises(UnsafeVolumeError, match="changed since it was inspected"):
        clone(vol, dst)
    tvol = Volume.open(dst)
    os.rename(dst, tmp_path / "moved")
    (tmp_path / "dst").mkdir()
    with pytest.raises(UnsafeVolumeError, match="changed since it was inspected"):
        clone(src, tvol)
    assert os.listdir(tmp_path / "dst") == [] and os.listdir(tmp_path / "moved") == []


def _destination_disk_img_symlink_to_another_directory(tmp_path: Path) -> None:
    # DESTINATION=<dir>/disk.img where disk.img links to another directory: refused, and
    # nothing lands in that directory.
    vol, elsewhere = tmp_path / "vol", tmp_path / "elsewhere"
    vol.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, vol / "disk.img")
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(64 * KiB))
    env = {"IMPORTER_ENDPOINT": str(image), "DESTINATION": str(vol / "disk.img")}
    with pytest.raises(ConfigurationError, match="symbolic link"):
        import_config(env)
    src = tmp_path / "src"
    src.mkdir()
    env = {"VOLUME_MODE": "filesystem", "MOUNT_POINT": str(src), "PREALLOCATION": "false",
           "OWNER_UID": "u", "DESTINATION": str(vol / "disk.img")}
    with pytest.raises(ConfigurationError, match="symbolic link"):
        clone_config(env)
    os.symlink(src, tmp_path / "mp")
    env.update(MOUNT_POINT=str(tmp_path / "mp"), DESTINATION=str(elsewhere))
    with pytest.raises(ConfigurationError, match="MOUNT_POINT.*symbolic link"):
        clone_config(env)
    assert os.listdir(elsewhere) == []


def _source_shrinking_during_the_copy_fails(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    if kind == "qcow2":
        qemu_img = need_tool("qemu-img")
        raw, src = src, tmp_path / "src.qcow2"
        subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(src)], check=True,
                       env=TOOL_ENV)
    dst = tmp_path / "dst.img"
    calls = []

    def shrink(done: int, total: int) -> None:
        if not calls:
            os.truncate(src, 1 * MiB)
        calls.append(done)

    with pytest.raises(OSError) as ei:
        cdimover.convert(src, dst, progress=shrink, threads=1, request_size=64 * KiB)
    assert ei.value.errno == errno.EIO
    assert ei.value.filename == str(src)
    assert not dst.exists() and not (tmp_path / "dst.img.cdimover-partial").exists()


def _second_job_refused(first: Callable[[Callable[[int, int], None]], object],
                        second: Callable[[], object], match: str) -> None:
    """Run FIRST in a thread with a progress callback that holds it mid-job; meanwhile SECOND
    must raise TargetInUseError matching MATCH; then FIRST must complete without error."""
    running, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(done: int, total: int) -> None:
        running.set()
        release.wait(30)

    def run() -> None:
        try:
            first(hold)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert running.wait(30)
        with pytest.raises(TargetInUseError, match=match):
            second()
    finally:
        release.set()
        t.join(60)
    assert not errors, errors


def _two_jobs_on_one_file_target(tmp_path: Path, existing: bool) -> None:
    a, b, dst = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "dst.img"
    a.write_bytes(os.urandom(4 * MiB))
    b.write_bytes(os.urandom(4 * MiB))
    if existing:
        dst.write_bytes(os.urandom(1 * MiB))
    _second_job_refused(
        lambda hold: cdimover.copy(a, dst, reflink="never", threads=1, request_size=64 * KiB,
                                   progress=hold),
        lambda: cdimover.copy(b, dst, reflink="never"), "nothing was written|being written")
    assert sha256_file(dst) == sha256_file(a)


# The scenarios above, each run as root and as uid 107 without capabilities (in a forked
# child, on a directory the user owns).
SCENARIOS = [
    ("disk-img-symlink", _disk_img_symlink_is_refused, {}),
    ("volume-path-symlink", _volume_path_symlink_is_refused, {}),
    ("volume-swapped", _volume_swapped_after_inspection_is_refused, {}),
    ("destination-symlink", _destination_disk_img_symlink_to_another_directory, {}),
    ("shrinking-raw", _source_shrinking_during_the_copy_fails, {"kind": "raw"}),
    ("shrinking-qcow2", _source_shrinking_during_the_copy_fails, {"kind": "qcow2"}),
    ("two-jobs-new-file", _two_jobs_on_one_file_target, {"existing": False}),
    ("two-jobs-existing-file", _two_jobs_on_one_file_target, {"existing": True}),
]


@pytest.mark.parametrize("user", ["root", "uid107"])
@pytest.mark.parametrize("scenario,kwargs", [(fn, kw) for _, fn, kw in SCENARIOS],
                         ids=[name for name, _, _ in SCENARIOS])
def test_hostile_scenario(shared_dir: Path, user: str, scenario: Callable[..., None],
                          kwargs: dict[str, object]) -> None:
    if user == "root":
        scenario(shared_dir, **kwargs)
        return
    need_root()
    if kwargs.get("kind") == "qcow2":
        need_tool("qemu-img")
    import cdimover.cdi.k8s  # noqa: F401 - loaded before the fork: uid 107 cannot read /root
    import cdimover.pod.config  # noqa: F401
    os.chown(shared_dir, QEMU_UID, QEMU_UID)

    def child() -> tuple[int]:
        scenario(shared_dir, **kwargs)
        return (1,)

    assert _run_as(user, child) == (1,)


def test_two_clones_onto_one_block_target(tmp_path: Path) -> None:
    need_loop()
    a, tgt = tmp_path / "a.img", tmp_path / "tgt.img"
    a.write_bytes(os.urandom(4 * MiB))
    tgt.write_bytes(b"\0" * (4 * MiB))
    src = tmp_path / "src"
    src.mkdir()
    (src / "disk.img").write_bytes(os.urandom(4 * MiB))
    with loopdev.attached(a) as adev, loopdev.attached(tgt) as tdev:
        _second_job_refused(
            lambda hold: clone(adev, tdev, threads=1, request_size=64 * KiB, progress=hold),
            lambda: clone(src, tdev), "in use")
    assert sha256_file(tgt) == sha256_file(a)


def test_mounted_block_device_is_never_written(tmp_path: Path, mounted_fs) -> None:  # type: ignore[no-untyped-def]
    mnt = mounted_fs("ext4", 16 * MiB)
    dev = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
               if line.split()[1] == str(mnt))
    fd = os.open(dev, os.O_RDONLY)
    try:
        before = hashlib.sha256(os.pread(fd, 16 * MiB, 0)).hexdigest()
    finally:
        os.close(fd)
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(1 * MiB))
    with pytest.raises(TargetInUseError, match="mounted"):
        cdimover.copy(img, dev)
    with pytest.raises(TargetInUseError, match="mounted"):
        cdimover.convert(img, dev)
    with pytest.raises(TargetInUseError, match="mounted"):
        cdimover.create_blank(dev, 1 * MiB)
    with pytest.raises(TargetInUseError, match="mounted"):
        cdimover.preallocate(dev, mode="falloc")
    fd = os.open(dev, os.O_RDONLY)
    try:
        assert hashlib.sha256(os.pread(fd, 16 * MiB, 0)).hexdigest() == before
    finally:
        os.close(fd)


def test_conversion_that_cannot_fit_keeps_the_existing_file(tmp_path: Path) -> None:
    qemu_img = need_tool("qemu-img")
    huge = tmp_path / "huge.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(huge), "1P"], check=True,
                   env=TOOL_ENV)
    keep = tmp_path / "keep.img"
    keep.write_bytes(b"precious" * 4096)
    with pytest.raises(OSError) as ei:
        cdimover.convert(huge, keep)
    assert ei.value.errno == errno.EFBIG
    assert ei.value.filename == str(keep)
    assert keep.read_bytes() == b"precious" * 4096
    assert "user.cdimover.incomplete" not in os.listxattr(keep)


def test_read_only_block_target_says_so(tmp_path: Path) -> None:
    need_loop()
    backing = tmp_path / "ro.img"
    backing.write_bytes(b"\0" * (4 * MiB))
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(1 * MiB))
    with loopdev.attached(backing, read_only=True) as dev:
        with pytest.raises(OSError) as ei:
            cdimover.copy(img, dev)
    assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert ei.value.filename == dev
    assert "read-only" in str(ei.value).lower()


def test_missing_device_path_is_not_created(tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(64 * KiB))
    for name in (f"/dev/mapper/cdimover-test-missing-{os.getpid()}",
                 f"/dev/cdimover-test-missing-{os.getpid()}"):
        with pytest.raises(FileNotFoundError, match="never created under /dev"):
            cdimover.copy(img, name)
        assert not os.path.lexists(name)
        assert not os.path.lexists(name + ".cdimover-partial")


def test_fifo_target_and_source_do_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(64 * KiB))
    with pytest.raises(OSError, match="fifo"):
        cdimover.copy(img, fifo)
    with pytest.raises(OSError, match="fifo"):
        cdimover.copy(fifo, tmp_path / "out.img")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
