"""The ``pod`` command: read the configuration, serve the metrics, do the work, write the
termination message."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal

from .. import argtypes
from ..errors import ScratchSpaceRequired, Terminated
from .messages import CLONE_COMPLETE, TERMINATION_LOG, deadline_message, failure_message, \
    scratch_required_message, success_message, write_termination_log

if TYPE_CHECKING:
    from .config import ImportConfig
    from .metrics import MetricsServer, ProgressCounter

__all__ = ["register", "DEFAULT_ADDRESS"]

log = logging.getLogger("cdimover")

# Where CDI's controllers scrape a pod: port 8443 on every address of the pod.  (The metrics
# module, and with it prometheus_client and http.server, loads only when a pod command runs;
# so do the configuration readers and the clone and import drivers, which pull in TLS, the
# HTTP and registry sources: `cdimover copy` registers these subcommands but never runs them.)
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


def _start_metrics(args: argparse.Namespace, counter: ProgressCounter) -> MetricsServer | None:
    """Serve COUNTER as ARGS say (None: --metrics-address none)."""
    from .config import get_env
    from .metrics import MetricsServer, new_registry

    env = os.environ
    certfile = args.tls_cert or get_env(env, "METRICS_TLS_CERT_FILE")
    keyfile = args.tls_key or get_env(env, "METRICS_TLS_KEY_FILE")
    if args.metrics_address.lower() == "none":
        return None
    if certfile or keyfile or args.metrics_http:
        server = MetricsServer(new_registry(counter), args.metrics_address,
                               certfile=certfile, keyfile=keyfile)
    else:
        # HTTPS with a certificate of our own, as CDI's pods serve it; the files are
        # loaded into the TLS context and removed at once.
        import tempfile

        from .metrics import self_signed_certificate

        with tempfile.TemporaryDirectory(prefix="cdimover-metrics-") as tls_dir:
            certfile, keyfile = self_signed_certificate(tls_dir)
            server = MetricsServer(new_registry(counter), args.metrics_address,
                                   certfile=certfile, keyfile=keyfile)
    server.start()
    return server


def _cmd_clone_source(args: argparse.Namespace) -> int:
    """Run ``pod clone-source``: send the source volume to the target's upload server;
    the termination message is CDI's plain "Clone Complete" (", Preallocation applied")."""
    from .clonesource import clone_source_config, run_clone_source
    from .metrics import ProgressCounter

    server: MetricsServer | None = None
    try:
        cfg = clone_source_config(os.environ, mount_point=args.mount_point,
                                  upload_url=args.upload_url, wire=args.wire)
        counter = ProgressCounter("clone", cfg.owner_uid)
        server = _start_metrics(args, counter)
        start = time.monotonic()
        outcome = run_clone_source(cfg, counter.set)
        counter.set(100.0)
        message = CLONE_COMPLETE + (", Preallocation applied" if cfg.preallocation else "")
        write_termination_log(args.termination_log, message)
    except BaseException as e:
        write_termination_log(args.termination_log, failure_message("clone", e))
        if server is not None:
            server.stop()
        raise
    def report() -> None:
        if args.json:
            print(json.dumps({"message": message, "wire": outcome.wire, "size": outcome.size,
                              "wireBytes": outcome.wire_bytes, "attempts": outcome.attempts,
                              "resumes": outcome.resumes, "diskDigest": outcome.digest,
                              "elapsed": round(time.monotonic() - start, 3)}, indent=2))
        elif not args.quiet:
            print(f"{message}: {cfg.mount_point} -> {cfg.upload_url} ({outcome.wire}"
                  f"{', digest ' + outcome.digest if outcome.digest else ''})")
    return _report_and_linger(args, server, report)


def _report_and_linger(args: argparse.Namespace, server: MetricsServer | None,
                       report: Callable[[], None]) -> int:
    """The work is done and its message written: REPORT it, keep serving the final metrics
    for --metrics-linger (a signal from here on only ends the linger), stop the server."""
    try:
        report()
        if server is not None and args.metrics_linger > 0:
            time.sleep(args.metrics_linger)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        if server is not None:
            server.stop()
    return 0


