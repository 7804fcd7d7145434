"""Shared fixtures: requirement checks that skip locally but fail in CI, hypothesis profiles,
sparse-file and loop-device factories; the network servers of netfix.py (nginx, faultproxy,
rawhttp) are registered as a plugin.

Loop devices are attached with `losetup` by exact name and detached in teardown, even on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["netfix", "regfix", "imagefix"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The environment for outside tools (qemu-img, qemu-io, openssl, ...): without the sanitizer
# runtime that the ASan run of the suite preloads, which would hang or fail them.
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "quick", deadline=None, max_examples=5,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(   # for a deeper run by hand: HYPOTHESIS_PROFILE=thorough
    "thorough", deadline=None, max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "default"))


def need(ok: bool, reason: str) -> None:
    """Skip the calling test when a requirement is missing; in CI (CI=true) fail instead."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"requirement missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_loop() -> None:
    need_root()
    need(os.path.exists("/dev/loop-control") and shutil.which("losetup") is not None,
         "needs /dev/loop-control and losetup")


def qemu_img_create(argv: list[str]) -> None:
    """Run the `qemu-img create` command ARGV.  For an image with LUKS encryption qemu-img
    times its PBKDF2 rounds with the thread's CPU clock and gives up with "Unable to get
    accurate CPU usage" when a round is accounted as 0 ms, which this tick-accounted VM does in
    about one run in five: that failure is retried (up to 50 times, a few ms each), any other
    fails at once."""
    last = ""
    for _ in range(50):
        r = subprocess.run(argv, capture_output=True, text=True, env=TOOL_ENV)
        if r.returncode == 0:
            return
        last = r.stderr
        if "Unable to get accurate CPU usage" not in last:
            break
    raise AssertionError(f"{' '.join(argv)}: {last.strip()}")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs {name} on PATH")
    assert path is not None
    return path


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: loopdev(backing_path, sector_size=512) -> '/dev/loopN'; detached in teardown."""
    need_loop()
    attached: list[str] = []

    def make(backing: str | os.PathLike[str], sector_size: int = 512) -> str:
        out = subprocess.run(
            ["losetup", "--find", "--show", "--sector-size", str(sector_size), os.fspath(backing)],
            check=True, capture_output=True, text=True).stdout.strip()
        attached.append(out)
        return out

    try:
        yield make
    finally:
        for dev in reversed(attached):
            subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


@pytest.fixture
def mounted_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: mounted_fs(fstype='ext4', size=64 MiB) -> mount point of a fresh filesystem made in
    a loop file; unmounted and detached in teardown."""
    need_loop()
    mounts: list[Path] = []
    devs: list[str] = []

    def make(fstype: str = "ext4", size: int = 64 << 20) -> Path:
        mkfs = need_tool(f"mkfs.{fstype}")
        img = tmp_path / f"fs{len(devs)}.{fstype}.img"
        with open(img, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                             capture_output=True, text=True).stdout.strip()
        devs.append(dev)
        args = [mkfs, "-q"] + (["-F"] if fstype.startswith("ext") else ["-f"]) + [dev]
        subprocess.run(args, check=True, capture_output=True)
        mnt = tmp_path / f"mnt{len(devs)}"
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        mounts.append(mnt)
        return mnt

    try:
        yield make
    finally:
        for mnt in reversed(mounts):
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        for dev in reversed(devs):
            subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
