"""Benchmark cdimover's RAW copy beside qemu-img, nbdcopy, cp and dd on loop devices.

Usage (root; loop devices, mkfs.ext4, mkfs.xfs, qemu-img, nbdcopy, fio):

    python3 bench/run.py [--size 4G] [--runs 5] [--scenarios NAME ...] [--json out.json]
                         [--workdir /var/tmp] [--seed 1] [--keep-going]
                         [--pod-limits] [--buffered-loops] [--no-disk-limit] [--fio-runtime S]

What users run: loop devices are attached with `losetup --direct-io=on` (a real PV -- Ceph RBD,
iSCSI, LVM, a cloud disk -- has no second page cache under it; the bench checks
/sys/block/loopN/loop/dio); --buffered-loops attaches them without, as before.  Every measured
tool, cdimover and the peers alike, runs in a fresh cgroup of its own (v2 when its controllers
are there, else v1 under this process's own cgroups) whose memory peak -- page cache charged
to it included, not only RSS -- is the table's "memcg peak MiB" column; --pod-limits gives
that cgroup CDI's default pod limits, memory 600M and cpu 750m (cpu.max, or the CFS quota
under v1), and the table adds the median seconds the CPU quota throttled each tool.  The peers
run with their best flags: qemu-img -W -m 16, plus -n --target-is-zero on a fresh device;
nbdcopy --destination-is-zero on a fresh target.

Disk limit: before the copy scenarios, fio (Debian package fio) measures the disk under the
scratch directory: sequential O_DIRECT reads and writes (libaio) of 1 and 4 MiB at queue
depths 4, 16 and 64 on a 2 GiB file, the best rate of each direction.  Each copy job then gets
a line "disk limit": the bytes it must read (the source's allocated bytes) at the read rate
plus the bytes it must write (the data) at the write rate, and cdimover's and the best peer's
time as multiples of it (target: cdimover <= 1.2 x).  --no-disk-limit skips it.

Scenarios (default: all but file2blk-dirty):

    blk2file        loop device (cdimover maps the backing file) -> file
    blkfull2file    loop device, cdimover with scan="full" (every byte read) -> file
    file2blk        file -> fresh loop device (reads as zeros)
    blk2blk         loop device (backing-file map) -> fresh loop device
    ext4            file -> file inside an ext4 filesystem on a loop device
    xfs             file -> file inside an xfs filesystem (reflink vs `qemu-img convert -C`)
    scaling         the same data in a SIZE and a 16xSIZE sparse disk, file and loop sources
    memcg           a dense (all data) SIZE copy file -> file in a 256 MiB memory cgroup
    file2blk-dirty  file -> loop device over a pre-filled (non-zero) file  (optional)
    qcow2           the source as QCOW2 (64 KiB clusters) -> file and -> fresh loop device,
                    cdimover.convert vs `qemu-img convert -f qcow2 -O raw`  (optional)
    qcow2-compressed  the source as compressed QCOW2 (zlib; zstd as an extra row) -> file
                    (optional)
    qcow2-wide      a 1 TiB QCOW2 with one 64 KiB cluster in every 512 MiB (2048 L2 tables,
                    128 MiB of metadata, made by qemu-io) -> file, cdimover vs qemu-img: the
                    cgroup's peak memory with the page cache (optional; --size unused)
    prealloc        a SIZE blank target preallocated: falloc on a fresh file (vs fallocate),
                    falloc and full on a fresh loop device (vs dd from /dev/zero,
                    oflag=direct), and a copy with preallocation="full" (vs
                    `qemu-img convert -o preallocation=full`)  (optional)
    http-qcow2      the source as QCOW2 (64 KiB clusters) served by nginx -> file and -> fresh
                    loop device: cdimover.import_url (range requests for the allocated clusters
                    only) vs CDI's scratch route (`curl -o SCRATCH` then `qemu-img convert`,
                    timed together, the scratch file on the same disk) and its direct route
                    (nbdkit curl plugin with the readahead and retry filters and CDI's
                    arguments, `qemu-img convert` of the QCOW2 over NBD)  (optional)
    http-xz         the RAW source compressed with `xz -T0 -3`, served by nginx -> file:
                    cdimover (one streamed GET) vs `curl | xz -dc | dd conv=sparse`  (optional)
    upload-qcow2    the source as QCOW2 (64 KiB clusters) uploaded over HTTPS on 127.0.0.1 with
                    `curl -T` -> file and -> fresh loop device: cdimover's upload server
                    (`serve-upload`, sync route) vs CDI's route emulated: nginx storing the
                    body in a scratch file (DAV PUT), then `qemu-img convert -O raw`
                    (optional)
    upload-raw      the RAW source uploaded the same way -> file: cdimover's upload server vs
                    `curl -T` to nginx writing the body to disk (DAV PUT) + `sync -d`
                    (optional)
    registry-qcow2  a containerDisk holding the source as QCOW2 (64 KiB clusters) under /disk/
                    in one gzip layer, in a local registry (docker-registry) -> file and ->
                    fresh loop device: cdimover.import_registry vs CDI's scratch route with the
                    same tools (`skopeo copy` to a local directory, `tar -xzf` of the layer,
                    `qemu-img convert -O raw`, timed together)  (optional)
    clone-net       the source's loop device cloned between two network namespaces (a veth
                    pair) -> Filesystem volume and -> fresh loop device: pod clone-source ->
                    pod upload-server (the clone stream; with zstd; killed at 90 % and
                    restarted) vs CDI's wire path (`dd` | snappy framing | `curl -T` into the
                    server's CDI mode) and `nbdcopy` from `qemu-nbd -r` over TCP  (optional)
    clone-net-1g    the same -> Filesystem volume, the link limited to 1 Gbit/s (tc tbf)
                    (optional)
    mixed           MIXED_BYTES of data copied file -> new file by cdimover beside fio doing
                    the same I/O and nothing else: the read and the write at once, and one
                    after the other, at 2 and 8 requests of 4 MiB in flight per side (2 x 2 x
                    4 MiB is cdimover's 16 MiB); what the disk gives a copy, and what
                    overlapping its reads and writes costs there  (optional)
    tune-blk2file, tune-file2blk, tune-blk2blk
                    the job of blk2file / file2blk / blk2blk with cdimover at several worker
                    counts (requests in flight) and request sizes (--tune), beside qemu-img
                    and nbdcopy  (optional)
    qdepth          no copy: fio's sequential O_DIRECT read and write rate by request size
                    (256 KiB - 4 MiB) and queue depth (1 - 64) on a file on the disk and on a
                    loop device over it, as tables  (optional)

The source is a virtual disk of SIZE bytes: 25 % data in scattered 1-8 MiB extents (random,
log-like text and repeated blocks mixed, about 2:1 for zlib), 10 % zeros written as data, the
rest holes; the layout and the bytes follow from --seed.  It is written once per invocation.

cdimover is run from a snapshot of the installed package copied into the scratch directory at
start (PYTHONPATH), so rebuilds of the working tree during a long run do not mix builds; the
snapshot is byte-compiled (compileall), as an install is, so no run pays for compiling it.
Its processes start as the container image starts them: the interpreter's site has nothing to
run there, so here they run with -S and the site-packages directories on PYTHONPATH, and this
machine's .pth files (an editable-install finder, a CA hook: 19-27 ms of a cold copy) are
not charged to them; --with-site keeps the site.

Method: every round runs each tool once, in an order shuffled per round (seeded by --seed,
the scenario and the round), so that no tool always follows the same neighbour -- a rotation
would put, say, cdimover after dd in every round;
`sync` and drop_caches before each run (cold cache); peers are followed by `sync -d TARGET`
inside their timed interval (cdimover fdatasyncs itself); every tool, cdimover included
(bench/_cdm_copy.py), is a child process measured with wait4 (wall, user+sys CPU, peak
RSS), forked by the small launcher bench/_spawn.c (compiled into the scratch directory) so
ru_maxrss is the tool's own and not inflated by this runner's pages.  cdimover's output is
verified with sha256 on every run, the peers' on the first round; allocated bytes are the
st_blocks of the target file (of the backing file for loop targets).  The table shows
medians; --json writes every sample.  --warmup N adds N discarded rounds per scenario (all
but scaling): on a VM whose host caches the disk, the first runs after writing an image can
be slower while the host flushes.  Loop devices are attached with `losetup --find --show`
and detached by name (only while their backing file is still the one attached), filesystems
unmounted, cgroups and files removed, even on failure or SIGTERM.

The issue's targets, checked per scenario: blk2file <= 0.5 x the best peer; blkfull2file
<= 0.9 with CPU <= 0.7 x qemu-img's; file2blk <= 0.8; blk2blk <= 0.5; ext4 <= 0.8; xfs
reflink << 0.1 s (the copy call inside cdimover <= 0.01 s); cdimover's peak RSS <= 64 MiB,
and its cgroup's peak (page cache included) <= 64 MiB; time <= 1.2 x the disk limit;
allocated <= data bytes + 1 %; scaling: 16xSIZE within 20 % (or 0.1 s) of SIZE; memcg:
cdimover succeeds.

Targets of the optional scenarios: qcow2 -> file and -> device <= 0.7 x qemu-img's time,
peak RSS <= 64 MiB (qemu-img's shown beside it), output sha256 = the RAW source's;
qcow2-compressed (zlib) <= 0.5 x qemu-img's, same checks (the zstd rows have no time target);
prealloc: file falloc <= 1.0 x fallocate's time, or both <= 0.2 s (both are near-instant, so
the process start-up of an interpreter dominates; the rule passes when either holds); device
falloc and full <= 0.5 x dd's, the backing file >= SIZE allocated after cdimover (really
provisioned) and reading as zeros; copy with preallocation="full" <= 0.8 x qemu-img's,
bytes verified and the target >= SIZE allocated.  cdimover's QCOW2 conversions run through
bench/_cdm_convert.py, its blank disks through bench/_cdm_prealloc.py.

Upload scenarios: cdimover runs through bench/_cdm_upload.py (`cdimover pod upload-server`,
the program of CDI's upload pod, configured by its environment, started through the _spawn
launcher for its own peak RSS; then curl; then the server's exit: the sync route answers
once the image is durable; the server's start-up is inside the measured wall time);
the peers PUT to nginx over HTTPS with the same curl (`-T`, streamed from disk), nginx
(`dav_methods PUT`, `client_max_body_size 0`, its body temp files beside the destination)
renames the body into place; the QCOW2 peer then runs qemu-img as in qcow2, and both peers
`sync -d` their output.  A self-signed certificate for 127.0.0.1 is made with openssl.
upload-qcow2 also times curl -> nginx alone storing the QCOW2 file (the receive floor: what
the client and a native server take to move the bytes, before any conversion).
Targets: upload-qcow2 (file and device) <= 0.5 x the CDI route's time, the server's peak
RSS <= 96 MiB; upload-raw throughput >= 0.8 x curl to nginx (time <= 1.25 x).

HTTP scenarios: nginx (Debian nginx-light) runs as a child of the runner with its own
configuration in the scratch directory (daemon off, master_process off, 127.0.0.1 on a free
ephemeral port, sendfile on) and is stopped by its PID at the end, even on failure; its
access log records $body_bytes_sent, so each run's bytes are what the server really sent
(shown for every tool).  The server reads the file cold too (drop_caches before each run).
cdimover imports through bench/_cdm_import.py (import_url; its JSON adds strategy,
bytes_fetched and requests).  The peers' qemu-img runs with the same options as in qcow2 (-W
-m 16, and -n --target-is-zero on a device), which makes them faster than CDI's own `-t
writeback -p`; nbdkit is started as CDI's NewNbdkitCurl does (-r, --readonly,
--exit-with-parent, -U SOCKET, --filter=readahead --filter=retry, the User-Agent header,
retry-exponential=no) with `--run` starting qemu-img once it listens, instead of CDI's
polling for the pid file.  The xz peer's dd uses iflag=fullblock so that conv=sparse sees
whole 1 MiB blocks from the pipe.  Targets: http-qcow2 (file and device) <= 0.5 x the
scratch route's time and <= 0.8 x the direct route's, nginx bytes for cdimover <= 1.02 x the
QCOW2 file's allocated size (st_blocks), peak RSS <= 64 MiB, output verified every run,
allocated <= data + 1 %; http-xz: time <= 1.0 x the pipeline's, same checks but the bytes.

Registry scenario: `docker-registry serve` (Debian's, the distribution project's registry) runs
as a child of the runner on 127.0.0.1 (plain HTTP, storage in the scratch directory) and is
stopped by its PID; the image is an OCI layout written here (the layer made with GNU tar,
owner 107, and `gzip REGISTRY_GZIP`) pushed with `skopeo copy`.  cdimover runs through
bench/_cdm_import.py (import_registry for a docker:// image; its JSON adds
bytes_fetched and the layer).  The
peer's skopeo copies the image to a directory in the scratch directory, tar extracts the
layer there, qemu-img converts as in qcow2, and `sync -d` makes the output durable; the
scratch files are removed after each run, outside the timing.  Targets: registry-qcow2 (file
and device) <= 0.5 x the peer's time, cdimover's peak RSS <= 96 MiB, bytes pulled by
cdimover = the layer's size, output verified every run, allocated <= data + 1 %.

clone-net runs each route through bench/_cdm_clonenet.py, which starts the receiving side in
one namespace and the sending side in the other (both under the _spawn launcher for their own
peak RSS) and counts the source veth's tx_bytes; the upload server's start-up is inside the
time of every route that uses it.  Targets: clone-net (both targets) <= 0.3 x CDI's wire
path, <= 0.8 x nbdcopy, bytes on the link <= 1.02 x the data, a run whose source is killed at
90 % <= 1.1 x an uncut one, each side's peak RSS <= 64 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CDM_RUNNER = HERE / "_cdm_copy.py"
# How cdimover's processes start: the interpreter with -S, the package snapshot and the
# site-packages directories on PYTHONPATH (set by snapshot_package), as the container image
# starts it -- that interpreter's site has no .pth file to run, where this machine's may (an
# editable-install finder, a CA hook): those cost 19-27 ms of a cold copy here and no pod
# pays them.  --with-site: [sys.executable] with the site as it is.
CDM_PYTHON: list[str] = [sys.executable]
CDM_CONVERT = HERE / "_cdm_convert.py"
CDM_PREALLOC = HERE / "_cdm_prealloc.py"
CDM_IMPORT = HERE / "_cdm_import.py"
CDM_UPLOAD = HERE / "_cdm_upload.py"
CDM_CLONENET = HERE / "_cdm_clonenet.py"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ALIGN = 4096
CHUNK = 8 * MiB
MEMCG_LIMIT = 256 * MiB
POD_MEMORY = 600 * 1000**2     # --pod-limits: CDI's default limits.memory (600M) ...
POD_CPU_MILLIS = 750           # ... and limits.cpu (750m)
RSS_LIMIT = 64 * MiB
HASH_LIMIT = 16 * GiB          # beyond this, verify by sparse-aware comparison, not sha256

DEFAULT_SCENARIOS = ["blk2file", "blkfull2file", "file2blk", "blk2blk", "ext4", "xfs",
                     "scaling", "memcg"]
ALL_SCENARIOS = DEFAULT_SCENARIOS + ["file2blk-dirty", "qcow2", "qcow2-compressed", "prealloc",
                                     "http-qcow2", "http-xz", "upload-qcow2", "upload-raw",
                                     "registry-qcow2", "clone-net", "clone-net-1g", "qdepth",
                                     "tune-blk2file", "tune-file2blk", "tune-blk2blk",
                                     "qcow2-wide", "mixed"]
# Scenarios whose jobs get a disk-limit line (fio measures the disk once, before them).
DISK_LIMIT_SCENARIOS = {"blk2file", "blkfull2file", "file2blk", "blk2blk", "ext4",
                        "file2blk-dirty", "qcow2", "tune-blk2file", "tune-file2blk",
                        "tune-blk2blk"}

# Targets from the issue: scenario -> max ratio of cdimover's median wall time to the best peer's.
RATIO_TARGETS = {"blk2file": 0.5, "blkfull2file": 0.9, "file2blk": 0.8, "blk2blk": 0.5,
                 "ext4": 0.8, "qcow2": 0.7, "qcow2-blk": 0.7, "qcow2-compressed": 0.5}
DISK_LIMIT_TARGET = 1.2       # x the disk-limit line (fio's best rates), from issue 17
PREALLOC_FILE_FLOOR = 0.2      # s: prealloc-file passes when both tools take at most this
PREALLOC_BLK_TARGET = 0.5      # x dd's time, falloc and full on a loop device
PREALLOC_COPY_TARGET = 0.8     # x qemu-img -o preallocation=full


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[m[2].upper()]
    n = int(float(m[1]) * mult)
    if n < 64 * MiB or n % MiB:
        raise argparse.ArgumentTypeError("size must be a multiple of 1 MiB, at least 64 MiB")
    return n


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def run(argv: Sequence[str], **kw: Any) -> str:
    """Run a helper command (not a measured one); its stdout, or CalledProcessError."""
    r = subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)
    return str(r.stdout)


# ---------------------------------------------------------------------------------------------
# The scenario image: layout and content

@dataclass
class Layout:
    size: int
    seed: int
    extents: list[tuple[int, int, str]]       # (offset, length, "data" | "zero"), sorted

    @property
    def data_bytes(self) -> int:
        return sum(ln for _, ln, k in self.extents if k == "data")

    @property
    def zero_bytes(self) -> int:
        return sum(ln for _, ln, k in self.extents if k == "zero")


def _draw_lengths(rng: np.random.Generator, total: int, lo: int, hi: int) -> list[int]:
    out: list[int] = []
    left = total
    while left > 0:
        n = int(rng.integers(lo // ALIGN, hi // ALIGN + 1)) * ALIGN
        n = min(n, left)
        out.append(n)
        left -= n
    return out


def make_layout(size: int, seed: int, data_frac: float = 0.25, zero_frac: float = 0.10,
                data_bytes: int | None = None) -> Layout:
    """Scattered 1-8 MiB extents: DATA_FRAC of SIZE data (or exactly DATA_BYTES), ZERO_FRAC
    zeros written as data, holes between.  The data extents (lengths and order) depend only on
    SEED and the data amount, so the same data can be laid out in disks of different sizes."""
    rng = np.random.default_rng([seed, 1])
    dbytes = data_bytes if data_bytes is not None else int(size * data_frac) // ALIGN * ALIGN
    zbytes = int(size * zero_frac) // ALIGN * ALIGN
    kinds = [(ln, "data") for ln in _draw_lengths(rng, dbytes, 1 * MiB, 8 * MiB)]
    zrng = np.random.default_rng([seed, 2])
    kinds += [(ln, "zero") for ln in _draw_lengths(zrng, zbytes, 1 * MiB, 8 * MiB)]
    order = np.random.default_rng([seed, 3]).permutation(len(kinds))
    kinds = [kinds[i] for i in order]
    gap_total = size - dbytes - zbytes
    if gap_total < 0:
        raise ValueError("extents do not fit")
    w = np.random.default_rng([seed, 7, size]).random(len(kinds) + 1)
    units = gap_total // ALIGN
    gaps = [int(x) for x in np.floor(w / w.sum() * units)]
    gaps[-1] += units - sum(gaps)
    extents = []
    pos = 0
    for (ln, kind), g in zip(kinds, gaps):
        pos += g * ALIGN
        extents.append((pos, ln, kind))
        pos += ln
    assert pos + gaps[-1] * ALIGN == size
    return Layout(size=size, seed=seed, extents=extents)


def dense_layout(size: int, seed: int) -> Layout:
    rng = np.random.default_rng([seed, 4])
    extents = []
    pos = 0
    for ln in _draw_lengths(rng, size, 1 * MiB, 8 * MiB):
        extents.append((pos, ln, "data"))
        pos += ln
    return Layout(size=size, seed=seed, extents=extents)


class Content:
    """Deterministic, partly repetitive bytes: per 64 KiB block, 35 % random bytes, 40 %
    slices of a 1 MiB log-like text, 25 % one of 16 random 4 KiB blocks repeated."""

    BLOCK = 64 * KiB

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 5])
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
        words = [bytes(rng.choice(letters, int(rng.integers(2, 10)))).decode()
                 for _ in range(300)]
        svcs = ["kernel", "systemd", "sshd", "kubelet", "containerd", "virt-launcher"]
        lines = []
        n = 0
        t = 1700000000.0
        while n < MiB + 4 * KiB:
            t += float(rng.random()) * 3
            ws = " ".join(words[int(i)] for i in rng.integers(0, len(words),
                                                               int(rng.integers(4, 14))))
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
            node = int(rng.integers(0, 8))
            svc = svcs[int(rng.integers(0, len(svcs)))]
            line = (f"{stamp}.{int(t * 1e6) % 10**6:06d}Z node-{node} "
                    f"{svc}[{int(rng.integers(1, 40000))}]: {ws} "
                    f"id={int(rng.integers(0, 1 << 32)):08x}\n")
            lines.append(line)
            n += len(line)
        text = "".join(lines).encode()[:MiB]
        self.text = np.frombuffer(text + text, dtype=np.uint8)
        tiles = np.frombuffer(rng.bytes(16 * ALIGN), dtype=np.uint8).reshape(16, ALIGN)
        self.reps = [np.tile(tiles[i], self.BLOCK // ALIGN) for i in range(16)]
        self.seed = seed

    def extent(self, index: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 6, index])
        buf = np.empty(length, dtype=np.uint8)
        nblk = -(-length // self.BLOCK)
        kinds = rng.choice(3, size=nblk, p=[0.35, 0.4, 0.25])
        rand = np.frombuffer(rng.bytes(int((kinds == 0).sum()) * self.BLOCK), dtype=np.uint8)
        ri = 0
        for b, k in enumerate(kinds):
            s = b * self.BLOCK
            e = min(length, s + self.BLOCK)
            n = e - s
            if k == 0:
                buf[s:e] = rand[ri:ri + n]
                ri += self.BLOCK
            elif k == 1:
                o = int(rng.integers(0, MiB))
                buf[s:e] = self.text[o:o + n]
            else:
                buf[s:e] = self.reps[int(rng.integers(0, 16))][:n]
        return buf


def write_image(path: str | Path, layout: Layout, content: Content) -> None:
    """Write LAYOUT to PATH (created sparse): data extents with CONTENT, zero extents as
    written zeros, holes untouched; fsync once."""
    zeros = bytes(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, layout.size)
        data_i = 0
        for off, ln, kind in layout.extents:
            if kind == "data":
                os.pwrite(fd, content.extent(data_i, ln).data, off)
                data_i += 1
            else:
                done = 0
                while done < ln:
                    n = min(CHUNK, ln - done)
                    os.pwrite(fd, memoryview(zeros)[:n], off + done)
                    done += n
        os.fsync(fd)
    finally:
        os.close(fd)


def compress_ratio(path: str | Path, layout: Layout, sample: int = 16 * MiB) -> float:
    """zlib (level 6, 64 KiB clusters as in compressed QCOW2) ratio over a sample of data."""
    raw = comp = 0
    with open(path, "rb") as f:
        for off, ln, kind in layout.extents:
            if kind != "data":
                continue
            f.seek(off)
            for s in range(0, ln, Content.BLOCK):
                blk = f.read(min(Content.BLOCK, ln - s))
                raw += len(blk)
                comp += len(zlib.compress(blk, 6))
            if raw >= sample:
                break
    return raw / comp if comp else 0.0


# ---------------------------------------------------------------------------------------------
# Hashing and verification

_ZEROS = bytes(CHUNK)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Data ranges of FD within [0, SIZE) by SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if d >= size:
            return
        h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        yield d, h
        pos = h


def sha256_sparse(path: str | Path, size: int) -> str:
    """sha256 of the first SIZE bytes of the regular file PATH (holes hashed as zeros without
    being read).  A file shorter than SIZE gets a distinct marker instead of a hash."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        real = os.fstat(fd).st_size
        if real < size:
            return f"short:{real}"
        pos = 0

        def zeros(n: int) -> None:
            while n > 0:
                k = min(n, CHUNK)
                h.update(memoryview(_ZEROS)[:k])
                n -= k

        for d, e in data_extents(fd, size):
            zeros(d - pos)
            while d < e:
                k = os.preadv(fd, [mv[:min(CHUNK, e - d)]], d)
                if k <= 0:
                    raise OSError(errno.EIO, f"short read at {d}", str(path))
                h.update(mv[:k])
                d += k
            pos = e
        zeros(size - pos)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return h.hexdigest()


