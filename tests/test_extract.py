"""cdimover.io.extract: tar archives extracted beneath a directory descriptor.

The hostile archives are built here, and each test checks both the refusal (UnsafeArchiveError
and its message) and that nothing outside the destination changed (a snapshot of the parent
directory: names, sizes, mtimes, bytes).  The traversal and symlink cases run again as uid 107
without capabilities.  Sparse members come from GNU tar's ``-S`` and keep their holes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import cdimover
from cdimover.errors import CdimoverError, UnsafeArchiveError
from cdimover.io.extract import ExtractResult, Limits, extract_tar, open_dir_nofollow, remove_entries
from conftest import need, need_root, need_tool
from layouts import sha256_file as sha256

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
Snapshot = dict[str, tuple[str, int, int, str]]


# ---------------------------------------------------------------------------------------------
# Helpers


class Archive:
    """A tar archive written member by member (PAX format)."""

    def __init__(self, path: Path, mode: str = "w") -> None:
        self.path = path
        self.tar = tarfile.open(path, mode, format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes | None = None,
            link: str = "", mode: int = 0o644, mtime: int = 1_600_000_000) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mode, ti.mtime = kind, link, mode, mtime
        if data is not None:
            ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data) if data is not None else None)

    def close(self) -> Path:
        self.tar.close()
        return self.path


def snapshot(root: Path, skip: Path | None = None) -> Snapshot:
    """Every entry under ROOT (links not followed, SKIP's subtree left out): kind, size,
    mtime and content digest or link target."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", st.st_size, st.st_mtime_ns, os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = ("file", st.st_size, st.st_mtime_ns, sha256(p))
            else:
                out[str(p)] = ("dir", 0, st.st_mtime_ns, "")
    st = root.lstat()
    out[str(root)] = ("dir", 0, st.st_mtime_ns, "")
    return out



def extract(archive: Path, dest: Path, **kw: object) -> ExtractResult:
    fd = open_dir_nofollow(dest)
    try:
        with open(archive, "rb") as f:
            return extract_tar(f, fd, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


@pytest.fixture
def outer(tmp_path: Path) -> Iterator[Path]:
    """OUTER/ with a file 'flag' and the destination OUTER/dest/."""
    d = tmp_path / "outer"
    (d / "dest").mkdir(parents=True)
    (d / "flag").write_text("original\n")
    (d / "secret").mkdir()
    (d / "secret" / "key").write_text("key\n")
    yield d


def cve_2025_4517(path: Path, dest: Path) -> Path:
    """The published shape of CVE-2025-4517: nested directories, each reached through a
    one-letter symlink, whose expansion exceeds PATH_MAX; a last symlink climbing back out
    through them; 'escape' pointing at DEST's parent; then a hard link to a file there,
    overwritten, and a new file written through 'escape'."""
    steps = "abcdefghijklmnop"
    path_max = os.pathconf(dest.parent, "PC_PATH_MAX")
    component = "d" * ((path_max - (len(str(dest)) + 1)) // (len(steps) + 1))
    a = Archive(path)
    prefix = ""
    for step in steps:
        a.add(os.path.join(prefix, component), tarfile.DIRTYPE, mode=0o777)
        a.add(os.path.join(prefix, step), tarfile.SYMTYPE, link=component)
        prefix = os.path.join(prefix, component)
    climb = os.path.join(*steps, "l" * 254)
    a.add(climb, tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps)))
    a.add("escape", tarfile.SYMTYPE, link=os.path.join(climb, ".."))
    a.add("flaglink", tarfile.LNKTYPE, link="escape/flag")
    a.add("flaglink", data=b"overwritten\n")
    a.add("escape/newfile", data=b"new\n")
    return a.close()


# ---------------------------------------------------------------------------------------------
# Hostile archives


def test_cve_2025_4517_symlink_chain_is_refused(tmp_path: Path, outer: Path) -> None:
    dest = outer / "dest"
    archive = cve_2025_4517(tmp_path / "cve.tar", dest)
    before = snapshot(outer, skip=dest)
    with pytest.raises(UnsafeArchiveError, match=r"^unsafe archive member 'a/b/c/d/e/f/g/h/i/"
                       r"j/k/l/m/n/o/p/l+': its path goes through the symbolic link 'a', "
                       r"which is never followed$"):
        extract(archive, dest)
    assert snapshot(outer, skip=dest) == before
    assert (outer / "flag").read_text() == "original\n"
    assert not (outer / "newfile").exists()
    # What came before the refused member is there, as the archive made it.
    assert os.readlink(dest / "a") == "d" * len(os.readlink(dest / "a"))


@pytest.mark.parametrize("members, message", [
    ([("/abs", tarfile.REGTYPE, "")], "an absolute name"),
    ([("../flag", tarfile.REGTYPE, "")], "a '..' component in the name"),
    ([("sub/../../flag", tarfile.REGTYPE, "")], "a '..' component in the name"),
    ([("sub/", tarfile.DIRTYPE, ""), ("sub/..", tarfile.DIRTYPE, "")],
     "a '..' component in the name"),
    ([("", tarfile.REGTYPE, "")], "an empty name"),
    ([("./", tarfile.REGTYPE, "")], "an empty name"),
    ([("out", tarfile.SYMTYPE, "../secret"), ("out/key", tarfile.REGTYPE, "")],
     "its path goes through the symbolic link 'out', which is never followed"),
    ([("out", tarfile.SYMTYPE, str(Path("/").resolve())), ("out/x/y", tarfile.REGTYPE, "")],
     "its path goes through the symbolic link 'out', which is never followed"),
    ([("h", tarfile.LNKTYPE, "../flag")], "a '..' component in the hard link target"),
    ([("h", tarfile.LNKTYPE, "/etc/passwd")], "an absolute hard link target"),
    ([("s", tarfile.SYMTYPE, "../flag"), ("h", tarfile.LNKTYPE, "s")],
     "a hard link to 's', which is not a regular file extracted from this archive"),
    ([("d/", tarfile.DIRTYPE, ""), ("h", tarfile.LNKTYPE, "d")],
     "a hard link to 'd', which is not a regular file extracted from this archive"),
    ([("h", tarfile.LNKTYPE, "nothing")],
     "a hard link to 'nothing', which is not a regular file extracted from this archive"),
    ([("chr", tarfile.CHRTYPE, "")], "a device node"),
    ([("blk", tarfile.BLKTYPE, "")], "a device node"),
    ([("fifo", tarfile.FIFOTYPE, "")], "a FIFO"),
    ([("weird", b"Z", "")], "an unsupported member type b'Z'"),
    ([("s", tarfile.SYMTYPE, "")], "a symbolic link with an empty target"),
])
def test_refused_members(tmp_path: Path, outer: Path, members: list[tuple[str, bytes, str]],
                         message: str) -> None:
    dest = outer / "dest"
    a = Archive(tmp_path / "bad.tar")
    for name, kind, link in members:
        a.add(name, kind, data=b"payload\n" if kind == tarfile.REGTYPE else None, link=link)
    archive = a.close()
    before = snapshot(outer, skip=dest)
    with pytest.raises(UnsafeArchiveError) as e:
        extract(archive, dest)
    assert str(e.value) == f"unsafe archive member {members[-1][0]!r}: {message}"
    assert isinstance(e.value, CdimoverError) and isinstance(e.value, ValueError)
    assert snapshot(outer, skip=dest) == before
    assert cdimover.UnsafeArchiveError is UnsafeArchiveError


def test_symlink_out_is_created_never_followed(tmp_path: Path, outer: Path) -> None:
    """A symlink to outside is extracted as a symlink; writing through it, by name or by a
    hard link beneath it, is refused, and the file it points at is unchanged."""
    dest = outer / "dest"
    a = Archive(tmp_path / "link.tar")
    a.add("flag", tarfile.SYMTYPE, link=str(outer / "flag"))
    a.add("up", tarfile.SYMTYPE, link="..")
    a.add("inside/", tarfile.DIRTYPE)
    a.add("alias", tarfile.SYMTYPE, link="inside")
    archive_ok = a.close()
    before = snapshot(outer, skip=dest)
    result = extract(archive_ok, dest)
    assert result.symlinks == 3 and result.entries == ("flag", "up", "inside", "alias")
    assert os.readlink(dest / "flag") == str(outer / "flag")
    assert os.readlink(dest / "up") == ".."
    for later in (("up/flag", tarfile.REGTYPE, ""), ("alias/x", tarfile.REGTYPE, ""),
                  ("up/secret/key", tarfile.REGTYPE, ""), ("h", tarfile.LNKTYPE, "up/flag")):
        b = Archive(tmp_path / "later.tar")
        b.add(later[0], later[1], data=b"evil\n" if later[1] == tarfile.REGTYPE else None,
              link=later[2])
        with pytest.raises(UnsafeArchiveError, match="symbolic link '(up|alias)', which is "
                           "never followed"):
            extract(b.close(), dest)
    assert snapshot(outer, skip=dest) == before


def test_existing_symlink_is_replaced_not_followed(tmp_path: Path, outer: Path) -> None:
    """A file member named like a symlink already in the destination replaces the symlink;
    the file the symlink pointed at is untouched."""
    dest = outer / "dest"
    os.symlink(outer / "flag", dest / "f")
    os.symlink(outer / "flag", dest / "h")
    a = Archive(tmp_path / "a.tar")
    a.add("f", data=b"mine\n", mode=0o644)
    a.add("h", tarfile.LNKTYPE, link="f")
    before = snapshot(outer, skip=dest)
    result = extract(a.close(), dest)
    assert snapshot(outer, skip=dest) == before
    assert (dest / "f").read_text() == "mine\n" and not (dest / "f").is_symlink()
    assert (dest / "h").stat().st_ino == (dest / "f").stat().st_ino
    assert (result.files, result.hardlinks, result.entries) == (1, 1, ("f", "h"))


def test_hard_link_to_file_not_from_this_archive_is_refused(tmp_path: Path, outer: Path) -> None:
    dest = outer / "dest"
    (dest / "existing").write_text("theirs\n")
    a = Archive(tmp_path / "a.tar")
    a.add("h", tarfile.LNKTYPE, link="existing")
    with pytest.raises(UnsafeArchiveError, match="which is not a regular file extracted from "
                       "this archive"):
        extract(a.close(), dest)
    assert not (dest / "h").exists()


def test_directory_in_the_way(tmp_path: Path, outer: Path) -> None:
    dest = outer / "dest"
    (dest / "d").mkdir()
    a = Archive(tmp_path / "a.tar")
    a.add("d", data=b"x")
    with pytest.raises(IsADirectoryError) as e:
        extract(a.close(), dest)
    assert e.value.filename == "d"


@pytest.mark.parametrize("limits, members, message", [
    (Limits(max_members=3), [f"f{i}" for i in range(5)],
     "'f3': the archive has more than 3 members"),
    (Limits(max_total_bytes=20), ["a", "b", "c"],
     "'c': the files' sizes add up to more than 20 bytes"),
    (Limits(max_path_length=10), ["short", "a-long-name"],
     "'a-long-name': the name is longer than 10 bytes"),
    (Limits(max_depth=3), ["a/b/c", "a/b/c2/d"],
     "'a/b/c2/d': the name is deeper than 3 components"),
])
def test_limits(tmp_path: Path, outer: Path, limits: Limits, members: list[str],
                message: str) -> None:
    a = Archive(tmp_path / "many.tar")
    for name in members:
        a.add(name, data=b"0123456789")
    with pytest.raises(UnsafeArchiveError) as e:
        extract(a.close(), outer / "dest", limits=limits)
    assert str(e.value) == f"unsafe archive member {message}"


def test_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path, outer: Path) -> None:
    a = Archive(tmp_path / "pax.tar")
    a.add("x" * 5000, data=b"data")   # the long name goes into a PAX header
    archive = a.close()
    with pytest.raises(UnsafeArchiveError, match=r"^an extended header of \d+ bytes exceeds "
                       r"the limit of 1000$"):
        extract(archive, outer / "dest", limits=Limits(max_header_bytes=1000))


