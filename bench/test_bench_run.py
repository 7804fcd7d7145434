"""Unit checks of bench/run.py's pure helpers: fio's command line and JSON, the sweep table,
the disk-limit arithmetic.  No fio, loop device or cgroup is needed.

    python3 -m pytest -q bench/test_bench_run.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

MiB = 1 << 20


def test_fio_cmd_direct_sequential() -> None:
    argv = run.fio_cmd("/var/tmp/x.dat", "read", MiB, 16, 1.5, 2 << 30)
    assert argv[0] == "fio"
    for opt in ("--rw=read", f"--bs={MiB}", "--iodepth=16", "--ioengine=libaio", "--direct=1",
                "--runtime=1.5", "--time_based", "--output-format=json"):
        assert opt in argv
    assert "--end_fsync=1" not in argv
    w = run.fio_cmd("/var/tmp/x.dat", "write", MiB, 1, None, 2 << 30)
    assert "--end_fsync=1" in w and "--time_based" not in w
    assert "--end_fsync=1" not in run.fio_cmd("/dev/loop9", "write", MiB, 1, 1.0, 1 << 30)
    assert "--fallocate=none" not in w
    assert "--fallocate=none" in run.fio_cmd("/var/tmp/x.dat", "write", MiB, 1, None, 1 << 30,
                                             fresh=True)


def test_fio_parse_skips_notes() -> None:
    doc = {"jobs": [{"read": {"bw_bytes": 500 * MiB, "clat_ns": {"mean": 2.5e6}},
                     "write": {"bw_bytes": 0}}]}
    text = "note: both iodepth >= 1 and synchronous I/O engine\n" + json.dumps(doc)
    assert run.fio_parse(text, "read") == (500.0 * MiB, 2.5)
    assert run.fio_parse(json.dumps(doc), "write") == (0.0, 0.0)


def test_best_points_and_table() -> None:
    pts = [run.FioPoint(rw, bs, qd, rate * MiB, 1.0)
           for rw, bs, qd, rate in [("read", MiB, 1, 100), ("read", MiB, 16, 900),
                                    ("read", 4 * MiB, 16, 800), ("write", MiB, 1, 80),
                                    ("write", 4 * MiB, 16, 700)]]
    best = run.best_points(pts)
    assert (best["read"].bs, best["read"].qd) == (MiB, 16)
    assert (best["write"].bs, best["write"].qd) == (4 * MiB, 16)
    lines = run.qdepth_table(pts).splitlines()
    assert lines[0].split() == ["read", "MiB/s", "qd", "1", "qd", "16"]
    assert lines[1].split() == ["1", "MiB", "100", "900"]
    assert lines[2].split() == ["4", "MiB", "-", "800"]
    assert best["read"].label() == "1 MiB x qd 16"


def test_parse_tune() -> None:
    assert run.parse_tune("4:4M,16:512K,0:0") == [(4, 4 * MiB), (16, 512 << 10), (0, 0)]
    assert run.tune_name(0, 0) == "cdimover"
    assert run.tune_name(16, MiB) == "cdm t16 r1M"
    for bad in ("4", "x:4M", "4:4G"):
        try:
            run.parse_tune(bad)
        except Exception:
            continue
        raise AssertionError(bad)


def _sample(case: str, wall: float, peak: int | None = None,
            throttled: float | None = None) -> run.Sample:
    return run.Sample(scenario="x", case=case, round=0, position=0, wall=wall, cpu=1.0,
                      utime=0.5, stime=0.5, maxrss=40 * MiB, rc=0, allocated=MiB,
                      verified=True, memcg_peak=peak, cpu_throttled=throttled)


def test_disk_limit_line_and_memcg_columns(tmp_path: Path) -> None:
    import argparse
    b = run.Bench(args=argparse.Namespace(), workdir=tmp_path, content=None,  # type: ignore
                  layout=None)  # type: ignore[arg-type]
    b.info["disk_limit"] = {"read": {"rate": 1000.0 * MiB}, "write": {"rate": 500.0 * MiB}}
    samples = [_sample("cdimover", 3.0, 50 * MiB, 0.25), _sample("qemu-img", 2.0, 900 * MiB)]
    run.disk_limit_line(b, "blk2file", 1000 * MiB, 500 * MiB, samples)
    line = b.reports[-1]
    assert "= 1.000 + 1.000 = 2.000s" in line and "cdimover = 1.50 x limit" in line
    assert "best peer (qemu-img) = 1.00 x limit" in line
    assert b.checks[-1][2] is False          # 1.5 > 1.2
    text = run.table(b, "t", run.summarize(samples), 2.0)
    head, rows = text.splitlines()[1], text.splitlines()[3:]
    assert "memcg peak MiB" in head and "throttled s" in head
    assert rows[0].split()[-2:] == ["50.0", "0.25"]
    assert rows[1].split()[-2:] == ["900.0", "-"]


def test_disk_limit_line_takes_the_fresh_space_write_rate(tmp_path: Path) -> None:
    import argparse
    b = run.Bench(args=argparse.Namespace(), workdir=tmp_path, content=None,  # type: ignore
                  layout=None)  # type: ignore[arg-type]
    b.info["disk_limit"] = {"read": {"rate": 1000.0 * MiB}, "write": {"rate": 2000.0 * MiB},
                            "write-fresh": {"rate": 250.0 * MiB}}
    samples = [_sample("cdimover", 3.3, 50 * MiB), _sample("qemu-img", 4.0, 900 * MiB)]
    run.disk_limit_line(b, "blk2blk", 1000 * MiB, 500 * MiB, samples)
    line = b.reports[-1]
    assert "written into fresh space at the fio rates = 1.000 + 2.000 = 3.000s" in line
    assert "cdimover = 1.10 x limit" in line
    assert b.checks[-1][2] is True           # 1.1 <= 1.2
    best = run.best_points([run.FioPoint("write", MiB, 16, 2000.0 * MiB, 1.0),
                            run.FioPoint("write-fresh", MiB, 16, 250.0 * MiB, 1.0),
                            run.FioPoint("write-fresh", 4 * MiB, 16, 300.0 * MiB, 1.0)])
    assert best["write"].rate == 2000.0 * MiB and best["write-fresh"].bs == 4 * MiB


def test_api_line_reports_the_busy_times_of_the_call() -> None:
    def sample(rnd: int, read: float, write: float) -> run.Sample:
        return run.Sample("blk2file", "cdimover", rnd, 0, 2.5, 0.4, 0.3, 0.1, 1, 0, None, True,
                          cdm={"import_s": 0.05, "elapsed": 2.0, "read_seconds": read,
                               "write_seconds": write, "sync_seconds": 0.01})
    line = run.api_line([sample(0, 1.0, 6.0), sample(1, 3.0, 7.0), sample(2, 2.0, 8.0)])
    assert line == ("cdimover time: cdimover: import 0.050s + call 2.000s (inside reads 2.00s, "
                    "writes 7.00s over the workers, sync 0.010s) + rest 0.450s")
    old = run.Sample("qcow2", "cdimover", 0, 0, 2.5, 0.4, 0.3, 0.1, 1, 0, None, True,
                     cdm={"import_s": 0.05, "elapsed": 2.0})
    assert run.api_line([old]) == ("cdimover time: cdimover: import 0.050s + call 2.000s + "
                                   "rest 0.450s")


def test_fio_copy_tool_reads_and_writes_at_once_or_in_turn() -> None:
    at_once = run.fio_copy_tool("fio at once qd 2", "/var/tmp/src.img", 2, False)
    serial = run.fio_copy_tool("fio serial qd 8", "/var/tmp/src.img", 8, True)
    assert not at_once.checked and not serial.checked and not at_once.is_cdm
    assert "--stonewall" not in at_once.argv
    a = serial.argv
    # the global options come before the first job; the read job, then the barrier, then the
    # write job into the target placeholder, fsynced, never preallocated
    assert a.index("--fallocate=none") < a.index("--name=read") < a.index("--stonewall") \
        < a.index("--name=write") < a.index("--filename={DST}") < a.index("--end_fsync=1")
    assert a.count("--iodepth=8") == 2 and a.count(f"--size={run.MIXED_BYTES}") == 2
    assert "--filename=/var/tmp/src.img" in a and "--rw=read" in a and "--rw=write" in a


def _rsample(scenario: str, case: str, rnd: int, wall: float, *, rc: int = 0,
            verified: bool | None = True, memcg_peak: int | None = None) -> run.Sample:
    return run.Sample(scenario=scenario, case=case, round=rnd, position=0, wall=wall, cpu=0.0,
                      utime=0.0, stime=0.0, maxrss=0, rc=rc, allocated=None, verified=verified,
                      memcg_peak=memcg_peak)


def test_paired_ratio_pairs_within_rounds() -> None:
    # The disk slows down in round 1 for both: the per-round ratios are 0.5 and 0.5.  Round 2
    # (the peer failed) and round 3 (cdimover's output was wrong) pair nothing.
    ss = [_rsample("j", "cdimover", 0, 1.0), _rsample("j", "peer", 0, 2.0),
          _rsample("j", "cdimover", 1, 4.0), _rsample("j", "peer", 1, 8.0),
          _rsample("j", "cdimover", 2, 1.0), _rsample("j", "peer", 2, 9.0, rc=1),
          _rsample("j", "cdimover", 3, 3.0, verified=False), _rsample("j", "peer", 3, 3.0)]
    assert run.paired_ratio(ss, "cdimover", "peer") == 0.5
    assert run.paired_ratio(ss, "cdimover", "nobody") is None
    ss.append(_rsample("j", "cdimover", 4, 5.0))
    ss.append(_rsample("j", "peer", 4, 2.0))
    assert run.paired_ratio(ss, "cdimover", "peer") == 0.5        # median of 0.5, 0.5, 2.5
    # (The ratio of the medians would be 1.0 here: 2.5 s (1, 1, 4, 5) / 2.5 s (2, 2, 3, 8).)


def _write_run(path: Path, samples: list[run.Sample], *, pod: bool,
               limits: dict[str, dict[str, float]]) -> Path:
    import dataclasses
    doc = {"args": {"pod_limits": pod}, "info": {"disk_limit_s": limits},
           "samples": [dataclasses.asdict(s) for s in samples], "checks": []}
    path.write_text(json.dumps(doc))
    return path


def test_tally_counts_runs_rounds_and_limits(tmp_path: Path) -> None:
    import tally
    lim = {"ext4": {"read_s": 0.5, "write_s": 0.5}}
    a = _write_run(tmp_path / "a.json", [
        _rsample("ext4", "cdimover", 0, 0.7, memcg_peak=40 * MiB),
        _rsample("ext4", "qemu-img", 0, 1.0), _rsample("ext4", "dd", 0, 2.0),
        _rsample("ext4", "cdimover", 1, 0.9, memcg_peak=47 * MiB),
        _rsample("ext4", "qemu-img", 1, 1.0), _rsample("ext4", "dd", 1, 2.0),
    ], pod=False, limits=lim)
    b = _write_run(tmp_path / "b.json", [
        _rsample("ext4", "cdimover", 0, 1.5), _rsample("ext4", "qemu-img", 0, 3.0),
        _rsample("ext4", "dd", 0, 1.0),
        _rsample("qcow2-compressed", "cdimover", 0, 1.0),
        _rsample("qcow2-compressed", "qemu-img", 0, 4.0),
        _rsample("qcow2-compressed", "qemu-img zstd", 0, 0.5),
    ], pod=False, limits=lim)
    c = _write_run(tmp_path / "c.json", [
        _rsample("ext4", "cdimover", 0, 1.0), _rsample("ext4", "qemu-img", 0, 1.0),
    ], pod=True, limits={})
    rows = {(t.job, t.mode): t for t in tally.tally([a, b, c])}
    t = rows[("ext4", "no limits")]
    assert t.run_ratios == pytest.approx([0.8, 1.5])     # run a: median(0.7, 0.9); run b: dd is best
    assert t.best_peers == {"qemu-img": 1, "dd": 1}
    assert t.met(t.run_ratios, t.target) == "1/2"
    assert sorted(t.round_ratios) == pytest.approx([0.7, 0.9, 1.5])
    assert t.met(t.round_ratios, t.target) == "1/3"
    assert t.limit_multiples == pytest.approx([0.8, 1.5])
    assert t.memcg_peak_mib == 47.0
    comp = rows[("qcow2-compressed", "no limits")]
    assert comp.run_ratios == [0.25] and comp.target == 0.5    # against qemu-img, not zstd
    pod = rows[("ext4", "pod limits")]
    assert pod.run_ratios == [1.0] and pod.limit_multiples == []
    out = tally.render(list(rows.values()), markdown=True)
    assert "| no limits | ext4 | 2 | 1.15 (0.80-1.50) | 0.85 | 1/2 | 1/3 |" in out


def test_cdm_python_without_site_finds_the_dependencies() -> None:
    import subprocess
    argv, dirs = run.cdm_python(with_site=False)
    assert argv == [sys.executable, "-S"]
    # cffi's backend (what the native module needs) imports from those directories alone,
    # and no .pth file ran: the site module was not imported.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(dirs)}
    r = subprocess.run([*argv, "-c", "import sys, _cffi_backend; print('site' in sys.modules)"],
                       env=env, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    assert run.cdm_python(with_site=True) == ([sys.executable], [])


def test_readahead_kb_of_the_interpreters_disk() -> None:
    import os
    ra = run.readahead_kb(os.path.realpath(sys.executable))
    st = os.stat(os.path.realpath(sys.executable))
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        assert ra is None
    else:
        queue = dev / "queue" if (dev / "queue").exists() else dev / ".." / "queue"
        assert ra == int((queue / "read_ahead_kb").read_text())
    assert run.readahead_kb("/proc/self") is None        # procfs: no block device
