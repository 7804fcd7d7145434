"""The container image in a real runtime, as pytest fixtures (registered by conftest.py).

- `image` (session): the image of `deploy/build-image.sh`, built once per source tree. Its
  tag is a hash of everything that goes into it (tests/imagetag.py), so the two suite runs of
  one CI job, and re-runs on an unchanged tree, reuse it from podman's storage; images of
  other trees made by these tests are removed first. `CDIMOVER_TEST_IMAGE=REF` tests an
  image already in podman's storage instead.
- `podman`: runs podman as root with `runc` and ulimits this host allows (a containers.conf
  written once per session, see ENVIRONMENT.md); every container and pod a test starts
  carries a fresh name and is removed by that name when the test ends, even on failure.
- `kube_overlay()`: a checked-in manifest made playable by `podman kube play` on this host,
  changing only what a cluster provides and podman does not: PVCs, Secrets and ConfigMaps
  become host paths (a Block PVC a loop device), the termination message a host file, the
  ports are dropped (podman 4.3 would publish each on every host address), the names made
  unique, and a pod runs once.

Pods run with `--network none`, or on an internal podman network the test made
(`pod_network`, link-local addresses, no route out); a test reaches a pod by entering its
network namespace (`nsenter -n`), never through the host's addresses.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TOOL_ENV, need, need_root, need_tool
from imagetag import TEST_REPO, source_hash
from netfix import make_certs, make_client_cert

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "deploy" / "build-image.sh"
ROLES = {"importer": "import", "uploadserver": "upload-server", "cloner": "clone-source"}
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""
# How a container is run in these tests: as CDI runs its pods, and read-only.
RESTRICTED = ["--user", "107:107", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
              "--read-only"]
QEMU_ID = 107
MiB = 1 << 20
CLIENT = "client.upload-server.cdi.kubevirt.io"    # CDI's upload proxy's client name


@dataclass
class Podman:
    """podman with this host's containers.conf; remembers what it started, by name."""
    env: dict[str, str]
    containers: list[str] = field(default_factory=list)
    kube_files: list[Path] = field(default_factory=list)

    def __call__(self, *args: str, check: bool = True,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} -> {r.returncode}\n{r.stderr}")
        return r

    def name(self, what: str) -> str:
        """A fresh container name, removed in teardown."""
        n = f"cdimover-test-{what}-{secrets.token_hex(4)}"
        self.containers.append(n)
        return n

    def run(self, image: str, *args: str, name: str, options: Sequence[str] = (),
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`podman run --rm` of IMAGE with ARGS, restricted as CDI's pods; not checked."""
        return self("run", "--rm", "--name", name, *RESTRICTED, *options, image, *args,
                    check=False, timeout=timeout)

    def play(self, manifest: Mapping[str, Any], d: Path, *options: str) -> None:
        """`podman kube play OPTIONS` of MANIFEST (written into D); `kube down` in teardown."""
        need_kube_play()
        path = d / f"{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
        self.kube_files.append(path)
        self("kube", "play", *options, str(path))

    def cleanup(self) -> None:
        """Remove the pods played and the containers named so far."""
        for path in reversed(self.kube_files):
            self("kube", "down", str(path), check=False, timeout=60)
        for n in reversed(self.containers):
            self("rm", "--force", "--ignore", "--time", "2", n, check=False, timeout=60)
        self.kube_files.clear()
        self.containers.clear()


def need_podman() -> None:
    need_root()
    for tool in ("podman", "runc", "mmdebstrap"):
        need_tool(tool)


def need_kube_play() -> None:
    """What `podman kube play` and the tests' clients need besides podman."""
    need(shutil.which("catatonit") is not None or os.path.exists("/usr/libexec/podman/catatonit"),
         "podman kube play needs catatonit (the pod's pause process)")
    need_tool("nsenter")
    need_tool("curl")


@pytest.fixture(scope="session")
def podman_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    need_podman()
    d = tmp_path_factory.mktemp("podman")
    (d / "containers.conf").write_text(CONTAINERS_CONF)
    p = Podman(env=dict(TOOL_ENV, CONTAINERS_CONF=str(d / "containers.conf")))
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def podman(podman_session: Podman) -> Iterator[Podman]:
    """The session's podman; what a test starts is removed when it ends, even on failure."""
    try:
        yield podman_session
    finally:
        podman_session.cleanup()


@dataclass(frozen=True)
class Image:
    ref: str
    build_seconds: float | None        # None: reused from podman's storage
    size: int

    def role(self, role: str) -> str:
        """The image CDI would start for ROLE (importer, uploadserver, cloner)."""
        repo, _, tag = self.ref.rpartition(":")
        return f"{repo}-{role}:{tag}"


@pytest.fixture(scope="session")
def image(podman_session: Podman) -> Image:
    """deploy/build-image.sh's image of this tree (see the module docstring)."""
    p = podman_session
    prebuilt = os.environ.get("CDIMOVER_TEST_IMAGE")
    if prebuilt:                        # an image built elsewhere, already in podman's storage
        size = int(p("image", "inspect", "--format", "{{.Size}}", prebuilt).stdout)
        return Image(ref=prebuilt, build_seconds=None, size=size)
    ref = f"{TEST_REPO}:{source_hash()}"
    # One build at a time on this host: a second session waits for the first and reuses it.
    with open("/var/tmp/cdimover-test-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seconds: float | None = None
        if p("image", "exists", ref, check=False).returncode != 0:
            old = p("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
            repos = {TEST_REPO, *(f"{TEST_REPO}-{role}" for role in ROLES)}
            for stale in (o for o in old if o.rpartition(":")[0] in repos):
                p("rmi", "--force", stale, check=False)
            start = time.monotonic()
            r = subprocess.run([str(BUILD_SCRIPT), ref], env=p.env, capture_output=True,
                               text=True, timeout=900)
            seconds = time.monotonic() - start
            assert r.returncode == 0, f"build-image.sh failed:\n{r.stderr[-4000:]}"
            assert r.stdout.strip().splitlines()[-1] == ref
    size = int(p("image", "inspect", "--format", "{{.Size}}", ref).stdout)
    return Image(ref=ref, build_seconds=seconds, size=size)


# ---------------------------------------------------------------------------------------------
# Manifests on podman


def load_manifest(name: str) -> dict[str, Any]:
    """The one document of deploy/NAME."""
    docs = list(yaml.safe_load_all((REPO / "deploy" / name).read_text()))
    assert len(docs) == 1
    return dict(docs[0])


def kube_overlay(manifest: Mapping[str, Any], image: str, *, claims: Mapping[str, str],
                 files: Mapping[str, str], termination_log: Path,
                 env: Mapping[str, str] | None = None,
                 secrets_: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """MANIFEST (a Pod) adapted for `podman kube play` on this host, changing nothing else:
    the image becomes IMAGE; each PVC the host path CLAIMS gives for its claim name (a block
    device or a directory), a Block volume mounted where the pod expects the device (podman
    passes a BlockDevice host path as a device); each Secret or ConfigMap the directory FILES
    gives for its name, and each env value taken from a Secret's key the text SECRETS_ gives
    for it; /dev/termination-log the file TERMINATION_LOG; ENV values replace those of the same
    name (addresses only a cluster resolves). Ports are dropped, the pod gets a unique name
    and runs once (`restartPolicy: Never`: a failure is seen at once, not restarted)."""
    m = copy.deepcopy(dict(manifest))
    assert m["kind"] == "Pod"
    m["metadata"]["name"] = f"{m['metadata']['name']}-{secrets.token_hex(4)}"
    spec = m["spec"]
    spec["restartPolicy"] = "Never"
    for v in spec["volumes"]:
        if "persistentVolumeClaim" in v:
            path = claims[v.pop("persistentVolumeClaim")["claimName"]]
            kind = "BlockDevice" if Path(path).is_block_device() else "Directory"
            v["hostPath"] = {"path": path, "type": kind}
        for source, key in (("secret", "secretName"), ("configMap", "name")):
            if source in v:
                v["hostPath"] = {"path": files[v.pop(source)[key]], "type": "Directory"}
    spec["volumes"].append({"name": "termination-log",
                            "hostPath": {"path": str(termination_log), "type": "File"}})
    for c in spec["containers"]:
        c["image"] = image
        c.pop("ports", None)
        mounts = c.setdefault("volumeMounts", [])
        mounts += [{"name": d["name"], "mountPath": d["devicePath"]}
                   for d in c.pop("volumeDevices", [])]
        mounts.append({"name": "termination-log", "mountPath": c["terminationMessagePath"]})
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert secrets_ is not None, f"no secret for {e['name']}"
                e.pop("valueFrom")
                e["value"] = secrets_[ref["name"]][ref["key"]]
            if env and e["name"] in env:
                e["value"] = env[e["name"]]
    return m


def container_state(podman: Podman, name: str) -> dict[str, Any]:
    out = json.loads(podman("inspect", "--type", "container", name).stdout)
    assert len(out) == 1
    return dict(out[0])


def termination_message(podman: Podman, name: str) -> str:
    """The termination message of container NAME, found through `podman inspect` (the host
    file mounted at its terminationMessagePath)."""
    state = container_state(podman, name)
    mounts = {m["Destination"]: m["Source"] for m in state["Mounts"]}
    return Path(mounts["/dev/termination-log"]).read_text()


def wait_exited(podman: Podman, name: str, timeout: float = 120) -> int:
    """Wait until container NAME exits; its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        state = container_state(podman, name)["State"]
        if state["Status"] in ("exited", "stopped"):
            return int(state["ExitCode"])
        assert time.monotonic() < deadline, f"{name} still {state['Status']} after {timeout}s"
        time.sleep(0.2)


def pod_pid(podman: Podman, pod: str) -> int:
    """The PID of POD's infra container: its network namespace is the pod's."""
    infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod).stdout.strip()
    return int(podman("inspect", "--format", "{{.State.Pid}}", infra).stdout)


@contextmanager
def pod_network(podman: Podman) -> Iterator[tuple[str, list[str]]]:
    """A podman network of its own for the pods of one test: internal (no route out of it),
    on a small link-local subnet, without DNS; (its name, the addresses pods may be given
    with `--ip`). Removed on exit, after the pods that use it."""
    third = secrets.randbelow(250) + 2
    name = f"cdimover-test-{secrets.token_hex(4)}"
    podman("network", "create", "--internal", "--disable-dns",
           "--subnet", f"169.254.{third}.0/29", name)
    try:
        yield name, [f"169.254.{third}.{i}" for i in range(2, 7)]
    finally:
        podman.cleanup()
        podman("network", "rm", "--force", name, check=False)


def curl_in(pid: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """curl ARGS inside the network namespace of process PID (a pod's 127.0.0.1)."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "curl", "-sS", *args],
                          env=TOOL_ENV, capture_output=True, timeout=timeout)


def wait_healthy(pid: int, ca: Path, host: str = "127.0.0.1", port: int = 8443,
                 timeout: float = 30) -> None:
    """Wait until the upload server in the network namespace of PID answers /healthz."""
    deadline = time.monotonic() + timeout
    while True:
        r = curl_in(pid, "--cacert", str(ca), f"https://{host}:{port}/healthz")
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"no /healthz: {r.stderr.decode()}"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Volumes, disks and certificates for the pods


def host_owned_by_qemu(path: Path) -> Path:
    """chown PATH to CDI's qemu user (107), as a PVC's fsGroup makes it writable in a pod."""
    os.chown(path, QEMU_ID, QEMU_ID)
    return path


def owned_dir(path: Path) -> Path:
    path.mkdir()
    return host_owned_by_qemu(path)


def termination_file(path: Path) -> Path:
    path.write_bytes(b"")
    return host_owned_by_qemu(path)


def attach(loopdev: Callable[..., str], backing: Path) -> str:
    """A loop device over BACKING (conftest's `loopdev`: detached in teardown), owned by 107."""
    dev = loopdev(backing)
    os.chown(dev, QEMU_ID, QEMU_ID)
    return dev


def sha256(path: Path, length: int | None = None) -> str:
    """The sha256 of PATH, or of its first LENGTH bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            chunk = f.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def disk(path: Path, size: int = 48 * MiB, seed: int = 107) -> Path:
    """A RAW disk: random data, text, zeros written as data, holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(rnd.randbytes(3 * MiB))
        f.seek(10 * MiB)
        f.write(b"\0" * MiB + b"cdimover in a container " * 40000)
        f.seek(size - 4096)
        f.write(rnd.randbytes(4096))
    return path


def manifest_env(name: str) -> dict[str, str]:
    """The literal env of deploy/NAME's container."""
    c = load_manifest(name)["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


def upload_pki(d: Path, extra_ips: Sequence[str] = ()) -> dict[str, Path]:
    """Under D: the TLS Secret of deploy/upload-server.yaml as a directory readable by 107
    ("tls": tls.crt + tls.key for 127.0.0.1 and EXTRA_IPS, the client CA ca.crt), the CA
    ("ca") and a client certificate with CDI's client name ("cert", "key")."""
    need_tool("openssl")
    pki = d / "pki"
    pki.mkdir()
    make_certs(pki, extra_ips)
    make_client_cert(pki, "client", CLIENT)
    tls = owned_dir(d / "tls")
    for src, dst in (("server.pem", "tls.crt"), ("server.key", "tls.key"), ("ca.pem", "ca.crt")):
        shutil.copyfile(pki / src, tls / dst)
        host_owned_by_qemu(tls / dst)
    return {"tls": tls, "ca": pki / "ca.pem", "cert": pki / "client.pem",
            "key": pki / "client.key"}
