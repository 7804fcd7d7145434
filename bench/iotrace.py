"""Where a copy's time goes: run a command under strace and show its data I/O as a timeline.

    python3 bench/iotrace.py [--min-bytes N] [--bin S] -- CMD [ARG...]
    python3 bench/iotrace.py --log strace.txt          (an existing `strace -f -tt -T` log)

For each kind of positional call (pread64, pwrite64, preadv2, pwritev2) and file descriptor:
the number of calls, the bytes, the time spent inside them, and the rate of one call; then,
per kind, how long 0, 1, 2, ... of those calls were in flight at once (the queue depth the
program really kept), the syncs and any call slower than 50 ms, and the MiB read and written
per time bin.  Calls smaller than --min-bytes (default 64 KiB: headers and metadata) are left
out.  strace slows every call by a few microseconds; with requests of megabytes that is noise.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

MiB = 1 << 20
DATA_CALLS = ("pread64", "pwrite64", "preadv2", "pwritev2")
TRACED = DATA_CALLS + ("fdatasync", "fsync", "fallocate", "sync_file_range")

_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\d+):(\d+):(\d+(?:\.\d+)?) (.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+= (-?\d+|\?)(?:.*?)<(\d+(?:\.\d+)?)>\s*$")


@dataclass(frozen=True)
class Call:
    start: float        # seconds since midnight
    pid: int
    name: str
    fd: int
    length: int         # bytes asked for (data calls), else 0
    offset: int
    ret: int
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


def _args(name: str, text: str) -> tuple[int, int, int]:
    """(fd, length, offset) from a call's argument text."""
    parts = [p.strip() for p in text.split(",")]
    fd = int(parts[0]) if parts and parts[0].lstrip("-").isdigit() else -1
    length = offset = 0
    if name in ("pread64", "pwrite64") and len(parts) >= 3:
        length, offset = int(parts[-2]), int(parts[-1])
    elif name in ("preadv2", "pwritev2"):
        # preadv2(fd, [{iov_base=..., iov_len=N}, ...], cnt, off, flags): length = the sum
        length = sum(int(m) for m in re.findall(r"iov_len=(\d+)", text))
        nums = [p for p in parts if p.lstrip("-").isdigit()]
        offset = int(nums[-2]) if len(nums) >= 3 else 0
    return fd, length, offset


def parse(lines: Iterable[str]) -> list[Call]:
    """The completed calls of an `strace -f -tt -T` log (unfinished/resumed pairs joined)."""
    pending: dict[int, tuple[float, str]] = {}
    calls = []
    for raw in lines:
        m = _LINE.match(raw.rstrip("\n"))
        if m is None:
            continue
        pid = int(m.group(1))
        t = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
        rest = m.group(5)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (t, rest[: -len("<unfinished ...>")].rstrip())
            continue
        r = _RESUMED.match(rest)
        if r is not None:
            if pid not in pending:
                continue
            t, head = pending.pop(pid)
            rest = head + r.group(2)
        c = _CALL.match(rest)
        if c is None or c.group(1) not in TRACED:
            continue
        name = c.group(1)
        fd, length, offset = _args(name, c.group(2))
        ret = int(c.group(3)) if c.group(3) != "?" else -1
        calls.append(Call(t, pid, name, fd, length, offset, ret, float(c.group(4))))
    return calls


def depth_profile(calls: Sequence[Call], t0: float, t1: float) -> dict[int, float]:
    """Seconds of [T0, T1] during which 0, 1, 2, ... of CALLS were in flight."""
    events = sorted([(c.start, 1) for c in calls] + [(c.end, -1) for c in calls])
    out: dict[int, float] = collections.defaultdict(float)
    depth, last = 0, t0
    for t, d in events:
        t = min(max(t, t0), t1)
        out[depth] += t - last
        last = t
        depth += d
    out[depth] += t1 - last
    return {k: v for k, v in sorted(out.items()) if v > 0}


def report(calls: Sequence[Call], min_bytes: int = 64 << 10, bin_s: float = 0.2) -> str:
    data = [c for c in calls if c.name in DATA_CALLS and c.length >= min_bytes and c.ret >= 0]
    if not data:
        return "no data calls of at least %d bytes\n" % min_bytes
    t0 = min(c.start for c in data)
    t1 = max(c.end for c in data)
    lines = [f"data I/O span {t1 - t0:.3f} s, {len(data)} calls of >= {min_bytes} bytes"]
    groups: dict[tuple[str, int], list[Call]] = collections.defaultdict(list)
    for c in data:
        groups[(c.name, c.fd)].append(c)
    lines.append(f"{'call':10s} {'fd':>4s} {'calls':>6s} {'MiB':>8s} {'busy s':>8s} "
                 f"{'ms/call':>8s} {'MiB/s/call':>10s} {'MiB/s':>8s}")
    for (name, fd), cs in sorted(groups.items()):
        nbytes = sum(c.length for c in cs)
        busy = sum(c.duration for c in cs)
        per_call = nbytes / MiB / busy if busy > 0 else float("inf")
        lines.append(f"{name:10s} {fd:4d} {len(cs):6d} {nbytes / MiB:8.0f} {busy:8.3f} "
                     f"{busy / len(cs) * 1000:8.1f} {per_call:10.0f} "
                     f"{nbytes / MiB / (t1 - t0):8.0f}")
    for name in DATA_CALLS:
        cs = [c for c in data if c.name == name]
        if cs:
            prof = depth_profile(cs, t0, t1)
            mean = sum(k * v for k, v in prof.items()) / (t1 - t0)
            shown = "  ".join(f"{k}: {v:.3f}s" for k, v in prof.items())
            lines.append(f"{name} in flight (mean {mean:.2f}): {shown}")
    for c in calls:     # every sync and allocation, and the data calls slower than 50 ms
        if c.name not in DATA_CALLS or (c.length >= min_bytes and c.duration >= 0.05):
            lines.append(f"  at {c.start - t0:7.3f}s {c.name}(fd {c.fd}"
                         + (f", {c.length >> 10} KiB at {c.offset >> 20} MiB" if c.length else "")
                         + f") took {c.duration:.3f}s")
    bins: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for c in data:
        b = int((c.end - t0) / bin_s)
        bins[b][0 if c.name in ("pread64", "preadv2") else 1] += c.length
    lines.append(f"MiB read / written per {bin_s:g} s:")
    lines.append(" ".join(f"{b * bin_s:.1f}:{v[0] / MiB:.0f}/{v[1] / MiB:.0f}"
                          for b, v in sorted(bins.items())))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", help="an existing strace -f -tt -T log instead of a command")
    ap.add_argument("--min-bytes", type=int, default=64 << 10)
    ap.add_argument("--bin", type=float, default=0.2, help="seconds per timeline bin")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if a.log:
        with open(a.log) as f:
            calls = parse(f)
    else:
        if not cmd:
            ap.error("give a command after --, or --log")
        with tempfile.TemporaryDirectory() as d:
            log = os.path.join(d, "strace.txt")
            r = subprocess.run(["strace", "-f", "-tt", "-T", "-e", "trace=" + ",".join(TRACED),
                                "-o", log, *cmd])
            if r.returncode != 0:
                print(f"iotrace: the command exited with {r.returncode}", file=sys.stderr)
            with open(log) as f:
                calls = parse(f)
    sys.stdout.write(report(calls, a.min_bytes, a.bin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