def compare_sparse(a: str | Path, b: str | Path, size: int) -> bool:
    """Byte equality of the first SIZE bytes of two regular files, reading only the union of
    their data extents (a hole equals zeros)."""
    fa = os.open(a, os.O_RDONLY | os.O_CLOEXEC)
    fb = os.open(b, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fa).st_size < size or os.fstat(fb).st_size < size:
            return False
        ranges = sorted(list(data_extents(fa, size)) + list(data_extents(fb, size)))
        merged: list[list[int]] = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        for s, e in merged:
            while s < e:
                n = min(CHUNK, e - s)
                if os.pread(fa, n, s) != os.pread(fb, n, s):
                    return False
                s += n
        return True
    finally:
        for fd in (fa, fb):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def reads_as_zeros(path: str | Path, size: int) -> bool:
    """PATH (a regular file) is at least SIZE bytes long and its first SIZE bytes read as
    zeros (holes and unwritten extents skipped by SEEK_DATA, data extents compared)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            return False
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        for d, e in data_extents(fd, size):
            while d < e:
                k = os.preadv(fd, [mv[:min(CHUNK, e - d)]], d)
                if k <= 0:
                    raise OSError(errno.EIO, f"short read at {d}", str(path))
                if np.count_nonzero(np.frombuffer(buf, dtype=np.uint8, count=k)):
                    return False
                d += k
        return True
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800


def extent_kinds(path: str | Path) -> dict[str, int]:
    """Bytes of PATH's extents by FIEMAP: "written" and "unwritten" (allocated but not yet
    written: reads as zeros without data on disk), "extents" their count."""
    import fcntl
    import struct
    out = {"written": 0, "unwritten": 0, "extents": 0}
    batch = 512
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(struct.pack("=QQIIII", start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC,
                                        0, batch, 0) + bytes(56 * batch))
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            n = struct.unpack_from("=I", buf, 20)[0]
            if n == 0:
                break
            last = False
            for i in range(n):
                lg, _, ln, _, _, fl = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                out["unwritten" if fl & FIEMAP_EXTENT_UNWRITTEN else "written"] += ln
                out["extents"] += 1
                start = lg + ln
                last = last or bool(fl & FIEMAP_EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return out


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------------------------
# System helpers: caches, loop devices, filesystems, cgroups

SETTLE = 0.5      # seconds of quiet after dropping caches (set from --settle)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(SETTLE)


def prewarm(path: str | Path, size: int) -> None:
    """Read PATH's data once and drop it again: in a VM the host may cache the guest's disk,
    so the first read after writing the image is colder than every later one.  Reading it
    here makes every measured run equally cold (guest cache dropped, host cache warm)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for d, e in data_extents(fd, size):
            while d < e:
                n = len(os.pread(fd, min(CHUNK, e - d), d))
                if n <= 0:
                    break
                d += n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# How the read floor reads: (name, readers, request bytes, O_DIRECT).  Direct reads with more
# in flight than any tool uses, and buffered reads that let the kernel's readahead run ahead.
FLOOR_METHODS = [("8 x 16 MiB O_DIRECT", 8, 16 * MiB, True),
                 ("4 x 4 MiB buffered", 4, 4 * MiB, False)]


def read_floor(path: str | Path, size: int, runs: int) -> tuple[float, str]:
    """The disk's floor for a job that must read PATH's data: for each of FLOOR_METHODS the
    median, over RUNS cold reads, of the seconds to read every data extent of PATH (SEEK_DATA)
    and do nothing else with the bytes; returns the fastest median and its method."""
    best = (float("inf"), "")
    for name, readers, request, direct in FLOOR_METHODS:
        t = _read_all(path, size, runs, readers, request, direct)
        best = min(best, (t, name))
    return best