def _cmd_pod(args: argparse.Namespace) -> int:
    """Run ``pod clone`` or ``pod import`` (ARGS.pod_command): read the configuration, serve
    the metrics, do the work, write the termination message.  Errors propagate to cli.main
    (which prints them and picks the exit status) after the failure message is written."""
    from .clone import run_clone
    from .config import CloneConfig, clone_config, import_config
    from .importer import run_import

    kind: Literal["clone", "import"] = args.pod_command
    env = os.environ
    server: MetricsServer | None = None
    try:
        cfg: CloneConfig | ImportConfig
        if kind == "clone":
            cfg = clone_config(env, mount_point=args.mount_point, destination=args.destination)
        else:
            cfg = import_config(env, endpoint=args.endpoint, destination=args.destination)
        from .metrics import ProgressCounter

        counter = ProgressCounter(kind, cfg.owner_uid)
        server = _start_metrics(args, counter)
        start = time.monotonic()
        if isinstance(cfg, CloneConfig):
            applied = run_clone(cfg, counter, threads=args.threads,
                                request_size=args.request_size)
            source, target = cfg.mount_point, cfg.destination
        else:
            applied = run_import(cfg, counter, threads=args.threads,
                                 request_size=args.request_size, mem_limit=args.mem_limit)
            source, target = cfg.endpoint, cfg.destination
        counter.set(100.0)
        message = success_message(kind, applied)
        write_termination_log(args.termination_log, message)
    except ScratchSpaceRequired as e:
        # CDI's convention: exit 0 with the request, and the controller adds /scratch
        write_termination_log(args.termination_log, scratch_required_message(str(e)))
        if server is not None:
            server.stop()
        log.warning("%s: the pod needs a scratch volume", e)
        return 0
    except BaseException as e:
        write_termination_log(args.termination_log, failure_message(kind, e))
        if server is not None:
            server.stop()
        raise
    return _report_and_linger(
        args, server, lambda: _report(args, message, source, target, time.monotonic() - start))


