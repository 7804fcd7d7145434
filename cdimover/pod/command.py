"""The ``pod`` command: read the configuration, serve the metrics, do the work, write the
termination message."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Final

from .. import argtypes
from ..errors import Terminated
from .clone import run_clone
from .config import CloneConfig, ImportConfig, clone_config, get_env, import_config
from .importer import run_import
from .messages import TERMINATION_LOG, Kind, failure_message, success_message, \
    write_termination_log

__all__ = ["register", "DEFAULT_ADDRESS"]

# Where CDI's controllers scrape a pod: port 8443 on every address of the pod.  (The metrics
# module, and with it prometheus_client and http.server, loads only when a pod command runs.)
DEFAULT_ADDRESS: Final = ":8443"


def _report(args: argparse.Namespace, message: str, source: str, target: str,
            elapsed: float) -> None:
    """Print the outcome on stdout (JSON with --json, nothing with --quiet)."""
    done = json.loads(message)
    if args.json:
        print(json.dumps(dict(done, source=source, target=target, elapsed=round(elapsed, 3)),
                         indent=2))
    elif not args.quiet:
        print(f"{done['message']}: {source} -> {target}"
              f"{' (preallocated)' if done['preallocationApplied'] else ''}")


def _cmd_pod(args: argparse.Namespace) -> int:
    """Run ``pod clone`` or ``pod import`` (ARGS.pod_command): read the configuration, serve
    the metrics, do the work, write the termination message.  Errors propagate to cli.main
    (which prints them and picks the exit status) after the failure message is written."""
    kind: Kind = args.pod_command
    env = os.environ
    server: MetricsServer | None = None
    try:
        cfg: CloneConfig | ImportConfig
        if kind == "clone":
            cfg = clone_config(env, mount_point=args.mount_point, destination=args.destination)
        else:
            cfg = import_config(env, endpoint=args.endpoint, destination=args.destination)
        from .metrics import MetricsServer, ProgressCounter, new_registry

        counter = ProgressCounter(kind, cfg.owner_uid)
        certfile = args.tls_cert or get_env(env, "METRICS_TLS_CERT_FILE")
        keyfile = args.tls_key or get_env(env, "METRICS_TLS_KEY_FILE")
        if args.metrics_address.lower() != "none":
            if certfile or keyfile or args.metrics_http:
                server = MetricsServer(new_registry(counter), args.metrics_address,
                                       certfile=certfile, keyfile=keyfile)
            else:
                # HTTPS with a certificate of our own, as CDI's pods serve it; the files are
                # loaded into the TLS context and removed at once.
                from .metrics import self_signed_certificate

                with tempfile.TemporaryDirectory(prefix="cdimover-metrics-") as tls_dir:
                    certfile, keyfile = self_signed_certificate(tls_dir)
                    server = MetricsServer(new_registry(counter), args.metrics_address,
                                           certfile=certfile, keyfile=keyfile)
            server.start()
        start = time.monotonic()
        if isinstance(cfg, CloneConfig):
            applied = run_clone(cfg, counter, threads=args.threads,
                                request_size=args.request_size)
            source, target = cfg.mount_point, cfg.destination
        else:
            applied = run_import(cfg, counter, threads=args.threads,
                                 request_size=args.request_size)
            source, target = cfg.endpoint, cfg.destination
        counter.set(100.0)
        message = success_message(kind, applied)
        write_termination_log(args.termination_log, message)
    except BaseException as e:
        write_termination_log(args.termination_log, failure_message(kind, e))
        if server is not None:
            server.stop()
        raise
    # The work is done and reported: a signal from here on only ends the linger.
    try:
        _report(args, message, source, target, time.monotonic() - start)
        if server is not None and args.metrics_linger > 0:
            time.sleep(args.metrics_linger)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        if server is not None:
            server.stop()
    return 0


def register(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
             common: argparse.ArgumentParser) -> None:
    """Add the ``pod`` command to the CLI's subparsers SUB (COMMON: shared options)."""
    p = sub.add_parser(
        "pod", help="run as a CDI clone or import pod",
        description="Run as a CDI clone or import pod, configured from the environment as CDI "
        "configures its pods; progress is served as Prometheus metrics and the outcome "
        "written as the termination message.")
    pods = p.add_subparsers(dest="pod_command", metavar="KIND", required=True)

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--termination-log", default=TERMINATION_LOG, metavar="PATH",
                        help=f"where the termination message goes (default {TERMINATION_LOG})")
    shared.add_argument("--metrics-address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help=f"serve progress metrics here (default {DEFAULT_ADDRESS}: every "
                        "address; port 0: any free port; 'none': no endpoint)")
    shared.add_argument("--tls-cert", metavar="PEM", help="serve metrics over HTTPS with this "
                        "certificate (or METRICS_TLS_CERT_FILE); needs --tls-key.  Without "
                        "one, a self-signed certificate is made at start, as CDI's pods do")
    shared.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (or "
                        "METRICS_TLS_KEY_FILE)")
    shared.add_argument("--metrics-http", action="store_true",
                        help="serve metrics over plain HTTP instead of HTTPS")
    shared.add_argument("--metrics-linger", type=argtypes.seconds, default=0.0, metavar="SECONDS",
                        help="keep serving the final metrics this long after success "
                        "(default 0)")
    shared.add_argument("--destination", metavar="PATH",
                        help="the target volume (overrides DESTINATION)")
    shared.add_argument("--threads", type=argtypes.threads, default=0,
                        help="worker threads of the copy (default: the copy's)")
    shared.add_argument("--request-size", type=argtypes.request_size, default=0, metavar="SIZE",
                        help="bytes per I/O request (default: the copy's)")

    c = pods.add_parser(
        "clone", parents=[common, shared], help="clone a volume (VOLUME_MODE, MOUNT_POINT, "
        "DESTINATION, PREALLOCATION, OWNER_UID, FILESYSTEM_OVERHEAD, UPLOAD_IMAGE_SIZE)",
        description="Clone the source volume MOUNT_POINT (VOLUME_MODE block or filesystem) "
        "into DESTINATION (a block device or a directory holding disk.img), for every pair "
        "of volume modes.  Required: VOLUME_MODE, MOUNT_POINT, PREALLOCATION (true|false), "
        "OWNER_UID.  Optional: DESTINATION (default /dev/cdi-block-volume or /data), "
        "FILESYSTEM_OVERHEAD (0.06), UPLOAD_IMAGE_SIZE (grow disk.img to this quantity).")
    c.add_argument("--mount-point", metavar="PATH",
                   help="the source volume (overrides MOUNT_POINT)")
    c.set_defaults(func=_cmd_pod, endpoint=None)

    i = pods.add_parser(
        "import", parents=[common, shared], help="import an image (IMPORTER_ENDPOINT, "
        "IMPORTER_CONTENTTYPE, IMPORTER_IMAGE_SIZE, IMPORTER_CHECKSUM, PREALLOCATION, ...)",
        description="Import the RAW or QCOW2 image (or, with IMPORTER_CONTENTTYPE=archive, "
        "the tar archive) at IMPORTER_ENDPOINT, a local path or file:// URL, into "
        "DESTINATION.  Optional: IMPORTER_CONTENTTYPE (kubevirt|archive), IMPORTER_IMAGE_SIZE "
        "(grow disk.img to this quantity), IMPORTER_CHECKSUM (sha256:<hex>, md5, sha1, "
        "sha512), PREALLOCATION (true|false), FILESYSTEM_OVERHEAD (0.06), OWNER_UID, "
        "DESTINATION (default /dev/cdi-block-volume or /data).")
    i.add_argument("--endpoint", metavar="PATH_OR_URL",
                   help="the image (overrides IMPORTER_ENDPOINT)")
    i.set_defaults(func=_cmd_pod, mount_point=None)
