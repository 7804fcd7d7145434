"""The command line: in-process main(argv) for results and errors, the console script in a
subprocess for exit codes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cdimover.cli import main
from conftest import TOOL_ENV
from layouts import Layout, Segment, sha256_prefix, write_layout


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdimover", *args], capture_output=True,
                          text=True, timeout=120, **kw)  # type: ignore[call-overload]


def test_copy_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    write_layout(src, Layout((Segment("data", 65536), Segment("hole", 1 << 20)), 1))
    assert main(["copy", "--json", "--reflink", "never", str(src), str(dst)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["virtual_size"] == 65536 + (1 << 20)
    assert out["bytes_written"] == 65536
    assert out["scan_method"] == "seek-hole"
    assert sha256_prefix(dst, out["virtual_size"]) == sha256_prefix(src, out["virtual_size"])


def test_copy_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "s.img"
    src.write_bytes(b"q" * 4096)
    assert main(["copy", "-q", str(src), str(tmp_path / "d.img")]) == 0
    assert capsys.readouterr().out == ""


def test_missing_source_is_one_line_exit_1(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["copy", str(tmp_path / "nope"), str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err == f"cdimover: {tmp_path / 'nope'}: No such file or directory\n"


def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["copy"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["--help"], ["copy", "--help"], ["prealloc", "--help"], ["scan", "--help"]):
        assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "zeros written as data" in out
    assert "--preallocation" in out and "--target-size" in out


def test_bad_quantity_is_a_usage_error(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "s.img"
    src.write_bytes(b"q" * 4096)
    assert main(["copy", "--target-size", "12Xi", str(src), str(tmp_path / "d")]) == 2
    assert "12Xi" in capsys.readouterr().err


def test_prealloc_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "blank.img"
    assert main(["prealloc", "--create", "--size", "4Mi", "--mode", "falloc", "--json",
                 str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size"] == 4 << 20 and out["preallocation_applied"]
    assert p.stat().st_blocks * 512 >= 4 << 20


def test_scan_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.img"
    write_layout(p, Layout((Segment("hole", 1 << 20), Segment("data", 8192)), 2))
    assert main(["scan", "--json", str(p)]) == 0
    ext = json.loads(capsys.readouterr().out)
    assert ext == [{"offset": 0, "length": 1 << 20, "data": False},
                   {"offset": 1 << 20, "length": 8192, "data": True}]


def test_demo_runs_and_verifies(tmp_path: Path) -> None:
    r = run_cli("demo", "--json", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verified"] is True
    assert out["target_data_bytes"] < out["virtual_size"] // 4


def test_console_script_exit_codes(tmp_path: Path) -> None:
    r = run_cli("copy", str(tmp_path / "missing"), str(tmp_path / "d"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert run_cli("copy").returncode == 2


def test_sigterm_mid_copy_then_rerun(tmp_path: Path) -> None:
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    write_layout(src, Layout((Segment("data", 64 << 20),), 9))
    # A slow copy: one thread, small requests, progress reported to a pipe.
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, cdimover.cli as c\n"
         "cp = sys.modules['cdimover.copy']\n"
         "orig = cp.copy\n"
         "def slow(*a, **k):\n"
         "    user = k['progress']\n"
         "    def p(d, t):\n"
         "        user(d, t); print(d, flush=True); time.sleep(0.02)\n"
         "    k['progress'] = p\n"
         "    return orig(*a, **k)\n"
         "cp.copy = slow\n"
         f"sys.exit(c.main(['copy', '--threads', '1', '--request-size', '4096', "
         f"'{src}', '{dst}']))\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()                # the copy has started
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "terminated" in err and "run the command again" in err
    # The new file was written under a partial name, removed when the copy stopped: nothing
    # that looks like a finished disk is left.
    assert sorted(os.listdir(tmp_path)) == ["s.img"]
    r = run_cli("copy", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    assert sha256_prefix(dst, 64 << 20) == sha256_prefix(src, 64 << 20)


def test_python_dash_m_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("cdimover ")


def test_clone_filesystem_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_layout(src / "disk.img", Layout((Segment("data", 65536), Segment("hole", 1 << 20)), 4))
    assert main(["clone", "--json", "--target-size", "4Mi", str(src), str(dst)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source_mode"] == out["target_mode"] == "Filesystem"
    assert out["disk_size"] == 4 << 20 == (dst / "disk.img").stat().st_size
    size = (src / "disk.img").stat().st_size
    assert sha256_prefix(dst / "disk.img", size) == sha256_prefix(src / "disk.img", size)


def test_clone_refusal_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    assert main(["clone", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cdimover: ") and err.count("\n") == 1 and "disk.img" in err


def test_loop_create_and_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import need_loop

    need_loop()
    backing = tmp_path / "pv.img"
    assert main(["loop", "create", "--json", "--size", "8Mi", "--sector-size", "4096",
                 "--pv-name", "local-pv-1", "--node", "node-a", str(backing)]) == 0
    out = json.loads(capsys.readouterr().out)
    dev = out["device"]
    try:
        assert dev.startswith("/dev/loop")
        assert "path: " + dev in out["manifest"] and "node-a" in out["manifest"]
        from cdimover import loopdev
        info = loopdev.info(dev)
        assert info.sector_size == 4096 and info.size == 8 << 20
    finally:
        assert main(["loop", "delete", dev]) == 0
    assert not Path(f"/sys/block/{Path(dev).name}/loop").exists()


def _qcow2_image(tmp_path: Path) -> Path:
    from conftest import need_tool

    qemu_img, qemu_io = need_tool("qemu-img"), need_tool("qemu-io")
    img = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "16M"], check=True,
                   env=TOOL_ENV)
    subprocess.run([qemu_io, "-c", "write -P 7 1M 1M", "-c", "write -c -P 9 4M 64k", str(img)],
                   check=True, capture_output=True, env=TOOL_ENV)
    return img


def test_info_json_matches_qemu_img_keys(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = _qcow2_image(tmp_path)
    assert main(["info", "--json", str(img)]) == 0
    ours = json.loads(capsys.readouterr().out)
    ref = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                    check=True, capture_output=True, text=True,
                                    env=TOOL_ENV).stdout)
    for key in ("virtual-size", "format", "cluster-size", "dirty-flag"):
        assert ours[key] == ref[key], key
    assert ours["format-specific"]["data"]["compat"] == ref["format-specific"]["data"]["compat"]


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _qcow2_image(tmp_path)
    out = tmp_path / "disk.raw"
    assert main(["convert", "--json", "-f", "qcow2", str(img), str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source_format"] == "qcow2" and res["scan_method"] == "qcow2"
    data = out.read_bytes()
    assert len(data) == 16 << 20
    assert data[1 << 20:2 << 20] == b"\x07" * (1 << 20)
    assert data[4 << 20:(4 << 20) + 65536] == b"\x09" * 65536
    assert data.count(0) == len(data) - (1 << 20) - 65536


def test_convert_refuses_backing_file_in_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import need_tool

    need_tool("qemu-img")
    img = tmp_path / "child.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd",
                    "-F", "raw", str(img), "1M"], check=True, env=TOOL_ENV)
    assert main(["convert", str(img), str(tmp_path / "out.raw")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backing" in err
    assert not (tmp_path / "out.raw").exists()
