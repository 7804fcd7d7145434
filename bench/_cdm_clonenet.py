"""One clone between two network namespaces for bench/run.py, printing one JSON line.

    python3 bench/_cdm_clonenet.py ROUTE SOURCE_DEV TARGET --ns-src NS --ns-dst NS
        --dev-src VETH --ip ADDR --certs DIR [--spawn _spawn] [--cut 0.9]

ROUTE:
- ``cdimover``, ``cdimover-zstd``: ``pod upload-server`` in NS-DST, ``pod clone-source`` in
  NS-SRC (cdimover's clone stream; with zstd compression).  ``--cut F``: the source process
  is killed once F of the data crossed the link and started again (a source pod restart);
  the stream resumes.
- ``cdi``: CDI's wire path built from the same kind of parts CDI uses: ``dd`` reads the whole
  device, a snappy framing encoder (cramjam) frames it, ``curl`` POSTs it with
  ``x-cdi-content-type: blockdevice-clone`` over mTLS into ``pod upload-server`` (which writes
  zero blocks as holes, as CDI's does).
- ``nbdcopy``: ``qemu-nbd -r`` exports the source in NS-SRC over TCP, ``nbdcopy`` in NS-DST
  copies it to TARGET, then ``sync -d``.

TARGET is a block device or a directory (its disk.img).  The line gives the bytes that
crossed the link (the source end's tx counter, both directions' payload as seen from the
sender), and the peak RSS of the receiving and the sending process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

_FRAMER = (
    "import sys, cramjam\n"
    "r, w = sys.stdin.buffer, sys.stdout.buffer\n"
    "while True:\n"
    "    b = r.read(4 << 20)\n"
    "    if not b: break\n"
    "    w.write(bytes(cramjam.snappy.compress(b)))\n"
    "w.flush()\n")


def tx_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat",
                          f"/sys/class/net/{dev}/statistics/tx_bytes"],
                         check=True, capture_output=True, text=True).stdout
    return int(out)


def rss_of(path: str) -> int:
    try:
        fields = open(path).read().split()
    except OSError:
        return 0
    return int(fields[3]) * 1024 if len(fields) == 4 else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("route", choices=("cdimover", "cdimover-zstd", "cdi", "nbdcopy"))
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--ns-src", required=True)
    p.add_argument("--ns-dst", required=True)
    p.add_argument("--dev-src", required=True)
    p.add_argument("--ip", required=True, help="the target namespace's address")
    p.add_argument("--ip-src", default="169.254.213.2", help="the source namespace's address")
    p.add_argument("--certs", required=True)
    p.add_argument("--spawn")
    p.add_argument("--cut", type=float, default=0.0)
    p.add_argument("--data", type=int, default=0, help="the source's data bytes (for --cut)")
    a = p.parse_args(argv)
    c = a.certs
    in_src = ["ip", "netns", "exec", a.ns_src]
    in_dst = ["ip", "netns", "exec", a.ns_dst]
    before = tx_bytes(a.ns_src, a.dev_src)
    srv_ru = tempfile.NamedTemporaryFile(prefix="rusage-")
    srv_log = tempfile.TemporaryFile(mode="w+")
    src_ru = tempfile.NamedTemporaryFile(prefix="rusage-")

    def spawned(ru: str, cmd: list[str]) -> list[str]:
        return [a.spawn, ru, *cmd] if a.spawn else cmd

    env = dict(os.environ, TLS_CERT_FILE=f"{c}/server.pem", TLS_KEY_FILE=f"{c}/server.key",
               CLIENT_CERT_FILE=f"{c}/ca.pem", CLIENT_NAME="client", OWNER_UID="bench",
               DESTINATION=a.target, PREALLOCATION="false", VOLUME_MODE="block",
               MOUNT_POINT=a.source, UPLOAD_URL=f"https://{a.ip}:8443/v1beta1/upload",
               CLIENT_CERT=open(f"{c}/client.pem").read(),
               CLIENT_KEY=open(f"{c}/client.key").read(),
               SERVER_CA_CERT=open(f"{c}/ca.pem").read(),
               CLONE_COMPRESSION="zstd" if a.route == "cdimover-zstd" else "none")
    out: dict[str, object] = {"route": a.route}
    t0 = time.monotonic()
    if a.route == "nbdcopy":
        port = "10809"
        nbd = subprocess.Popen([*in_src, "qemu-nbd", "-r", "-f", "raw", "-e", "8", "-b", a.ip_src,
                                "-p", port, "-x", "src", "--cache=none", "--aio=native",
                                a.source], stderr=subprocess.PIPE, text=True)
        try:
            dst = a.target
            if os.path.isdir(dst):
                dst = os.path.join(dst, "disk.img")
                size = int(subprocess.run(["blockdev", "--getsize64", a.source], check=True,
                                          capture_output=True, text=True).stdout)
                with open(dst, "wb") as f:
                    f.truncate(size)
            deadline = time.monotonic() + 30      # until qemu-nbd listens
            while True:
                r = subprocess.run([*in_dst, "nbdcopy", "--destination-is-zero",
                                    f"nbd://{a.ip_src}:{port}/src", dst],
                                   capture_output=True, text=True)
                if r.returncode == 0 or "Connection refused" not in r.stderr \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if r.returncode != 0:
                sys.stderr.write(r.stderr)
                return 1
            subprocess.run(["sync", "-d", dst], check=True)
        finally:
            nbd.send_signal(signal.SIGTERM)
            nbd.wait()
        out["wire_bytes"] = tx_bytes(a.ns_src, a.dev_src) - before
        out["elapsed"] = time.monotonic() - t0
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0

    srv = subprocess.Popen(spawned(srv_ru.name, [*in_dst, sys.executable, "-m", "cdimover",
                                                 "pod", "upload-server", "--listen",
                                                 f"{a.ip}:8443", "--termination-log",
                                                 "/dev/null"]),
                           env=env, stdout=subprocess.DEVNULL, stderr=srv_log)
    try:
        if a.route == "cdi":
            # wait for the server, as a CDI source would see it ready
            for _ in range(500):
                r = subprocess.run([*in_src, "curl", "-s", "-o", "/dev/null", "--cacert",
                                    f"{c}/ca.pem", f"https://{a.ip}:8443/healthz"])
                if r.returncode == 0:
                    break
                time.sleep(0.02)
            pipeline = (
                f"dd if={a.source} bs=1M iflag=direct status=none | "
                f"{sys.executable} -c '{_FRAMER}' | "
                f"curl -sS --fail -o /dev/null --cacert {c}/ca.pem --cert {c}/client.pem "
                f"--key {c}/client.key -H 'x-cdi-content-type: blockdevice-clone' "
                f"-H 'Content-Type: application/octet-stream' -T - -X POST "
                f"https://{a.ip}:8443/v1beta1/upload")
            r = subprocess.run(spawned(src_ru.name, [*in_src, "sh", "-c", pipeline]), env=env)
            ok = r.returncode == 0
        else:
            cmd = [*in_src, sys.executable, "-m", "cdimover", "pod", "clone-source",
                   "--metrics-address", "none", "--termination-log", "/dev/null", "--quiet"]
            # its own process group, so that a kill reaches the source under the launcher
            src = subprocess.Popen(spawned(src_ru.name, cmd), env=env, start_new_session=True)
            if a.cut:
                while src.poll() is None:
                    if tx_bytes(a.ns_src, a.dev_src) - before >= a.cut * a.data:
                        os.killpg(src.pid, signal.SIGKILL)
                        src.wait()
                        out["cut_at"] = tx_bytes(a.ns_src, a.dev_src) - before
                        src = subprocess.Popen(spawned(src_ru.name, cmd), env=env,
                                               start_new_session=True)
                        break
                    time.sleep(0.005)
            ok = src.wait() == 0
        rc = srv.wait(600)
        if not ok or rc != 0:
            srv_log.seek(0)
            sys.stderr.write(srv_log.read()[-4000:])
            return 1
    finally:
        if srv.poll() is None:
            srv.terminate()
            srv.wait()
    out["wire_bytes"] = tx_bytes(a.ns_src, a.dev_src) - before
    out["server_maxrss"] = rss_of(srv_ru.name)
    out["source_maxrss"] = rss_of(src_ru.name)
    out["elapsed"] = time.monotonic() - t0
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