def test_malformed_and_truncated_archives(tmp_path: Path, outer: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 100)
    with pytest.raises(UnsafeArchiveError, match="^malformed archive: "):
        extract(junk, outer / "dest")
    a = Archive(tmp_path / "cut.tar")
    a.add("big", data=os.urandom(64 << 10))
    cut = a.close()
    with open(cut, "r+b") as f:
        f.truncate(512 + (16 << 10))
    with pytest.raises(UnsafeArchiveError):
        extract(cut, outer / "dest")


def three_members(path: Path) -> bytes:
    """A plain archive of three 1000-byte files f0, f1, f2 (1536 bytes each); its bytes."""
    a = Archive(path)
    for i in range(3):
        a.add(f"f{i}", data=bytes([65 + i]) * 1000)
    return a.close().read_bytes()


@pytest.mark.parametrize("cut, message", [
    (lambda b: b[:3 * 1536], "truncated archive: it ends without an end-of-archive block, or "
     "inside a header"),
    (lambda b: b[:1536 + 200], "truncated archive: it ends without an end-of-archive block, "
     "or inside a header"),
    (lambda b: gzip.compress(b)[:-40], "truncated archive: it ends without an end-of-archive "
     "block, or inside a header"),
    (lambda b: b[:1536 + 148] + b"0001234\0" + b[1536 + 156:], "malformed archive: a header is "
     "corrupt (bad checksum)"),
])
def test_truncated_or_corrupt_archives_are_not_cut_short_silently(
        tmp_path: Path, outer: Path, cut: Callable[[bytes], bytes], message: str) -> None:
    """tarfile ends an archive quietly at a short or corrupt header once it has read a
    member; the import must not report such an archive extracted."""
    whole = three_members(tmp_path / "three.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(cut(whole))
    with pytest.raises(UnsafeArchiveError) as e:
        extract(bad, outer / "dest")
    assert str(e.value) == message
    assert extract(tmp_path / "three.tar", outer / "dest").files == 3


def test_works_without_extraction_filters(tmp_path: Path, outer: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python without tarfile's extraction filters (before 3.11.4) extracts the same."""
    for name in ("data_filter", "tar_filter", "fully_trusted_filter"):
        monkeypatch.delattr(tarfile, name, raising=False)
    a = Archive(tmp_path / "a.tar")
    a.add("dir/file", data=b"hello\n")
    result = extract(a.close(), outer / "dest")
    assert (outer / "dest" / "dir" / "file").read_bytes() == b"hello\n"
    assert (result.files, result.dirs, result.entries) == (1, 1, ("dir",))


def test_open_dir_nofollow_refuses_a_symlink(tmp_path: Path, outer: Path) -> None:
    os.symlink(outer / "dest", tmp_path / "link")
    with pytest.raises(OSError) as e:
        open_dir_nofollow(tmp_path / "link")
    assert (e.value.errno, e.value.filename) == (40, str(tmp_path / "link"))
    with pytest.raises(NotADirectoryError):
        open_dir_nofollow(outer / "flag")


# ---------------------------------------------------------------------------------------------
# What archives create


def holes(path: Path) -> list[tuple[int, int]]:
    """The data extents of PATH by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def sparse_source(path: Path) -> None:
    """16 MiB: 64 KiB of data at 0, 4 KiB at 5 MiB, a hole to the end."""
    with open(path, "wb") as f:
        f.write(os.urandom(64 << 10))
        f.seek(5 * MiB)
        f.write(os.urandom(4096))
        f.truncate(16 * MiB)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_keep_their_holes(tmp_path: Path, outer: Path, fmt: str) -> None:
    tar = need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    sparse_source(src / "disk.img")
    need(holes(src / "disk.img") == [(0, 64 << 10), (5 * MiB, 5 * MiB + 4096)],
         "the temporary filesystem keeps holes")
    archive = tmp_path / "sparse.tar"
    subprocess.run([tar, "-S", f"--format={fmt}", "-cf", str(archive), "-C", str(src),
                    "disk.img"], check=True)
    assert archive.stat().st_size < MiB   # tar stored it sparse
    dest = outer / "dest"
    result = extract(archive, dest)
    out = dest / "disk.img"
    assert sha256(out) == sha256(src / "disk.img")
    assert out.stat().st_size == 16 * MiB
    assert holes(out) == [(0, 64 << 10), (5 * MiB, 5 * MiB + 4096)]
    assert out.stat().st_blocks * 512 <= (64 << 10) + 4096 + (64 << 10)
    assert (result.size, result.bytes_written) == (16 * MiB, (64 << 10) + 4096)


def test_zeros_written_as_data_become_holes(tmp_path: Path, outer: Path) -> None:
    data = os.urandom(5000) + bytes(3 * MiB) + os.urandom(100) + bytes(8192 + 17)
    a = Archive(tmp_path / "z.tar")
    a.add("z", data=data)
    result = extract(a.close(), outer / "dest")
    out = outer / "dest" / "z"
    assert out.read_bytes() == data
    ext = holes(out)
    need(len(ext) > 1, "the temporary filesystem keeps holes")
    # 5000 bytes: blocks 0-1 written; zeros to the block holding the next data; the tail zeros
    # end in a hole.
    first_data_block = (5000 + 3 * MiB) // 4096 * 4096
    assert ext == [(0, 8192), (first_data_block, first_data_block + 4096)]
    assert result.bytes_written == 8192 + 4096


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_compressed_archives(tmp_path: Path, outer: Path, mode: str) -> None:
    payload = os.urandom(300_000)
    a = Archive(tmp_path / "c.tar", mode)
    a.add("dir/payload.bin", data=payload)
    a.add("dir/link", tarfile.SYMTYPE, link="payload.bin")
    archive = a.close()
    seen: list[int] = []
    result = extract(archive, outer / "dest", progress=seen.append)
    assert (outer / "dest" / "dir" / "payload.bin").read_bytes() == payload
    assert os.readlink(outer / "dest" / "dir" / "link") == "payload.bin"
    assert (result.files, result.dirs, result.symlinks) == (1, 1, 1)
    assert seen == sorted(seen) and 0 < seen[-1] <= archive.stat().st_size


def test_from_a_pipe(tmp_path: Path, outer: Path) -> None:
    """A non-seekable stream (tar -cz writing to a pipe) extracts the same."""
    tar = need_tool("tar")
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(os.urandom(3 * MiB + 5))
    p = subprocess.Popen([tar, "-cz", "-C", str(src), "a"], stdout=subprocess.PIPE)
    assert p.stdout is not None
    fd = open_dir_nofollow(outer / "dest")
    try:
        result = extract_tar(p.stdout, fd)
    finally:
        os.close(fd)
        p.stdout.close()
        p.wait(timeout=30)
    assert sha256(outer / "dest" / "a" / "b" / "f") == sha256(src / "a" / "b" / "f")
    assert result.entries == ("a",)


def build_tree(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """A realistic volume tree; the expected entries as (kind, mode, mtime_s, sha|target)."""
    t = 1_500_000_000
    entries: dict[str, tuple[str, int, int, str]] = {}

    def file(rel: str, data: bytes, mode: int, expect_mode: int) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        os.utime(p, (t, t + len(rel)))
        entries[rel] = ("file", expect_mode, t + len(rel), hashlib.sha256(data).hexdigest())

    file("disk.img", os.urandom(1 << 16) + bytes(1 << 20) + os.urandom(10), 0o660, 0o660)
    file("etc/config.yaml", b"key: value\n", 0o644, 0o644)
    file("etc/empty", b"", 0o444, 0o644)
    file("bin/tool", b"#!/bin/sh\necho hi\n", 0o4755, 0o755)
    file("bin/private", b"x" * 10000, 0o000, 0o600)
    file("data/deep/er/still/deeper/leaf.bin", os.urandom(70_001), 0o640, 0o640)
    os.link(root / "etc/config.yaml", root / "etc/config.hard")
    entries["etc/config.hard"] = entries["etc/config.yaml"]
    os.symlink("../etc/config.yaml", root / "bin/config")
    os.symlink("/nonexistent/absolute", root / "dangling")
    entries["bin/config"] = ("link", 0, t, "../etc/config.yaml")
    entries["dangling"] = ("link", 0, t, "/nonexistent/absolute")
    for link in ("bin/config", "dangling"):
        os.utime(root / link, (t, t), follow_symlinks=False)
    for rel, mode, expect in (("etc", 0o755, 0o755), ("bin", 0o2750, 0o750),
                              ("data/deep", 0o500, 0o700), ("data/deep/er", 0o777, 0o777),
                              ("data", 0o755, 0o755), ("data/deep/er/still", 0o755, 0o755),
                              ("data/deep/er/still/deeper", 0o711, 0o711)):
        entries[rel] = ("dir", expect, t + 7, "")
    for rel in sorted((r for r, e in entries.items() if e[0] == "dir"), key=len, reverse=True):
        os.chmod(root / rel, {"etc": 0o755, "bin": 0o2750, "data/deep": 0o500,
                              "data/deep/er": 0o777, "data": 0o755,
                              "data/deep/er/still": 0o755,
                              "data/deep/er/still/deeper": 0o711}[rel])
        os.utime(root / rel, (t + 7, t + 7))
    return entries


def read_tree(root: Path) -> dict[str, tuple[str, int, int, str]]:
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, int(st.st_mtime), os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), int(st.st_mtime), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), sha256(p))
    return out


def test_round_trip_of_a_tree(tmp_path: Path, outer: Path) -> None:
    """A tree made by GNU tar: every file's bytes by sha256, masked modes, mtimes (of
    directories too, applied after their content), symlinks as they were, hard links
    shared, ownership not restored."""
    tar = need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    expected = build_tree(src)
    archive = tmp_path / "tree.tar.gz"
    subprocess.run([tar, "-czf", str(archive), "-C", str(src), "--owner=1234",
                    "--group=5678", "."], check=True)
    for rel in ("data/deep",):   # let the test clean up after itself
        os.chmod(src / rel, 0o755)
    dest = outer / "dest"
    dest_before = dest.stat()
    result = extract(archive, dest)
    assert read_tree(dest) == expected
    assert (dest / "etc/config.hard").stat().st_ino == (dest / "etc/config.yaml").stat().st_ino
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in dest.rglob("*")} == \
        {(os.getuid(), os.getgid())}
    assert (result.files, result.hardlinks, result.symlinks, result.dirs) == (6, 1, 2, 7)
    assert sorted(result.entries) == ["bin", "dangling", "data", "disk.img", "etc"]
    assert stat.S_IMODE(dest.stat().st_mode) == stat.S_IMODE(dest_before.st_mode)
    # A second run over the first replaces everything in place.
    again = extract(archive, dest)
    assert read_tree(dest) == expected
    assert set(again.entries) == {"disk.img", "dangling"}   # the directories were there


def test_remove_entries_never_follows_links(tmp_path: Path, outer: Path) -> None:
    dest = outer / "dest"
    a = Archive(tmp_path / "a.tar")
    a.add("tree/sub/f", data=b"x")
    a.add("tree/up", tarfile.SYMTYPE, link="../..")
    a.add("tree/sub/ro/", tarfile.DIRTYPE, mode=0o500)
    a.add("secret", tarfile.SYMTYPE, link=str(outer / "secret"))
    a.add("file", data=b"y")
    result = extract(a.close(), dest)
    (dest / "keep").write_text("not from the archive\n")
    before = snapshot(outer, skip=dest)
    fd = open_dir_nofollow(dest)
    try:
        remove_entries(fd, result.entries)
        with pytest.raises(ValueError):
            remove_entries(fd, ["a/b"])
    finally:
        os.close(fd)
    assert snapshot(outer, skip=dest) == before
    assert sorted(os.listdir(dest)) == ["keep"]


# ---------------------------------------------------------------------------------------------
# As an unprivileged user

UNPRIVILEGED = textwrap.dedent("""
    import os, sys, tarfile
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from cdimover.errors import UnsafeArchiveError
    from cdimover.io.extract import extract_tar, open_dir_nofollow
    fd = open_dir_nofollow(sys.argv[3])
    for archive in sys.argv[4:]:
        try:
            with open(archive, "rb") as f:
                extract_tar(f, fd)
        except UnsafeArchiveError as e:
            print("refused", e)
        else:
            print("extracted")
""")


def test_unprivileged_traversal_and_symlinks(tmp_path: Path) -> None:
    """The CVE chain and the symlink escapes, as uid 107 without capabilities, in a
    directory that uid owns: refused, and the files beside the destination unchanged."""
    need_root()
    setpriv = need_tool("setpriv")
    base = Path(tempfile.mkdtemp(prefix="cdimover-extract-"))
    try:
        os.chmod(base, 0o755)
        outer = base / "outer"
        (outer / "dest").mkdir(parents=True)
        (outer / "flag").write_text("original\n")
        for p in (outer, outer / "dest", outer / "flag"):
            os.chown(p, 107, 107)
        cve = cve_2025_4517(base / "cve.tar", outer / "dest")
        a = Archive(base / "link.tar")
        a.add("out", tarfile.SYMTYPE, link="..")
        a.add("out/flag", data=b"evil\n")
        link = a.close()
        b = Archive(base / "hard.tar")
        b.add("h", tarfile.LNKTYPE, link="out/flag")
        hard = b.close()
        before = snapshot(outer, skip=outer / "dest")
        p = subprocess.run(
            [setpriv, "--reuid=107", "--regid=107", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", sys.executable, "-c", UNPRIVILEGED, str(ROOT),
             str(ROOT / "tests"), str(outer / "dest"), str(cve), str(link), str(hard)],
            capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert len(lines) == 3 and all(line.startswith("refused ") for line in lines), lines
        assert "symbolic link 'a', which is never followed" in lines[0]
        assert "symbolic link 'out', which is never followed" in lines[1]
        assert "symbolic link 'out', which is never followed" in lines[2]
        assert snapshot(outer, skip=outer / "dest") == before
        assert os.readlink(outer / "dest" / "out") == ".."
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


# ---------------------------------------------------------------------------------------------
# The import pod (IMPORTER_CONTENTTYPE=archive)


def run_import(tmp_path: Path, archive: Path, dest: Path,
               **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``cdimover pod import`` of ARCHIVE into DEST: (process, termination message)."""
    log = tmp_path / "termination-log"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("IMPORTER_", "DESTINATION", "OWNER_UID"))}
    environ.update(IMPORTER_ENDPOINT=str(archive), IMPORTER_CONTENTTYPE="archive",
                   DESTINATION=str(dest), OWNER_UID="uid-1", PYTHONPATH=str(ROOT), **env)
    p = subprocess.run([sys.executable, "-m", "cdimover", "pod", "import", "--termination-log",
                        str(log), "--metrics-address", "none"], env=environ,
                       capture_output=True, text=True, timeout=120)
    return p, log.read_text() if log.exists() else ""