def _read_all(path: str | Path, size: int, runs: int, readers: int, request: int,
              direct: bool) -> float:
    import mmap
    import threading
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pieces = [(off, min(request, e - off))
                  for d, e in data_extents(fd, size) for off in range(d, e, request)]
    finally:
        os.close(fd)
    times = []
    for _ in range(max(1, runs)):
        drop_caches()
        work = iter(pieces)
        lock = threading.Lock()
        dfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        if not direct:
            os.posix_fadvise(dfd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def reader() -> None:
            buf = mmap.mmap(-1, request)
            view = memoryview(buf)
            try:
                while True:
                    with lock:
                        item = next(work, None)
                    if item is None:
                        return
                    off, ln = item
                    os.preadv(dfd, [view[:-(-ln // ALIGN) * ALIGN]], off)
            finally:
                view.release()
                buf.close()

        threads = [threading.Thread(target=reader) for _ in range(readers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - t0)
        if not direct:
            os.posix_fadvise(dfd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(dfd)
    return med(times)


def floor_line(b: Bench, scenario: str, path: str | Path, size: int,
               samples: list[Sample]) -> None:
    """Emit how close cdimover and the best peer came to the read floor of PATH."""
    rows = summarize(samples)
    floor, how = read_floor(path, size, b.args.runs)
    b.info.setdefault("read_floor_s", {})[scenario] = {"seconds": floor, "method": how}
    peers = [r for r in rows if r.case != "cdimover" and r.n_ok > 0]
    best = min(peers, key=lambda r: r.wall) if peers else None
    cdm = next(r for r in rows if r.case == "cdimover")
    line = (f"read floor (reading the source's data and nothing else, cold; fastest of "
            f"{' / '.join(m[0] for m in FLOOR_METHODS)}: {how}): {floor:.3f}s; "
            f"cdimover = {cdm.wall / floor:.2f} x floor")
    if best:
        line += f", best peer ({best.case}) = {best.wall / floor:.2f} x floor"
    b.emit(line)


# ---------------------------------------------------------------------------------------------
# The disk's own limit, by fio: sequential direct I/O at a range of request sizes and queue
# depths (libaio), the best rate of each direction

FIO_SIZE = 2 * GiB               # the data file fio reads and writes (sequential, wraps around)
FIO_FRESH_SIZE = 1 * GiB         # one pass into a new file per fresh-space write point
LIMIT_BS = [1 * MiB, 4 * MiB]    # the disk-limit line's request sizes ...
LIMIT_QD = [4, 16, 64]           # ... and queue depths
SWEEP_BS = [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB]     # the queue-depth scenario
SWEEP_QD = [1, 2, 4, 8, 16, 32, 64]
FIO_RUNTIME_DEFAULT = 1.5
FIO_RUNTIME = FIO_RUNTIME_DEFAULT        # s per point (set from --fio-runtime)


@dataclass(frozen=True)
class FioPoint:
    rw: str              # "read" | "write" | "write-fresh" (into a new sparse file)
    bs: int
    qd: int
    rate: float          # bytes/s
    lat_ms: float        # mean completion latency

    def label(self) -> str:
        return f"{fmt_size(self.bs).replace('.00 ', ' ')} x qd {self.qd}"


def fio_cmd(target: str, rw: str, bs: int, qd: int, runtime: float | None,
            size: int, fresh: bool = False) -> list[str]:
    """fio's command line for one point: sequential RW ("read" | "write") of BS-byte requests,
    QD in flight (libaio, O_DIRECT) on TARGET (a file or a device) over SIZE bytes, for RUNTIME
    seconds (None: one pass of SIZE, to lay the file out).  FRESH: TARGET is a new file that
    fio must not preallocate, so every write lands where the filesystem has to allocate."""
    argv = ["fio", "--name=seq", f"--filename={target}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", f"--size={size}",
            "--output-format=json", "--invalidate=1"]
    if runtime is not None:
        argv += [f"--runtime={runtime:g}", "--time_based"]
    if fresh:
        argv.append("--fallocate=none")
    if rw == "write" and not target.startswith("/dev/"):
        argv.append("--end_fsync=1")
    return argv


def fio_parse(doc: str, rw: str) -> tuple[float, float]:
    """(bytes/s, mean completion latency in ms) of direction RW from fio's JSON output."""
    start = doc.find("{")           # fio may print notes before the JSON document
    job = json.loads(doc[start:])["jobs"][0][rw]
    lat = job.get("clat_ns", {}).get("mean", 0.0) / 1e6
    return float(job["bw_bytes"]), float(lat)


def fio_point(target: str, rw: str, bs: int, qd: int, size: int = FIO_SIZE) -> FioPoint:
    rate, lat = fio_parse(run(fio_cmd(target, rw, bs, qd, FIO_RUNTIME, size)), rw)
    return FioPoint(rw, bs, qd, rate, lat)


def fio_fresh_point(path: Path, bs: int, qd: int, size: int = FIO_FRESH_SIZE) -> FioPoint:
    """One pass of SIZE bytes written into a new, sparse file at PATH (removed after): the
    rate at which the disk and its filesystem take data into space not yet allocated, which
    is where every job's target writes (a new file, or a new loop device over a new sparse
    file), and which costs more than overwriting laid-out blocks."""
    path.unlink(missing_ok=True)
    try:
        rate, lat = fio_parse(run(fio_cmd(str(path), "write", bs, qd, None, size, fresh=True)),
                              "write")
    finally:
        path.unlink(missing_ok=True)
    return FioPoint("write-fresh", bs, qd, rate, lat)


def fio_layout(path: Path, size: int = FIO_SIZE) -> None:
    """Write PATH's SIZE bytes once (reads of a sparse file would not reach the disk)."""
    run(fio_cmd(str(path), "write", 4 * MiB, 16, None, size))


def fio_sweep(target: str, sizes: Sequence[int], depths: Sequence[int],
              size: int = FIO_SIZE) -> list[FioPoint]:
    """Every (direction, request size, queue depth), writes first (TARGET's data is laid out)."""
    return [fio_point(target, rw, bs, qd, size)
            for rw in ("write", "read") for bs in sizes for qd in depths]


def best_points(points: Sequence[FioPoint]) -> dict[str, FioPoint]:
    """The fastest point of each direction."""
    out: dict[str, FioPoint] = {}
    for p in points:
        if p.rw not in out or p.rate > out[p.rw].rate:
            out[p.rw] = p
    return out


def measure_disk_limit(b: Bench) -> None:
    """The disk under the scratch directory: sequential direct read and write rates at the
    request size and queue depth that give the most (LIMIT_BS x LIMIT_QD), into b.info."""
    path = b.workdir / "fio.dat"
    try:
        t = time.perf_counter()
        fio_layout(path)
        pts = fio_sweep(str(path), LIMIT_BS, LIMIT_QD)
    finally:
        path.unlink(missing_ok=True)
    fresh = [fio_fresh_point(b.workdir / "fio-fresh.dat", bs, qd)
             for bs in LIMIT_BS for qd in LIMIT_QD]
    best = best_points(pts + fresh)
    b.info["disk_limit"] = {rw: dataclasses.asdict(p) for rw, p in best.items()}
    b.info["disk_limit_points"] = [dataclasses.asdict(p) for p in pts + fresh]
    r, w, f = best["read"], best["write"], best["write-fresh"]
    b.emit(f"disk limit (fio, sequential, O_DIRECT, libaio, {fmt_size(FIO_SIZE)} file in the "
           f"scratch directory, best of {len(pts)} points, then {len(fresh)} passes of "
           f"{fmt_size(FIO_FRESH_SIZE)} into a new sparse file, {time.perf_counter() - t:.0f}s): "
           f"read {r.rate / MiB:.0f} MiB/s ({r.label()}), "
           f"write over laid-out blocks {w.rate / MiB:.0f} MiB/s ({w.label()}), "
           f"write into fresh space {f.rate / MiB:.0f} MiB/s ({f.label()})")


def disk_limit_line(b: Bench, scenario: str, read_bytes: int, write_bytes: int,
                    samples: list[Sample]) -> None:
    """Emit the time this job needs at the disk's limit (READ_BYTES read at the best read rate
    plus WRITE_BYTES written at the best rate into fresh space, where every job's target
    writes: one disk serves both) and how close cdimover and the best peer came; check
    cdimover <= DISK_LIMIT_TARGET x that.  Without a fresh-space rate (older results), the
    rate over laid-out blocks."""
    lim = b.info.get("disk_limit")
    if not lim:
        return
    fresh = "write-fresh" in lim
    t_r = read_bytes / lim["read"]["rate"]
    t_w = write_bytes / lim["write-fresh" if fresh else "write"]["rate"]
    t = t_r + t_w
    rows = summarize(samples)
    peers = [r for r in rows if r.case != "cdimover" and not r.case.startswith("cdm ")
             and r.n_ok > 0]
    best = min(peers, key=lambda r: r.wall) if peers else None
    cdm = next((r for r in rows if r.case == "cdimover"), None)
    line = (f"disk limit: {fmt_size(read_bytes)} read + {fmt_size(write_bytes)} written "
            f"{'into fresh space ' if fresh else ''}at "
            f"the fio rates = {t_r:.3f} + {t_w:.3f} = {t:.3f}s (overlapped, at best "
            f"{max(t_r, t_w):.3f}s)")
    if cdm is not None:
        line += f"; cdimover = {cdm.wall / t:.2f} x limit"
    if best is not None:
        line += f", best peer ({best.case}) = {best.wall / t:.2f} x limit"
    b.emit(line)
    b.info.setdefault("disk_limit_s", {})[scenario] = {"read_s": t_r, "write_s": t_w}
    if cdm is not None:
        b.check(scenario, f"time <= {DISK_LIMIT_TARGET} x disk limit", cdm.wall / t
                <= DISK_LIMIT_TARGET, f"{cdm.wall:.3f}s vs {t:.3f}s = {cdm.wall / t:.2f}")


def qdepth_scenario(b: Bench) -> None:
    """fio's sequential direct rates over SWEEP_BS x SWEEP_QD on a file in the scratch
    directory (the disk) and on a direct-I/O loop device over such a file, as tables."""
    path = b.workdir / "fio-sweep.dat"
    with Resources().scoped() as res:
        res.callback(lambda: path.unlink(missing_ok=True))
        fio_layout(path)
        targets = [("file on the disk (O_DIRECT)", str(path))]
        targets.append((f"loop device, {'direct' if LOOP_DIRECT else 'buffered'} I/O, over "
                        "that file", res.loop(path)))
        for what, target in targets:
            t = time.perf_counter()
            pts = fio_sweep(target, SWEEP_BS, SWEEP_QD)
            b.info.setdefault("qdepth", {})[what] = [dataclasses.asdict(p) for p in pts]
            b.emit(f"\n== qdepth: {what}; fio sequential, libaio, O_DIRECT, {FIO_RUNTIME:g}s "
                   f"per point ({time.perf_counter() - t:.0f}s)")
            b.emit(qdepth_table(pts))
            best = best_points(pts)
            b.emit("best: " + ", ".join(f"{rw} {p.rate / MiB:.0f} MiB/s at {p.label()}"
                                        for rw, p in sorted(best.items())))


MIXED_BYTES = 1400 * MiB        # the mixed scenario's data, as one extent: what a copy of the
                                # default source reads (1 GiB of data, 0.4 GiB of zeros as data)
MIXED_TARGET = 1.2              # cdimover <= this x fio's copy at once with its requests in flight


def fio_copy_tool(name: str, src: str, qd: int, serial: bool) -> Tool:
    """fio doing to the disk what a copy of MIXED_BYTES from SRC to a new file does, with nothing
    in between: a sequential O_DIRECT read of SRC and a sequential O_DIRECT write of as many
    bytes into {DST} (not preallocated, fsynced at the end), QD requests of 4 MiB in flight per
    side; both at once, or (SERIAL) the read and then the write."""
    side = ["--direct=1", "--ioengine=libaio", "--bs=4M", f"--iodepth={qd}",
            f"--size={MIXED_BYTES}"]
    argv = ["fio", "--output-format=json", "--fallocate=none",
            "--name=read", f"--filename={src}", "--rw=read", *side]
    if serial:
        argv.append("--stonewall")
    argv += ["--name=write", "--filename={DST}", "--rw=write", *side, "--end_fsync=1"]
    return Tool(name, argv, checked=False)


def mixed_scenario(b: Bench) -> None:
    """cdimover's copy of MIXED_BYTES (one extent at the start of a sparse SIZE file) to a new
    file beside fio doing the same reads and writes at once and one after the other, shuffled
    per round, cold; cdimover's output is compared with the source every run."""
    size = b.layout.size
    src = b.workdir / "mixed-src.img"
    with Resources().scoped() as res:
        res.callback(lambda: src.unlink(missing_ok=True))
        with open(src, "wb") as f:
            f.truncate(size)
        fio_layout(src, MIXED_BYTES)
        tools = [cdm_tool(str(src), "{DST}"),
                 fio_copy_tool("fio at once qd 2", str(src), 2, False),
                 fio_copy_tool("fio at once qd 8", str(src), 8, False),
                 fio_copy_tool("fio serial qd 2", str(src), 2, True),
                 fio_copy_tool("fio serial qd 8", str(src), 8, True)]
        samples = run_rounds(b, "mixed", tools, size, "", file_target(b, "mixed-dst.img"),
                             verify=lambda dst: compare_sparse(src, dst, size))
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    ref = by["fio at once qd 2"]
    b.emit("\n" + table(b, f"== mixed: {fmt_size(MIXED_BYTES)} read and as much written into a "
                           "new file: cdimover's copy, and fio doing that I/O alone",
                         rows, ref.wall if ref.n_ok else None))
    b.emit(api_line(samples))
    cdm = by["cdimover"]
    at2, at8 = by["fio at once qd 2"], by["fio at once qd 8"]
    se2, se8 = by["fio serial qd 2"], by["fio serial qd 8"]
    if min(r.n_ok for r in (cdm, at2, at8, se2, se8)) > 0:
        b.emit(f"one after the other / at once: {se2.wall / at2.wall:.2f} at qd 2, "
               f"{se8.wall / at8.wall:.2f} at qd 8; cdimover / fio at once: "
               f"{cdm.wall / at2.wall:.2f} at qd 2 (its own 16 MiB in flight), "
               f"{cdm.wall / at8.wall:.2f} at qd 8")
        b.check("mixed", f"time <= {MIXED_TARGET} x fio's copy at once (qd 2)",
                cdm.wall / at2.wall <= MIXED_TARGET,
                f"{cdm.wall:.3f}s vs {at2.wall:.3f}s = {cdm.wall / at2.wall:.2f}")
    b.check("mixed", "cdimover output verified every run",
            cdm.verified.startswith("ok") and cdm.n_ok == cdm.n,
            f"{cdm.verified}, {cdm.n_ok}/{cdm.n} runs ok")


def qdepth_table(pts: Sequence[FioPoint]) -> str:
    """MiB/s by request size (rows) and queue depth (columns), for each direction."""
    depths = sorted({p.qd for p in pts})
    lines = []
    for rw in ("read", "write"):
        lines.append(f"{rw + ' MiB/s':<12}" + "".join(f"{'qd ' + str(q):>8}" for q in depths))
        for bs in sorted({p.bs for p in pts}):
            by = {p.qd: p for p in pts if p.rw == rw and p.bs == bs}
            lines.append(f"{fmt_size(bs).replace('.00 ', ' '):<12}" + "".join(
                f"{by[q].rate / MiB:8.0f}" if q in by else f"{'-':>8}" for q in depths))
    return "\n".join(lines)


class Resources:
    """Everything the benchmark attaches, mounts or creates, released in reverse order."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    def close(self) -> None:
        self.stack.close()

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        self.stack.callback(fn, *args)

    def loop(self, backing: str | Path, read_only: bool = False) -> str:
        """A loop device over BACKING, with direct I/O on the backing file (as a real PV has
        no second page cache under it) unless --buffered-loops; detached by RES."""
        opts = ["--read-only"] if read_only else []
        if LOOP_DIRECT:
            opts.append("--direct-io=on")
        dev = run(["losetup", "--find", "--show", *opts, str(backing)]).strip()
        if not dev.startswith("/dev/loop"):
            raise RuntimeError(f"losetup returned {dev!r}")
        self.stack.callback(detach_loop, dev, Path(backing).resolve())
        dio = loop_dio(dev)
        if dio != LOOP_DIRECT:
            raise RuntimeError(f"{dev}: direct I/O is {'on' if dio else 'off'}, wanted "
                               f"{'on' if LOOP_DIRECT else 'off'} (backing file {backing})")
        return dev

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Resources]:
        inner = Resources()
        try:
            yield inner
        finally:
            inner.close()


LOOP_DIRECT = True     # loop devices with --direct-io=on (cleared by --buffered-loops)


def loop_dio(dev: str) -> bool:
    """Whether the loop device DEV does direct I/O on its backing file."""
    return Path("/sys/block", Path(dev).name, "loop", "dio").read_text().strip() == "1"


def loop_backing(dev: str) -> str:
    try:
        return Path("/sys/block", Path(dev).name, "loop", "backing_file").read_text().strip()
    except OSError:
        return ""


def detach_loop(dev: str, backing: Path) -> None:
    """Detach DEV, but only while it is still the loop device over BACKING (ours)."""
    now = loop_backing(dev)
    if now != str(backing):
        log(f"WARNING: not detaching {dev}: its backing file is {now!r}, not {str(backing)!r}")
        return
    for i in range(20):
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.1 * (i + 1))
    log(f"WARNING: could not detach {dev}: {r.stderr.strip()}")


def umount(path: str) -> None:
    for i in range(20):
        r = subprocess.run(["umount", path], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.1 * (i + 1))
    log(f"WARNING: could not unmount {path}: {r.stderr.strip()}")


def make_fs(res: Resources, workdir: Path, fstype: str, size: int) -> Path:
    """A fresh FSTYPE filesystem of SIZE bytes in a sparse loop file, mounted; returns the
    mount point.  Unmounted, detached and removed by RES."""
    img = workdir / f"{fstype}.fs"
    with open(img, "wb") as f:
        f.truncate(size)
    res.callback(lambda: img.unlink(missing_ok=True))
    dev = res.loop(img)
    if fstype == "ext4":
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
    elif fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev])
    else:
        raise ValueError(fstype)
    mnt = workdir / f"mnt-{fstype}"
    mnt.mkdir()
    res.callback(lambda: mnt.rmdir() if mnt.exists() else None)
    run(["mount", dev, str(mnt)])
    res.callback(umount, str(mnt))
    return mnt


def _own_v1_path(controller: str) -> str:
    """This process's cgroup v1 path for CONTROLLER (from /proc/self/cgroup)."""
    for ln in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = ln.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise RuntimeError(f"this process is in no cgroup v1 {controller} hierarchy")


class MemCgroup:
    """A child cgroup for one measured tool: memory (a hard LIMIT, or None to measure the peak
    only) and, when CPU_MILLIS is given, a CPU quota (cpu.max under cgroup v2, CFS quota and
    period under v1), as a pod's limits.memory and limits.cpu set them.  cgroup v2 when its
    memory (and, for a quota, cpu) controllers are available (a child of the v2 root);
    otherwise cgroup v1, as children of this process's own memory and cpu cgroups, so the
    benchmark never leaves the limits it was started under.  The memory peak includes the
    page cache the tool's I/O charged (v2 memory.peak, v1 memory.max_usage_in_bytes)."""

    CFS_PERIOD_US = 100_000

    def __init__(self, limit: int | None, name: str, cpu_millis: int | None = None) -> None:
        self.limit = limit
        self.cpu_millis = cpu_millis
        self.path: Path | None = None           # the memory cgroup (v1) or the cgroup (v2)
        self.cpu_path: Path | None = None       # v1 only: the cpu cgroup
        mounts = [ln.split() for ln in Path("/proc/self/mounts").read_text().splitlines()]
        v2 = next((m[1] for m in mounts if m[2] == "cgroup2"), None)
        need = {"memory"} | ({"cpu"} if cpu_millis is not None else set())
        if v2 and need <= set(Path(v2, "cgroup.controllers").read_text().split()):
            self.version = 2
            parent = Path(v2)
            have = set(Path(parent, "cgroup.subtree_control").read_text().split())
            for c in sorted(need - have):
                Path(parent, "cgroup.subtree_control").write_text(f"+{c}")
            self.cpu_parent: Path | None = None
        else:
            def v1_mount(controller: str) -> str:
                m = next((m[1] for m in mounts if m[2] == "cgroup" and controller in
                          m[3].split(",")), None)
                if m is None:
                    raise RuntimeError(f"no {controller} cgroup controller (v2 or v1) available")
                return m
            self.version = 1
            parent = Path(v1_mount("memory")) / _own_v1_path("memory").lstrip("/")
            self.cpu_parent = (Path(v1_mount("cpu")) / _own_v1_path("cpu").lstrip("/")
                               if cpu_millis is not None else None)
        self.parent = parent
        self.name = name

    def describe(self) -> str:
        mem = ("no memory limit" if self.limit is None else f"memory {self.limit // 1000**2}M"
               if self.limit % 1000**2 == 0 else f"memory {fmt_size(self.limit)}")
        cpu = f", cpu {self.cpu_millis}m" if self.cpu_millis is not None else ""
        return f"cgroup v{self.version}: {mem}{cpu}"

    def create(self) -> None:
        p = self.parent / self.name
        p.mkdir()
        self.path = p
        quota = (self.cpu_millis * self.CFS_PERIOD_US // 1000 if self.cpu_millis is not None
                 else None)
        if self.version == 2:
            if self.limit is not None:
                (p / "memory.max").write_text(str(self.limit))
                if (p / "memory.swap.max").exists():
                    (p / "memory.swap.max").write_text("0")
            if quota is not None:
                (p / "cpu.max").write_text(f"{quota} {self.CFS_PERIOD_US}")
        else:
            if self.limit is not None:
                (p / "memory.limit_in_bytes").write_text(str(self.limit))
                if (p / "memory.memsw.limit_in_bytes").exists():
                    (p / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
            if quota is not None and self.cpu_parent is not None:
                c = self.cpu_parent / self.name
                c.mkdir()
                self.cpu_path = c
                (c / "cpu.cfs_period_us").write_text(str(self.CFS_PERIOD_US))
                (c / "cpu.cfs_quota_us").write_text(str(quota))

    def preexec(self) -> Callable[[], None]:
        assert self.path is not None
        procs = [str(d / "cgroup.procs") for d in (self.path, self.cpu_path) if d is not None]

        def enter() -> None:
            for f in procs:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))
        return enter

    def peak(self) -> int:
        assert self.path is not None
        f = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int((self.path / f).read_text())

    def throttled(self) -> float | None:
        """Seconds the CPU quota held the cgroup back (None without a quota)."""
        d = self.path if self.version == 2 else self.cpu_path
        if self.cpu_millis is None or d is None:
            return None
        stat = dict(ln.split() for ln in (d / "cpu.stat").read_text().splitlines()
                    if len(ln.split()) == 2)
        if self.version == 2:
            return int(stat.get("throttled_usec", 0)) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def oom_kills(self) -> int:
        assert self.path is not None
        f = "memory.events" if self.version == 2 else "memory.oom_control"
        for ln in (self.path / f).read_text().splitlines():
            k, _, v = ln.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for attr in ("cpu_path", "path"):
            d = getattr(self, attr)
            if d is None:
                continue
            for i in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise
                    time.sleep(0.1)
            else:
                log(f"WARNING: could not remove cgroup {d}")
            setattr(self, attr, None)


# ---------------------------------------------------------------------------------------------
# Measured runs

@dataclass
class Proc:
    wall: float
    utime: float
    stime: float
    maxrss: int          # bytes
    rc: int
    stdout: str
    stderr: str


SPAWN: str | None = None      # compiled bench/_spawn.c, set by main()


def build_spawn(workdir: Path) -> str | None:
    """Compile bench/_spawn.c into WORKDIR; None (with a warning) when there is no compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    exe = workdir / "_spawn"
    if cc is not None:
        r = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(HERE / "_spawn.c")],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return str(exe)
        log(f"WARNING: cannot compile _spawn.c: {r.stderr.strip()}")
    log("WARNING: no C compiler: peak RSS includes the runner's own (os.wait4 from Python)")
    return None


def spawn_measured(argv: Sequence[str], preexec: Callable[[], None] | None = None) -> Proc:
    """Run ARGV as a child and measure it with wait4: through the _spawn launcher when
    available (exact ru_maxrss, see _spawn.c), else with os.wait4 here."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="rusage-") as ruf:
        cmd = [SPAWN, ruf.name, *argv] if SPAWN else list(argv)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             preexec_fn=preexec)
        while True:
            try:
                _, status, ru = os.wait4(p.pid, 0)
                break
            except InterruptedError:
                continue
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        utime, stime, maxrss = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
        if SPAWN:
            fields = Path(ruf.name).read_text().split()
            if len(fields) == 4:
                utime, stime, maxrss = float(fields[1]), float(fields[2]), int(fields[3])
        return Proc(wall=wall, utime=utime, stime=stime, maxrss=maxrss * KiB,
                    rc=p.returncode, stdout=out.read().decode(errors="replace"),
                    stderr=err.read().decode(errors="replace"))


@dataclass
class Tool:
    name: str
    argv: list[str]
    sync: str | None = None           # path to `sync -d` after the command (peers)
    is_cdm: bool = False
    checked: bool = True              # False: writes bytes of its own (fio), not verified


@dataclass
class Sample:
    scenario: str
    case: str                          # tool name (or scaling case)
    round: int
    position: int
    wall: float
    cpu: float
    utime: float
    stime: float
    maxrss: int
    rc: int
    allocated: int | None
    verified: bool | None              # None: not checked this run
    cdm: dict[str, Any] | None = None
    sync_wall: float = 0.0             # part of WALL spent in the peer's `sync -d TARGET`
    memcg_peak: int | None = None
    memcg_oom_kills: int | None = None
    cpu_throttled: float | None = None  # s the cgroup's CPU quota held the tool back
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)    # from run_rounds' PROBE

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.verified is not False


def timed(tool: Tool, memcg: MemCgroup | None = None) -> tuple[Proc, dict[str, Any]]:
    """Run TOOL (and the sync of its target) as one timed unit, inside a fresh cgroup made
    from MEMCG when given (its memory peak, OOM kills and CPU throttling go into the extras)."""
    extra: dict[str, Any] = {}
    if memcg is not None:
        memcg.create()
    try:
        pre = memcg.preexec() if memcg is not None else None
        t0 = time.perf_counter()
        p = spawn_measured(tool.argv, pre)
        extra["sync_wall"] = 0.0
        if p.rc == 0 and tool.sync:
            s = spawn_measured(["sync", "-d", tool.sync], pre)
            extra["sync_wall"] = s.wall
            p.utime += s.utime
            p.stime += s.stime
            p.maxrss = max(p.maxrss, s.maxrss)
            if s.rc != 0:
                p.rc = s.rc
                p.stderr += s.stderr
        p.wall = time.perf_counter() - t0
        if memcg is not None:
            extra["memcg_peak"] = memcg.peak()
            extra["memcg_oom_kills"] = memcg.oom_kills()
            extra["cpu_throttled"] = memcg.throttled()
    finally:
        if memcg is not None:
            memcg.remove()
    return p, extra


def cdm_tool(src: str, dst: str, *, scan: str = "auto", reflink: str = "auto",
             target_is_zero: bool = False, threads: int = 0, request_size: int = 0,
             name: str = "cdimover") -> Tool:
    argv = [*CDM_PYTHON, str(CDM_RUNNER), src, dst, "--scan", scan, "--reflink", reflink]
    if target_is_zero:
        argv.append("--target-is-zero")
    if threads:
        argv += ["--threads", str(threads)]
    if request_size:
        argv += ["--request-size", str(request_size)]
    return Tool(name, argv, is_cdm=True)


# The tune-* scenarios: cdimover's copy with other numbers of workers (requests in flight)
# and request sizes, (threads, request bytes); 0 = the core's default.  --tune replaces it.
TUNE_CONFIGS = [(0, 0), (8, 2 * MiB), (16, 1 * MiB), (12, 2 * MiB), (8, 4 * MiB),
                (16, 2 * MiB)]


def parse_tune(text: str) -> list[tuple[int, int]]:
    """--tune "T:SIZE,...", e.g. "4:4M,8:2M" (SIZE as --size takes it, K/M suffixes)."""
    out = []
    for item in text.split(","):
        t, _, r = item.partition(":")
        m = re.fullmatch(r"\s*(\d+)\s*([KM]?)\s*", r)
        if not t.strip().isdigit() or m is None:
            raise argparse.ArgumentTypeError(f"bad --tune item {item!r} (THREADS:SIZE)")
        out.append((int(t), int(m[1]) * {"": 1, "K": KiB, "M": MiB}[m[2]]))
    return out


def tune_name(threads: int, request: int) -> str:
    if not threads and not request:
        return "cdimover"
    return (f"cdm t{threads or 'def'} r" + (f"{request // MiB}M" if request % MiB == 0 else
                                             f"{request // KiB}K" if request else "def"))


def peer_tools(src: str, dst: str, *, dst_is_dev: bool, fresh: bool) -> list[Tool]:
    qemu = ["qemu-img", "convert", "-W", "-m", "16", "-f", "raw", "-O", "raw"]
    if dst_is_dev:
        qemu.append("-n")
        if fresh:
            qemu.append("--target-is-zero")
    nbd = ["nbdcopy"] + (["--destination-is-zero"] if fresh else []) + [src, dst]
    dd = ["dd", f"if={src}", f"of={dst}", "bs=1M", "status=none"]
    if fresh:
        dd.append("conv=sparse,notrunc" if dst_is_dev else "conv=sparse")
    elif dst_is_dev:
        dd.append("conv=notrunc")   # conv=sparse would leave the old bytes in place
    return [Tool("qemu-img", qemu + [src, dst], sync=dst),
            Tool("nbdcopy", nbd, sync=dst),
            Tool("cp", ["cp", "--sparse=always", src, dst], sync=dst),
            Tool("dd", dd, sync=dst)]


# ---------------------------------------------------------------------------------------------
# Scenarios

@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    content: Content
    layout: Layout
    image: Path | None = None
    image_hash: str = ""
    samples: list[Sample] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    checks: list[tuple[str, str, bool | None, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    cgroup: MemCgroup | None = None     # every measured tool runs in a fresh one of these

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.reports.append(text)

    def check(self, scenario: str, what: str, ok: bool | None, detail: str) -> None:
        self.checks.append((scenario, what, ok, detail))

    def ensure_image(self) -> tuple[Path, str]:
        if self.image is None:
            self.image = self.workdir / "source.img"
            t = time.perf_counter()
            write_image(self.image, self.layout, self.content)
            log(f"wrote {self.image} ({fmt_size(allocated(self.image))} allocated) in "
                f"{time.perf_counter() - t:.1f}s; hashing")
            self.image_hash = sha256_sparse(self.image, self.layout.size)
            self.info["source_sha256"] = self.image_hash
            self.info["source_allocated"] = allocated(self.image)
            self.info["zlib_ratio"] = compress_ratio(self.image, self.layout)
        return self.image, self.image_hash


def run_rounds(b: Bench, scenario: str, tools: list[Tool], size: int, expect_hash: str,
               prepare: Callable[[Resources], tuple[str, str]],
               source_path: str | None = None, memcg: MemCgroup | None = None,
               verify: Callable[[str], bool] | None = None,
               probe: Callable[[str], dict[str, Any]] | None = None) -> list[Sample]:
    """Run every tool ARGS.runs times, in an order shuffled per round.  PREPARE(res) makes a
    fresh target and returns (path given to the tool, file whose bytes/allocation are checked);
    TOOLS' argv use the literal placeholder '{DST}' for the target path.  VERIFY(file), when given,
    replaces the comparison with EXPECT_HASH; PROBE(file) fills Sample.stats.  Each run is in
    a fresh cgroup made from MEMCG, or else from the bench's (peak memory, --pod-limits)."""
    out: list[Sample] = []
    cg = memcg if memcg is not None else b.cgroup
    n = len(tools)
    for r in range(-b.args.warmup, b.args.runs):
        key = [b.args.seed, 11, r + 1000] + list(scenario.encode())
        order = [tools[int(i)] for i in np.random.default_rng(key).permutation(n)]
        for pos, tool in enumerate(order):
            with Resources().scoped() as res:
                dst, dst_file = prepare(res)
                t = dataclasses.replace(tool, argv=[a.replace("{DST}", dst) for a in tool.argv],
                                        sync=tool.sync.replace("{DST}", dst) if tool.sync else None)
                if t.name == "nbdcopy" and not dst.startswith("/dev/") and not os.path.exists(dst):
                    with open(dst, "wb") as f:
                        f.truncate(size)
                drop_caches()
                p, extra = timed(t, cg)
                s = Sample(scenario=scenario, case=tool.name, round=r, position=pos,
                           wall=p.wall, cpu=p.utime + p.stime, utime=p.utime, stime=p.stime,
                           maxrss=p.maxrss, rc=p.rc, allocated=None, verified=None, **extra)
                if p.rc != 0:
                    s.error = (p.stderr.strip() or p.stdout.strip())[-2000:]
                    log(f"  {scenario}/{tool.name} round {r}: exit {p.rc}: {s.error[-300:]}")
                else:
                    if tool.is_cdm:
                        with contextlib.suppress(ValueError, IndexError):
                            s.cdm = json.loads(p.stdout.strip().splitlines()[-1])
                    s.allocated = allocated(dst_file)
                    if probe is not None:
                        s.stats = probe(dst_file)
                    if r >= 0 and tool.checked and (tool.is_cdm or r == 0):
                        if verify is not None:
                            s.verified = verify(dst_file)
                        elif size > HASH_LIMIT and source_path is not None:
                            s.verified = compare_sparse(source_path, dst_file, size)
                        else:
                            s.verified = sha256_sparse(dst_file, size) == expect_hash
                        if not s.verified:
                            log(f"  {scenario}/{tool.name} round {r}: OUTPUT MISMATCH")
                            if not b.args.keep_going and tool.is_cdm:
                                raise RuntimeError(f"{scenario}: cdimover output differs")
                if r < 0:
                    log(f"  {scenario} warm-up {tool.name:9s} {s.wall:7.2f}s (discarded)")
                    continue
                log(f"  {scenario} r{r} {tool.name:9s} {s.wall:7.2f}s (sync {s.sync_wall:5.2f}s) "
                    f"cpu {s.cpu:6.2f}s "
                    f"rss {s.maxrss / MiB:6.1f}MiB alloc "
                    f"{fmt_size(s.allocated) if s.allocated is not None else '-':>10s} "
                    f"verified={s.verified}"
                    + (f" memcg_peak={fmt_size(s.memcg_peak)}" if s.memcg_peak else "")
                    + (f" throttled={s.cpu_throttled:.2f}s" if s.cpu_throttled else ""))
                out.append(s)
    b.samples.extend(out)
    return out


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def round_ratios(samples: Sequence[Sample], case: str, peer: str) -> list[float]:
    """CASE's wall time / PEER's in each round where both ran and were not found wrong."""
    walls = {(s.round, s.case): s.wall for s in samples if s.ok}
    rounds = sorted({r for r, _ in walls})
    return [walls[(r, case)] / walls[(r, peer)] for r in rounds
            if (r, case) in walls and (r, peer) in walls]


def paired_ratio(samples: Sequence[Sample], case: str, peer: str) -> float | None:
    """The median of round_ratios, or None without a round to pair.  This is the ratio the
    targets are checked on: pairing within a round cancels the disk's drift between rounds,
    which a ratio of the two medians does not."""
    ratios = round_ratios(samples, case, peer)
    return med(ratios) if ratios else None


@dataclass
class Row:
    case: str
    wall: float
    cpu: float
    rss: float
    alloc: float | None
    n_ok: int
    n: int
    verified: str
    extra: dict[str, float] = field(default_factory=dict)


def summarize(samples: list[Sample]) -> list[Row]:
    rows = []
    for case in dict.fromkeys(s.case for s in samples):
        ss = [s for s in samples if s.case == case]
        ok = [s for s in ss if s.ok]
        use = ok or ss
        allocs = [s.allocated for s in ok if s.allocated is not None]
        checked = [s.verified for s in ss if s.verified is not None]
        if any(s.rc != 0 for s in ss):
            v = "FAILED"
        elif checked and all(checked):
            v = f"ok({len(checked)})"
        elif checked:
            v = "MISMATCH"
        else:
            v = "-"
        row = Row(case=case, wall=med([s.wall for s in use]), cpu=med([s.cpu for s in use]),
                  rss=max(s.maxrss for s in use) / MiB,
                  alloc=(med(allocs) / MiB) if allocs else None, n_ok=len(ok), n=len(ss),
                  verified=v)
        inner = [s.cdm["elapsed"] for s in ok if s.cdm]
        if inner:
            row.extra["api_s"] = med(inner)
        peaks = [s.memcg_peak for s in ss if s.memcg_peak is not None]
        if peaks:
            row.extra["memcg_peak_mib"] = max(peaks) / MiB
        thr = [s.cpu_throttled for s in use if s.cpu_throttled is not None]
        if thr:
            row.extra["throttled_s"] = med(thr)
        rows.append(row)
    return rows


def table(b: Bench, title: str, rows: list[Row], best_peer: float | None,
          memcg: bool | None = None, ratio_to: dict[str, float] | None = None) -> str:
    """RATIO_TO: per-case denominators of the ratio column (cases not in it use BEST_PEER).
    MEMCG: show the cgroup's peak memory (page cache included) and, under a CPU quota, the
    median seconds throttled; None: when any row has them."""
    if memcg is None:
        memcg = any("memcg_peak_mib" in r.extra for r in rows)
    thr = memcg and any("throttled_s" in r.extra for r in rows)
    w = max([12] + [len(r.case) for r in rows])
    head = (f"{'tool':<{w}} {'wall s':>8} {'CPU s':>7} {'RSS MiB':>8} {'alloc MiB':>10} "
            f"{'ratio':>6} {'api s':>7} {'verified':>9} {'runs':>5}")
    if memcg:
        head += f" {'memcg peak MiB':>15}"
    if thr:
        head += f" {'throttled s':>12}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        den = (ratio_to or {}).get(r.case, best_peer)
        ratio = f"{r.wall / den:6.2f}" if den else f"{'-':>6}"
        api = f"{r.extra['api_s']:7.3f}" if "api_s" in r.extra else f"{'-':>7}"
        alloc = f"{r.alloc:10.1f}" if r.alloc is not None else f"{'-':>10}"
        ln = (f"{r.case:<{w}} {r.wall:8.3f} {r.cpu:7.3f} {r.rss:8.1f} {alloc} {ratio} {api} "
              f"{r.verified:>9} {r.n_ok:>2}/{r.n:<2}")
        if memcg:
            pk = r.extra.get("memcg_peak_mib")
            ln += f" {pk:15.1f}" if pk is not None else f" {'-':>15}"
        if thr:
            th = r.extra.get("throttled_s")
            ln += f" {th:12.2f}" if th is not None else f" {'-':>12}"
        lines.append(ln)
    return "\n".join(lines)


def common_checks(b: Bench, scenario: str, rows: list[Row], data_bytes: int,
                  check_alloc: bool = True, rss_beside: str | Sequence[str] | None = None) -> None:
    """RSS_BESIDE: the peer (or peers) whose peak RSS is shown next to cdimover's."""
    cdm = next(r for r in rows if r.case == "cdimover")
    names = [rss_beside] if isinstance(rss_beside, str) else list(rss_beside or [])
    peers = [r for r in rows if r.case in names]
    b.check(scenario, "cdimover peak RSS <= 64 MiB", cdm.rss <= RSS_LIMIT / MiB,
            f"{cdm.rss:.1f} MiB" + (" (" + ", ".join(f"{p.case} {p.rss:.1f} MiB" for p in peers)
                                    + ")" if peers else ""))
    if check_alloc:
        lim = data_bytes * 1.01 / MiB
        ok = cdm.alloc is not None and cdm.alloc <= lim
        b.check(scenario, "allocated <= data + 1 %", ok,
                f"{cdm.alloc if cdm.alloc is not None else float('nan'):.1f} MiB vs "
                f"{lim:.1f} MiB")
    b.check(scenario, "cdimover output verified every run", cdm.verified.startswith("ok")
            and cdm.n_ok == cdm.n, f"{cdm.verified}, {cdm.n_ok}/{cdm.n} runs ok")
    pk = cdm.extra.get("memcg_peak_mib")
    if pk is not None:
        b.check(scenario, "cdimover cgroup peak (page cache too) <= 64 MiB",
                pk <= RSS_LIMIT / MiB, f"{pk:.1f} MiB" + (" (" + ", ".join(
                    f"{p.case} {p.extra['memcg_peak_mib']:.1f} MiB" for p in rows
                    if p.case != "cdimover" and "memcg_peak_mib" in p.extra) + ")"))


def direction(b: Bench, scenario: str) -> None:
    """One copy job between a file and loop devices; a tune-* SCENARIO runs the job of the
    scenario it names with cdimover's TUNE_CONFIGS (and the two best peers for reference)."""
    tune = scenario.startswith("tune-")
    job = scenario.removeprefix("tune-")
    size = b.layout.size
    image, h = b.ensure_image()
    with Resources().scoped() as res:
        src: str
        fresh = True
        dst_is_dev = job in ("file2blk", "blk2blk", "file2blk-dirty")
        if job in ("blk2file", "blkfull2file", "blk2blk"):
            src = res.loop(image, read_only=True)
        else:
            src = str(image)
        if scenario == "file2blk-dirty":
            fresh = False
            filler = np.frombuffer(np.random.default_rng(99).bytes(CHUNK), dtype=np.uint8)

        def prepare(r: Resources) -> tuple[str, str]:
            if not dst_is_dev:
                p = b.workdir / "target.img"
                p.unlink(missing_ok=True)
                r.callback(lambda: p.unlink(missing_ok=True))
                return str(p), str(p)
            back = b.workdir / "target.back"
            back.unlink(missing_ok=True)
            r.callback(lambda: back.unlink(missing_ok=True))
            fd = os.open(back, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)
                if not fresh:
                    for off in range(0, size, CHUNK):
                        os.pwrite(fd, filler[:min(CHUNK, size - off)].data, off)
                    os.fsync(fd)
            finally:
                os.close(fd)
            return r.loop(back), str(back)

        scan = "full" if job == "blkfull2file" else "auto"
        tools = [cdm_tool(src, "{DST}", scan=scan, target_is_zero=dst_is_dev and fresh,
                          threads=t, request_size=rq, name=tune_name(t, rq))
                 for t, rq in (b.args.tune if tune else [(0, 0)])]
        tools += [tl for tl in peer_tools(src, "{DST}", dst_is_dev=dst_is_dev, fresh=fresh)
                  if not tune or tl.name in ("qemu-img", "nbdcopy")]
        samples = run_rounds(b, scenario, tools, size, h, prepare)
        if tune:
            rows = summarize(samples)
            peers = [r for r in rows if not r.case.startswith("cd") and r.n_ok]
            best = min(peers, key=lambda r: r.wall) if peers else None
            b.emit("\n" + table(b, f"== {scenario}: {describe(job)}; cdimover with "
                                  "--threads T --request-size R", rows,
                                 best.wall if best else None))
            if best:
                b.emit(f"ratio: against the best peer ({best.case} {best.wall:.3f}s)")
            disk_limit_line(b, scenario, b.info["source_allocated"], b.layout.data_bytes,
                            samples)
            return
        report_direction(b, scenario, samples, src_desc=describe(scenario))
        b.emit(api_line(samples))
        disk_limit_line(b, scenario, b.info["source_allocated"], b.layout.data_bytes, samples)
        if scenario in ("file2blk", "file2blk-dirty"):
            floor_line(b, scenario, src, size, samples)


def describe(scenario: str) -> str:
    return {
        "blk2file": "loop device -> file (cdimover: loop backing-file map)",
        "blkfull2file": "loop device -> file (cdimover: scan=full, every byte read)",
        "file2blk": "file -> fresh loop device (reads as zeros)",
        "blk2blk": "loop device -> fresh loop device",
        "file2blk-dirty": "file -> loop device over a pre-filled file",
        "ext4": "file -> file on ext4 (loop-mounted)",
        "xfs": "file -> file on xfs (reflink)",
        "qcow2": "QCOW2 (64 KiB clusters) -> file",
        "qcow2-blk": "QCOW2 (64 KiB clusters) -> fresh loop device (reads as zeros)",
        "qcow2-compressed": "compressed QCOW2 (64 KiB clusters) -> file",
        "qcow2-wide": "1 TiB QCOW2, one 64 KiB cluster per 512 MiB -> file",
        "http-qcow2": "QCOW2 (64 KiB clusters) over HTTP (nginx, ranges) -> file",
        "http-qcow2-blk": "QCOW2 (64 KiB clusters) over HTTP (nginx, ranges) -> fresh loop device",
        "http-xz": f"RAW compressed with xz -T0 {XZ_LEVEL} over HTTP (nginx) -> file",
        "registry-qcow2": "containerDisk (QCOW2, 64 KiB clusters, gzip layer) from a local "
                          "registry -> file",
        "registry-qcow2-blk": "containerDisk (QCOW2, 64 KiB clusters, gzip layer) from a local "
                              "registry -> fresh loop device",
        "upload-qcow2": "QCOW2 (64 KiB clusters) uploaded over HTTPS (curl -T) -> file",
        "clone-net-blk2fs": "block -> Filesystem volume (disk.img) across two network "
                            "namespaces",
        "clone-net-blk2blk": "block -> fresh block across two network namespaces",
        "clone-net-1g-blk2fs": "block -> Filesystem volume across two namespaces, link "
                               "limited to 1 Gbit/s",
        "upload-qcow2-blk": "QCOW2 (64 KiB clusters) uploaded over HTTPS (curl -T) -> fresh "
                            "loop device",
        "upload-raw": "RAW uploaded over HTTPS (curl -T) -> file",
    }[scenario]


def report_direction(b: Bench, scenario: str, samples: list[Sample], src_desc: str,
                     rss_beside: str | Sequence[str] | None = None) -> None:
    rows = summarize(samples)
    peers = [r for r in rows if r.case != "cdimover" and r.n_ok > 0]
    best = min(peers, key=lambda r: r.wall) if peers else None
    cdm = next(r for r in rows if r.case == "cdimover")
    b.emit("\n" + table(b, f"== {scenario}: {src_desc}", rows, best.wall if best else None))
    paired = paired_ratio(samples, "cdimover", best.case) if best else None
    if best:
        b.emit(f"best peer: {best.case} {best.wall:.3f}s; cdimover/best = "
               f"{cdm.wall / best.wall:.3f} (medians), "
               + (f"{paired:.3f} (median of the per-round ratios)" if paired is not None
                  else "no round with both"))
    if scenario in RATIO_TARGETS and paired is not None and best:
        lim = RATIO_TARGETS[scenario]
        b.check(scenario, f"time <= {lim} x best peer ({best.case})", paired <= lim,
                f"{paired:.3f}")
    if scenario == "blkfull2file":
        q = next((r for r in rows if r.case == "qemu-img" and r.n_ok), None)
        if q:
            b.check(scenario, "CPU <= 0.7 x qemu-img's", cdm.cpu <= 0.7 * q.cpu,
                    f"{cdm.cpu:.3f}s vs {q.cpu:.3f}s = {cdm.cpu / q.cpu:.3f}")
    if scenario == "xfs":
        api = cdm.extra.get("api_s", float("nan"))
        b.check(scenario, "reflink copy << 0.1 s (copy call <= 0.01 s)", api <= 0.01,
                f"copy call {api * 1000:.1f} ms, process {cdm.wall * 1000:.0f} ms")
        refl = [s.cdm.get("reflinked") for s in samples if s.cdm]
        b.check(scenario, "cdimover reflinked", bool(refl) and all(refl),
                f"reflinked in {sum(bool(x) for x in refl)}/{len(refl)} runs")
    common_checks(b, scenario, rows, b.layout.data_bytes, check_alloc=scenario != "xfs",
                  rss_beside=rss_beside)
    if scenario == "xfs":
        b.check(scenario, "allocated <= data + 1 %", None,
                "n/a: a reflinked file shares the source's extents (st_blocks counts them)")


def in_fs(b: Bench, scenario: str) -> None:
    fstype = scenario
    size = b.layout.size
    _, h = b.ensure_image()
    with Resources().scoped() as res:
        mnt = make_fs(res, b.workdir, fstype, size + max(GiB, size // 2))
        src = mnt / "source.img"
        res.callback(lambda: src.unlink(missing_ok=True))
        write_image(src, b.layout, b.content)
        if sha256_sparse(src, size) != h:
            raise RuntimeError(f"{scenario}: regenerated source differs from {b.image}")
        drop_caches()

        def prepare(r: Resources) -> tuple[str, str]:
            p = mnt / "target.img"
            p.unlink(missing_ok=True)
            r.callback(lambda: p.unlink(missing_ok=True))
            return str(p), str(p)

        tools = [cdm_tool(str(src), "{DST}", reflink="auto")]
        if fstype == "xfs":
            tools += [Tool("qemu-img -C", ["qemu-img", "convert", "-C", "-W", "-m", "16",
                                           "-f", "raw", "-O", "raw", str(src), "{DST}"],
                           sync="{DST}"),
                      Tool("cp reflink", ["cp", "--reflink=always", str(src), "{DST}"],
                           sync="{DST}")]
        else:
            tools += peer_tools(str(src), "{DST}", dst_is_dev=False, fresh=True)
        samples = run_rounds(b, scenario, tools, size, h, prepare)
    report_direction(b, scenario, samples, src_desc=describe(scenario))
    if fstype == "ext4":
        disk_limit_line(b, scenario, b.info["source_allocated"], b.layout.data_bytes, samples)


def scaling(b: Bench) -> None:
    small = b.layout.size
    big = small * 16
    data = small // 4 // ALIGN * ALIGN
    with Resources().scoped() as res:
        imgs = {}
        for label, sz in (("small", small), ("big", big)):
            lay = make_layout(sz, b.args.seed, zero_frac=0.0, data_bytes=data)
            p = b.workdir / f"scaling-{label}.img"
            res.callback(lambda p=p: p.unlink(missing_ok=True))
            write_image(p, lay, b.content)
            hh = sha256_sparse(p, sz) if sz <= HASH_LIMIT else ""
            if not hh:
                prewarm(p, sz)     # sha256_sparse has read the others once already
            imgs[label] = (p, sz, hh, lay)
            log(f"scaling: {p} {fmt_size(sz)} with {fmt_size(lay.data_bytes)} data in "
                f"{sum(1 for e in lay.extents if e[2] == 'data')} extents")
        loops = {k: res.loop(v[0], read_only=True) for k, v in imgs.items()}
        dst = b.workdir / "scaling-target.img"

        samples: list[Sample] = []
        cases = [("file", "small"), ("file", "big"), ("loop", "small"), ("loop", "big")]
        for r in range(b.args.runs):
            for pos in range(len(cases)):
                kind, label = cases[(pos + r) % len(cases)]
                p, sz, hh, _ = imgs[label]
                src = str(p) if kind == "file" else loops[label]
                name = f"{kind} {fmt_size(sz).replace('.00 ', '')}"
                dst.unlink(missing_ok=True)
                try:
                    tool = cdm_tool(src, str(dst))
                    drop_caches()
                    pr, _ = timed(tool, b.cgroup)
                    s = Sample(scenario="scaling", case=name, round=r, position=pos,
                               wall=pr.wall, cpu=pr.utime + pr.stime, utime=pr.utime,
                               stime=pr.stime, maxrss=pr.maxrss, rc=pr.rc, allocated=None,
                               verified=None)
                    if pr.rc == 0:
                        with contextlib.suppress(ValueError, IndexError):
                            s.cdm = json.loads(pr.stdout.strip().splitlines()[-1])
                        s.allocated = allocated(dst)
                        s.verified = (sha256_sparse(dst, sz) == hh if hh
                                      else compare_sparse(p, dst, sz))
                    else:
                        s.error = pr.stderr.strip()[-2000:]
                    log(f"  scaling r{r} {name:12s} {s.wall:7.3f}s api "
                        f"{(s.cdm or {}).get('elapsed', float('nan')):.3f}s verified={s.verified}")
                    samples.append(s)
                finally:
                    dst.unlink(missing_ok=True)
    b.samples.extend(samples)
    rows = summarize(samples)
    b.emit("\n" + table(b, f"== scaling: {fmt_size(data)} of data in {fmt_size(small)} and "
                           f"{fmt_size(big)} sparse disks -> file (cdimover only)", rows, None))
    by = {r.case: r for r in rows}
    for kind in ("file", "loop"):
        a = by[f"{kind} {fmt_size(small).replace('.00 ', '')}"]
        z = by[f"{kind} {fmt_size(big).replace('.00 ', '')}"]
        ok = z.wall <= a.wall * 1.2 or z.wall - a.wall <= 0.1
        b.check("scaling", f"{kind} source: 16x disk time ~ 1x (<= 1.2x or +0.1 s)", ok,
                f"{a.wall:.3f}s vs {z.wall:.3f}s = {z.wall / a.wall:.2f}x")
    for row in rows:
        b.check("scaling", f"{row.case}: verified, RSS <= 64 MiB",
                row.verified.startswith("ok") and row.rss <= RSS_LIMIT / MiB,
                f"{row.verified}, {row.rss:.1f} MiB")


def memcg_scenario(b: Bench) -> None:
    size = b.layout.size
    lay = dense_layout(size, b.args.seed)
    mc = MemCgroup(MEMCG_LIMIT, f"cdimover-bench-{os.getpid()}")
    with Resources().scoped() as res:
        src = b.workdir / "dense.img"
        res.callback(lambda: src.unlink(missing_ok=True))
        t = time.perf_counter()
        write_image(src, lay, b.content)
        h = sha256_sparse(src, size)
        log(f"memcg: dense source {fmt_size(size)} written+hashed in "
            f"{time.perf_counter() - t:.1f}s; cgroup v{mc.version} under {mc.parent}")

        def prepare(r: Resources) -> tuple[str, str]:
            p = b.workdir / "dense-target.img"
            p.unlink(missing_ok=True)
            r.callback(lambda: p.unlink(missing_ok=True))
            return str(p), str(p)

        tools = [cdm_tool(str(src), "{DST}")]
        tools += [tl for tl in peer_tools(str(src), "{DST}", dst_is_dev=False, fresh=True)
                  if tl.name in ("qemu-img", "cp")]
        samples = run_rounds(b, "memcg", tools, size, h, prepare, memcg=mc)
    rows = summarize(samples)
    b.emit("\n" + table(b, f"== memcg: dense {fmt_size(size)} file -> file inside a "
                           f"{fmt_size(MEMCG_LIMIT)} memory cgroup (v{mc.version})", rows,
                        None, memcg=True))
    cdm = next(r for r in rows if r.case == "cdimover")
    b.check("memcg", "cdimover succeeds in 256 MiB memcg", cdm.n_ok == cdm.n and cdm.n > 0,
            f"{cdm.n_ok}/{cdm.n} runs ok, cgroup peak "
            f"{cdm.extra.get('memcg_peak_mib', float('nan')):.1f} MiB")
    b.check("memcg", "cdimover peak RSS <= 64 MiB", cdm.rss <= RSS_LIMIT / MiB,
            f"{cdm.rss:.1f} MiB")


# ---------------------------------------------------------------------------------------------
# QCOW2 conversion and preallocation scenarios

def file_target(b: Bench, name: str = "target.img") -> Callable[[Resources], tuple[str, str]]:
    """A PREPARE for run_rounds: a path in the scratch directory, no file yet."""
    def prepare(r: Resources) -> tuple[str, str]:
        p = b.workdir / name
        p.unlink(missing_ok=True)
        r.callback(lambda: p.unlink(missing_ok=True))
        return str(p), str(p)
    return prepare


def loop_target(b: Bench, size: int,
                name: str = "target.back") -> Callable[[Resources], tuple[str, str]]:
    """A PREPARE for run_rounds: a fresh loop device over a new sparse SIZE file (reads as
    zeros); the tool gets the device, the checks look at the backing file."""
    def prepare(r: Resources) -> tuple[str, str]:
        back = b.workdir / name
        back.unlink(missing_ok=True)
        r.callback(lambda: back.unlink(missing_ok=True))
        with open(back, "wb") as f:
            f.truncate(size)
        return r.loop(back), str(back)
    return prepare


def convert_tool(src: str, dst: str, *, name: str = "cdimover", target_is_zero: bool = False,
                 preallocation: str = "off") -> Tool:
    argv = [*CDM_PYTHON, str(CDM_CONVERT), src, dst, "--source-format", "qcow2",
            "--preallocation", preallocation]
    if target_is_zero:
        argv.append("--target-is-zero")
    return Tool(name, argv, is_cdm=True)


def qemu_to_raw(src: str, dst: str, *, name: str = "qemu-img", dst_is_dev: bool = False) -> Tool:
    argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-W", "-m", "16"]
    if dst_is_dev:
        argv += ["-n", "--target-is-zero"]
    return Tool(name, argv + [src, dst], sync=dst)


def make_qcow2(b: Bench, res: Resources, raw: Path, name: str, opts: list[str]) -> Path:
    """RAW converted to QCOW2 with qemu-img (64 KiB clusters plus OPTS), verified to read back
    as RAW with qemu-img compare, prewarmed; removed by RES."""
    out = b.workdir / name
    res.callback(lambda: out.unlink(missing_ok=True))
    t = time.perf_counter()
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw), str(out)])
    took = time.perf_counter() - t
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(out)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(out)]))
    data = info.get("format-specific", {}).get("data", {})
    st = os.stat(out)
    desc = (f"{name}: {' '.join(opts)}; file {fmt_size(st.st_size)}, allocated "
            f"{fmt_size(st.st_blocks * 512)}, cluster {info.get('cluster-size')}, "
            f"compression {data.get('compression-type', '?')}; written in {took:.1f}s")
    log(desc)
    b.emit(f"image {desc}")
    b.info.setdefault("qcow2_images", {})[name] = {
        "opts": opts, "file_size": st.st_size, "allocated": st.st_blocks * 512,
        "cluster_size": info.get("cluster-size"),
        "compression_type": data.get("compression-type"), "convert_s": took}
    prewarm(out, st.st_size)
    return out


def qcow2_scenario(b: Bench, scenario: str) -> None:
    size = b.layout.size
    image, h = b.ensure_image()
    with Resources().scoped() as res:
        if scenario == "qcow2":
            q = str(make_qcow2(b, res, image, "source.qcow2", ["-o", "cluster_size=65536"]))
            tools = [convert_tool(q, "{DST}"), qemu_to_raw(q, "{DST}")]
            samples = run_rounds(b, "qcow2", tools, size, h, file_target(b))
            report_direction(b, "qcow2", samples, describe("qcow2"), rss_beside="qemu-img")
            b.emit(api_line(samples))
            disk_limit_line(b, "qcow2", allocated(q), b.layout.data_bytes, samples)
            floor_line(b, "qcow2", q, os.path.getsize(q), samples)
            tools = [convert_tool(q, "{DST}", target_is_zero=True),
                     qemu_to_raw(q, "{DST}", dst_is_dev=True)]
            samples = run_rounds(b, "qcow2-blk", tools, size, h, loop_target(b, size))
            report_direction(b, "qcow2-blk", samples, describe("qcow2-blk"),
                             rss_beside="qemu-img")
            b.emit(api_line(samples))
            disk_limit_line(b, "qcow2-blk", allocated(q), b.layout.data_bytes, samples)
            floor_line(b, "qcow2-blk", q, os.path.getsize(q), samples)
            return
        zl = str(make_qcow2(b, res, image, "source-zlib.qcow2",
                            ["-c", "-o", "cluster_size=65536,compression_type=zlib"]))
        zs = str(make_qcow2(b, res, image, "source-zstd.qcow2",
                            ["-c", "-o", "cluster_size=65536,compression_type=zstd"]))
        tools = [convert_tool(zl, "{DST}"), qemu_to_raw(zl, "{DST}"),
                 convert_tool(zs, "{DST}", name="cdimover zstd"),
                 qemu_to_raw(zs, "{DST}", name="qemu-img zstd")]
        samples = run_rounds(b, scenario, tools, size, h, file_target(b))
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    den = {"cdimover": by["qemu-img"].wall, "qemu-img": by["qemu-img"].wall,
           "cdimover zstd": by["qemu-img zstd"].wall, "qemu-img zstd": by["qemu-img zstd"].wall}
    b.emit("\n" + table(b, f"== {scenario}: {describe(scenario)}; zlib, and zstd as extra rows",
                        rows, None, ratio_to=den))
    b.emit("ratio: each row against qemu-img on the same image (zlib rows vs qemu-img, zstd "
           "rows vs qemu-img zstd)")
    b.emit(api_line(samples))
    cdm, qz = by["cdimover"], by["qemu-img"]
    r = paired_ratio(samples, "cdimover", "qemu-img")
    if r is not None:
        b.emit(f"cdimover/qemu-img (zlib) = {cdm.wall / qz.wall:.3f} (medians), {r:.3f} "
               "(median of the per-round ratios)")
        b.check(scenario, f"time <= {RATIO_TARGETS[scenario]} x qemu-img's (zlib)",
                r <= RATIO_TARGETS[scenario], f"{r:.3f}")
    common_checks(b, scenario, [r for r in rows if r.case in ("cdimover", "qemu-img")],
                  b.layout.data_bytes, rss_beside="qemu-img")
    cz, qzs = by["cdimover zstd"], by["qemu-img zstd"]
    b.check(scenario, "zstd: time vs qemu-img zstd (no target)", None,
            f"{cz.wall:.3f}s vs {qzs.wall:.3f}s = {cz.wall / qzs.wall:.3f}"
            if qzs.n_ok else "qemu-img zstd failed")
    b.check(scenario, "zstd: cdimover verified every run, RSS <= 64 MiB",
            cz.verified.startswith("ok") and cz.n_ok == cz.n and cz.rss <= RSS_LIMIT / MiB,
            f"{cz.verified}, {cz.n_ok}/{cz.n} runs ok, {cz.rss:.1f} MiB "
            f"(qemu-img zstd {qzs.rss:.1f} MiB)")


WIDE_SIZE = 1 << 40            # qcow2-wide: a 1 TiB guest ...
WIDE_STRIDE = 512 * MiB        # ... with one 64 KiB cluster in every 512 MiB (one L2 table each)


def qcow2_wide_scenario(b: Bench) -> None:
    """A 1 TiB QCOW2 (64 KiB clusters) with one cluster written in every 512 MiB, by qemu-io:
    2048 L2 tables (128 MiB of metadata) around 128 MiB of data, a layout in which every table
    is read for one entry.  cdimover and qemu-img convert it to a file, each in its own cgroup:
    the cgroup's peak (page cache included) is the point; the output is checked against the
    image with qemu-img compare."""
    n = WIDE_SIZE // WIDE_STRIDE
    with Resources().scoped() as res:
        q = b.workdir / "wide.qcow2"
        res.callback(lambda: q.unlink(missing_ok=True))
        q.unlink(missing_ok=True)
        t = time.perf_counter()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(q),
             str(WIDE_SIZE)])
        cmds = [f"write -q -P {i % 251 + 1} {i * WIDE_STRIDE + (i % 7) * MiB} 64k"
                for i in range(n)]
        for k in range(0, n, 512):      # a few qemu-io runs: the argument list stays short
            argv = ["qemu-io", "-f", "qcow2"]
            for c in cmds[k:k + 512]:
                argv += ["-c", c]
            run(argv + [str(q)])
        st = os.stat(q)
        b.emit(f"image wide.qcow2: {fmt_size(WIDE_SIZE)} guest, {n} clusters of 64 KiB, one per "
               f"{fmt_size(WIDE_STRIDE)}; file {fmt_size(st.st_size)}; written in "
               f"{time.perf_counter() - t:.1f}s")

        def same(dst: str) -> bool:
            r = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(q),
                                dst], capture_output=True)
            return r.returncode == 0

        tools = [convert_tool(str(q), "{DST}"), qemu_to_raw(str(q), "{DST}")]
        samples = run_rounds(b, "qcow2-wide", tools, WIDE_SIZE, "", file_target(b),
                             verify=same)
        rows = summarize(samples)
        qi = next(r for r in rows if r.case == "qemu-img")
        b.emit("\n" + table(b, "== qcow2-wide: 1 TiB QCOW2, 2048 L2 tables for 128 MiB of data "
                               "-> file", rows, qi.wall if qi.n_ok else None))
        b.emit(api_line(samples))
        common_checks(b, "qcow2-wide", rows, n * 64 * 1024, rss_beside="qemu-img")


