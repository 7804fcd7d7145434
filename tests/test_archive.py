"""Archive clones (content_type="archive"): the whole tree of a Filesystem volume, as CDI's tar
pipeline copies it, without tar. Checked entry by entry: types, bytes, permission bits, mtimes,
symlinks kept as symlinks (never followed, on either side), hard links, holes, lost+found and
special files left out, ownership not restored, same-named target entries replaced; and the
refusals: Block volumes, mode mismatch, a tree too big, a busy source. Needs root (chown, loop
devices for ext4/xfs): skips locally without it, fails in CI."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import cdimover
from cdimover import CloneValidationError, SourceInUseError, TargetTooSmallError
from cdimover.io import loopdev
from cdimover.cdi.volume import check_not_in_use, clone
from conftest import TOOL_ENV, need_loop, need_root, need_tool
from layouts import Layout, Segment, allocated_blocks, nonzero_blocks, write_layout

MiB = 1 << 20
DISK = Layout((Segment("data", 256 << 10), Segment("hole", 3 * MiB), Segment("zero", 64 << 10),
               Segment("data", 4096), Segment("hole", MiB)), seed=3)
T0 = 1_500_000_000_123_456_789       # a fixed mtime (ns) to recognise in the target

MountFs = Callable[..., Path]
Entry = tuple[str, int, int, object]   # kind, mode bits, mtime_ns, content (sha, link, None)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    need_root()


def mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def build_tree(root: Path) -> None:
    """A volume tree with every kind of entry an archive clone meets."""
    write_layout(root / "disk.img", DISK)
    os.chmod(root / "disk.img", 0o660)
    data = root / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "sub" / "deeper" / "file.txt").write_text("deep\n")
    os.chmod(data / "sub" / "deeper" / "file.txt", 0o600)
    (data / "empty").write_bytes(b"")
    (data / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(data / "script.sh", 0o750)
    (data / "setuid").write_bytes(b"\x7fELF")
    os.chmod(data / "setuid", 0o4755)
    (data / "lost+found").mkdir()                 # only the root's lost+found is left out
    (data / "lost+found" / "kept").write_text("kept")
    (data / "owned").write_text("someone else's")
    os.chown(data / "owned", 4321, 4321)
    ro = root / "ro"
    ro.mkdir()
    (ro / "inside").write_text("read-only dir")
    os.chmod(ro, 0o555)                            # children must exist before this mode
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.symlink("/etc/passwd", root / "passwd")     # absolute, out of the tree
    os.symlink("data/sub", root / "rel")           # relative, to a directory
    os.symlink("nowhere", root / "dangling")
    os.symlink("loop", root / "loop")
    os.symlink("/etc", data / "etc")               # a directory outside: never descended
    (root / "h1").write_bytes(b"hard linked\n" * 100)
    os.link(root / "h1", data / "h2")
    os.mkfifo(root / "pipe")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
    finally:
        s.close()
    lf = root / "lost+found"
    lf.mkdir(exist_ok=True)
    (lf / "#1234").write_text("fsck leftovers")
    # Fixed times, innermost first so a parent's time is not bumped by its children afterwards.
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root), reverse=True)):
        for name in dirnames + filenames:
            mtime(Path(dirpath) / name, T0 + i * 1000 + len(name))
    mtime(root, T0)


def snapshot(root: Path, *, skip_root: tuple[str, ...] = ()) -> dict[str, Entry]:
    """Every entry under ROOT (not ROOT itself), never following symlinks."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip_root]
            filenames = [f for f in filenames if f not in skip_root]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                kind = "file"
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                kind = "dir"
            else:
                kind = "special"
            mode = 0 if kind == "symlink" else stat.S_IMODE(st.st_mode)
            out[rel] = (kind, mode, st.st_mtime_ns, content)
    return out


def expected(src: Path) -> dict[str, Entry]:
    """What the target must hold after an archive clone of SRC."""
    out = {}
    for rel, (kind, mode, mt, content) in snapshot(src, skip_root=("lost+found",)).items():
        if kind == "special":
            continue
        if kind == "file":
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        out[rel] = (kind, mode, mt, content)
    return out


def fs_dir(kind: str, tmp_path: Path, mounted_fs: MountFs) -> Path:
    if kind == "tmp":
        return tmp_path
    need_loop()
    return mounted_fs(kind, 320 * MiB if kind == "xfs" else 64 * MiB)


