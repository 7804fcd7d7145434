"""Hostile QCOW2 images: valid images made by qemu-img, then mutated -- every header field,
L1/L2 entries (reserved bits, misaligned, outside the file, into the header or other
metadata, self-references), compressed descriptors (past EOF, bombs, short and garbage
streams), truncation at every 512 bytes of the metadata, extension lengths, snapshot tables,
backing/data-file names pointing at host files, encryption and feature bits.

Each conversion runs in a child process under a per-image alarm (a hang kills it: SIGALRM's
default action) and, outside sanitizer builds, RLIMIT_AS of 1 GiB; a signal, a hang or an
unexpected exception type fails the test, naming the mutation.  The error type is asserted
exactly where the outcome is determined by the mutation, and otherwise must be one of
ImageFormatError's family (or success).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import TOOL_ENV, need_tool

FORMAT = "ImageFormatError"
UNSUPPORTED = "UnsupportedImageError"
UNSAFE = "UnsafeImageError"
OK = "ok"
FORMAT_FAMILY = frozenset({FORMAT, UNSUPPORTED})
ANY_REFUSAL = FORMAT_FAMILY | {UNSAFE, OK}

PER_IMAGE_SECONDS = 30
# qemu tools must not inherit a sanitizer runtime preloaded for the extension (they hang).
ADDRESS_SPACE = 1 << 30
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "") or bool(os.environ.get("CDIMOVER_SANITIZE"))

CHILD = r"""
import hashlib, json, os, resource, signal, sys
limit, alarm = int(sys.argv[1]), int(sys.argv[2])
import cdimover
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
signal.signal(signal.SIGALRM, signal.SIG_DFL)      # a hang ends the process
for job in json.load(sys.stdin):
    print(json.dumps({"start": job["name"]}), flush=True)
    res = {"name": job["name"]}
    signal.alarm(alarm)
    try:
        cdimover.inspect(job["image"], format="qcow2")
        res["inspect"] = "ok"
    except Exception as e:
        res["inspect"] = type(e).__name__
    try:
        r = cdimover.convert(job["image"], job["out"], source_format="qcow2")
        res["convert"] = "ok"
        if job.get("sha"):
            h = hashlib.sha256()
            with open(job["out"], "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            res["sha"] = h.hexdigest()
    except Exception as e:
        res["convert"] = type(e).__name__
        res["msg"] = str(e)
    signal.alarm(0)
    try:
        os.unlink(job["out"])
    except FileNotFoundError:
        pass
    print(json.dumps(res), flush=True)
"""


def run_batch(jobs: list[dict[str, Any]], tmp: Path) -> dict[str, dict[str, Any]]:
    """Convert every job's image in child processes; a job whose child died gets
    convert = "CRASH(...)" and the rest continue in a new child."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(jobs)
    limit = 0 if SANITIZED else ADDRESS_SPACE
    while pending:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(limit), str(PER_IMAGE_SECONDS)],
            input=json.dumps(pending), capture_output=True, text=True,
            timeout=PER_IMAGE_SECONDS * len(pending) + 120)
        started = None
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["name"]] = rec
                started = None
        done = {j["name"] for j in pending if j["name"] in results}
        if proc.returncode != 0:
            name = started or next((j["name"] for j in pending if j["name"] not in done), None)
            if name is None:
                pytest.fail(f"child failed after all jobs: {proc.stderr[-2000:]}")
            why = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit {proc.returncode}")
            results[name] = {"name": name, "convert": f"CRASH({why})",
                             "msg": proc.stderr[-3000:]}
            done.add(name)
        pending = [j for j in pending if j["name"] not in done]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not SANITIZED:
        assert usage.ru_maxrss * 1024 < 512 << 20, f"child peak RSS {usage.ru_maxrss} KiB"
    return results


# ---- images and a small QCOW2 layout reader ---------------------------------------------------