def api_line(samples: list[Sample]) -> str:
    """Where cdimover's wall time goes (medians): the import of the package, the API call,
    the rest (interpreter start-up and exit, the runner, the peer-less sync); inside the call,
    the time in source reads and in target writes summed over the workers (the side near
    threads x call bounds the job) and in the final sync; and the allocation methods it
    reported."""
    parts = []
    for case in dict.fromkeys(s.case for s in samples if s.cdm):
        ss = [s for s in samples if s.case == case and s.cdm and s.ok]
        cs = [s.cdm for s in ss if s.cdm]
        imp = med([c.get("import_s", float("nan")) for c in cs])
        api = med([c.get("elapsed", float("nan")) for c in cs])
        wall = med([s.wall for s in ss])
        meth = sorted({m for c in cs for m in c.get("alloc_methods", [])})
        busy = ""
        if all("read_seconds" in c for c in cs):
            busy = (f" (inside reads {med([c['read_seconds'] for c in cs]):.2f}s, writes "
                    f"{med([c['write_seconds'] for c in cs]):.2f}s over the workers, sync "
                    f"{med([c['sync_seconds'] for c in cs]):.3f}s)")
        parts.append(f"{case}: import {imp:.3f}s + call {api:.3f}s{busy} + rest "
                     f"{wall - imp - api:.3f}s" + (f", alloc {','.join(meth)}" if meth else ""))
    return "cdimover time: " + "; ".join(parts)


