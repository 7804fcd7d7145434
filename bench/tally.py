"""How often the direct-I/O targets held over many bench runs: read the --json files of
bench/run.py and tabulate, per job and per mode (no limits / pod limits), cdimover's ratio to
the best peer in each run, how many runs and rounds met the target, its time against the
disk-limit line and its cgroup's peak memory.

    python3 bench/tally.py RUN.json [RUN.json ...] [--markdown]

The ratio of a run is the one bench/run.py checks: the median over its rounds of cdimover's
time / the best peer's in the same round, the best peer being the one with the lowest median
time in that run (qemu-img alone for the compressed job).  A round counts once per run in the
pooled figure, so a run of 5 rounds weighs 5.  The targets are issue 17's: 0.85 x the best
peer (0.5 on the compressed job), 1.2 x the disk-limit line, 64 MiB of cgroup memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

JOBS = ["blk2file", "file2blk", "blk2blk", "ext4", "qcow2", "qcow2-blk", "qcow2-compressed"]
PEER_TARGET = 0.85
PEER_TARGET_COMPRESSED = 0.5
LIMIT_TARGET = 1.2
MEMCG_LIMIT_MIB = 64.0
MiB = 1 << 20


@dataclass
class Tally:
    """One job in one mode, over every run read."""
    job: str
    mode: str
    target: float
    run_ratios: list[float] = field(default_factory=list)
    round_ratios: list[float] = field(default_factory=list)
    limit_multiples: list[float] = field(default_factory=list)
    cdm_walls: list[float] = field(default_factory=list)      # median per run
    peer_walls: list[float] = field(default_factory=list)     # best peer's median per run
    best_peers: Counter[str] = field(default_factory=Counter)
    memcg_peak_mib: float = 0.0

    def met(self, xs: list[float], lim: float) -> str:
        return f"{sum(x <= lim for x in xs)}/{len(xs)}"


def load(path: Path) -> tuple[str, dict[str, Any], list[run.Sample]]:
    doc = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(run.Sample)}
    samples = [run.Sample(**{k: v for k, v in d.items() if k in names}) for d in doc["samples"]]
    mode = "pod limits" if doc.get("args", {}).get("pod_limits") else "no limits"
    return mode, doc.get("info", {}), samples


def best_peer(samples: list[run.Sample], job: str) -> str | None:
    """The peer with the lowest median time among SAMPLES (of one job), as bench/run.py picks
    it; qemu-img on the compressed job."""
    if job == "qcow2-compressed":
        return "qemu-img" if any(s.case == "qemu-img" and s.ok for s in samples) else None
    peers = [r for r in run.summarize(samples) if r.n_ok and r.case != "cdimover"
             and not r.case.startswith(("cdm ", "cdimover "))]
    return min(peers, key=lambda r: r.wall).case if peers else None


def tally(files: list[Path]) -> list[Tally]:
    out: dict[tuple[str, str], Tally] = {}
    for path in files:
        mode, info, samples = load(path)
        limits = info.get("disk_limit_s", {})
        for job in JOBS:
            ss = [s for s in samples if s.scenario == job]
            cdm = [s.wall for s in ss if s.case == "cdimover" and s.ok]
            peer = best_peer(ss, job)
            ratios = run.round_ratios(ss, "cdimover", peer) if peer else []
            if not cdm or peer is None or not ratios:
                continue
            t = out.setdefault((job, mode), Tally(job, mode, PEER_TARGET_COMPRESSED
                                                  if job == "qcow2-compressed" else PEER_TARGET))
            t.run_ratios.append(statistics.median(ratios))
            t.round_ratios += ratios
            t.best_peers[peer] += 1
            t.cdm_walls.append(statistics.median(cdm))
            t.peer_walls.append(statistics.median(s.wall for s in ss if s.case == peer and s.ok))
            if job in limits:
                line = limits[job]["read_s"] + limits[job]["write_s"]
                t.limit_multiples.append(statistics.median(cdm) / line)
            peaks = [s.memcg_peak for s in ss if s.case == "cdimover" and s.memcg_peak]
            if peaks:
                t.memcg_peak_mib = max(t.memcg_peak_mib, max(peaks) / MiB)
    return [out[k] for k in sorted(out, key=lambda k: (k[1], JOBS.index(k[0])))]


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def render(rows: list[Tally], markdown: bool) -> str:
    head = ["mode", "job", "runs", "ratio: median (range)", "target", "runs met",
            "rounds met", "best peers", "cdimover s", "peer s", "x disk limit", "limit met",
            "memcg peak MiB"]
    body = []
    for t in rows:
        body.append([t.mode, t.job, str(len(t.run_ratios)), spread(t.run_ratios),
                     f"{t.target:g}", t.met(t.run_ratios, t.target),
                     t.met(t.round_ratios, t.target),
                     ", ".join(f"{p} {n}" for p, n in t.best_peers.most_common()),
                     spread(t.cdm_walls), spread(t.peer_walls), spread(t.limit_multiples),
                     t.met(t.limit_multiples, LIMIT_TARGET) if t.limit_multiples else "-",
                     f"{t.memcg_peak_mib:.1f}" + ("" if t.memcg_peak_mib <= MEMCG_LIMIT_MIB
                                                  else " OVER")])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="bench/run.py --json outputs")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    a = p.parse_args(argv)
    rows = tally(a.files)
    if not rows:
        print("no direct-I/O job with cdimover and a peer in these files", file=sys.stderr)
        return 1
    print(render(rows, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