def test_pod_import_refuses_the_traversal_archive(tmp_path: Path, outer: Path) -> None:
    dest = outer / "dest"
    archive = cve_2025_4517(tmp_path / "cve.tar", dest)
    before = snapshot(outer, skip=dest)
    p, message = run_import(tmp_path, archive, dest)
    assert p.returncode == 1
    assert message.startswith("Unable to process data: unsafe archive member 'a/b/c/")
    assert message.endswith(": its path goes through the symbolic link 'a', which is never "
                            "followed")
    assert p.stderr.startswith("cdimover: unsafe archive member") and p.stderr.count("\n") == 1
    assert snapshot(outer, skip=dest) == before
    assert (outer / "flag").read_text() == "original\n"


def test_pod_checksum_mismatch_removes_what_the_archive_created(tmp_path: Path,
                                                               outer: Path) -> None:
    dest = outer / "dest"
    (dest / "kept").write_text("there before\n")
    a = Archive(tmp_path / "a.tar")
    a.add("tree/sub/f", data=b"x" * 5000)
    a.add("tree/out", tarfile.SYMTYPE, link=str(outer / "secret"))
    a.add("top", tarfile.SYMTYPE, link=str(outer / "secret"))
    a.add("disk.img", data=os.urandom(8192))
    archive = a.close()
    before = snapshot(outer, skip=dest)
    p, message = run_import(tmp_path, archive, dest, IMPORTER_CHECKSUM="sha256:" + "0" * 64)
    assert p.returncode == 1
    assert message == (f"Unable to process data: checksum mismatch: IMPORTER_CHECKSUM is "
                       f"sha256:{'0' * 64} but {archive} has sha256:{sha256(archive)}; the "
                       f"written image was removed")
    assert sorted(os.listdir(dest)) == ["kept"]
    assert snapshot(outer, skip=dest) == before
    # and with the right checksum, the same archive is extracted
    p, message = run_import(tmp_path, archive, dest, IMPORTER_CHECKSUM=f"sha256:{sha256(archive)}")
    assert p.returncode == 0, p.stderr
    assert message == '{"message":"Import Complete","preallocationApplied":false}'
    assert (dest / "tree" / "sub" / "f").read_bytes() == b"x" * 5000
    assert os.readlink(dest / "top") == str(outer / "secret")