def blank_tool(dst: str, size: int, mode: str, name: str) -> Tool:
    return Tool(name, [*CDM_PYTHON, str(CDM_PREALLOC), "blank", dst, str(size),
                       "--preallocation", mode], is_cdm=True)


def prealloc_scenario(b: Bench) -> None:
    size = b.layout.size

    def zeros(path: str) -> bool:
        return reads_as_zeros(path, size)

    def alloc_stats(samples: list[Sample], case: str) -> tuple[int, int, int]:
        al = [s.allocated for s in samples if s.case == case and s.ok and s.allocated is not None]
        return (min(al) if al else -1), (max(al) if al else -1), len(al)

    def alloc_check(sc: str, samples: list[Sample], case: str, peers: Sequence[str]) -> None:
        lo, hi, n = alloc_stats(samples, case)
        other = "; ".join(f"{p} {fmt_size(alloc_stats(samples, p)[0])}" for p in peers)
        b.check(sc, f"{case}: allocated >= {fmt_size(size)} every run", n > 0 and lo >= size,
                f"min {fmt_size(lo)} over {n} runs ({other})")

    def rss_verify_checks(sc: str, rows: list[Row], cases: Sequence[str]) -> None:
        for r in rows:
            if r.case in cases:
                b.check(sc, f"{r.case}: verified every run, RSS <= 64 MiB",
                        r.verified.startswith("ok") and r.n_ok == r.n
                        and r.rss <= RSS_LIMIT / MiB,
                        f"{r.verified}, {r.n_ok}/{r.n} runs ok, {r.rss:.1f} MiB")

    def extents_line(samples: list[Sample]) -> str:
        parts = []
        for case in dict.fromkeys(s.case for s in samples):
            ss = [s.stats for s in samples if s.case == case and s.ok and s.stats]
            if ss:
                parts.append(f"{case} {fmt_size(med([x['written'] for x in ss]))} written + "
                             f"{fmt_size(med([x['unwritten'] for x in ss]))} unwritten")
        return "extents (FIEMAP, median): " + "; ".join(parts)

    # (a) falloc on a fresh file vs fallocate
    sc = "prealloc-file"
    tools = [blank_tool("{DST}", size, "falloc", "cdimover"),
             Tool("fallocate", ["fallocate", "-l", str(size), "{DST}"], sync="{DST}")]
    samples = run_rounds(b, sc, tools, size, "", file_target(b), verify=zeros,
                         probe=extent_kinds)
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    cdm, fa = by["cdimover"], by["fallocate"]
    b.emit("\n" + table(b, f"== {sc}: {fmt_size(size)} blank file, preallocation=falloc "
                           "(cdimover.create_blank vs fallocate -l)", rows, fa.wall))
    b.emit(api_line(samples))
    b.emit(extents_line(samples))
    ratio = cdm.wall / fa.wall
    ok = ratio <= 1.0 or (cdm.wall <= PREALLOC_FILE_FLOOR and fa.wall <= PREALLOC_FILE_FLOOR)
    b.check(sc, f"time <= 1.0 x fallocate's, or both <= {PREALLOC_FILE_FLOOR} s", ok,
            f"{cdm.wall:.3f}s vs {fa.wall:.3f}s = {ratio:.2f}x")
    alloc_check(sc, samples, "cdimover", ["fallocate"])
    rss_verify_checks(sc, rows, ["cdimover"])

    # (b), (c) falloc and full on a fresh loop device vs dd from /dev/zero
    sc = "prealloc-blk"
    tools = [blank_tool("{DST}", size, "falloc", "cdimover falloc"),
             blank_tool("{DST}", size, "full", "cdimover full"),
             Tool("dd", ["dd", "if=/dev/zero", "of={DST}", "bs=1M", f"count={size // MiB}",
                         "oflag=direct", "status=none"], sync="{DST}")]
    samples = run_rounds(b, sc, tools, size, "", loop_target(b, size), verify=zeros,
                         probe=extent_kinds)
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    dd = by["dd"]
    b.emit("\n" + table(b, f"== {sc}: {fmt_size(size)} blank loop device (fresh sparse "
                           "backing file); alloc = backing file", rows, dd.wall))
    b.emit(api_line(samples))
    b.emit(extents_line(samples))
    for case in ("cdimover falloc", "cdimover full"):
        r = by[case]
        ratio = r.wall / dd.wall
        b.check(sc, f"{case}: time <= {PREALLOC_BLK_TARGET} x dd's", ratio <= PREALLOC_BLK_TARGET,
                f"{r.wall:.3f}s vs {dd.wall:.3f}s = {ratio:.3f}")
        alloc_check(sc, samples, case, ["dd"])
    rss_verify_checks(sc, rows, ["cdimover falloc", "cdimover full"])

    # (d) copy onto a file with preallocation=full vs qemu-img -o preallocation=full
    sc = "prealloc-copy"
    image, h = b.ensure_image()
    src = str(image)
    tools = [Tool("cdimover", [*CDM_PYTHON, str(CDM_RUNNER), src, "{DST}",
                               "--preallocation", "full"], is_cdm=True),
             Tool("qemu-img", ["qemu-img", "convert", "-W", "-m", "16", "-f", "raw", "-O", "raw",
                               "-o", "preallocation=full", src, "{DST}"], sync="{DST}")]
    samples = run_rounds(b, sc, tools, size, h, file_target(b), probe=extent_kinds)
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    cdm, q = by["cdimover"], by["qemu-img"]
    b.emit("\n" + table(b, f"== {sc}: file -> file, preallocation=full", rows, q.wall))
    b.emit(api_line(samples))
    b.emit(extents_line(samples))
    ratio = cdm.wall / q.wall
    b.check(sc, f"time <= {PREALLOC_COPY_TARGET} x qemu-img's", ratio <= PREALLOC_COPY_TARGET,
            f"{cdm.wall:.3f}s vs {q.wall:.3f}s = {ratio:.3f}")
    alloc_check(sc, samples, "cdimover", ["qemu-img"])
    b.check(sc, "cdimover peak RSS <= 64 MiB", cdm.rss <= RSS_LIMIT / MiB,
            f"{cdm.rss:.1f} MiB (qemu-img {q.rss:.1f} MiB)")
    b.check(sc, "cdimover output verified every run", cdm.verified.startswith("ok")
            and cdm.n_ok == cdm.n, f"{cdm.verified}, {cdm.n_ok}/{cdm.n} runs ok")


