"""A copy's wall time with and without slow TLS clients on the pod's metrics endpoint.

Usage:  python3 bench/metrics_load.py [--size 1G] [--clients 500] [--runs 3]
                                      [--workdir /var/tmp] [--request-size 64K]

In one process, as a pod runs: a MetricsServer (HTTPS, self-signed certificate) serving a
ProgressCounter, and ``cdimover.copy(SRC, DST, request_size=...)`` of a dense SIZE file whose
progress callback feeds the counter.  In a child process, CLIENTS slow clients: each connects,
completes the TLS handshake, then sends its request one byte a second (a third of them send
half a ClientHello and wait instead), and reconnects a second after the server closes it.
Each round times one copy without and one with the clients (page-cache-warm source,
fdatasync'd target) and reports this process's thread count, RSS and CPU time, and the
clients' CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


async def _client(port: int, stall_handshake: bool, ctx: ssl.SSLContext) -> None:
    while True:
        try:
            if stall_handshake:
                # A TCP connection that sends half a ClientHello and waits.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                await writer.drain()
                await reader.read(1)   # until the server closes it
            else:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, ssl_handshake_timeout=30)
                for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(1.0)
            writer.close()
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
        await asyncio.sleep(1.0)   # a slow client reconnects slowly too


async def _clients(port: int, n: int) -> None:
    """Run N clients until SIGTERM ends the process (its default action)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tasks = [asyncio.create_task(_client(port, i % 3 == 2, ctx)) for i in range(n)]
    await asyncio.gather(*tasks)


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    t = os.times()
    return t.user + t.system


def _status() -> tuple[int, int]:
    """(threads, RSS in KiB) of this process."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=_size, default=1 << 30)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--request-size", type=_size, default=64 << 10)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_port is not None:
        asyncio.run(_clients(args.client_port, args.clients))
        return

    import cdimover
    from cdimover.pod.metrics import (MetricsServer, ProgressCounter, new_registry,
                                  self_signed_certificate)

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="metrics-load-") as d:
        src, dst = os.path.join(d, "src.img"), os.path.join(d, "dst.img")
        with open(src, "wb") as f:
            for _ in range(args.size // (16 << 20)):
                f.write(os.urandom(16 << 20))
        counter = ProgressCounter("import", "bench")
        cert, key = self_signed_certificate(d)
        server = MetricsServer(new_registry(counter), "127.0.0.1:0", certfile=cert,
                               keyfile=key).start()

        cpu: dict[str, list[float]] = {"quiet": [], "loaded": []}

        def progress(done: int, total: int) -> None:
            counter.set(100 * done / total)

        def copy(kind: str = "") -> float:
            if os.path.exists(dst):
                os.unlink(dst)
            c, t = _cpu(), time.monotonic()
            cdimover.copy(src, dst, request_size=args.request_size, progress=progress)
            t, c = time.monotonic() - t, _cpu() - c
            if kind:
                cpu[kind].append(c)
            return t

        copy()   # warm the page cache with the source
        quiet, loaded, status = [], [], []
        clients_cpu: list[float] = []
        clients_total = 0.0
        try:
            for _ in range(args.runs):
                quiet.append(copy("quiet"))
                born = time.monotonic()
                p = subprocess.Popen([sys.executable, __file__, "--client-port",
                                      str(server.port), "--clients", str(args.clients)])
                try:
                    time.sleep(8)
                    status.append(_status())
                    loaded.append(copy("loaded"))
                finally:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
                    used = ru.ru_utime + ru.ru_stime - clients_total
                    clients_total += used
                    clients_cpu.append(used / (time.monotonic() - born))
                time.sleep(2)
        finally:
            server.stop()
        q, lo = statistics.median(quiet), statistics.median(loaded)
        print(f"copy of {args.size >> 20} MiB, request size {args.request_size >> 10} KiB")
        print(f"  no clients      : median {q:.2f} s  best {min(quiet):.2f} s  runs "
              f"{[round(x, 2) for x in quiet]}")
        print(f"  {args.clients} slow clients: median {lo:.2f} s  best {min(loaded):.2f} s  runs "
              f"{[round(x, 2) for x in loaded]}  (median {100 * (lo / q - 1):+.0f} %)")
        print(f"  threads / RSS with clients: {[(t, f'{r >> 10} MiB') for t, r in status]}")
        print(f"  this process's CPU seconds during the copy: quiet "
              f"{statistics.median(cpu['quiet']):.2f}, with clients "
              f"{statistics.median(cpu['loaded']):.2f} (medians); the clients' process: "
              f"{statistics.median(clients_cpu):.2f} CPU s/s")


if __name__ == "__main__":
    main()