def _cmd_upload_server(args: argparse.Namespace) -> int:
    """Run ``pod upload-server``: serve until an upload succeeded (exit 0, "Upload Complete"),
    the DEADLINE passed (exit 0, "Deadline Passed"), the image needs scratch space the pod
    lacks (exit 0, scratchSpaceRequired) or an async upload failed after its answer (exit 1)."""
    from .config import upload_config

    try:
        cfg = upload_config(os.environ, listen=args.listen, destination=args.destination)
        from .metrics import UploadProgress, new_registry
        from .upload import UploadServer, server_tls_context, volume_destination

        tls = server_tls_context(cfg.tls_cert, cfg.tls_key, client_ca=cfg.client_ca,
                                 min_version=cfg.tls_min_version, ciphers=cfg.tls_ciphers)
        if cfg.client_ca is None:
            log.warning("CLIENT_CERT_FILE is not set: uploads are accepted from any client")
        progress = UploadProgress(cfg.owner_uid)
        server = UploadServer(
            volume_destination(cfg.destination, cfg.filesystem_overhead, cfg.image_size),
            host=cfg.host, port=cfg.port, tls=tls, client_name=cfg.client_name,
            require_client_cert=cfg.client_ca is not None, preallocation=cfg.preallocation,
            scratch_dir=cfg.scratch_dir, progress=progress, registry=new_registry(progress),
            deadline=cfg.deadline, idle_timeout=args.idle_timeout, linger=args.linger,
            header_timeout=args.header_timeout, mem_limit=args.mem_limit,
            name=cfg.destination)
        outcome = server.run()
    except BaseException as e:
        write_termination_log(args.termination_log, failure_message("upload", e))
        raise
    if outcome == "complete":
        write_termination_log(args.termination_log,
                              success_message("clone" if server.clone_target else "upload",
                                              server.preallocation_applied,
                                              server.disk_digest))
        return 0
    if outcome == "deadline":
        write_termination_log(args.termination_log, deadline_message())
        return 0
    if outcome == "scratch":
        write_termination_log(args.termination_log,
                              scratch_required_message(server.scratch_reason))
        return 0
    if outcome == "failed":
        assert server.failure is not None
        write_termination_log(args.termination_log, failure_message("upload", server.failure))
        raise server.failure
    write_termination_log(args.termination_log, failure_message("upload", Terminated()))
    raise Terminated()


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
        "import", parents=[common, shared], help="import an image (IMPORTER_SOURCE, "
        "IMPORTER_ENDPOINT, IMPORTER_CONTENTTYPE, IMPORTER_IMAGE_SIZE, IMPORTER_CHECKSUM, "
        "PREALLOCATION, ...)",
        description="Import the RAW or QCOW2 image (or, with IMPORTER_CONTENTTYPE=archive, "
        "the tar archive) at IMPORTER_ENDPOINT, a local path or file:// URL, an http(s):// "
        "URL (IMPORTER_SOURCE=http) or a containerDisk docker://HOST/REPO:TAG or @sha256:... "
        "(IMPORTER_SOURCE=registry; IMPORTER_REGISTRY_IMAGE_ARCHITECTURE, "
        "CDIMOVER_INSECURE_REGISTRIES), into DESTINATION.  Remote sources: "
        "IMPORTER_ACCESS_KEY_ID, IMPORTER_SECRET_KEY, IMPORTER_CERT_DIR, INSECURE_TLS, "
        "http_proxy, https_proxy, no_proxy, IMPORTER_PROXY_CERT_DIR; SCRATCH_DIR (/scratch) "
        "for a QCOW2 that cannot be converted as it arrives.  Optional: IMPORTER_CONTENTTYPE "
        "(kubevirt|archive), IMPORTER_IMAGE_SIZE "
        "(grow disk.img to this quantity), IMPORTER_CHECKSUM (sha256:<hex>, md5, sha1, "
        "sha512), PREALLOCATION (true|false), FILESYSTEM_OVERHEAD (0.06), OWNER_UID, "
        "DESTINATION (default /dev/cdi-block-volume or /data).")
    i.add_argument("--endpoint", metavar="PATH_OR_URL",
                   help="the image (overrides IMPORTER_ENDPOINT)")
    i.add_argument("--mem-limit", type=argtypes.size, default=0, metavar="SIZE",
                   help="bytes a streamed QCOW2 (http, registry) may hold before the tables "
                   "that place them (default 64Mi); past it the image is converted from "
                   "SCRATCH_DIR, or the pod asks for scratch space")
    i.set_defaults(func=_cmd_pod, mount_point=None)

    cs = pods.add_parser(
        "clone-source", parents=[common, shared], help="send a volume to a clone target "
        "(VOLUME_MODE, MOUNT_POINT, UPLOAD_URL, CLIENT_CERT, CLIENT_KEY, SERVER_CA_CERT, ...)",
        description="Send the source volume MOUNT_POINT (VOLUME_MODE block or filesystem) to "
        "the upload server at UPLOAD_URL over mutual TLS: cdimover's resumable, checked, "
        "data-only clone stream when the target speaks it, CDI's snappy-framed wire format "
        "otherwise.  Required: VOLUME_MODE, MOUNT_POINT, UPLOAD_URL, OWNER_UID, PREALLOCATION."
        "  Optional: CLIENT_CERT, CLIENT_KEY, SERVER_CA_CERT (PEM text), CLONE_WIRE "
        "(auto|cdi|cdimover), CLONE_COMPRESSION (none|zstd), CLONE_RETRY_TIMEOUT (600).")
    cs.add_argument("--mount-point", metavar="PATH",
                    help="the source volume (overrides MOUNT_POINT)")
    cs.add_argument("--upload-url", metavar="URL", help="the target (overrides UPLOAD_URL)")
    cs.add_argument("--wire", choices=("auto", "cdi", "cdimover"),
                    help="the wire format (overrides CLONE_WIRE; default auto)")
    cs.set_defaults(func=_cmd_clone_source)

    u = pods.add_parser(
        "upload-server", parents=[common], help="receive an upload as CDI's upload pod "
        "(TLS_CERT_FILE, TLS_KEY_FILE, CLIENT_CERT_FILE, CLIENT_NAME, DESTINATION, ...)",
        description="Serve CDI's upload API over HTTPS and write the uploaded RAW, "
        "compressed RAW or QCOW2 image straight onto DESTINATION (default /data/disk.img; "
        "a block device such as /dev/cdi-block-volume), in one pass.  Required: "
        "TLS_CERT_FILE, TLS_KEY_FILE.  Optional: CLIENT_CERT_FILE + CLIENT_NAME (client "
        "certificates required, CN checked), LISTEN_ADDRESS, LISTEN_PORT (0.0.0.0:8443), "
        "TLS_MIN_VERSION (VersionTLS12), TLS_CIPHERS, UPLOAD_IMAGE_SIZE, FILESYSTEM_OVERHEAD "
        "(0.06), PREALLOCATION, DEADLINE (RFC 3339), OWNER_UID, SCRATCH_DIR (/scratch).")
    u.add_argument("--termination-log", default=TERMINATION_LOG, metavar="PATH",
                   help=f"where the termination message goes (default {TERMINATION_LOG})")
    u.add_argument("--listen", metavar="HOST:PORT",
                   help="listen here (overrides LISTEN_ADDRESS and LISTEN_PORT)")
    u.add_argument("--destination", metavar="PATH",
                   help="the target volume (overrides DESTINATION)")
    u.add_argument("--idle-timeout", type=argtypes.seconds, default=60.0, metavar="SECONDS",
                   help="drop an upload whose body sends nothing this long (default 60)")
    u.add_argument("--header-timeout", type=argtypes.seconds, default=10.0, metavar="SECONDS",
                   help="close a connection without a complete request head (TLS handshake "
                   "included) this long after it opened (default 10, as CDI's)")
    u.add_argument("--linger", type=argtypes.seconds, default=0.0, metavar="SECONDS",
                   help="keep answering (409 to uploads) this long after success (default 0)")
    u.add_argument("--mem-limit", type=argtypes.size, default=0, metavar="SIZE",
                   help="bytes a QCOW2 body may hold before the tables that place them "
                   "(default 64Mi); past it the body is converted from SCRATCH_DIR")
    u.set_defaults(func=_cmd_upload_server)