# ---------------------------------------------------------------------------------------------
# HTTP imports: nginx serving the image, cdimover.import_url vs CDI's two routes

HTTP_PEER_TARGETS = {"curl+qemu-img": 0.5, "nbdkit+qemu-img": 0.8}   # x the peer's wall time
HTTP_BYTES_SLACK = 1.02         # nginx bytes for cdimover <= this x the QCOW2's allocated size
XZ_LEVEL = "-3"                 # `xz -T0 -3`: multi-threaded, blocks of 12 MiB
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """An ephemeral port of 127.0.0.1 that was free a moment ago."""
    import socket
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


class ChildServer:
    """A server run as a child of the runner on 127.0.0.1:self.port, stopped by its PID."""

    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def wait_listening(self, what: str, detail: str, logs: Sequence[Path], busy: str) -> bool:
        """Wait (10 s) until the child listens: True; False when it failed because the port
        was taken meanwhile (BUSY in its LOGS); RuntimeError for any other failure."""
        import socket
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection((LOCALHOST, self.port), timeout=1).close()
                log(f"{what} (pid {self.proc.pid}) {detail}")
                return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        why = "".join(p.read_text() for p in logs)
        if busy.lower() in why.lower():
            return False
        raise RuntimeError(f"{what} did not start: {why.strip()[-1000:]}")

    def stop(self) -> None:
        """SIGTERM to the child's PID, SIGKILL if it is still there 10 s later."""
        p, self.proc = self.proc, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p is None or p.poll() is not None:
                return
            p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


