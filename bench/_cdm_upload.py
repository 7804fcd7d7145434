"""One upload through cdimover's upload server for bench/run.py, printing one JSON line.

    python3 bench/_cdm_upload.py IMAGE TARGET --cert PEM --key PEM [--spawn _spawn]

Starts ``cdimover pod upload-server`` -- the program CDI's upload pod runs, configured by
its environment (TLS_CERT_FILE, TLS_KEY_FILE, UPLOAD_IMAGE_SIZE) with DESTINATION=TARGET --
on a free port of 127.0.0.1, through the bench's _spawn launcher when given (for the
server's own peak RSS); waits until /healthz answers, then ``curl -T IMAGE -X POST`` to
/v1beta1/upload (streamed from disk; the sync route answers once the image is complete and
durable) and waits for the server to exit.  The runner measures this whole tree with wait4
(server start-up included); the line adds the server's own peak RSS and the seconds from
curl's start to the server's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def virtual_size(image: str) -> int:
    """The disk size of IMAGE: a QCOW2 header's, else the file's."""
    with open(image, "rb") as f:
        head = f.read(32)
    if len(head) == 32 and head[:4] == b"QFI\xfb":
        return int.from_bytes(head[24:32], "big")
    return os.path.getsize(image)


def stop(srv: subprocess.Popen[str]) -> int:
    """Kill the server's process group (its own session: _spawn and the server) and reap."""
    try:
        os.killpg(srv.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return srv.wait()


def wait_healthy(port: int, cafile: str, srv: subprocess.Popen[str], limit: float = 60) -> bool:
    """Poll GET /healthz until it answers 200 (True), or the server exits or LIMIT passes."""
    ctx = ssl.create_default_context(cafile=cafile)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and srv.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Connection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("target")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--spawn")
    a = p.parse_args(argv)
    port = free_port()
    device = a.target.startswith("/dev/")
    # A file target is written as a Filesystem volume's disk.img (the pod's DESTINATION is a
    # volume), in a directory beside TARGET, and renamed to TARGET once the upload is done.
    vol = a.target + ".vol"
    dest = a.target if device else os.path.join(vol, "disk.img")
    if not device:
        os.makedirs(vol, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix="rusage-") as ruf, \
            tempfile.NamedTemporaryFile(prefix="termination-") as term, \
            tempfile.TemporaryFile(mode="w+") as log:
        cmd = [sys.executable, "-m", "cdimover", "pod", "upload-server", "--listen",
               f"127.0.0.1:{port}", "--destination", dest, "--termination-log", term.name]
        if a.spawn:
            cmd = [a.spawn, ruf.name, *cmd]
        env = dict(os.environ, TLS_CERT_FILE=a.cert, TLS_KEY_FILE=a.key)
        if not device:
            # The size CDI gives the pod: disk.img is grown to it (at most the usable space).
            env["UPLOAD_IMAGE_SIZE"] = str(virtual_size(a.image))
        srv = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=log, text=True, env=env, start_new_session=True)
        if not wait_healthy(port, a.cert, srv):
            stop(srv)
            log.seek(0)
            sys.stderr.write("the upload server did not become healthy:\n" + log.read())
            return 1
        t0 = time.monotonic()
        c = subprocess.run(["curl", "-sS", "--fail-with-body", "--cacert", a.cert, "-T",
                            a.image, "-X", "POST", "-o", "/dev/null",
                            f"https://127.0.0.1:{port}/v1beta1/upload"])
        try:
            rc = srv.wait(timeout=600)
        except subprocess.TimeoutExpired:
            rc = stop(srv)
        took = time.monotonic() - t0
        if c.returncode != 0 or rc != 0:
            log.seek(0)
            sys.stderr.write(log.read())
            return 1
        if not device:
            os.rename(dest, a.target)
            os.rmdir(vol)
        fields = open(ruf.name).read().split() if a.spawn else []
        server_rss = int(fields[3]) * 1024 if len(fields) == 4 else 0
    json.dump({"server_maxrss": server_rss, "upload_s": took, "elapsed": took,
               "image_bytes": os.path.getsize(a.image)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
