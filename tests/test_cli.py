"""The command line: in-process main(argv) for results and errors, the console script in a
subprocess for exit codes and signals."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdimover import argtypes
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
         "cp = sys.modules['cdimover.ops.copy']\n"
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
        from cdimover.io import loopdev
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


# ---- the progress line ----------------------------------------------------------------------

def _screen(written: str) -> str:
    """What a terminal shows after WRITTEN: carriage returns go back to column 0 and
    overwrite, ESC [K erases to the end of the line."""
    line: list[str] = []
    col = 0
    i = 0
    while i < len(written):
        if written.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        ch = written[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return "".join(line)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "terminal"])
def test_progress_line_leaves_no_old_characters(monkeypatch: pytest.MonkeyPatch,
                                                tty: bool) -> None:
    import cdimover.cli as cli

    clock = iter([0.0, 1.0, 2.0, 1000.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    stream = _Tty() if tty else io.StringIO()
    bar = cli.ProgressBar(stream, "copy")            # start at t=0
    bar(1, 10 << 30)                                 # 1 B/s: an ETA of 11 digits
    long_line = _screen(stream.getvalue())
    bar(9 << 30, 10 << 30)                           # 4.5 GiB/s: "ETA    0s", shorter
    shown = _screen(stream.getvalue())
    assert len(shown.rstrip()) < len(long_line)
    last = stream.getvalue().rsplit("\r", 1)[1]
    assert shown.rstrip() == last.replace("\x1b[K", "").rstrip()
    assert ("\x1b[K" in stream.getvalue()) == tty
    assert shown.rstrip().endswith("s") and "ss" not in shown


# ---- usage errors for tuning options ----------------------------------------------------------

@pytest.mark.parametrize("argv,option", [
    (["--threads", "-3"], "--threads"), (["--threads", "17"], "--threads"),
    (["--threads", "four"], "--threads"),
    (["--request-size", "5000"], "--request-size"), (["--request-size", "0"], "--request-size"),
    (["--request-size", str((64 << 20) + 4096)], "--request-size"),
    (["--sparse-size", "256"], "--sparse-size"), (["--sparse-size", "6144"], "--sparse-size"),
    (["--sparse-size", str(8 << 20)], "--sparse-size"),                  # > default request
    (["--request-size", "65536", "--sparse-size", "131072"], "--sparse-size"),
])
def test_tuning_options_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], option: str) -> None:
    src = tmp_path / "s.img"
    src.write_bytes(b"q" * 4096)
    assert main(["copy", *argv, str(src), str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err and "Errno" not in err
    assert not (tmp_path / "d").exists()


def test_tuning_limits_are_the_cores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bounds the CLI accepts are accepted by the core, one step beyond is refused."""
    import cdimover
    import cdimover.cli as cli

    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    write_layout(src, Layout((Segment("data", 1 << 20),), 3))
    ok = [dict(threads=argtypes.MAX_THREADS), dict(request_size=argtypes.MAX_REQUEST),
          dict(request_size=argtypes.REQUEST_ALIGN, sparse_size=argtypes.MIN_SPARSE),
          dict(request_size=argtypes.MAX_REQUEST, sparse_size=argtypes.MAX_REQUEST)]
    for kw in ok:
        cdimover.copy(src, dst, reflink="never", **kw)  # type: ignore[arg-type]
    bad = [dict(threads=argtypes.MAX_THREADS + 1), dict(request_size=argtypes.MAX_REQUEST + 4096),
           dict(request_size=argtypes.REQUEST_ALIGN + 512), dict(sparse_size=argtypes.MIN_SPARSE // 2),
           dict(sparse_size=argtypes.DEFAULT_REQUEST * 2)]
    for kw in bad:
        with pytest.raises(OSError):
            cdimover.copy(src, dst, reflink="never", **kw)  # type: ignore[arg-type]
    assert main(["copy", "-q", "--threads", "16", "--request-size", str(64 << 20),
                 "--sparse-size", "512", str(src), str(dst)]) == 0
    assert sha256_prefix(dst, 1 << 20) == sha256_prefix(src, 1 << 20)


# ---- broken pipe ------------------------------------------------------------------------------

def test_scan_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    p = tmp_path / "many.img"
    with open(p, "wb") as f:                 # 4000 extents: far more output than a pipe holds
        for i in range(2000):
            f.seek(i * 8192)
            f.write(b"x" * 4096)
    proc = subprocess.Popen([sys.executable, "-m", "cdimover", "scan", str(p)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()                      # as `head -1` does
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert first.split() == [b"0", b"4096", b"data"]
    assert err == b""


# ---- -v ---------------------------------------------------------------------------------------

def test_verbose_logs_the_strategy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    write_layout(src, Layout((Segment("data", 65536), Segment("hole", 1 << 20)), 1))
    assert main(["copy", "-q", "--reflink", "never", str(src), str(dst)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["copy", "-q", "-v", "--reflink", "never", str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cdimover: {src} -> {dst}: raw source; ")
    for word in ("scan seek-hole", "zeroing ", "direct I/O read ", "reflink no",
                 "preallocation off"):
        assert word in err
    assert main(["copy", "-q", "-vv", "--reflink", "never", str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    debug = [line for line in err.splitlines() if line.startswith("cdimover: result: ")]
    assert len(debug) == 1
    assert json.loads(debug[0][len("cdimover: result: "):])["bytes_written"] == 65536


def test_verbose_logs_the_conversion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _qcow2_image(tmp_path)
    assert main(["convert", "-q", "-v", str(img), str(tmp_path / "o.raw")]) == 0
    err = capsys.readouterr().err
    assert "qcow2 source; scan qcow2 (qcow2 v3" in err and "preallocation off" in err


# ---- API words in CLI terms -------------------------------------------------------------------

@pytest.mark.parametrize("api,cli", [
    ("power the VM off first, or pass force=True", "power the VM off first, or use --force"),
    ("or pass source_format='raw' to copy", "or use -f raw to copy"),
    ("convert it with cdimover.convert(), or", "convert it with cdimover convert, or"),
    ("/d: target_size applies to file targets only", "/d: --target-size applies to file "
     "targets only"),
    ("preallocation='fast': expected 'off'", "--preallocation fast: expected 'off'"),
    ("scan method full; file format qcow2", "scan method full; file format qcow2"),
    ("filesystem_overhead=2 is out of range", "--filesystem-overhead 2 is out of range"),
])
def test_cli_words(api: str, cli: str) -> None:
    from cdimover.cli import cli_words

    assert cli_words(api) == cli


def test_clone_of_a_locked_source_says_force(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import need_tool
    from cdimover.errors import SourceInUseError
    from cdimover.cdi.volume import check_not_in_use

    qemu_io = need_tool("qemu-io")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_layout(src / "disk.img", Layout((Segment("data", 65536),), 5))

    def locked() -> bool:
        try:
            check_not_in_use(str(src))
        except SourceInUseError:
            return True
        return False

    proc = subprocess.Popen([qemu_io, "-f", "raw", str(src / "disk.img")],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=TOOL_ENV)
    try:
        deadline = time.monotonic() + 10
        while not locked():
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io holds no lock"
            time.sleep(0.05)
        assert main(["clone", str(src), str(dst)]) == 1
        err = capsys.readouterr().err
        assert "use --force" in err and "force=True" not in err
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.terminate()
        proc.wait(10)


# ---- the package ------------------------------------------------------------------------------

def test_help_lists_every_public_name() -> None:
    import pydoc

    import cdimover

    assert set(cdimover.__all__) - {"__version__"} <= set(dir(cdimover))
    text = pydoc.render_doc(cdimover, renderer=pydoc.plaintext)
    for name in ("clone", "Volume", "CloneResult", "usable_space", "required_space", "copy",
                 "convert", "UnsupportedImageError"):
        assert f"\n    {name}" in text or f"class {name}" in text or f"{name}(" in text, name
    assert "Moving disks" in text and "CDI volumes" in text


def test_license_file_matches_pyproject() -> None:
    root = Path(__file__).resolve().parent.parent
    assert 'license = { text = "Apache-2.0" }' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text


def test_readme_manifests_are_clone_requests() -> None:
    import re as _re

    from cdimover.cdi.k8s import clone_requests

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = _re.findall(r"```yaml\n(.*?)```", readme, _re.S)
    assert blocks
    reqs = [r for b in blocks for r in clone_requests(b)]
    assert [(r.target_name, r.source_namespace, r.source_name, r.size) for r in reqs] == [
        ("fedora-clone", "golden-images", "fedora-40", 10 << 30),
        ("fedora-vm-disk", "golden-images", "fedora-40", 10 << 30)]
    assert all(r.target_namespace == "vms" and r.cross_namespace for r in reqs)


def test_clone_follows_a_device_link_typed_by_the_user(tmp_path: Path) -> None:
    # /dev/disk/by-id/... style: the command line follows a link the user typed.
    from cdimover.io import loopdev
    from conftest import need_loop

    need_loop()
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(1 << 20)
    (src / "disk.img").write_bytes(data)
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\0" * (2 << 20))
    with loopdev.attached(backing) as dev:
        link = tmp_path / "by-id-disk"
        os.symlink(dev, link)
        assert main(["clone", "-q", "--content-type", "kubevirt", str(src), str(link)]) == 0
    assert backing.read_bytes()[:1 << 20] == data


def test_klog_verbosity_as_cdi_passes_it(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """CDI starts its pod images with `args: ["-v=1"]` (klog): read as -v, -v=0 as nothing."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    assert main(["scan", "--json", "-v=2", str(disk)]) == 0
    assert main(["scan", "--json", "--v=0", str(disk)]) == 0
    capsys.readouterr()
    assert main(["scan", "-v=x", str(disk)]) == 2