class Nginx(ChildServer):
    """nginx serving ROOT on 127.0.0.1 at a free ephemeral port: a child process (daemon off,
    master_process off) with its own configuration, pid file, logs and temp paths in DIR,
    stopped by its PID when RES closes.  The access log records $body_bytes_sent, so the bytes
    the server really sent during one run are counted: mark() before, sent_since() after."""

    LOG_FORMAT = "$status $body_bytes_sent $request_method $request_uri"

    def __init__(self, res: Resources, d: Path, root: Path) -> None:
        exe = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""),
                                                           "/usr/sbin"]))
        if exe is None:
            raise RuntimeError("nginx not found (Debian nginx-light)")
        d.mkdir()
        res.callback(shutil.rmtree, d, True)
        self.dir, self.root, self.log = d, root, d / "access.log"
        res.callback(self.stop)
        for _ in range(5):
            self.port = free_port()
            if self._start(exe):
                return
        raise RuntimeError("nginx: no free port after 5 attempts")

    def conf(self) -> str:
        """One server on 127.0.0.1:port with ROOT at /; everything nginx writes stays in DIR."""
        d = self.dir
        top = ([("user", "root")] if os.geteuid() == 0 else []) + [
            ("daemon", "off"), ("master_process", "off"), ("pid", f"{d}/nginx.pid"),
            ("error_log", f"{d}/error.log info")]
        http = [("default_type", "application/octet-stream"),
                *((f"{k}_temp_path", f"{d}/{k}_temp")
                  for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
                ("log_format", f"bench '{self.LOG_FORMAT}'"),
                ("access_log", f"{d}/access.log bench"), ("sendfile", "on"),
                ("keepalive_timeout", "60s")]

        def block(items: Sequence[tuple[str, str]], indent: str) -> str:
            return "".join(f"{indent}{k} {v};\n" for k, v in items)
        server = [("listen", f"{LOCALHOST}:{self.port}"), ("root", str(self.root))]
        return (block(top, "") + "events { worker_connections 256; }\nhttp {\n"
                + block(http, "    ") + "    server {\n" + block(server, "        ")
                + "        location / { }\n    }\n}\n")

    def _start(self, exe: str) -> bool:
        """Start on self.port; False when the port was taken meanwhile."""
        (self.dir / "nginx.conf").write_text(self.conf())
        for name in ("error.log", "access.log"):
            (self.dir / name).write_bytes(b"")
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([exe, "-e", str(self.dir / "error.log"),
                                          "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf")],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        return self.wait_listening("nginx", f"serving {self.root} on "
                                   f"http://{LOCALHOST}:{self.port}/",
                                   [self.dir / "error.log", self.dir / "stderr.log"],
                                   "Address already in use")

    def url(self, name: str) -> str:
        return f"http://{LOCALHOST}:{self.port}/{name}"

    def mark(self) -> int:
        return self.log.stat().st_size

    def sent_since(self, mark: int) -> dict[str, int]:
        """Body bytes sent and requests answered since MARK (nginx logs a request just after
        its response: the log is read until it stops growing for 0.2 s)."""
        size, still = -1, 0
        deadline = time.monotonic() + 5
        while still < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.log.stat().st_size
            still = still + 1 if now == size else 0
            size = now
        with open(self.log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        sent = [int(ln.split()[1]) for ln in lines if len(ln.split()) >= 2]
        return {"nginx_bytes_sent": sum(sent), "nginx_requests": len(sent)}


def http_versions(b: Bench) -> None:
    """Record and show the versions of the HTTP scenarios' tools (once)."""
    if "http_tools" in b.info:
        return
    vs = {}
    for argv in (["nginx", "-v"], ["nbdkit", "--version"], ["curl", "--version"],
                 ["xz", "--version"]):
        exe = shutil.which(argv[0], path=os.pathsep.join([os.environ.get("PATH", ""),
                                                          "/usr/sbin"]))
        r = subprocess.run([exe or argv[0], *argv[1:]], capture_output=True, text=True)
        line = ((r.stdout or r.stderr).splitlines() or ["?"])[0].strip()
        vs[argv[0]] = " ".join(line.split()[:2]) if argv[0] == "curl" else line   # no libs
    b.info["http_tools"] = vs
    b.emit("http tools: " + "; ".join(vs.values()))


def import_tool(url: str, dst: str, *, target_is_zero: bool = False) -> Tool:
    argv = [*CDM_PYTHON, str(CDM_IMPORT), url, dst]
    if target_is_zero:
        argv.append("--target-is-zero")
    return Tool("cdimover", argv, is_cdm=True)


def scratch_route(url: str, scratch: Path, dst: str, dst_is_dev: bool) -> Tool:
    """CDI's scratch route: download the whole file, then convert it (timed together)."""
    qemu = qemu_to_raw(str(scratch), dst, dst_is_dev=dst_is_dev).argv
    return Tool("curl+qemu-img", ["sh", "-c", 'curl -sS -o "$1" "$2" && shift 2 && "$@"', "sh",
                                  str(scratch), url, *qemu], sync=dst)


def nbdkit_route(url: str, sock: Path, pidfile: Path, dst: str, dst_is_dev: bool) -> Tool:
    """CDI's direct route: nbdkit with the curl plugin and the readahead and retry filters,
    started with CDI's arguments (pkg/image/nbdkit.go: NewNbdkitCurl, StartNbdkit) on a unix
    socket; qemu-img decodes the QCOW2 over NBD.  `--run` runs qemu-img once nbdkit listens
    and stops nbdkit when it exits, so both are one measured process tree."""
    qemu = qemu_to_raw(f"nbd+unix:///?socket={sock}", dst, dst_is_dev=dst_is_dev).argv
    argv = ["nbdkit", "--readonly", "--exit-with-parent", "-U", str(sock),
            "--pidfile", str(pidfile), "--filter=readahead", "--filter=retry",
            "--run", shlex.join(qemu), "-r", "curl",
            "header=User-Agent: cdi-nbdkit-importer", "retry-exponential=no", f"url={url}"]
    return Tool("nbdkit+qemu-img", argv, sync=dst)


def http_checks(b: Bench, scenario: str, samples: list[Sample], served: int | None) -> None:
    """The per-peer time targets, the bytes nginx sent (checked against SERVED, the QCOW2's
    allocated size, when given) and what cdimover reported about its fetching."""
    rows = summarize(samples)
    by = {r.case: r for r in rows}
    cdm = by["cdimover"]
    for peer, lim in HTTP_PEER_TARGETS.items():
        p = by.get(peer)
        if p is None:
            continue
        ok = p.n_ok > 0 and cdm.n_ok > 0 and cdm.wall / p.wall <= lim
        b.check(scenario, f"time <= {lim} x {peer}'s", ok if p.n_ok else None,
                f"{cdm.wall:.3f}s vs {p.wall:.3f}s = {cdm.wall / p.wall:.3f}"
                if p.n_ok else f"{peer} failed")
    sent = {r.case: med([s.stats["nginx_bytes_sent"] for s in samples
                         if s.case == r.case and s.ok and s.stats]) for r in rows}
    reqs = {r.case: med([s.stats["nginx_requests"] for s in samples
                         if s.case == r.case and s.ok and s.stats]) for r in rows}
    b.emit("nginx sent (median body bytes, requests): " + "; ".join(
        f"{c} {fmt_size(sent[c])} in {reqs[c]:.0f}" for c in sent)
        + (f"; the served file has {fmt_size(served)} allocated" if served else ""))
    cs = [s.cdm for s in samples if s.case == "cdimover" and s.ok and s.cdm]
    if cs:
        b.emit(f"cdimover reported: strategy {','.join(sorted({c['strategy'] for c in cs}))}, "
               f"compression {','.join(sorted({c['compression'] for c in cs}))}, "
               f"fetched {fmt_size(med([c['bytes_fetched'] for c in cs]))} in "
               f"{med([c['requests'] for c in cs]):.0f} requests, "
               f"retries {sum(c['retries'] for c in cs)}, restarts {sum(c['restarts'] for c in cs)}")
    if served is not None:
        worst = max((s.stats["nginx_bytes_sent"] for s in samples
                     if s.case == "cdimover" and s.ok and s.stats), default=None)
        b.check(scenario, f"nginx bytes for cdimover <= {HTTP_BYTES_SLACK} x allocated",
                worst is not None and worst <= HTTP_BYTES_SLACK * served,
                f"max {fmt_size(worst or 0)} vs {fmt_size(served)} = "
                f"{(worst or 0) / served:.3f}")


def scenario_dir(b: Bench, res: Resources, name: str) -> Path:
    """A new directory NAME in the scratch directory, removed with everything in it by RES."""
    d = b.workdir / name
    d.mkdir()
    res.callback(shutil.rmtree, d, True)
    return d


def http_scenario(b: Bench, scenario: str) -> None:
    size = b.layout.size
    image, h = b.ensure_image()
    with Resources().scoped() as res:
        www = scenario_dir(b, res, "www")
        srv = Nginx(res, b.workdir / "nginx", www)
        http_versions(b)
        scratch = b.workdir / "scratch.qcow2"
        sock, pidfile = b.workdir / "nbdkit.sock", b.workdir / "nbdkit.pid"

        def served(prepare: Callable[[Resources], tuple[str, str]]
                   ) -> Callable[[Resources], tuple[str, str]]:
            """PREPARE plus a mark in nginx's log and removal of the peers' leftovers."""
            def prep(r: Resources) -> tuple[str, str]:
                for p in (scratch, sock, pidfile):
                    r.callback(lambda p=p: p.unlink(missing_ok=True))
                out = prepare(r)
                marks["at"] = srv.mark()
                return out
            return prep

        marks = {"at": 0}

        def probe(_: str) -> dict[str, Any]:
            return srv.sent_since(marks["at"])

        if scenario == "http-qcow2":
            q = make_qcow2(b, res, image, "www/source.qcow2", ["-o", "cluster_size=65536"])
            url, alloc = srv.url(q.name), allocated(q)
            for sc, dev in (("http-qcow2", False), ("http-qcow2-blk", True)):
                tools = [import_tool(url, "{DST}", target_is_zero=dev),
                         scratch_route(url, scratch, "{DST}", dev),
                         nbdkit_route(url, sock, pidfile, "{DST}", dev)]
                prep = loop_target(b, size) if dev else file_target(b)
                samples = run_rounds(b, sc, tools, size, h, served(prep), probe=probe)
                report_direction(b, sc, samples, describe(sc),
                                 rss_beside=("curl+qemu-img", "nbdkit+qemu-img"))
                http_checks(b, sc, samples, alloc)
                b.emit(api_line(samples))
            return
        xz = www / "source.img.xz"
        res.callback(lambda: xz.unlink(missing_ok=True))
        t = time.perf_counter()
        with open(xz, "wb") as f:
            subprocess.run(["xz", "-T0", XZ_LEVEL, "-c", str(image)], stdout=f, check=True)
        took = time.perf_counter() - t
        desc = (f"source.img.xz: xz -T0 {XZ_LEVEL}; file {fmt_size(os.path.getsize(xz))} "
                f"from {fmt_size(size)}; written in {took:.1f}s")
        log(desc)
        b.emit(f"image {desc}")
        b.info["xz_image"] = {"level": XZ_LEVEL, "file_size": os.path.getsize(xz),
                              "compress_s": took}
        prewarm(xz, os.path.getsize(xz))
        url = srv.url(xz.name)
        tools = [import_tool(url, "{DST}"),
                 Tool("curl|xz|dd", ["bash", "-o", "pipefail", "-c",
                                     'curl -sS "$1" | xz -dc | dd of="$2" bs=1M conv=sparse '
                                     'iflag=fullblock status=none', "bash", url, "{DST}"],
                      sync="{DST}")]
        samples = run_rounds(b, scenario, tools, size, h, served(file_target(b)), probe=probe)
        report_direction(b, scenario, samples, describe(scenario), rss_beside="curl|xz|dd")
        rows = {r.case: r for r in summarize(samples)}
        cdm, dd = rows["cdimover"], rows["curl|xz|dd"]
        b.check(scenario, "time <= 1.0 x curl|xz|dd's", cdm.n_ok > 0 and dd.n_ok > 0
                and cdm.wall <= dd.wall, f"{cdm.wall:.3f}s vs {dd.wall:.3f}s = "
                f"{cdm.wall / dd.wall:.3f}" if cdm.n_ok and dd.n_ok else
                f"not measured: cdimover {cdm.verified}, curl|xz|dd {dd.verified}")
        http_checks(b, scenario, samples, None)
        b.emit(api_line(samples))


class DavNginx(Nginx):
    """Nginx over HTTPS (CERT, KEY) whose ROOT takes PUT requests (the DAV module): the body
    is received into a temp file beside ROOT and renamed into place."""

    def __init__(self, res: Resources, d: Path, root: Path, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        super().__init__(res, d, root)

    def conf(self) -> str:
        base = super().conf()
        base = base.replace(f"listen {LOCALHOST}:{self.port};",
                            f"listen {LOCALHOST}:{self.port} ssl;\n"
                            f"        ssl_certificate {self.cert};\n"
                            f"        ssl_certificate_key {self.key};\n"
                            f"        client_max_body_size 0;")
        base = base.replace(f"client_body_temp_path {self.dir}/client_body_temp;",
                            f"client_body_temp_path {self.root}/.client_body_temp;")
        return base.replace("location / { }",
                            "location / { dav_methods PUT; create_full_put_path on; }")

    def url(self, name: str) -> str:
        return f"https://{LOCALHOST}:{self.port}/{name}"


UPLOAD_QCOW2_TARGET = 0.5        # x the CDI route's wall time
UPLOAD_RAW_TARGET = 1.25         # x curl->nginx's wall time (throughput >= 0.8 x)
UPLOAD_RSS_LIMIT = 96 * MiB      # the upload server's own peak RSS


def upload_floor(b: Bench, upload: list[str], srv: DavNginx) -> float:
    """Median seconds of UPLOAD (curl ... -T IMAGE) to nginx alone, cold, with the stored
    file synced: what the client and a native server take to move the bytes, before any
    conversion -- the least any upload route can take on this machine."""
    times = []
    dst = b.workdir / "floor.qcow2"
    for _ in range(max(1, b.args.runs)):
        dst.unlink(missing_ok=True)
        drop_caches()
        time.sleep(b.args.settle)
        t = time.monotonic()
        run([*upload, srv.url(dst.name)])
        run(["sync", "-d", str(dst)])
        times.append(time.monotonic() - t)
    dst.unlink(missing_ok=True)
    return med(times)


def upload_scenario(b: Bench, scenario: str) -> None:
    size = b.layout.size
    image, h = b.ensure_image()
    with Resources().scoped() as res:
        d = scenario_dir(b, res, "upload")
        cert, key = d / "server.pem", d / "server.key"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)])
        srv = DavNginx(res, b.workdir / "nginx", b.workdir, cert, key)
        http_versions(b)
        curl = ["curl", "-sS", "--fail", "--cacert", str(cert), "-o", "/dev/null", "-T"]

        def cdm(src: Path) -> Tool:
            argv = [*CDM_PYTHON, str(CDM_UPLOAD), str(src), "{DST}", "--cert", str(cert),
                    "--key", str(key)] + (["--spawn", SPAWN] if SPAWN else [])
            return Tool("cdimover", argv, is_cdm=True)

        scratch = b.workdir / "scratch.qcow2"
        floor: float | None = None
        if scenario == "upload-qcow2":
            q = make_qcow2(b, res, image, "upload/source.qcow2", ["-o", "cluster_size=65536"])
            cases = (("upload-qcow2", False), ("upload-qcow2-blk", True))
        else:
            q = image
            cases = (("upload-raw", False),)
        for sc, dev in cases:
            if scenario == "upload-qcow2":
                qemu = qemu_to_raw(str(scratch), "{DST}", dst_is_dev=dev).argv
                store = [*curl, str(q), srv.url(scratch.name)]
                peer = Tool("curl>nginx+qemu-img",
                            ["sh", "-c", f"{shlex.join(store)} && {shlex.join(qemu)}"],
                            sync="{DST}")
            else:
                peer = Tool("curl>nginx", [*curl, str(q), srv.url("target.img")],
                            sync="{DST}")
            prep = loop_target(b, size) if dev else file_target(b)

            def prepared(r: Resources, prep: Callable[[Resources], tuple[str, str]] = prep
                         ) -> tuple[str, str]:
                r.callback(lambda: scratch.unlink(missing_ok=True))
                return prep(r)
            samples = run_rounds(b, sc, [cdm(q), peer], size, h, prepared)
            rows = summarize(samples)
            by = {r.case: r for r in rows}
            c, p = by["cdimover"], by[peer.name]
            b.emit("\n" + table(b, f"== {sc}: {describe(sc)}", rows, p.wall if p.n_ok else None))
            lim = UPLOAD_QCOW2_TARGET if scenario == "upload-qcow2" else UPLOAD_RAW_TARGET
            if c.n_ok and p.n_ok:
                ratio = c.wall / p.wall
                b.emit(f"cdimover/{peer.name} = {ratio:.3f}"
                       + (f"; throughput {size / c.wall / MiB:.0f} vs "
                          f"{size / p.wall / MiB:.0f} MiB/s (virtual bytes per second) = "
                          f"{p.wall / c.wall:.3f}" if scenario == "upload-raw" else ""))
                b.check(sc, f"time <= {lim} x {peer.name}'s", ratio <= lim, f"{ratio:.3f}")
            else:
                b.check(sc, f"time <= {lim} x {peer.name}'s", None, "not measured")
            rss = [s.cdm["server_maxrss"] for s in samples
                   if s.case == "cdimover" and s.ok and s.cdm]
            worst = max(rss, default=0)
            b.check(sc, "upload server peak RSS <= 96 MiB", bool(rss) and 0 < worst
                    <= UPLOAD_RSS_LIMIT, f"max {worst / MiB:.1f} MiB (the measured tree "
                    f"{c.rss:.1f} MiB, {peer.name} {p.rss:.1f} MiB)")
            b.check(sc, "cdimover output verified every run", c.verified.startswith("ok")
                    and c.n_ok == c.n, f"{c.verified}, {c.n_ok}/{c.n} runs ok")
            if scenario == "upload-qcow2" and c.n_ok and p.n_ok:
                if floor is None:
                    floor = upload_floor(b, [*curl, str(q)], srv)
                b.emit(f"receive floor (curl -> nginx storing the QCOW2 file, durable, nothing "
                       f"else; cold, median of {b.args.runs}): {floor:.3f}s = "
                       f"{floor / p.wall:.2f} x {peer.name}; cdimover = "
                       f"{c.wall / floor:.2f} x the floor")
            if scenario == "upload-qcow2":
                lim_alloc = b.layout.data_bytes * 1.01 / MiB
                b.check(sc, "allocated <= data + 1 %", c.alloc is not None
                        and c.alloc <= lim_alloc, f"{c.alloc or float('nan'):.1f} MiB vs "
                        f"{lim_alloc:.1f} MiB")


REGISTRY_TARGET = 0.5            # x the scratch route's wall time
REGISTRY_RSS_LIMIT = 96 * MiB    # cdimover's peak RSS
REGISTRY_GZIP = "-6"             # gzip's default level, as image builders use


class LocalRegistry(ChildServer):
    """`docker-registry serve` on 127.0.0.1 at a free ephemeral port (plain HTTP), its
    configuration and storage in DIR: a child process stopped by its PID when RES closes."""

    def __init__(self, res: Resources, d: Path) -> None:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RuntimeError("docker-registry not found (Debian docker-registry)")
        d.mkdir()
        res.callback(shutil.rmtree, d, True)
        self.dir = d
        res.callback(self.stop)
        for _ in range(5):
            self.port = free_port()
            if self._start(exe):
                return
        raise RuntimeError("docker-registry: no free port after 5 attempts")

    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def _start(self, exe: str) -> bool:
        conf = self.dir / "config.yml"
        conf.write_text("\n".join([
            "version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {self.dir / 'data'}",
            "http:", f"  addr: {self.host}", "  secret: cdimover-bench", ""]))
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([exe, "serve", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        return self.wait_listening("docker-registry", f"on http://{self.host}/",
                                   [self.dir / "stderr.log"], "address already in use")


def _oci_blob(layout: Path, src: Path | bytes) -> dict[str, Any]:
    """Put SRC (a file, moved, or bytes) into the OCI layout as a blob: its descriptor."""
    h = hashlib.sha256()
    if isinstance(src, bytes):
        h.update(src)
        size = len(src)
    else:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        size = src.stat().st_size
    dest = layout / "blobs" / "sha256" / h.hexdigest()
    if isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        src.rename(dest)
    return {"digest": f"sha256:{h.hexdigest()}", "size": size}


def container_disk(b: Bench, res: Resources, qcow2: Path, reg: LocalRegistry,
                   repo: str) -> dict[str, Any]:
    """Push a containerDisk holding QCOW2 as /disk/disk.qcow2 (one gzip layer, made with GNU
    tar and gzip) to REG with skopeo: the layer's descriptor."""
    d = scenario_dir(b, res, "oci")
    stage = d / "stage"
    (stage / "disk").mkdir(parents=True)
    os.link(qcow2, stage / "disk" / "disk.qcow2")
    layout = d / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    t = time.perf_counter()
    layer_file = d / "layer.tar.gz"
    run(["sh", "-c", f"tar --owner=107 --group=107 --numeric-owner -C {shlex.quote(str(stage))}"
         f" -cf - disk | gzip {REGISTRY_GZIP} > {shlex.quote(str(layer_file))}"])
    diff = hashlib.sha256()
    with subprocess.Popen(["gzip", "-dc", str(layer_file)], stdout=subprocess.PIPE) as gz:
        assert gz.stdout is not None
        while chunk := gz.stdout.read(CHUNK):
            diff.update(chunk)
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             **_oci_blob(layout, layer_file)}
    took = time.perf_counter() - t
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [f"sha256:{diff.hexdigest()}"]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_oci_blob(layout, config)},
        "layers": [layer]}).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_oci_blob(layout, manifest),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    run(["skopeo", "copy", "-q", "--insecure-policy", "--dest-tls-verify=false",
         f"oci:{layout}:v1", f"docker://{reg.host}/{repo}:v1"])
    shutil.rmtree(d, ignore_errors=True)
    text = (f"containerDisk {repo}:v1: /disk/disk.qcow2 in a tar+gzip layer (gzip "
            f"{REGISTRY_GZIP}) of {fmt_size(layer['size'])}, made in {took:.1f}s")
    log(text)
    b.emit(f"image {text}")
    b.info["registry_image"] = {"layer_size": layer["size"], "gzip": REGISTRY_GZIP,
                                "make_s": took, "layer": layer["digest"]}
    return layer


def registry_scenario(b: Bench) -> None:
    size = b.layout.size
    image, h = b.ensure_image()
    with Resources().scoped() as res:
        reg = LocalRegistry(res, b.workdir / "registry")
        skopeo = run(["skopeo", "--version"]).strip()
        reg_version = run(["docker-registry", "--version"]).strip()
        b.info["registry_tools"] = {"skopeo": skopeo, "docker-registry": reg_version}
        b.emit(f"registry tools: {reg_version}; {skopeo}")
        q = make_qcow2(b, res, image, "source.qcow2", ["-o", "cluster_size=65536"])
        layer = container_disk(b, res, q, reg, "bench/disk")
        q.unlink()
        ref = f"docker://{reg.host}/bench/disk:v1"
        pulled = b.workdir / "skopeo-dir"
        extracted = b.workdir / "extracted"
        layer_hex = str(layer["digest"]).split(":", 1)[1]
        for sc, dev in (("registry-qcow2", False), ("registry-qcow2-blk", True)):
            cdm = import_tool(ref, "{DST}", target_is_zero=dev)
            cdm.argv += ["--insecure-registry", reg.host]
            qemu = qemu_to_raw(str(extracted / "disk" / "disk.qcow2"), "{DST}",
                               dst_is_dev=dev).argv
            peer = Tool("skopeo+tar+qemu-img", [
                "sh", "-c", 'skopeo copy -q --insecure-policy --src-tls-verify=false "$1" '
                '"dir:$2" && mkdir "$3" && tar -xzf "$2/$4" -C "$3" && shift 4 && "$@"', "sh",
                ref, str(pulled), str(extracted), layer_hex, *qemu], sync="{DST}")
            prep = loop_target(b, size) if dev else file_target(b)

            def prepared(r: Resources, prep: Callable[[Resources], tuple[str, str]] = prep
                         ) -> tuple[str, str]:
                for p in (pulled, extracted):
                    r.callback(shutil.rmtree, p, True)
                return prep(r)
            samples = run_rounds(b, sc, [cdm, peer], size, h, prepared)
            rows = summarize(samples)
            by = {r.case: r for r in rows}
            c, p = by["cdimover"], by[peer.name]
            b.emit("\n" + table(b, f"== {sc}: {describe(sc)}", rows, p.wall if p.n_ok else None))
            if c.n_ok and p.n_ok:
                ratio = c.wall / p.wall
                b.emit(f"cdimover/{peer.name} = {ratio:.3f}")
                b.check(sc, f"time <= {REGISTRY_TARGET} x {peer.name}'s",
                        ratio <= REGISTRY_TARGET, f"{ratio:.3f}")
            else:
                b.check(sc, f"time <= {REGISTRY_TARGET} x {peer.name}'s", None, "not measured")
            b.check(sc, "cdimover peak RSS <= 96 MiB", 0 < c.rss <= REGISTRY_RSS_LIMIT / MiB,
                    f"{c.rss:.1f} MiB ({peer.name} {p.rss:.1f} MiB)")
            cs = [s.cdm for s in samples if s.case == "cdimover" and s.ok and s.cdm]
            fetched = sorted({int(x["bytes_fetched"]) for x in cs})
            b.emit(f"cdimover reported: layers pulled {sorted({x['layers_pulled'] for x in cs})}, "
                   f"bytes fetched {fetched}, retries {sum(x['retries'] for x in cs)}, "
                   f"strategy {sorted({x['strategy'] for x in cs})}")
            b.check(sc, "bytes pulled = the layer's size", bool(cs) and fetched ==
                    [int(layer["size"])], f"{fetched} vs {layer['size']}")
            b.check(sc, "cdimover output verified every run", c.verified.startswith("ok")
                    and c.n_ok == c.n, f"{c.verified}, {c.n_ok}/{c.n} runs ok")
            lim_alloc = b.layout.data_bytes * 1.01 / MiB
            b.check(sc, "allocated <= data + 1 %", c.alloc is not None and c.alloc <= lim_alloc,
                    f"{c.alloc or float('nan'):.1f} MiB vs {lim_alloc:.1f} MiB")
            b.emit(api_line(samples))