@dataclass
class Layout:
    data: bytes
    cluster_bits: int
    size: int
    l1_size: int
    l1_off: int
    rt_off: int
    rt_clusters: int
    nb_snapshots: int
    snap_off: int
    header_length: int
    extended: bool

    @classmethod
    def parse(cls, data: bytes) -> Layout:
        (_, version, _, _, cb, size, _, l1s, l1o, rto, rtc, nbs, sno) = struct.unpack(
            ">IIQIIQIIQQIIQ", data[:72])
        incompat = struct.unpack(">Q", data[72:80])[0] if version == 3 else 0
        hlen = struct.unpack(">I", data[100:104])[0] if version == 3 else 72
        return cls(data, cb, size, l1s, l1o, rto, rtc, nbs, sno, hlen, bool(incompat & 16))

    @property
    def cluster(self) -> int:
        return 1 << self.cluster_bits

    def l1_entry_off(self, i: int) -> int:
        return self.l1_off + 8 * i

    def l1(self, i: int) -> int:
        return int(struct.unpack(">Q", self.data[self.l1_entry_off(i):][:8])[0])

    def l2_entries(self) -> list[tuple[int, int, int]]:
        """(guest offset, file offset of the entry, entry) for every nonzero L2 entry."""
        esize = 16 if self.extended else 8
        per = self.cluster // esize
        out = []
        for i in range(self.l1_size):
            l2 = self.l1(i) & 0x00fffffffffffe00
            if not l2:
                continue
            for j in range(per):
                off = l2 + j * esize
                e = struct.unpack(">Q", self.data[off:off + 8])[0]
                guest = (i * per + j) << self.cluster_bits
                if e and guest < self.size:
                    out.append((guest, off, e))
        return out

    def first(self, pred: Callable[[int], bool]) -> tuple[int, int, int]:
        return next(t for t in self.l2_entries() if pred(t[2]))

    def l2_table_of(self, guest: int) -> int:
        per = self.cluster // (16 if self.extended else 8)
        return self.l1((guest >> self.cluster_bits) // per) & 0x00fffffffffffe00

    def compressed(self, e: int) -> tuple[int, int]:
        shift = 62 - (self.cluster_bits - 8)
        coff = e & ((1 << shift) - 1)
        sectors = ((e >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return coff, sectors * 512 - (coff & 511)


def is_data(e: int) -> bool:
    return not e & (1 << 62) and bool(e & 0x00fffffffffffe00) and not e & 1


def is_compressed(e: int) -> bool:
    return bool(e & (1 << 62))


def put(buf: bytearray, off: int, fmt: str, value: int) -> bytearray:
    struct.pack_into(fmt, buf, off, value)
    return buf


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    qemu_img, qemu_io = need_tool("qemu-img"), need_tool("qemu-io")
    d = tmp_path_factory.mktemp("hostile-base")

    def make(name: str, opts: str, size: str, *cmds: str) -> Path:
        p = d / name
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, str(p), size],
                       check=True, capture_output=True, env=TOOL_ENV)
        args = [qemu_io]
        for c in cmds:
            args += ["-c", c]
        if cmds:
            subprocess.run(args + [str(p)], check=True, capture_output=True, env=TOOL_ENV)
        return p

    imgs = {
        "v3": make("v3.qcow2", "cluster_size=64k", "4M", "write -P 0x11 0 128k",
                   "write -c -P 0x22 1M 64k", "write -z 2M 64k", "write -c -P 0x33 3M 64k"),
        "v2": make("v2.qcow2", "compat=0.10,cluster_size=4k", "1M", "write -P 0x11 0 16k",
                   "write -c -P 0x22 64k 4k"),
        "ext": make("ext.qcow2", "cluster_size=16k,extended_l2=on", "1M",
                    "write -P 0x11 1k 2k", "write -c -P 0x22 64k 16k", "write -z 128k 4k"),
        "small": make("small.qcow2", "cluster_size=512", "256k", "write -P 0x11 0 4k",
                      "write -c -P 0x22 32k 512", "write -z 64k 1k", "write -P 0x33 200k 1k"),
        "zstd": make("zstd.qcow2", "cluster_size=64k,compression_type=zstd", "1M",
                     "write -c -P 0x22 0 64k", "write -P 0x11 128k 64k"),
        "zstd128": make("zstd128.qcow2", "cluster_size=128k,compression_type=zstd", "1M",
                        "write -c -P 0x23 0 128k"),
        "zstd32": make("zstd32.qcow2", "cluster_size=32k,compression_type=zstd", "1M",
                       "write -c -P 0x24 0 32k"),
    }
    # v3 gets a snapshot table and a COW'd L2 table.
    subprocess.run([qemu_img, "snapshot", "-c", "s1", str(imgs["v3"])], check=True, env=TOOL_ENV)
    subprocess.run([qemu_io, "-c", "write -P 0x44 64k 64k", str(imgs["v3"])], check=True,
                   capture_output=True, env=TOOL_ENV)
    return imgs


@dataclass
class Case:
    name: str
    base: str
    mutate: Callable[[bytearray, Layout], bytearray | bytes]
    expect: str | frozenset[str]
    same_output: bool = False           # must convert to the unmutated image's bytes
    inspect: str | frozenset[str] | None = None


def run_cases(cases: list[Case], images: dict[str, Path], tmp: Path) -> dict[str, Any]:
    jobs, base_jobs = [], {}
    for c in cases:
        data = bytearray(images[c.base].read_bytes())
        img = tmp / f"{c.name}.qcow2"
        img.write_bytes(bytes(c.mutate(data, Layout.parse(bytes(data)))))
        jobs.append({"name": c.name, "image": str(img), "out": str(tmp / f"{c.name}.raw"),
                     "sha": c.same_output})
        if c.same_output and c.base not in base_jobs:
            base_jobs[c.base] = {"name": f"base-{c.base}", "image": str(images[c.base]),
                                 "out": str(tmp / f"base-{c.base}.raw"), "sha": True}
    results = run_batch(jobs + list(base_jobs.values()), tmp)
    problems = []
    for c in cases:
        r = results[c.name]
        allowed = {c.expect} if isinstance(c.expect, str) else set(c.expect)
        if r["convert"] not in allowed:
            problems.append(f"{c.name}: convert -> {r['convert']} ({r.get('msg', '')[:300]}), "
                            f"expected {sorted(allowed)}")
        if c.same_output and r["convert"] == OK and r["sha"] != results[f"base-{c.base}"]["sha"]:
            problems.append(f"{c.name}: output differs from the unmutated image's")
        if c.inspect is not None:
            allowed_i = {c.inspect} if isinstance(c.inspect, str) else set(c.inspect)
            if r["inspect"] not in allowed_i:
                problems.append(f"{c.name}: inspect -> {r['inspect']}, expected {allowed_i}")
    assert not problems, "\n".join(problems)
    return results


# ---- the header ----------------------------------------------------------------------------

def field(off: int, fmt: str, value: int | Callable[[Layout], int]) -> Callable[..., bytearray]:
    def mutate(buf: bytearray, lay: Layout) -> bytearray:
        return put(buf, off, fmt, value(lay) if callable(value) else value)
    return mutate


U32, U64 = ">I", ">Q"
MAX32, MAX64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def header_cases() -> list[Case]:
    eof = lambda lay: (len(lay.data) + 2 * lay.cluster) // lay.cluster * lay.cluster  # noqa: E731
    c = [
        Case("magic", "v3", field(0, U32, 0x514649fa), FORMAT),
        Case("version-0", "v3", field(4, U32, 0), UNSUPPORTED),
        Case("version-1", "v3", field(4, U32, 1), UNSUPPORTED),
        Case("version-4", "v3", field(4, U32, 4), UNSUPPORTED),
        Case("version-max", "v3", field(4, U32, MAX32), UNSUPPORTED),
        Case("cluster-bits-0", "v3", field(20, U32, 0), FORMAT),
        Case("cluster-bits-8", "v3", field(20, U32, 8), FORMAT),
        Case("cluster-bits-22", "v3", field(20, U32, 22), UNSUPPORTED),
        Case("cluster-bits-max", "v3", field(20, U32, MAX32), UNSUPPORTED),
        Case("cluster-bits-12", "v3", field(20, U32, 12), FORMAT_FAMILY | {OK}),
        Case("cluster-bits-17", "v3", field(20, U32, 17), FORMAT_FAMILY | {OK}),
        Case("size-513", "v3", field(24, U64, 513), FORMAT),
        Case("size-2^56", "v3", field(24, U64, 1 << 56), FORMAT),
        Case("size-2^63", "v3", field(24, U64, 1 << 63), FORMAT),
        Case("size-max", "v3", field(24, U64, MAX64), FORMAT),
        Case("size-past-l1", "v3", field(24, U64, lambda lay: (lay.l1_size << (
            2 * lay.cluster_bits - 3)) + 512), FORMAT),
        Case("size-0", "v3", field(24, U64, 0), OK),
        Case("crypt-aes", "v3", field(32, U32, 1), UNSUPPORTED, inspect=OK),
        Case("crypt-luks", "v3", field(32, U32, 2), UNSUPPORTED, inspect=OK),
        Case("crypt-3", "v3", field(32, U32, 3), UNSUPPORTED, inspect=OK),
        Case("crypt-max", "v3", field(32, U32, MAX32), UNSUPPORTED, inspect=OK),
        Case("l1-size-0", "v3", field(36, U32, 0), FORMAT),
        Case("l1-size-max", "v3", field(36, U32, MAX32), FORMAT),
        Case("l1-size-4M+1", "v3", field(36, U32, (1 << 22) + 1), FORMAT),
        Case("l1-size-past-eof", "v3", field(36, U32, lambda lay: len(lay.data) // 8), FORMAT),
        Case("l1-size-plus-1", "v3", field(36, U32, lambda lay: lay.l1_size + 1), OK,
             same_output=True),
        Case("l1-offset-0", "v3", field(40, U64, 0), FORMAT),
        Case("l1-offset-misaligned", "v3", field(40, U64, lambda lay: lay.l1_off + 512), FORMAT),
        Case("l1-offset-plus-1", "v3", field(40, U64, lambda lay: lay.l1_off + 1), FORMAT),
        Case("l1-offset-eof", "v3", field(40, U64, eof), FORMAT),
        Case("l1-offset-2^63", "v3", field(40, U64, 1 << 63), FORMAT),
        Case("l1-offset-max", "v3", field(40, U64, MAX64), FORMAT),
        Case("l1-on-refcount-table", "v3", field(40, U64, lambda lay: lay.rt_off), FORMAT),
        Case("l1-on-snapshot-table", "v3", field(40, U64, lambda lay: lay.snap_off), FORMAT),
        Case("rt-offset-0", "v3", field(48, U64, 0), FORMAT),
        Case("rt-offset-misaligned", "v3", field(48, U64, lambda lay: lay.rt_off + 512), FORMAT),
        Case("rt-offset-eof", "v3", field(48, U64, eof), FORMAT),
        Case("rt-offset-max", "v3", field(48, U64, MAX64), FORMAT),
        Case("rt-on-l1", "v3", field(48, U64, lambda lay: lay.l1_off), FORMAT),
        Case("rt-clusters-0", "v3", field(56, U32, 0), FORMAT),
        Case("rt-clusters-max", "v3", field(56, U32, MAX32), FORMAT),
        Case("rt-clusters-200", "v3", field(56, U32, 200), FORMAT),
        Case("rt-clusters-past-eof", "v3", field(56, U32, 100), FORMAT),
        Case("rt-clusters-2-overlap", "v3", field(56, U32, 3), FORMAT),
        Case("snapshots-max", "v3", field(60, U32, MAX32), FORMAT),
        Case("snapshots-65537", "v3", field(60, U32, 65537), FORMAT),
        Case("snapshots-past-eof", "v3",
             field(60, U32, lambda lay: (len(lay.data) - lay.snap_off) // 40 + 2), FORMAT),
        Case("snapshots-zero-entries", "v3", field(60, U32, 1000), OK, same_output=True),
        Case("snapshots-0", "v3", field(60, U32, 0), OK, same_output=True),
        Case("snap-offset-0", "v3", field(64, U64, 0), FORMAT),
        Case("snap-offset-misaligned", "v3", field(64, U64, lambda lay: lay.snap_off + 8),
             FORMAT),
        Case("snap-offset-eof", "v3", field(64, U64, eof), FORMAT),
        Case("snap-offset-max", "v3", field(64, U64, MAX64), FORMAT),
        Case("snap-on-l1", "v3", field(64, U64, lambda lay: lay.l1_off), FORMAT),
        Case("incompat-bit5", "v3", field(72, U64, 1 << 5), UNSUPPORTED, inspect=UNSUPPORTED),
        Case("incompat-bit63", "v3", field(72, U64, 1 << 63), UNSUPPORTED),
        Case("incompat-all", "v3", field(72, U64, MAX64), UNSUPPORTED),
        Case("corrupt-bit", "v3", field(72, U64, 2), FORMAT, inspect=OK),
        Case("dirty-bit", "v3", field(72, U64, 1), OK, same_output=True),
        Case("data-file-bit", "v3", field(72, U64, 4), UNSAFE, inspect=OK),
        Case("compression-bit-zlib", "v3", field(72, U64, 8), FORMAT),
        Case("extended-l2-bit", "v3", field(72, U64, 16), FORMAT_FAMILY | {OK}),
        Case("extended-l2-small-cluster", "small", field(72, U64, 16), FORMAT),
        Case("compat-all", "v3", field(80, U64, MAX64), OK, same_output=True),
        # Every autoclear bit but bit 1 ("raw external data"), which needs a data file.
        Case("autoclear-all", "v3", field(88, U64, MAX64 & ~2), OK, same_output=True),
        Case("autoclear-raw-data-without-data-file", "v3", field(88, U64, 2), FORMAT),
        Case("refcount-order-0", "v3", field(96, U32, 0), OK, same_output=True),
        Case("refcount-order-6", "v3", field(96, U32, 6), OK, same_output=True),
        Case("refcount-order-7", "v3", field(96, U32, 7), FORMAT),
        Case("refcount-order-max", "v3", field(96, U32, MAX32), FORMAT),
        Case("header-length-0", "v3", field(100, U32, 0), FORMAT),
        Case("header-length-100", "v3", field(100, U32, 100), FORMAT),
        Case("header-length-103", "v3", field(100, U32, 103), FORMAT),
        Case("header-length-105", "v3", field(100, U32, 105), FORMAT),
        Case("header-length-104", "v3", field(100, U32, 104), OK, same_output=True),
        Case("header-length-cluster+8", "v3", field(100, U32, (1 << 16) + 8), FORMAT),
        Case("header-length-max", "v3", field(100, U32, MAX32), FORMAT),
        Case("header-length-120", "v3", field(100, U32, 120), FORMAT_FAMILY | {OK}),
        Case("compression-type-1-no-bit", "v3", field(104, ">B", 1), FORMAT),
        Case("compression-type-2", "v3",
             lambda b, lay: put(put(b, 104, ">B", 2), 72, U64, 8), UNSUPPORTED),
        Case("compression-zstd-on-zlib-data", "v3",
             lambda b, lay: put(put(b, 104, ">B", 1), 72, U64, 8), FORMAT),
        Case("v2-header-past-eof", "v2", lambda b, lay: b[:60], FORMAT),
        Case("empty-file", "v3", lambda b, lay: b"", FORMAT),
        Case("magic-only", "v3", lambda b, lay: b[:4], FORMAT),
        Case("v3-header-truncated", "v3", lambda b, lay: b[:100], FORMAT),
    ]
    # Every header field, every width, a spread of values: never anything but a refusal.
    spread = [0, 1, 0x7F, 0x80, 0xFF, 0x1FF, 0x200, 0xFFFF, 1 << 31, MAX32]
    layout = [(4, U32), (8, U64), (16, U32), (20, U32), (24, U64), (32, U32), (36, U32),
              (40, U64), (48, U64), (56, U32), (60, U32), (64, U64), (72, U64), (80, U64),
              (88, U64), (96, U32), (100, U32)]
    for off, fmt in layout:
        for v in spread + ([1 << 40, 1 << 55, 1 << 62, MAX64] if fmt == U64 else []):
            c.append(Case(f"field-{off}-{v:x}", "v3", field(off, fmt, v), ANY_REFUSAL))
            if off < 72:
                c.append(Case(f"v2-field-{off}-{v:x}", "v2", field(off, fmt, v), ANY_REFUSAL))
    return c


def test_header_fields(images: dict[str, Path], tmp_path: Path) -> None:
    run_cases(header_cases(), images, tmp_path)


# ---- backing files, data files, extensions ----------------------------------------------------

def set_backing(name: bytes, offset: int = 0x200) -> Callable[..., bytearray]:
    def mutate(buf: bytearray, lay: Layout) -> bytearray:
        buf[offset:offset + len(name)] = name
        put(buf, 8, U64, offset)
        return put(buf, 16, U32, len(name))
    return mutate


def set_extensions(*exts: tuple[int, bytes | int]) -> Callable[..., bytearray]:
    """Replace the extension area with EXTS: (type, data) or (type, declared length)."""
    def mutate(buf: bytearray, lay: Layout) -> bytearray:
        pos = lay.header_length
        buf[pos:4096] = bytes(4096 - pos)
        for typ, data in exts:
            if isinstance(data, int):
                struct.pack_into(">II", buf, pos, typ, data)
                pos += 8
                continue
            struct.pack_into(">II", buf, pos, typ, len(data))
            buf[pos + 8:pos + 8 + len(data)] = data
            pos += 8 + (len(data) + 7) // 8 * 8
        return buf
    return mutate


def test_backing_and_data_files_are_refused_and_never_opened(images: dict[str, Path],
                                                             tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                  # opening it for reading would block: a hang, caught
    cases = [
        Case("backing-etc-passwd", "v3", set_backing(b"/etc/passwd"), UNSAFE, inspect=OK),
        Case("backing-fifo", "v3", set_backing(str(fifo).encode()), UNSAFE, inspect=OK),
        Case("backing-relative", "v2", set_backing(b"../../../etc/shadow", 0x100), UNSAFE,
             inspect=OK),
        Case("backing-json", "v3", set_backing(b'json:{"file.filename":"/etc/passwd"}'),
             UNSAFE, inspect=OK),
        Case("backing-empty-name", "v3", set_backing(b""), UNSAFE, inspect=OK),
        Case("backing-too-long", "v3", set_backing(b"a" * 1024), FORMAT, inspect=FORMAT),
        Case("backing-offset-in-header", "v3",
             lambda b, lay: put(put(b, 8, U64, 16), 16, U32, 4), FORMAT),
        Case("backing-offset-past-cluster", "v3",
             lambda b, lay: put(put(b, 8, U64, 1 << 16), 16, U32, 4), FORMAT),
        Case("backing-offset-max", "v3",
             lambda b, lay: put(put(b, 8, U64, MAX64), 16, U32, 4), FORMAT),
        Case("backing-name-past-cluster", "v3",
             lambda b, lay: put(put(b, 8, U64, 0xFFF0), 16, U32, 100), FORMAT),
        Case("data-file-extension", "v3",
             set_extensions((0x44415441, b"/etc/passwd")), UNSAFE, inspect=OK),
        Case("data-file-extension-fifo", "v3",
             set_extensions((0x44415441, str(fifo).encode())), UNSAFE, inspect=OK),
        Case("data-file-bit-and-extension", "v3",
             lambda b, lay: put(set_extensions((0x44415441, b"/dev/sda"))(b, lay), 72, U64, 4),
             UNSAFE, inspect=OK),
        Case("backing-format-64", "v3", set_extensions((0xE2792ACA, b"r" * 64)), FORMAT),
        Case("backing-format-twice", "v3",
             set_extensions((0xE2792ACA, b"raw"), (0xE2792ACA, b"raw")), FORMAT),
        Case("backing-format-alone", "v3", set_extensions((0xE2792ACA, b"raw")), FORMAT),
        Case("crypto-ext-without-luks", "v3", set_extensions((0x0537BE77, bytes(16))), FORMAT),
        Case("crypto-ext-bad-length", "v3",
             lambda b, lay: put(set_extensions((0x0537BE77, bytes(8)))(b, lay), 32, U32, 2),
             FORMAT),
        Case("ext-length-max", "v3", set_extensions((0x6803F857, MAX32)), FORMAT),
        Case("ext-length-cluster", "v3", set_extensions((0x6803F857, 1 << 16)), FORMAT),
        Case("ext-length-just-past", "v3",
             set_extensions((0x6803F857, (1 << 16) - 104 - 8 + 1)), FORMAT),
        Case("ext-length-past-backing-name", "v3",
             lambda b, lay: set_backing(b"x", 0x400)(set_extensions((0x12345678, 0x400))(b, lay),
                                                     lay), FORMAT),
        Case("ext-unknown", "v3", set_extensions((0x12345678, b"hello world")), OK,
             same_output=True),
        Case("ext-bitmaps-garbage", "v3", set_extensions((0x23852875, b"\xff" * 24)), OK,
             same_output=True),
        Case("ext-many-empty", "v3", set_extensions(*[(0x12345678, b"")] * 400), OK,
             same_output=True),
    ]
    results = run_cases(cases, images, tmp_path)
    assert "backing" in results["backing-etc-passwd"]["msg"]
    assert "/etc/passwd" in results["data-file-extension"]["msg"]


# ---- L1 and L2 entries ------------------------------------------------------------------------

def at(off: Callable[[Layout], int],
       value: Callable[[Layout, int], int]) -> Callable[..., bytearray]:
    def mutate(buf: bytearray, lay: Layout) -> bytearray:
        o = off(lay)
        old = struct.unpack(">Q", bytes(buf[o:o + 8]))[0]
        return put(buf, o, U64, value(lay, old) & MAX64)
    return mutate


def l1_0(lay: Layout) -> int:
    return lay.l1_entry_off(0)


def data_entry(lay: Layout) -> int:
    return lay.first(is_data)[1]


def compressed_entry(lay: Layout) -> int:
    return lay.first(is_compressed)[1]


def eof_up(lay: Layout) -> int:
    return (len(lay.data) + lay.cluster) // lay.cluster * lay.cluster


def entry_cases(images: dict[str, Path]) -> list[Case]:
    M = 0x00FFFFFFFFFFFE00
    c = [
        Case("l1-reserved-bit0", "v3", at(l1_0, lambda lay, e: e | 1), FORMAT),
        Case("l1-reserved-bit8", "v3", at(l1_0, lambda lay, e: e | 1 << 8), FORMAT),
        Case("l1-reserved-bit56", "v3", at(l1_0, lambda lay, e: e | 1 << 56), FORMAT),
        Case("l1-reserved-bit62", "v3", at(l1_0, lambda lay, e: e | 1 << 62), FORMAT),
        Case("l1-misaligned", "v3", at(l1_0, lambda lay, e: e + 512), FORMAT),
        Case("l1-past-eof", "v3", at(l1_0, lambda lay, e: eof_up(lay)), FORMAT),
        Case("l1-last-cluster-partial", "v3",
             lambda b, lay: at(l1_0, lambda lay, e: len(b) // lay.cluster * lay.cluster)(
                 b + b"\0" * 100, lay), FORMAT),
        Case("l1-max-offset", "v3", at(l1_0, lambda lay, e: M), FORMAT),
        Case("l1-to-l1-table", "v3", at(l1_0, lambda lay, e: lay.l1_off), FORMAT),
        Case("l1-to-refcount-table", "v3", at(l1_0, lambda lay, e: lay.rt_off), FORMAT),
        Case("l1-to-snapshot-table", "v3", at(l1_0, lambda lay, e: lay.snap_off), FORMAT),
        Case("l1-zero", "v3", at(l1_0, lambda lay, e: 0), OK),
        Case("l1-header-copied", "v3", at(l1_0, lambda lay, e: 1 << 63), OK),
        Case("l1-small-aliased", "small",
             at(lambda lay: lay.l1_entry_off(1), lambda lay, e: lay.l1(0)), OK),
        Case("l2-reserved-bit1", "v3", at(data_entry, lambda lay, e: e | 2), FORMAT),
        Case("l2-reserved-bit8", "v3", at(data_entry, lambda lay, e: e | 1 << 8), FORMAT),
        Case("l2-reserved-bit56", "v3", at(data_entry, lambda lay, e: e | 1 << 56), FORMAT),
        Case("l2-reserved-bit61", "v3", at(data_entry, lambda lay, e: e | 1 << 61), FORMAT),
        Case("l2-misaligned", "v3", at(data_entry, lambda lay, e: e + 512), FORMAT),
        Case("l2-past-eof", "v3", at(data_entry, lambda lay, e: eof_up(lay)), FORMAT),
        Case("l2-max-offset", "v3", at(data_entry, lambda lay, e: M), FORMAT),
        Case("l2-header-copied", "v3", at(data_entry, lambda lay, e: 1 << 63), OK),
        Case("l2-to-l1-table", "v3", at(data_entry, lambda lay, e: lay.l1_off | 1 << 63),
             FORMAT),
        Case("l2-to-refcount-table", "v3", at(data_entry, lambda lay, e: lay.rt_off), FORMAT),
        Case("l2-to-snapshot-table", "v3", at(data_entry, lambda lay, e: lay.snap_off), FORMAT),
        Case("l2-to-itself", "v3",
             at(data_entry, lambda lay, e: lay.l2_table_of(lay.first(is_data)[0])), FORMAT),
        Case("l2-zero-flag-with-offset", "v3", at(data_entry, lambda lay, e: e | 1), OK),
        Case("l2-zero-flag-past-eof", "v3", at(data_entry, lambda lay, e: eof_up(lay) | 1), OK),
        Case("v2-zero-flag", "v2", at(data_entry, lambda lay, e: e | 1), FORMAT),
        Case("v2-l2-to-l1", "v2", at(data_entry, lambda lay, e: lay.l1_off), FORMAT),
        Case("small-l2-misaligned", "small", at(data_entry, lambda lay, e: e + 8 * 512 + 256),
             FORMAT),
        Case("ext-bit0", "ext", at(data_entry, lambda lay, e: e | 1), FORMAT),
        Case("ext-alloc-and-zero", "ext",
             at(lambda lay: data_entry(lay) + 8, lambda lay, b: b | (b & 0xFFFFFFFF) << 32),
             FORMAT),
        Case("ext-alloc-without-offset", "ext",
             at(data_entry, lambda lay, e: 0), FORMAT),
        Case("ext-compressed-bitmap", "ext",
             at(lambda lay: compressed_entry(lay) + 8, lambda lay, b: 1), FORMAT),
        Case("ext-all-zero-bits", "ext",
             at(lambda lay: data_entry(lay) + 8, lambda lay, b: 0xFFFFFFFF << 32), OK),
        Case("ext-alloc-whole-cluster", "ext",
             at(lambda lay: data_entry(lay) + 8, lambda lay, b: 0xFFFFFFFF),
             OK if ext_cluster_in_file(images) else FORMAT),
        Case("ext-alloc-past-eof", "ext",
             lambda b, lay: at(lambda lay: data_entry(lay) + 8, lambda lay, b: 0xFFFFFFFF)(
                 at(data_entry, lambda lay, e: len(b) // lay.cluster * lay.cluster)(b, lay),
                 lay), FORMAT),
    ]
    return c


def ext_cluster_in_file(images: dict[str, Path]) -> bool:
    lay = Layout.parse(images["ext"].read_bytes())
    host = lay.first(is_data)[2] & 0x00FFFFFFFFFFFE00
    return host + lay.cluster <= len(lay.data)


def test_l1_l2_entries(images: dict[str, Path], tmp_path: Path) -> None:
    run_cases(entry_cases(images), images, tmp_path)


# ---- compressed clusters -----------------------------------------------------------------------

def set_compressed(stream: bytes | Callable[[Layout], bytes]) -> Callable[..., bytearray]:
    """Append STREAM to the file (at an odd offset, as qemu packs compressed data) and point
    the first compressed cluster's descriptor at it."""
    def mutate(buf: bytearray, lay: Layout) -> bytearray:
        data = stream(lay) if callable(stream) else stream
        _, off, e = lay.first(is_compressed)
        coff = len(buf) + 300
        end = coff + len(data)
        buf.extend(bytes(end - len(buf)))
        buf[coff:end] = data
        shift = 62 - (lay.cluster_bits - 8)
        sectors = min((end - 1) // 512 - coff // 512, (1 << (lay.cluster_bits - 8)) - 1)
        return put(buf, off, U64, 1 << 62 | sectors << shift | coff)
    return mutate


def raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -12)
    return z.compress(data) + z.flush()


def zstd_cluster(images: dict[str, Path], name: str) -> bytes:
    lay = Layout.parse(images[name].read_bytes())
    coff, csize = lay.compressed(lay.first(is_compressed)[2])
    return lay.data[coff:coff + csize]


def compressed_cases(images: dict[str, Path]) -> list[Case]:
    def desc(value: Callable[[Layout, int], int]) -> Callable[..., bytearray]:
        return at(compressed_entry, value)

    def shift(lay: Layout) -> int:
        return 62 - (lay.cluster_bits - 8)

    def max_sectors(lay: Layout, e: int) -> int:
        return e | ((1 << (lay.cluster_bits - 8)) - 1) << shift(lay)

    def max_sectors_expect(name: str) -> str:
        lay = Layout.parse(images[name].read_bytes())
        coff, _ = lay.compressed(lay.first(is_compressed)[2])
        end = coff + (1 << (lay.cluster_bits - 8)) * 512 - (coff & 511)
        return OK if end <= (len(lay.data) + 511) // 512 * 512 else FORMAT

    c = [
        Case("c-past-eof", "v3", desc(lambda lay, e: 1 << 62 | eof_up(lay) + 100), FORMAT),
        Case("c-in-header", "v3", desc(lambda lay, e: 1 << 62 | 0x100), FORMAT),
        Case("c-zero-offset", "v3", desc(lambda lay, e: 1 << 62), FORMAT),
        Case("c-on-l1", "v3", desc(lambda lay, e: 1 << 62 | lay.l1_off), FORMAT),
        Case("c-on-refcount-table", "v3", desc(lambda lay, e: 1 << 62 | lay.rt_off + 8),
             FORMAT),
        Case("c-copied-bit", "v3", desc(lambda lay, e: e | 1 << 63), FORMAT),
        Case("c-max-sectors", "v3", desc(max_sectors), max_sectors_expect("v3")),
        Case("c-small-max-sectors", "small", desc(max_sectors), max_sectors_expect("small")),
        Case("c-small-high-offset-bits", "small", desc(lambda lay, e: e | 1 << 57), FORMAT),
        Case("c-last-byte-of-file", "v3",
             lambda b, lay: desc(lambda lay, e: 1 << 62 | len(b) - 1)(b, lay), FORMAT),
        Case("c-bomb-2-clusters", "v3",
             set_compressed(lambda lay: raw_deflate(b"A" * 2 * lay.cluster)), FORMAT),
        Case("c-bomb-16M-zeros", "v3",
             set_compressed(lambda lay: raw_deflate(bytes(16 << 20))[:2 * lay.cluster - 512]),
             FORMAT),
        Case("c-short", "v3", set_compressed(lambda lay: raw_deflate(b"B" * (lay.cluster // 2))),
             FORMAT),
        Case("c-one-byte-short", "v3",
             set_compressed(lambda lay: raw_deflate(b"B" * (lay.cluster - 1))), FORMAT),
        Case("c-exact", "v3", set_compressed(lambda lay: raw_deflate(b"C" * lay.cluster)), OK),
        Case("c-exact-32k-window", "v3", set_compressed(raw15), OK),
        Case("c-garbage", "v3", set_compressed(random.Random(2).randbytes(700)), FORMAT),
        Case("c-zlib-header", "v3",
             set_compressed(lambda lay: zlib.compress(b"D" * lay.cluster)), FORMAT),
        Case("c-truncated-stream", "v3",
             set_compressed(lambda lay: raw_deflate(random.Random(3).randbytes(lay.cluster))[:900]),
             FORMAT),
        Case("c-zstd-bomb", "zstd", set_compressed(zstd_cluster(images, "zstd128")), FORMAT),
        Case("c-zstd-short", "zstd", set_compressed(zstd_cluster(images, "zstd32")), FORMAT),
        Case("c-zstd-exact", "zstd", set_compressed(zstd_cluster(images, "zstd")), OK,
             same_output=True),
        Case("c-zstd-garbage", "zstd", set_compressed(random.Random(4).randbytes(600)), FORMAT),
        Case("c-zstd-two-frames", "zstd",
             set_compressed(zstd_cluster(images, "zstd32") + zstd_cluster(images, "zstd32")),
             OK),
        # Frames after the ones that fill the cluster are padding (qemu reads them the same).
        Case("c-zstd-three-frames", "zstd",
             set_compressed(zstd_cluster(images, "zstd32") * 3), OK),
        Case("c-zstd-frame-straddles-end", "zstd",
             set_compressed(zstd_cluster(images, "zstd32") * 1 + zstd_cluster(images, "zstd")),
             FORMAT),
        Case("c-deflate-on-zstd", "zstd",
             set_compressed(lambda lay: raw_deflate(b"E" * lay.cluster)), FORMAT),
    ]
    return c


def raw15(lay: Layout) -> bytes:
    """A raw deflate stream of one cluster using distances beyond qemu's 4 KiB window."""
    block = random.Random(5).randbytes(8192)
    data = (block * (lay.cluster // 8192 + 1))[:lay.cluster]
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush()


def test_compressed_descriptors_and_bombs(images: dict[str, Path], tmp_path: Path) -> None:
    run_cases(compressed_cases(images), images, tmp_path)


# ---- truncation, random corruption -------------------------------------------------------------

@pytest.mark.parametrize("base", ["v3", "small", "ext", "v2"])
def test_truncation_at_every_512_bytes(images: dict[str, Path], tmp_path: Path,
                                       base: str) -> None:
    data = images[base].read_bytes()
    lay = Layout.parse(data)
    # The metadata region: everything up to the end of the last L2 table or table of any kind.
    ends = [lay.l1_off + 8 * lay.l1_size, lay.rt_off + lay.rt_clusters * lay.cluster]
    ends += [(lay.l1(i) & 0x00FFFFFFFFFFFE00) + lay.cluster for i in range(lay.l1_size)]
    meta_end = min(max(ends), len(data))
    cuts = list(range(0, meta_end, 512))
    if base == "small":
        cuts = list(range(0, len(data), 512))     # the whole image
    def cut(n: int) -> Callable[[bytearray, Layout], bytearray]:
        return lambda b, lay: b[:n]
    cases = [Case(f"cut-{base}-{n}", base, cut(n), FORMAT) for n in cuts]
    run_cases(cases, images, tmp_path)


def test_random_corruption_of_metadata(images: dict[str, Path], tmp_path: Path) -> None:
    """Seeded random byte flips in the header cluster and the tables: any refusal or success,
    never a crash, a hang or an unbounded allocation."""
    rnd = random.Random(20240601)
    cases = []
    for base in ("v3", "small", "ext", "zstd", "v2"):
        data = images[base].read_bytes()
        lay = Layout.parse(data)
        regions = [(0, min(4096, lay.cluster)), (lay.l1_off, 8 * lay.l1_size)]
        regions += [(lay.l1(i) & 0x00FFFFFFFFFFFE00, lay.cluster) for i in range(lay.l1_size)
                    if lay.l1(i) & 0x00FFFFFFFFFFFE00]
        if lay.nb_snapshots:
            regions.append((lay.snap_off, 128))
        for k in range(60):
            edits = []
            for _ in range(rnd.randint(1, 6)):
                start, length = rnd.choice(regions)
                pos = start + rnd.randrange(max(1, length))
                edits.append((pos, rnd.choice([0, 0xFF, rnd.randrange(256)])))

            def mutate(buf: bytearray, lay: Layout,
                       edits: list[tuple[int, int]] = edits) -> bytearray:
                for pos, val in edits:
                    if pos < len(buf):
                        buf[pos] = val
                return buf
            cases.append(Case(f"random-{base}-{k}", base, mutate, ANY_REFUSAL))
    run_cases(cases, images, tmp_path)


def test_memory_is_bounded_for_huge_declared_sizes(images: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """Values that would size allocations if trusted: the largest L1 table, refcount table,
    snapshot count and cluster size the checks allow all stay within RLIMIT_AS."""
    def huge(buf: bytearray, lay: Layout) -> bytearray:
        put(buf, 20, U32, 21)                       # 2 MiB clusters
        put(buf, 24, U64, 1 << 55)                  # a 32 MiB L1 table (the cap) ...
        return put(buf, 36, U32, 1 << 22)           # ... that is not in the file
    cases = [
        Case("huge-l1-at-cap", "v3", huge, FORMAT),
        Case("huge-snapshot-extra", "v3",
             lambda b, lay: put(b, lay.snap_off + 36, U32, MAX32), FORMAT),
        Case("huge-snapshot-names", "v3",
             lambda b, lay: put(put(b, lay.snap_off + 12, ">H", 0xFFFF), lay.snap_off + 14,
                                ">H", 0xFFFF), FORMAT),
        Case("huge-snapshot-l1", "v3", lambda b, lay: put(b, lay.snap_off + 8, U32, MAX32),
             FORMAT),
    ]
    run_cases(cases, images, tmp_path)