def volume_dir(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------
# The tree


@pytest.mark.parametrize("fs", ["tmp", "ext4", "xfs", "ext4->xfs"])
def test_archive_clone_of_a_tree(tmp_path: Path, mounted_fs: MountFs, fs: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    if fs == "ext4->xfs":
        src = mounted_fs("ext4", 64 * MiB)           # a real lost+found at its root
        tgt = mounted_fs("xfs", 320 * MiB)
    else:
        base = fs_dir(fs, tmp_path, mounted_fs)
        src, tgt = volume_dir(base, "src"), volume_dir(base, "tgt")
    build_tree(src)
    want = expected(src)
    passwd_before = Path("/etc/passwd").read_bytes()

    with caplog.at_level(logging.WARNING, logger="cdimover.cdi.volume"):
        r = clone(src, tgt, content_type="archive")

    got = snapshot(tgt, skip_root=("lost+found",) if fs == "ext4->xfs" else ())
    assert got == want
    assert (r.source_mode, r.target_mode, r.content_type) == ("Filesystem", "Filesystem",
                                                              "archive")
    assert r.copy is None and r.files == len(want)
    assert set(r.skipped) == {str(src / "pipe"), str(src / "sock")}
    warned = " ".join(rec.getMessage() for rec in caplog.records)
    assert "pipe: skipped a fifo" in warned and "sock: skipped a socket" in warned
    # Symlinks are copied as symlinks and never followed.
    assert (tgt / "passwd").is_symlink() and os.readlink(tgt / "passwd") == "/etc/passwd"
    assert (tgt / "data" / "etc").is_symlink()
    assert Path("/etc/passwd").read_bytes() == passwd_before
    # Hard links stay hard links.
    assert os.stat(tgt / "h1").st_ino == os.stat(tgt / "data" / "h2").st_ino
    # No ownership restored (tar --no-same-owner): everything belongs to the cloner.
    assert os.stat(tgt / "data" / "owned").st_uid == os.getuid()
    # lost+found of the root is not cloned; a nested one is.
    assert not (tgt / "lost+found" / "#1234").exists()
    assert (tgt / "data" / "lost+found" / "kept").read_text() == "kept"
    # Holes stay holes.
    disk = tgt / "disk.img"
    assert disk.stat().st_size == DISK.size
    if fs == "xfs":       # one filesystem with reflinks: the extents are shared as they are
        assert allocated_blocks(disk, 0, DISK.size) == allocated_blocks(src / "disk.img", 0,
                                                                        DISK.size)
    else:
        extra = allocated_blocks(disk, 0, DISK.size) - nonzero_blocks(src / "disk.img",
                                                                      DISK.size)
        assert not extra, f"holes or zeros allocated: {sorted(extra)[:8]}"
    assert r.virtual_size >= DISK.size


def test_archive_target_entries_are_replaced_others_kept(tmp_path: Path) -> None:
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    outside = volume_dir(tmp_path, "outside")
    (src / "a").mkdir()
    (src / "a" / "new").write_text("new")
    (src / "b").write_text("file now")
    (src / "c").write_text("through a link?")
    (src / "disk.img").write_bytes(b"\1" * 4096)
    # The target: a file where a directory comes, a directory tree where a file comes, a
    # symlink out of the tree where a file comes, a leftover disk.img, and an unrelated entry.
    (tgt / "a").write_text("old file")
    (tgt / "b").mkdir()
    (tgt / "b" / "deep").mkdir()
    (tgt / "b" / "deep" / "x").write_text("old")
    os.symlink(outside / "victim", tgt / "c")
    os.symlink(outside, tgt / "b" / "out")          # rmtree must not follow this either
    (outside / "keep").write_text("keep")
    (tgt / "disk.img").write_bytes(b"\2" * 8192)
    (tgt / "unrelated").write_text("stays")
    os.mkfifo(src / "pipe")                          # skipped: the target's "pipe" stays
    (tgt / "pipe").write_text("not replaced by a skipped entry")

    r = clone(src, tgt, content_type="archive")
    assert r.skipped == (str(src / "pipe"),)
    assert (tgt / "pipe").read_text() == "not replaced by a skipped entry"
    assert (tgt / "a" / "new").read_text() == "new" and not (tgt / "a").is_symlink()
    assert (tgt / "b").read_text() == "file now"
    assert not (tgt / "c").is_symlink() and (tgt / "c").read_text() == "through a link?"
    assert not (outside / "victim").exists()
    assert (outside / "keep").read_text() == "keep"
    assert (tgt / "disk.img").read_bytes() == b"\1" * 4096
    assert (tgt / "unrelated").read_text() == "stays"
    assert r.files == 5


def test_archive_of_an_empty_volume(tmp_path: Path) -> None:
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    (src / "lost+found").mkdir()
    r = clone(src, tgt, content_type="archive")
    assert r.files == 0 and r.virtual_size == 0 and os.listdir(tgt) == []


def test_archive_rerun_after_cancel(tmp_path: Path) -> None:
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(5 * MiB))
    (src / "d").mkdir()
    (src / "d" / "g").write_bytes(os.urandom(MiB))
    calls: list[int] = []

    def stop_in_the_second_file(done: int, total: int) -> bool:
        calls.append(done)
        return done > 6 * MiB

    with pytest.raises(cdimover.CopyCancelled):
        clone(src, tgt, content_type="archive", progress=stop_in_the_second_file)
    assert (tgt / "f0").exists()
    r = clone(src, tgt, content_type="archive")
    assert snapshot(tgt) == snapshot(src)
    assert r.files == 5 and r.virtual_size == 16 * MiB


def test_archive_progress_covers_the_tree(tmp_path: Path) -> None:
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    (src / "a").write_bytes(os.urandom(3 * MiB))
    (src / "b").write_bytes(os.urandom(5 * MiB))
    seen: list[tuple[int, int]] = []
    clone(src, tgt, content_type="archive", progress=lambda d, t: seen.append((d, t)))
    assert seen and {t for _, t in seen} == {8 * MiB}
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] <= 8 * MiB