# ---------------------------------------------------------------------------------------------
# Clones between two network namespaces

CLONE_CDI_TARGET = 0.3           # x CDI's wire path (whole device, snappy, HTTPS)
CLONE_NBD_TARGET = 0.8           # x nbdcopy from qemu-nbd over TCP
CLONE_WIRE_LIMIT = 1.02          # x the data, bytes on the link
CLONE_CUT_LIMIT = 1.1            # x an uncut run, a run whose source is killed at 90 %
CLONE_RSS_LIMIT = 64 * MiB       # per side
NS_SERVER_IP = "169.254.213.1"


def netns_pair(res: Resources, rate: str | None = None) -> tuple[str, str, str]:
    """Two namespaces joined by a veth pair, removed with RES: (source ns, target ns, the
    source's veth).  RATE: a tbf limit on the source's end (e.g. 1gbit)."""
    tag = f"{os.getpid() % 100000}"
    ns_src, ns_dst, dev_src, dev_dst = f"cdmb-s{tag}", f"cdmb-d{tag}", f"cdmbs{tag}", f"cdmbd{tag}"
    for ns in (ns_src, ns_dst):
        run(["ip", "netns", "add", ns])
        res.callback(lambda ns=ns: subprocess.run(["ip", "netns", "del", ns],
                                                  capture_output=True))
    run(["ip", "link", "add", dev_src, "netns", ns_src, "type", "veth", "peer", "name",
         dev_dst, "netns", ns_dst])
    for ns, dev, ip in ((ns_src, dev_src, "169.254.213.2"), (ns_dst, dev_dst, NS_SERVER_IP)):
        run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
        run(["ip", "-n", ns, "link", "set", dev, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    if rate:
        run(["ip", "netns", "exec", ns_src, "tc", "qdisc", "add", "dev", dev_src, "root", "tbf",
             "rate", rate, "burst", "256kb", "latency", "100ms"])
    return ns_src, ns_dst, dev_src


def clone_certs(d: Path) -> None:
    """ca, server (for NS_SERVER_IP) and client (CN client) certificates in D."""
    def ossl(*args: str) -> None:
        run(["openssl", *args], cwd=d)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=bench ca", "-keyout", "ca.key", "-out", "ca.pem",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign")
    for name, ext in (("server", f"subjectAltName=IP:{NS_SERVER_IP}\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(ext + "\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


def clonenet_scenario(b: Bench, scenario: str) -> None:
    size = b.layout.size
    image, h = b.ensure_image()
    data = b.layout.data_bytes
    with Resources().scoped() as res:
        d = scenario_dir(b, res, "clonenet")
        clone_certs(d)
        rate = "1gbit" if scenario == "clone-net-1g" else None
        ns_src, ns_dst, dev_src = netns_pair(res, rate)
        src = res.loop(image, read_only=True)

        def tool(name: str, route: str, *extra: str) -> Tool:
            argv = [*CDM_PYTHON, str(CDM_CLONENET), route, src, "{DST}", "--ns-src", ns_src,
                    "--ns-dst", ns_dst, "--dev-src", dev_src, "--ip", NS_SERVER_IP,
                    "--certs", str(d), "--data", str(data), *extra]
            if SPAWN:
                argv += ["--spawn", SPAWN]
            return Tool(name, argv, is_cdm=True)

        def fs_target(r: Resources) -> tuple[str, str]:
            vol = b.workdir / "clone-target"
            shutil.rmtree(vol, ignore_errors=True)
            vol.mkdir()
            r.callback(lambda: shutil.rmtree(vol, ignore_errors=True))
            return str(vol), str(vol / "disk.img")

        cases = [("clone-net-blk2fs", fs_target)]
        if rate is None:
            cases.append(("clone-net-blk2blk", loop_target(b, size)))
        for sc, prep in cases:
            if rate is None:
                sc_name = sc
                tools = [tool("cdimover", "cdimover"), tool("cdimover-zstd", "cdimover-zstd"),
                         tool("cdi-wire", "cdi"), tool("nbdcopy", "nbdcopy"),
                         tool("cdimover-cut90", "cdimover", "--cut", "0.9")]
            else:
                sc_name = "clone-net-1g-blk2fs"
                tools = [tool("cdimover", "cdimover"), tool("cdimover-zstd", "cdimover-zstd"),
                         tool("cdi-wire", "cdi"), tool("nbdcopy", "nbdcopy")]
            samples = run_rounds(b, sc_name, tools, size, h, prep)
            rows = summarize(samples)
            by = {r.case: r for r in rows}
            c = by["cdimover"]
            b.emit("\n" + table(b, f"== {sc_name}: {describe(sc_name)}", rows,
                                c.wall if c.n_ok else None))
            wire = {r.case: med([s.cdm["wire_bytes"] for s in samples
                                 if s.case == r.case and s.ok and s.cdm]) for r in rows}
            b.emit("bytes on the link (median): " + ", ".join(
                f"{k} {v / MiB:.1f} MiB" for k, v in wire.items()) + f"; data {data / MiB:.1f} MiB")
            for peer, lim in (("cdi-wire", CLONE_CDI_TARGET), ("nbdcopy", CLONE_NBD_TARGET)):
                p = by[peer]
                if rate is None and c.n_ok and p.n_ok:
                    b.check(sc_name, f"time <= {lim} x {peer}", c.wall / p.wall <= lim,
                            f"{c.wall / p.wall:.3f}")
                elif c.n_ok and p.n_ok:
                    b.emit(f"cdimover/{peer} = {c.wall / p.wall:.3f} (1 Gbit/s)")
            b.check(sc_name, f"bytes on the link <= {CLONE_WIRE_LIMIT} x data",
                    wire["cdimover"] <= CLONE_WIRE_LIMIT * data,
                    f"{wire['cdimover'] / data:.4f}")
            if "cdimover-cut90" in by and by["cdimover-cut90"].n_ok and c.n_ok:
                ratio = by["cdimover-cut90"].wall / c.wall
                b.check(sc_name, f"killed at 90 % <= {CLONE_CUT_LIMIT} x uncut",
                        ratio <= CLONE_CUT_LIMIT, f"{ratio:.3f}")
            for side in ("server_maxrss", "source_maxrss"):
                worst = max([s.cdm[side] for s in samples
                             if s.case == "cdimover" and s.ok and s.cdm], default=0)
                b.check(sc_name, f"{side.split('_')[0]} peak RSS <= 64 MiB",
                        0 < worst <= CLONE_RSS_LIMIT, f"{worst / MiB:.1f} MiB")


# ---------------------------------------------------------------------------------------------

def cdm_python(with_site: bool) -> tuple[list[str], list[str]]:
    """The interpreter's argv for cdimover's processes and the directories they need on
    PYTHONPATH besides the snapshot: none with the site, else the site-packages directories
    (the dependencies, cffi's backend first) without running their .pth files."""
    if with_site:
        return [sys.executable], []
    import site
    dirs = [d for d in [*site.getsitepackages(), site.getusersitepackages()]
            if os.path.isdir(d)]
    return [sys.executable, "-S"], dirs


def snapshot_package(workdir: Path, wait: float, with_site: bool = False) -> dict[str, str]:
    """Copy the installed cdimover package (Python files and the built extension) into
    WORKDIR/pkg and point PYTHONPATH there, so one consistent build serves the whole run even
    while the working tree is being edited and rebuilt; set CDM_PYTHON (see there).  Retries
    for WAIT seconds until the copy imports the way the runs start it."""
    import importlib.util
    global CDM_PYTHON
    spec = importlib.util.find_spec("cdimover")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("cdimover is not installed")
    src = Path(list(spec.submodule_search_locations)[0])
    dst = workdir / "pkg" / "cdimover"
    argv, deps = cdm_python(with_site)
    path = os.pathsep.join([str(dst.parent), *deps])
    env = dict(os.environ, PYTHONPATH=path)
    deadline = time.monotonic() + wait
    while True:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        # Compiled as an install compiles it: without this, an environment with
        # PYTHONDONTWRITEBYTECODE would compile every module in every measured run.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dst)], check=True)
        r = subprocess.run([*argv, "-c", "import cdimover; print(cdimover.__file__)"],
                           env=env, capture_output=True, text=True, cwd="/")
        if r.returncode == 0 and r.stdout.strip().startswith(str(dst)):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"cdimover from {src} does not import: {r.stderr.strip()[-500:]}")
        log(f"cdimover does not import yet ({r.stderr.strip().splitlines()[-1:]}); retrying")
        time.sleep(15)
    os.environ["PYTHONPATH"] = path
    CDM_PYTHON = argv
    h = hashlib.sha256()
    for f in sorted(dst.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    head = subprocess.run(["git", "-C", str(src.parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src.parent), "status", "--porcelain", "--",
                            "cdimover", "csrc"], capture_output=True, text=True).stdout.strip()
    return {"cdimover_from": str(src), "cdimover_snapshot_sha256": h.hexdigest()[:16],
            "cdimover_git": (head or "?") + (" + uncommitted changes" if dirty else ""),
            "cdimover_python": " ".join(argv) + ("" if with_site else
                                                 " (no site: as the image starts it)")}


def readahead_kb(path: str) -> int | None:
    """The read_ahead_kb of the block device holding PATH (of its disk for a partition), or
    None when PATH is on no block device (overlay, tmpfs).  A cold start faults each library
    in with that much read around it, and the pages read are charged to the tool's cgroup."""
    st = os.stat(path)
    d = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for q in (d / "queue" / "read_ahead_kb", d / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(q.read_text())
        except (OSError, ValueError):
            continue
    return None


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            return run(argv).splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               "?")
    return {"kernel": platform.release(), "cpu": cpu, "ncpu": str(os.cpu_count()),
            "python": platform.python_version(), "qemu-img": first(["qemu-img", "--version"]),
            "nbdcopy": first(["nbdcopy", "--version"]), "cp": first(["cp", "--version"]),
            "dd": first(["dd", "--version"])}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--size", type=parse_size, default=4 * GiB, help="virtual disk size (4G)")
    ap.add_argument("--runs", type=int, default=5, help="rounds per scenario (5)")
    ap.add_argument("--scenarios", nargs="+", default=DEFAULT_SCENARIOS,
                    choices=ALL_SCENARIOS, metavar="NAME", help=" ".join(ALL_SCENARIOS))
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="parent of the scratch directory (on the host filesystem)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait-import", type=float, default=600,
                    help="seconds to wait for a cdimover build that imports (600)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed rounds before the measured ones, per scenario (0)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to wait after dropping caches before each run (0.5)")
    ap.add_argument("--keep-going", action="store_true",
                    help="continue after a cdimover output mismatch")
    ap.add_argument("--buffered-loops", action="store_true",
                    help="attach loop devices without --direct-io (the backing file's page "
                         "cache under every loop I/O, as before issue 17)")
    ap.add_argument("--with-site", action="store_true",
                    help="start cdimover's processes with this interpreter's site (its .pth "
                         "files run) instead of -S and PYTHONPATH, as the image starts it")
    ap.add_argument("--pod-limits", action="store_true",
                    help=f"run every tool in a cgroup with CDI's default pod limits "
                         f"(memory {POD_MEMORY // 1000**2}M, cpu {POD_CPU_MILLIS}m)")
    ap.add_argument("--no-disk-limit", action="store_true",
                    help="skip fio's measure of the disk (the disk-limit lines)")
    ap.add_argument("--tune", type=parse_tune, default=TUNE_CONFIGS, metavar="T:SIZE,...",
                    help="the tune-* scenarios' cdimover settings, threads:request size "
                         "(0:0 = the defaults); default " + ",".join(
                             f"{t}:{r // MiB}M" for t, r in TUNE_CONFIGS))
    ap.add_argument("--fio-runtime", type=float, default=FIO_RUNTIME_DEFAULT,
                    help=f"seconds per fio point ({FIO_RUNTIME_DEFAULT:g})")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (loop devices, mounts, drop_caches, cgroups)")
    needs = ["losetup", "qemu-img", "nbdcopy", "mkfs.ext4", "mkfs.xfs"]
    if {"qdepth", "mixed"} & set(args.scenarios) or (not args.no_disk_limit
                                      and DISK_LIMIT_SCENARIOS & set(args.scenarios)):
        needs.append("fio")
    for tool in needs:
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found" + (" (Debian package fio)" if tool == "fio" else ""))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    workdir = Path(tempfile.mkdtemp(prefix="cdimover-bench-", dir=args.workdir))
    global SPAWN, SETTLE, LOOP_DIRECT, FIO_RUNTIME
    SETTLE = args.settle
    LOOP_DIRECT = not args.buffered_loops
    FIO_RUNTIME = args.fio_runtime
    SPAWN = build_spawn(workdir)
    try:
        pkg = snapshot_package(workdir, args.wait_import, args.with_site)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    t_start = time.perf_counter()
    content = Content(args.seed)
    layout = make_layout(args.size, args.seed)
    b = Bench(args=args, workdir=workdir, content=content, layout=layout)
    if args.pod_limits:
        b.cgroup = MemCgroup(POD_MEMORY, f"cdimover-bench-{os.getpid()}", POD_CPU_MILLIS)
    else:
        b.cgroup = MemCgroup(None, f"cdimover-bench-{os.getpid()}")
    b.info["loops"] = "direct-io" if LOOP_DIRECT else "buffered"
    b.info["tool_cgroup"] = b.cgroup.describe()
    b.info.update(versions())
    b.info.update(pkg)
    status = 0
    try:
        n_data = sum(1 for e in layout.extents if e[2] == "data")
        b.emit(f"cdimover bench: size {fmt_size(args.size)}, {args.runs} runs "
               f"(+{args.warmup} warm-up), seed {args.seed}, "
               f"scenarios {' '.join(args.scenarios)}")
        b.emit(f"host: {b.info['cpu']} x{b.info['ncpu']}, kernel {b.info['kernel']}; "
               f"{b.info['qemu-img']}; {b.info['nbdcopy']}; {b.info['cp']}")
        b.emit(f"cdimover: snapshot {pkg['cdimover_snapshot_sha256']} of {pkg['cdimover_from']} "
               f"(git {pkg['cdimover_git']}), run by {pkg['cdimover_python']}")
        ra = readahead_kb(os.path.realpath(sys.executable))
        b.info["readahead_kb"] = ra
        if ra is not None:
            b.emit(f"readahead: {ra} KiB on the interpreter's disk (a cold start reads that much "
                   f"around each library page it touches, into the tool's cgroup; Linux's default is "
                   f"128 KiB)")
        b.emit(f"source: {fmt_size(layout.data_bytes)} data in {n_data} extents of 1-8 MiB, "
               f"{fmt_size(layout.zero_bytes)} zeros written as data, rest holes")
        b.emit(f"loop devices: {b.info['loops']}; each tool in a fresh {b.info['tool_cgroup']}"
               + (" (CDI's default pod limits)" if args.pod_limits else
                  " (peak memory measured, page cache included)"))
        if not args.no_disk_limit and DISK_LIMIT_SCENARIOS & set(args.scenarios):
            try:
                measure_disk_limit(b)
            except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
                msg = e.stderr if isinstance(e, subprocess.CalledProcessError) else ""
                b.emit(f"disk limit: fio failed: {e} {msg}".rstrip())
        for sc in args.scenarios:
            log(f"scenario {sc}")
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            try:
                if sc in ("ext4", "xfs"):
                    in_fs(b, sc)
                elif sc == "scaling":
                    scaling(b)
                elif sc == "memcg":
                    memcg_scenario(b)
                elif sc in ("qcow2", "qcow2-compressed"):
                    qcow2_scenario(b, sc)
                elif sc == "qcow2-wide":
                    qcow2_wide_scenario(b)
                elif sc == "prealloc":
                    prealloc_scenario(b)
                elif sc in ("http-qcow2", "http-xz"):
                    http_scenario(b, sc)
                elif sc in ("upload-qcow2", "upload-raw"):
                    upload_scenario(b, sc)
                elif sc == "registry-qcow2":
                    registry_scenario(b)
                elif sc in ("clone-net", "clone-net-1g"):
                    clonenet_scenario(b, sc)
                elif sc == "qdepth":
                    qdepth_scenario(b)
                elif sc == "mixed":
                    mixed_scenario(b)
                else:
                    direction(b, sc)
            except (subprocess.CalledProcessError, OSError, RuntimeError) as e:
                msg = e.stderr if isinstance(e, subprocess.CalledProcessError) else ""
                log(f"scenario {sc} failed: {e} {msg}")
                b.emit(f"\n== {sc}: ERROR {e} {msg}".rstrip())
                b.check(sc, "scenario ran", False, str(e))
                status = 1
            load1 = os.getloadavg()[0]
            log(f"scenario {sc} took {time.perf_counter() - t:.0f}s")
            b.emit(f"({sc}: {time.perf_counter() - t:.0f}s; 1-min load average {load0:.2f} "
                   f"at start, {load1:.2f} at end, on {os.cpu_count()} CPUs)")
            b.info.setdefault("loadavg", {})[sc] = [load0, load1]
            if "source_allocated" in b.info and "zlib_ratio" in b.info and not b.info.get("_shown"):
                b.info["_shown"] = True
                b.emit(f"source image: allocated {fmt_size(b.info['source_allocated'])}, "
                       f"zlib ratio of data {b.info['zlib_ratio']:.2f}:1")
        b.emit("\n== targets")
        scw = max([14] + [len(c[0]) for c in b.checks])
        for sc, what, ok, detail in b.checks:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[ok]
            b.emit(f"{mark}  {sc:<{scw}} {what:<48} {detail}")
            if ok is False:
                status = 1
        b.emit(f"\ntotal bench time {time.perf_counter() - t_start:.0f}s")
    finally:
        if b.image is not None:
            b.image.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            doc = {"args": {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(args).items()},
                   "info": {k: v for k, v in b.info.items() if not k.startswith("_")},
                   "layout": {"size": layout.size, "data_bytes": layout.data_bytes,
                              "zero_bytes": layout.zero_bytes,
                              "extents": layout.extents},
                   "samples": [dataclasses.asdict(s) for s in b.samples],
                   "checks": [{"scenario": sc, "target": w, "pass": ok, "detail": d}
                              for sc, w, ok, d in b.checks]}
            args.json.write_text(json.dumps(doc, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
