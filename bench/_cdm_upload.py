"""One upload through cdimover's upload server for bench/run.py, printing one JSON line.

    python3 bench/_cdm_upload.py IMAGE TARGET --cert PEM --key PEM [--spawn _spawn]

Starts ``cdimover serve-upload TARGET`` (HTTPS on a free port of 127.0.0.1, through the
bench's _spawn launcher when given, for the server's own peak RSS), waits until it listens,
then ``curl -T IMAGE -X POST`` to /v1beta1/upload (streamed from disk; the sync route
answers once the image is complete and durable) and waits for the server to exit.  The
runner measures this whole tree with wait4 (server start-up included); the line adds the
server's own peak RSS and the seconds from curl's start to the server's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("target")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--spawn")
    a = p.parse_args(argv)
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="rusage-") as ruf:
        cmd = [sys.executable, "-m", "cdimover", "serve-upload", a.target, "--listen",
               f"127.0.0.1:{port}", "--tls-cert", a.cert, "--tls-key", a.key, "--quiet"]
        if a.spawn:
            cmd = [a.spawn, ruf.name, *cmd]
        srv = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        assert srv.stderr is not None
        line = srv.stderr.readline()
        if "serving uploads" not in line:
            srv.wait()
            sys.stderr.write(line + srv.stderr.read())
            return 1
        t0 = time.monotonic()
        c = subprocess.run(["curl", "-sS", "--fail-with-body", "--cacert", a.cert, "-T",
                            a.image, "-X", "POST", "-o", "/dev/null",
                            f"https://127.0.0.1:{port}/v1beta1/upload"])
        rc = srv.wait()
        took = time.monotonic() - t0
        err = srv.stderr.read()
        if c.returncode != 0 or rc != 0:
            sys.stderr.write(err)
            return 1
        fields = open(ruf.name).read().split() if a.spawn else []
        server_rss = int(fields[3]) * 1024 if len(fields) == 4 else 0
    json.dump({"server_maxrss": server_rss, "upload_s": took, "elapsed": took,
               "image_bytes": os.path.getsize(a.image)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