def test_archive_preallocation(tmp_path: Path) -> None:
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    write_layout(src / "disk.img", DISK)
    r = clone(src, tgt, content_type="archive", preallocation=True)
    assert r.preallocation_applied
    assert (tgt / "disk.img").stat().st_blocks * 512 >= DISK.size


# ---------------------------------------------------------------------------------------------
# Refusals


@contextmanager
def block_volume(tmp_path: Path, name: str, size: int = 4 * MiB) -> Iterator[str]:
    need_loop()
    backing = tmp_path / f"{name}.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    with loopdev.attached(backing) as dev:
        yield dev


def test_archive_refuses_block_volumes(tmp_path: Path) -> None:
    fs = volume_dir(tmp_path, "fs")
    (fs / "disk.img").write_bytes(b"\1" * 4096)
    with block_volume(tmp_path, "a") as a, block_volume(tmp_path, "b") as b:
        with pytest.raises(CloneValidationError) as ei:
            clone(a, b, content_type="archive")
        assert "ContentType Archive cannot have block volumeMode (target is Block)" in str(
            ei.value)
        with pytest.raises(CloneValidationError) as ei:
            clone(a, fs, content_type="archive")
        msg = str(ei.value)
        assert "ContentType Archive cannot have block volumeMode (source is Block)" in msg
        assert ("source volumeMode (Block) and target volumeMode (Filesystem) do not match, "
                "contentType (archive)") in msg
        with pytest.raises(CloneValidationError, match=r"source volumeMode \(Filesystem\) and "
                           r"target volumeMode \(Block\) do not match, contentType \(archive\)"):
            clone(fs, b, content_type="archive")
        # The same pairs are fine for kubevirt.
        clone(fs, b)


def test_archive_refuses_nested_volumes_and_target_size(tmp_path: Path) -> None:
    src = volume_dir(tmp_path, "src")
    inner = volume_dir(src, "inner")
    with pytest.raises(CloneValidationError, match="inside the other"):
        clone(src, inner, content_type="archive")
    with pytest.raises(CloneValidationError, match="inside the other"):
        clone(inner, src, content_type="archive")
    with pytest.raises(CloneValidationError, match="target_size"):
        clone(src, volume_dir(tmp_path, "t"), content_type="archive", target_size="1Gi")


def test_archive_too_big_for_the_target(tmp_path: Path, mounted_fs: MountFs) -> None:
    need_loop()
    tgt = mounted_fs("ext4", 16 * MiB)
    (tgt / "old").write_text("old")
    before = sorted(os.listdir(tgt))
    src = volume_dir(tmp_path, "src")
    (src / "big").write_bytes(os.urandom(20 * MiB))
    (src / "old").write_text("new")
    allocated = sum(os.stat(src / n).st_blocks * 512 for n in ("big", "old"))
    with pytest.raises(TargetTooSmallError) as ei:
        clone(src, tgt, content_type="archive")
    assert "but the volume tree needs 20.0 MiB" in str(ei.value)
    assert ei.value.required == allocated >= 20 * MiB
    assert ei.value.available is not None and ei.value.available < 20 * MiB
    assert sorted(os.listdir(tgt)) == before and (tgt / "old").read_text() == "old"
    # Holes do not count: a sparse tree of the same apparent size fits.
    (src / "big").unlink()
    with open(src / "big", "wb") as f:
        f.truncate(20 * MiB)
    r = clone(src, tgt, content_type="archive")
    assert (tgt / "big").stat().st_size == 20 * MiB and r.virtual_size == 20 * MiB + 3


def test_archive_source_in_use(tmp_path: Path) -> None:
    qemu_io = need_tool("qemu-io")
    src, tgt = volume_dir(tmp_path, "src"), volume_dir(tmp_path, "tgt")
    write_layout(src / "disk.img", DISK)
    proc = subprocess.Popen([qemu_io, "-f", "raw", str(src / "disk.img")], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TOOL_ENV)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                check_not_in_use(src)
            except SourceInUseError:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io never locked"
            time.sleep(0.05)
        with pytest.raises(SourceInUseError, match="disk.img: locked by"):
            clone(src, tgt, content_type="archive")
        assert os.listdir(tgt) == []
        r = clone(src, tgt, content_type="archive", force=True)
        assert r.files == 1
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
