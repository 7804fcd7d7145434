"""The ``cdimover`` command line: ``main(argv)`` returns the exit status, so tests call it
in-process.  Exit status: 0 success, 1 error (one line on stderr, no traceback), 2 usage
(including out-of-range --threads, --request-size and --sparse-size), 130 interrupted
(SIGINT), 141 stdout closed by its reader (``cdimover scan X | head``: nothing is printed,
and 141 is what a shell reports for ``cat`` killed by SIGPIPE), 143 terminated (SIGTERM).

Errors from the API are printed in command-line words (``use --force``, not ``pass
force=True``); ``-v`` logs the strategy of each copy (scan method, zeroing methods, direct
I/O, reflink, preallocation) to stderr, ``-vv`` everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from . import argtypes
from .argtypes import MAX_THREADS
from .errors import CdimoverError, CopyCancelled, Terminated
from .units import format_size

if TYPE_CHECKING:
    from .types import CopyResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGPIPE = 141
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

log = logging.getLogger("cdimover")


def _fmt_bytes(n: float) -> str:
    return format_size(int(n))


class ProgressBar:
    """A one-line progress display (percent of virtual size, rate, ETA) for terminals.

    Each update rewrites the line after a carriage return.  On a terminal the rest of the
    line is erased (``ESC [K``); on anything else (a log file, a pipe) the new text is padded
    with spaces to the length of the previous one, so no characters of a longer old line
    remain either way.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0
        self.width = 0          # characters of the line on screen
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def show(self, text: str) -> None:
        """Replace the line on screen with TEXT."""
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(f"\r{text.ljust(self.width)}")
        self.width = len(text)
        self.stream.flush()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        pct = 100.0 * done / total if total else 100.0
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * pct / 100)
        bar = "#" * filled + "-" * (width - filled)
        self.show(f"{self.label} [{bar}] {pct:5.1f}% {_fmt_bytes(rate)}/s ETA {eta:4.0f}s")

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@contextmanager
def _signals_cancel() -> Iterator[None]:
    """Turn SIGTERM into an exception raised inside the progress callback (which cancels the
    native copy at its next request); SIGINT already raises KeyboardInterrupt."""
    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _progress(args: argparse.Namespace, label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback: a bar on a terminal (or with --progress), else silent."""
    show = getattr(args, "progress", False) or (sys.stderr.isatty() and not args.quiet
                                                 and not args.json)
    bar = ProgressBar(sys.stderr, label) if show else None

    def cb(done: int, total: int) -> None:
        if bar is not None:
            bar(done, total)

    try:
        yield cb
    finally:
        if bar is not None:
            bar.finish()


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif not args.quiet:
        print(human)


def _summary(r: Any) -> str:
    methods = ", ".join(m.label for m in r.zero_methods) or "none needed"
    note = f" ({r.scan_note})" if r.scan_note else ""
    return (f"{r.source} -> {r.target}: {_fmt_bytes(r.virtual_size)} virtual, "
            f"{_fmt_bytes(r.bytes_written)} written, {_fmt_bytes(r.bytes_zeroed)} zeroed, "
            f"{_fmt_bytes(r.bytes_skipped)} left as holes, in {r.elapsed:.2f}s; "
            f"scan {r.scan_method.label}{note}; zeroing {methods}")


def _cmd_copy(args: argparse.Namespace) -> int:
    from .ops.copy import copy

    with _progress(args, "copy") as cb:
        r = copy(args.source, args.target, target_is_zero=args.target_is_zero, progress=cb,
                 reflink=args.reflink, scan=args.scan, threads=args.threads,
                 request_size=args.request_size, sparse_size=args.sparse_size,
                 preallocation=args.preallocation, target_size=args.target_size,
                 source_format=args.source_format)
    _log_strategy(r)
    _emit(args, r.as_dict(), _summary(r))
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from .ops.convert import convert

    with _progress(args, "convert") as cb:
        r = convert(args.source, args.target, source_format=args.format,
                    preallocation=args.preallocation, target_is_zero=args.target_is_zero,
                    progress=cb, target_size=args.target_size, threads=args.threads)
    _log_strategy(r)
    _emit(args, r.as_dict(), _summary(r))
    return EXIT_OK


def _http_source(args: argparse.Namespace, url: str) -> Any:
    """The HttpSource of URL from the command line's options (the password from a file or
    the environment, never from argv)."""
    from .io.http import HttpSource

    auth = None
    user = getattr(args, "user", None)
    if user is not None:
        password = ""
        if args.password_file is not None:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        elif "CDIMOVER_PASSWORD" in os.environ:
            password = os.environ["CDIMOVER_PASSWORD"]
        auth = (user, password)
    return HttpSource(url, auth=auth, ca=getattr(args, "ca", None),
                      insecure=getattr(args, "insecure", False),
                      headers=tuple(getattr(args, "header", None) or ()),
                      retries=getattr(args, "retries", 5),
                      idle_timeout=getattr(args, "idle_timeout", 600))


def _registry_args(args: argparse.Namespace) -> dict[str, Any]:
    """What a docker:// import or info takes from the command line."""
    auth = None
    if getattr(args, "user", None) is not None:
        source = _http_source(args, "https://registry.invalid/")
        auth = source.auth
    insecure = tuple(getattr(args, "insecure_registry", None) or ())
    insecure += tuple(h for h in os.environ.get("CDIMOVER_INSECURE_REGISTRIES", "").split(",")
                      if h)
    return dict(auth=auth, ca=getattr(args, "ca", None),
                insecure_tls=getattr(args, "insecure", False), insecure_registries=insecure)


def _cmd_import_registry(args: argparse.Namespace) -> int:
    from .ops.registry import import_registry

    with _progress(args, "import") as cb:
        r = import_registry(args.url, args.target, source_format=args.format,
                            preallocation=args.preallocation,
                            target_is_zero=args.target_is_zero, target_size=args.target_size,
                            capacity=args.capacity, progress=cb, arch=args.arch,
                            retries=args.retries, **_registry_args(args))
    out = r.copy.as_dict()
    out.update(image=r.image, manifest_digest=r.manifest_digest, platform=r.platform,
               layer=r.layer, member=r.member, compression=r.compression,
               member_compression=r.member_compression, layers_pulled=r.layers_pulled,
               bytes_fetched=r.bytes_fetched, retries=r.retries, source_format=r.source_format)
    human = (f"{_summary(r.copy)}; {r.member} of layer {r.layer[:19]} ({r.compression}), "
             f"{r.layers_pulled} layer(s) pulled, {_fmt_bytes(r.bytes_fetched)} fetched, "
             f"digests verified")
    _emit(args, out, human)
    return EXIT_OK


def _registry_info(args: argparse.Namespace) -> int:
    from .ops.registry import registry_client

    client = registry_client(args.path, **_registry_args(args))
    res = client.resolve(args.arch)
    out = {"image": str(client.ref), "manifest_digest": res.digest,
           "index_digest": res.index_digest, "platform": res.platform,
           "media_type": res.media_type,
           "layers": [{"digest": la.digest, "size": la.size, "media_type": la.media_type}
                      for la in res.layers]}
    human = "\n".join([f"image: {client.ref}", f"manifest: {res.digest}"] +
                      ([f"platform: {res.platform}"] if res.platform else []) +
                      [f"layer: {la.digest} {_fmt_bytes(la.size)} {la.compression}"
                       for la in res.layers])
    _emit(args, out, human)
    return EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    from .io.imageref import is_registry_url
    from .ops.remote import import_url

    if is_registry_url(args.url):
        return _cmd_import_registry(args)
    source = _http_source(args, args.url)
    with _progress(args, "import") as cb:
        r = import_url(source, args.target, source_format=args.format, checksum=args.checksum,
                       preallocation=args.preallocation, target_is_zero=args.target_is_zero,
                       target_size=args.target_size, capacity=args.capacity, progress=cb,
                       threads=args.threads)
    _log_strategy(r.copy)
    out = r.copy.as_dict()
    out.update(url=r.url, strategy=r.strategy, compression=r.compression,
               file_size=r.file_size, bytes_fetched=r.bytes_fetched, requests=r.requests,
               retries=r.retries, restarts=r.restarts, http_version=r.http_version,
               digest=r.digest, source_format=r.source_format)
    human = (f"{_summary(r.copy)}; fetched {_fmt_bytes(r.bytes_fetched)} in {r.requests} "
             f"requests ({r.strategy}, HTTP/{r.http_version}"
             f"{', ' + r.compression if r.compression != 'none' else ''}"
             f"{f', {r.retries} retried' if r.retries else ''}"
             f"{f', {r.restarts} restarted from byte 0' if r.restarts else ''})")
    if r.digest:
        human += f"; checksum {r.digest} verified"
    _emit(args, out, human)
    return EXIT_OK


def _url_info(args: argparse.Namespace) -> Any:
    from ._native import Context
    from .formats.qcow2 import ImageInfo
    from .ops.remote import probe_url

    source = _http_source(args, args.path)
    with Context() as ctx:
        ns = source.open(ctx)
        try:
            pr = probe_url(ctx, ns, source, args.format)
        finally:
            ns.free()
    if pr.image is not None:
        return pr.image
    if pr.format == "qcow2":
        raise ValueError(f"{source.display_url}: a QCOW2 image on a server without byte "
                         "ranges: its header can only be read by importing it")
    if pr.format != "raw":
        raise ValueError(f"{source.display_url}: {pr.format}-compressed: its image can only "
                         "be described by importing it")
    size = pr.info.size if pr.info.size is not None else 0
    return ImageInfo(filename=source.display_url, format="raw", virtual_size=size,
                     actual_size=size, file_size=size)


def _cmd_info(args: argparse.Namespace) -> int:
    from .formats.qcow2 import info_json, inspect
    from .io.http import is_url
    from .io.imageref import is_registry_url

    if is_registry_url(args.path):
        return _registry_info(args)

    info = _url_info(args) if is_url(args.path) else inspect(args.path, format=args.format)
    if args.json:
        print(json.dumps(info_json(info), indent=4))
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    lines = [f"image: {info.filename}", f"file format: {info.format}",
             f"virtual size: {_fmt_bytes(info.virtual_size)} ({info.virtual_size} bytes)",
             f"disk size: {_fmt_bytes(info.actual_size)}"]
    if info.format == "qcow2":
        lines += [f"cluster_size: {info.cluster_size}", f"compat: {info.compat}",
                  f"compression type: {info.compression_type}",
                  f"extended l2: {str(info.extended_l2).lower()}"]
        if info.backing_file is not None:
            lines.append(f"backing file: {info.backing_file} (never opened; conversion "
                         "refuses it)")
        if info.data_file is not None:
            lines.append(f"data file: {info.data_file} (never opened; conversion refuses it)")
        if info.encrypted:
            lines.append("encrypted: yes (not supported)")
        if info.dirty:
            lines.append("dirty: yes")
        if info.corrupt:
            lines.append("corrupt: yes")
    print("\n".join(lines))
    return EXIT_OK


def _cmd_prealloc(args: argparse.Namespace) -> int:
    from .ops.prealloc import create_blank, preallocate

    if args.create:
        if args.size is None:
            raise ValueError("--create needs --size")
        r = create_blank(args.path, args.size, preallocation=args.mode)
    else:
        r = preallocate(args.path, mode=args.mode, size=args.size)
    methods = ", ".join(m.label for m in r.alloc_methods) or "none"
    _emit(args, r.as_dict(), f"{r.path}: {_fmt_bytes(r.size)} preallocated ({r.mode}: "
          f"{methods}) in {r.elapsed:.2f}s")
    return EXIT_OK


def _cmd_clone(args: argparse.Namespace) -> int:
    from .cdi.volume import Volume, clone

    # Paths typed on the command line are the user's own: a symbolic link such as
    # /dev/disk/by-id/... is followed there (never inside a volume).
    source = Volume.open(args.source, args.filesystem_overhead, follow_symlinks=True)
    target = Volume.open(args.target, args.filesystem_overhead, follow_symlinks=True)
    with _progress(args, "clone") as cb:
        r = clone(source, target, content_type=args.content_type,
                  preallocation=args.preallocation, filesystem_overhead=args.filesystem_overhead,
                  target_size=args.target_size, force=args.force, progress=cb)
    if r.copy is not None:
        _log_strategy(r.copy)
    result = {
        "source_mode": r.source_mode, "target_mode": r.target_mode,
        "source": r.source_path, "target": r.target_path, "content_type": r.content_type,
        "virtual_size": r.virtual_size, "disk_size": r.disk_size,
        "bytes_written": r.bytes_written, "bytes_zeroed": r.bytes_zeroed,
        "preallocation_applied": r.preallocation_applied, "files": r.files,
        "elapsed": round(r.elapsed, 6),
        "copy": r.copy.as_dict() if r.copy is not None else None,
    }
    what = (f"{r.files} files" if r.content_type == "archive"
            else f"{_fmt_bytes(r.virtual_size)} virtual, {_fmt_bytes(r.bytes_written)} written")
    _emit(args, result, f"{r.source_mode} {r.source_path} -> {r.target_mode} {r.target_path}: "
          f"{what} in {r.elapsed:.2f}s")
    return EXIT_OK


def _cmd_loop_create(args: argparse.Namespace) -> int:
    from .io import loopdev

    loopdev.create_backing_file(args.file, args.size, fill=args.fill)
    try:
        dev = loopdev.attach(args.file, sector_size=args.sector_size)
    except BaseException:
        os.unlink(args.file)
        raise
    result: dict[str, Any] = {"device": dev, "backing_file": args.file, "size": args.size}
    human = dev
    if args.pv_name:
        manifest = loopdev.persistent_volume_manifest(
            args.pv_name, dev, args.node or os.uname().nodename, args.size,
            storage_class=args.storage_class)
        result["manifest"] = manifest
        human = f"{dev}\n---\n{manifest}"
    _emit(args, result, human)
    return EXIT_OK


def _cmd_loop_delete(args: argparse.Namespace) -> int:
    from .io import loopdev

    loopdev.detach(args.device)
    _emit(args, {"device": args.device, "detached": True}, f"{args.device} detached")
    return EXIT_OK


def _cmd_manifests(args: argparse.Namespace) -> int:
    """Write deploy/'s manifests into --output-dir, compare them with --check, or print them."""
    from . import __version__
    from .cdi.deploy import IMAGE_NAME, deploy_manifests

    files = deploy_manifests(args.image or f"{IMAGE_NAME}:{__version__}")
    if args.check:
        def current(name: str) -> str | None:
            try:
                with open(os.path.join(args.check, name), encoding="utf-8") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        stale = [name for name, text in files.items() if current(name) != text]
        for name in stale:
            print(f"cdimover: {os.path.join(args.check, name)}: not what "
                  f"'cdimover manifests -o {args.check}' writes", file=sys.stderr)
        return EXIT_ERROR if stale else EXIT_OK
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        if not args.quiet:
            print("\n".join(os.path.join(args.output_dir, name) for name in files))
        return EXIT_OK
    sys.stdout.write("---\n".join(text for name, text in files.items()
                                   if name != "kustomization.yaml"))
    return EXIT_OK


def _cmd_serve_upload(args: argparse.Namespace) -> int:
    """The upload server of ``pod upload-server`` on a local file or device, for a test."""
    from .errors import ConfigurationError
    from .pod.metrics import UploadProgress, new_registry
    from .pod.upload import UploadServer, path_destination, server_tls_context

    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"--listen: {args.listen!r} is not HOST:PORT")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise ConfigurationError("--client-ca needs --tls-cert and --tls-key")
    tls = server_tls_context(args.tls_cert, args.tls_key, client_ca=args.client_ca) \
        if args.tls_cert else None
    progress = UploadProgress("")
    server = UploadServer(path_destination(args.target), host=host.strip("[]"),
                          port=int(port), tls=tls, client_name=args.client_name,
                          require_client_cert=bool(args.client_ca),
                          preallocation=args.preallocation, scratch_dir=args.scratch_dir,
                          progress=progress, registry=new_registry(progress),
                          idle_timeout=args.idle_timeout, name=args.target)

    def ready(bound: int) -> None:
        scheme = "https" if tls else "http"
        print(f"cdimover: serving uploads on {scheme}://{host or '0.0.0.0'}:{bound}"
              f"/v1beta1/upload into {args.target}", file=sys.stderr, flush=True)

    outcome = server.run(ready)
    if outcome == "failed" and server.failure is not None:
        raise server.failure
    if outcome == "stopped":
        raise Terminated()
    if outcome == "scratch":
        print(f"cdimover: the image needs scratch space (--scratch-dir): "
              f"{server.scratch_reason}", file=sys.stderr)
        return EXIT_ERROR
    _emit(args, {"target": args.target, "outcome": outcome,
                 "preallocationApplied": server.preallocation_applied},
          f"upload complete: {args.target}")
    return EXIT_OK


def _cmd_upload(args: argparse.Namespace) -> int:
    """``cdimover upload FILE URL``: a client of CDI's upload API."""
    from .io.upload_client import tls_context, upload_file

    if bool(args.cert) != bool(args.key):
        from .errors import ConfigurationError
        raise ConfigurationError("--cert and --key go together")
    token = args.token
    if token is not None and token.startswith("@"):
        with open(token[1:], encoding="utf-8") as f:
            token = f.read().strip()
    ctx = tls_context(ca=args.ca, cert=args.cert, key=args.key, insecure=args.insecure)

    def say(text: str) -> None:
        print(f"cdimover: {text}", file=sys.stderr, flush=True)
    with _progress(args, "upload") as cb:
        r = upload_file(args.file, args.url, token=token, context=ctx, use_async=args.use_async,
                        retries=args.retry, progress=cb, say=say)
    _emit(args, {"file": args.file, "url": r.url, "bytes": r.size, "status": r.status,
                 "attempts": r.attempts, "async": r.used_async,
                 "seconds": round(r.elapsed, 3)},
          f"uploaded {args.file} ({_fmt_bytes(r.size)}) to {r.url} in {r.elapsed:.1f} s"
          + (f" after {r.attempts} attempts" if r.attempts > 1 else ""))
    return EXIT_OK


def _cmd_scan(args: argparse.Namespace) -> int:
    from .ops.copy import scan

    extents = scan(args.path, method=args.scan)
    if args.json:
        print(json.dumps([{"offset": o, "length": n, "data": d} for o, n, d in extents],
                         indent=2))
    elif not args.quiet:
        for o, n, d in extents:
            print(f"{o:>16} {n:>16} {'data' if d else 'hole'}")
    return EXIT_OK


def _cmd_digest(args: argparse.Namespace) -> int:
    from .ops.clonestream import disk_digest

    path = args.path
    if os.path.isdir(path):
        path = os.path.join(path, "disk.img")
    digest = disk_digest(path)
    if args.json:
        print(json.dumps({"path": path, "diskDigest": digest}, indent=2))
    elif not args.quiet:
        print(f"{digest}  {path}")
    return EXIT_OK


def _sha256(path: str, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _cmd_demo(args: argparse.Namespace) -> int:
    """Make a small sparse RAW disk (data, zeros written as data, holes), copy it, verify."""
    import tempfile

    from .ops.copy import copy, scan

    workdir = args.dir or tempfile.mkdtemp(prefix="cdimover-demo-")
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "source.img")
    dst = os.path.join(workdir, "disk.img")
    size = 64 << 20
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(4 << 20))
        f.seek(16 << 20)
        f.write(b"\0" * (8 << 20))           # zeros written as data
        f.seek(40 << 20)
        f.write(b"cdimover " * 100_000)
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    r = copy(src, dst, reflink="never")
    same = _sha256(src, size) == _sha256(dst, size)
    data = sum(n for _, n, d in scan(dst) if d)
    result = dict(r.as_dict(), verified=same, target_data_bytes=data)
    _emit(args, result, _summary(r) + f"\nverified sha256: {'OK' if same else 'MISMATCH'}; "
          f"target holds {_fmt_bytes(data)} of data in {_fmt_bytes(size)} virtual ({dst})")
    return EXIT_OK if same else EXIT_ERROR


def _check_tuning(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that involve two options: --sparse-size at most the request size."""
    sparse = getattr(args, "sparse_size", 0)
    request = getattr(args, "request_size", 0) or argtypes.DEFAULT_REQUEST
    if sparse > request:
        parser.error(f"argument --sparse-size: must not exceed the request size ({request}), "
                     f"got {sparse}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what is done (repeat for more)")

    p = argparse.ArgumentParser(
        prog="cdimover",
        description="Sparse-aware, bit-exact data mover for VM disks: files and block devices.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"cdimover {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # What copy and convert share: how the target is written and how the work is shown.
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("--target-is-zero", action="store_true",
                         help="the target block device already reads as zeros (skip zeroing)")
    writing.add_argument("--preallocation", choices=("off", "falloc", "full"), default="off",
                         help="off: keep holes; falloc: reserve every block; full: write "
                         "every block (default: off)")
    writing.add_argument("--target-size", type=argtypes.size, default=None,
                         help="grow a file target to this size (bytes or a Kubernetes "
                         "quantity such as 10Gi); never shrinks below the source")
    writing.add_argument("--threads", type=argtypes.threads, default=0,
                         help=f"worker threads, 1 to {MAX_THREADS} (default: 0, meaning 4)")
    writing.add_argument("--progress", action="store_true",
                         help="show a progress bar even when stderr is not a terminal")

    c = sub.add_parser("copy", parents=[common, writing],
                       help="copy a RAW disk (file or block device)",
                       description="Copy a RAW disk between regular files and block devices, "
                       "keeping holes as holes and turning zeros written as data into holes. "
                       "A missing target is created; an existing file is replaced; a block "
                       "device must be at least as large as the source.")
    c.add_argument("source", help="source file or block device")
    c.add_argument("target", help="target file or block device")
    c.add_argument("--reflink", choices=("auto", "never", "always"), default="auto",
                   help="share extents between files on one filesystem (default: auto)")
    c.add_argument("--scan", choices=("auto", "seek", "loop", "full"), default="auto",
                   help="how to find the source's data: SEEK_DATA, a loop device's backing "
                   "file, or a full read (default: auto)")
    c.add_argument("--request-size", type=argtypes.request_size, default=0,
                   help="bytes per I/O request: a multiple of 4096 from 4 KiB to 64 MiB "
                   "(default 4 MiB)")
    c.add_argument("--sparse-size", type=argtypes.sparse_size, default=0,
                   help="zero-detection granularity in bytes: a power of two from 512 to the "
                   "request size (default 4096)")
    c.add_argument("-f", "--source-format", choices=("auto", "raw"), default="auto",
                   help="auto: refuse a source that is QCOW2 (use convert) or another image "
                   "format or archive; raw: copy the bytes as they are (default: auto)")
    c.set_defaults(func=_cmd_copy)

    cv = sub.add_parser("convert", parents=[common, writing],
                        help="convert a QCOW2 or RAW image to RAW",
                        description="Write the guest disk of a QCOW2 (or RAW) image as RAW onto "
                        "a file or block device, sparse and bit-exact. Backing files, external "
                        "data files and encryption are refused; malformed images get a clear "
                        "error; other formats (VMDK, VHD, VHDX, VDI, QED, LUKS, gzip, xz, zstd, "
                        "tar, ...) are refused by name. -f raw copies byte for byte even if the "
                        "data looks like an image.")
    cv.add_argument("source", help="QCOW2 or RAW image")
    cv.add_argument("target", help="target file or block device")
    cv.add_argument("-f", "--format", choices=("auto", "raw", "qcow2"), default="auto",
                    help="source format (default: auto, by the QCOW2 magic)")
    cv.set_defaults(func=_cmd_convert)

    inf = sub.add_parser("info", parents=[common], help="describe a QCOW2 or RAW image",
                         description="Describe an image from its validated header. --json "
                                     "prints the keys of `qemu-img info --output=json`. "
                                     "Formats cdimover does not convert (VMDK, VHD, gzip, "
                                     "...) are refused by name unless -f raw.")
    # What import and info of a URL share: credentials, trust, headers, retries.
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--user", help="basic auth user name")
    remote.add_argument("--password-file", metavar="FILE",
                        help="file holding the basic auth password (default: the environment "
                        "variable CDIMOVER_PASSWORD; never on the command line)")
    remote.add_argument("--ca", metavar="PATH", help="PEM file, or directory of *.crt/*.pem "
                        "files, trusted besides the system's CAs")
    remote.add_argument("--insecure", action="store_true",
                        help="do not verify the server's TLS certificate")
    remote.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                        help="extra request header (repeatable)")
    remote.add_argument("--retries", type=int, default=5,
                        help="repetitions of a failed request, resuming where it broke "
                        "(default 5)")
    remote.add_argument("--idle-timeout", type=int, default=600, metavar="SECONDS",
                        help="give up after this long below 1 KiB/s (default 600)")
    remote.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]",
                        help="a docker:// registry reached over plain HTTP (repeatable; also "
                        "CDIMOVER_INSECURE_REGISTRIES, comma-separated)")
    remote.add_argument("--arch", default=None,
                        help="docker://: the architecture picked from a multi-arch image "
                        "(default: this machine's)")

    inf.add_argument("path", help="image file, block device, http(s):// URL or docker:// "
                     "image")
    inf.add_argument("-f", "--format", choices=("auto", "raw", "qcow2"), default="auto")
    for action in remote._actions:
        inf._add_action(action)
    inf.set_defaults(func=_cmd_info)

    im = sub.add_parser("import", parents=[common, writing, remote],
                        help="import a RAW or QCOW2 image from an http(s):// URL",
                        description="Import a RAW or QCOW2 image (maybe gzip-, xz- or "
                        "zstd-compressed) from an http:// or https:// URL straight onto a file "
                        "or block device, in one pass and without a scratch copy. With byte "
                        "ranges, a QCOW2 is converted by fetching only its allocated clusters; "
                        "otherwise the body is decoded as it arrives. Broken transfers resume.")
    im.add_argument("url", help="http:// or https:// URL of the image, or docker://HOST/REPO"
                    "[:TAG|@sha256:...] of a containerDisk (the file under /disk/)")
    im.add_argument("target", help="target file or block device")
    im.add_argument("-f", "--format", choices=("auto", "raw", "qcow2"), default="auto",
                    help="image format after decompression (default: auto, by magic bytes)")
    im.add_argument("--checksum", metavar="ALGO:HEX",
                    help="expected md5|sha1|sha256|sha512 of the file as downloaded")
    im.add_argument("--capacity", type=argtypes.size, default=None,
                    help="most bytes the image may take (default: a device's size, or a "
                    "file's free space); a longer stream is stopped")
    im.set_defaults(func=_cmd_import)

    pa = sub.add_parser("prealloc", parents=[common], help="preallocate a disk or create a "
                        "blank one", description="Reserve (falloc) or write (full) every "
                        "block of an existing file or block device, keeping its data; with "
                        "--create, make a blank disk of --size bytes (CDI's blank DataVolume).")
    pa.add_argument("path", help="file or block device")
    pa.add_argument("--mode", choices=("off", "falloc", "full"), default="falloc",
                    help="falloc: reserve without writing; full: write every block")
    pa.add_argument("--size", type=argtypes.size, default=None,
                    help="size in bytes or as a Kubernetes quantity (default: current size)")
    pa.add_argument("--create", action="store_true",
                    help="create (or replace) a blank disk instead of keeping the data")
    pa.set_defaults(func=_cmd_prealloc)

    s = sub.add_parser("scan", parents=[common], help="print the extent map of a disk",
                       description="Print the data and hole extents cdimover would use.")
    s.add_argument("path")
    s.add_argument("--scan", choices=("auto", "seek", "loop", "full"), default="auto")
    s.set_defaults(func=_cmd_scan)

    dg = sub.add_parser("digest", parents=[common], help="print a disk's clone digest",
                        description="Print the disk digest a cdimover clone stream verifies "
                        "(and the target's termination message reports as diskDigest), "
                        "reading only the disk's data: a SHA-256 chain over its 1 MiB blocks. "
                        "A directory means its disk.img.")
    dg.add_argument("path", help="a disk image, a block device or a Filesystem volume")
    dg.set_defaults(func=_cmd_digest)

    d = sub.add_parser("demo", parents=[common],
                       help="copy a small generated sparse disk and verify it",
                       description="Create a 64 MiB sparse RAW disk with data, zeros written "
                       "as data and holes; copy it; verify the copy by sha256.")
    d.add_argument("--dir", help="work directory (default: a new temporary directory)")
    d.set_defaults(func=_cmd_demo)

    cl = sub.add_parser("clone", parents=[common], help="clone one volume into another",
                        description="Clone a CDI volume: a directory is a Filesystem volume "
                        "whose disk is disk.img at its root, a block device is a Block volume. "
                        "Different volume modes need --content-type kubevirt; archive clones "
                        "copy the whole tree of a Filesystem volume. Sizes, rules and whether "
                        "the source is in use are checked before anything is written.")
    cl.add_argument("source", help="source volume (directory or block device)")
    cl.add_argument("target", help="target volume (directory or block device)")
    cl.add_argument("--content-type", choices=("kubevirt", "archive"), default="kubevirt")
    cl.add_argument("--preallocation", action="store_true",
                    help="reserve every block of the target")
    cl.add_argument("--filesystem-overhead", default="0.06",
                    help="CDI's filesystem overhead for Filesystem volumes (default 0.06)")
    cl.add_argument("--target-size", type=argtypes.size, default=None,
                    help="grow the target's disk.img to this size (e.g. 10Gi)")
    cl.add_argument("--force", action="store_true",
                    help="skip the check that the source is not in use")
    cl.add_argument("--progress", action="store_true",
                    help="show a progress bar even when stderr is not a terminal")
    cl.set_defaults(func=_cmd_clone)

    lo = sub.add_parser("loop", help="create or delete a loop-device block volume",
                        description="Loop devices as local block volumes, as the seed's "
                        "local block PV: create a backing file and attach it, or detach.")
    losub = lo.add_subparsers(dest="loop_command", metavar="ACTION", required=True)
    lc = losub.add_parser("create", parents=[common], help="create a backing file and attach it")
    lc.add_argument("file", help="backing file to create (must not exist)")
    lc.add_argument("--size", type=argtypes.size, required=True,
                    help="size in bytes or as a quantity (e.g. 2G, 2Gi)")
    lc.add_argument("--fill", choices=("sparse", "zero"), default="sparse",
                    help="sparse file, or zeros written like the seed's dd (default sparse)")
    lc.add_argument("--sector-size", type=int, default=512, help="logical sector size")
    lc.add_argument("--pv-name", help="also print a PersistentVolume manifest with this name")
    lc.add_argument("--node", help="node name for the PV's affinity (default: this host)")
    lc.add_argument("--storage-class", default="local-block")
    lc.set_defaults(func=_cmd_loop_create)
    ld = losub.add_parser("delete", parents=[common], help="detach a loop device")
    ld.add_argument("device", help="the loop device, e.g. /dev/loop3")
    ld.set_defaults(func=_cmd_loop_delete)

    su = sub.add_parser(
        "serve-upload", parents=[common], help="receive one upload into a file or device",
        description="Serve CDI's upload API (the server of 'pod upload-server') and write "
        "the RAW, compressed RAW or QCOW2 image uploaded to /v1beta1/upload (or -async, "
        "-form, -form-async) onto TARGET in one pass; exit once it is complete.  A "
        "directory TARGET is a Filesystem volume: archives (/v1beta1/upload-archive) and "
        "filesystem clones are extracted beneath it.")
    su.add_argument("target", help="the file, block device or directory to write")
    su.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
                    help="listen here (default 127.0.0.1:8443)")
    su.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    su.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    su.add_argument("--client-ca", metavar="PEM",
                    help="require client certificates signed by this CA")
    su.add_argument("--client-name", metavar="CN",
                    help="with --client-ca: the client certificate's required CN")
    su.add_argument("--scratch-dir", metavar="DIR",
                    help="where a QCOW2 that needs it is converted from (default none)")
    su.add_argument("--preallocation", action="store_true",
                    help="reserve every block of the target")
    su.add_argument("--idle-timeout", type=argtypes.seconds, default=60.0, metavar="SECONDS",
                    help="drop an upload whose body sends nothing this long (default 60)")
    su.set_defaults(func=_cmd_serve_upload)

    up = sub.add_parser(
        "upload", parents=[common], help="upload an image to CDI's upload proxy or pod",
        description="Send FILE as the body of a POST to CDI's upload API at URL (an upload "
        "proxy or upload pod; a URL without a path gets /v1beta1/upload), streamed with a "
        "progress bar.  A refused connection or an answer 502/503/504 is retried with "
        "backoff; every retry sends the file again from byte 0, as CDI cannot resume.")
    up.add_argument("file", help="the image: RAW, QCOW2, or gzip/xz/zstd-compressed RAW")
    up.add_argument("url", help="e.g. https://cdi-uploadproxy.example:443")
    up.add_argument("--token", metavar="TOKEN",
                    help="Authorization: Bearer TOKEN (@FILE reads it from FILE)")
    up.add_argument("--ca", metavar="PEM", help="verify the server against this CA bundle")
    up.add_argument("--insecure", action="store_true", help="do not verify the server")
    up.add_argument("--cert", metavar="PEM", help="a client certificate")
    up.add_argument("--key", metavar="PEM", help="the client certificate's key")
    up.add_argument("--async", dest="use_async", action="store_true",
                    help="use the async route when HEAD says the server has it")
    up.add_argument("--retry", type=int, default=5, metavar="N",
                    help="retries after a refused connection or 502/503/504 (default 5)")
    up.add_argument("--progress", action="store_true", help="show a progress bar")
    up.set_defaults(func=_cmd_upload)

    ma = sub.add_parser(
        "manifests", parents=[common], help="write the Kubernetes manifests of deploy/",
        description="Generate the pods a CDI controller would create with cdimover's image "
        "(HTTP import, upload server, clone source, a local Block to Filesystem clone), a "
        "Job for a standalone clone, the RBAC of a cross-namespace clone and a "
        "kustomization.yaml over them.  Without -o or --check, print them on stdout.")
    ma.add_argument("--image", metavar="REF",
                    help="the image every pod runs (default localhost/cdimover:VERSION)")
    ma.add_argument("-o", "--output-dir", metavar="DIR", help="write one file each into DIR")
    ma.add_argument("--check", metavar="DIR",
                    help="exit 1 unless DIR holds exactly what -o DIR would write")
    ma.set_defaults(func=_cmd_manifests)

    from .pod import command as pod_command
    pod_command.register(sub, common)
    return p


_KLOG_VERBOSITY = re.compile(r"--?v=([0-9])")


def _klog_verbosity(argv: Sequence[str]) -> list[str]:
    """ARGV with klog's ``-v=N`` (how CDI's controllers start the images of their pods:
    ``args: ["-v=1"]``) read as N times ``-v``."""
    out: list[str] = []
    for arg in argv:
        m = _KLOG_VERBOSITY.fullmatch(arg)
        out += ["-v"] * int(m[1]) if m else [arg]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ARGV (default sys.argv[1:]); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(_klog_verbosity(sys.argv[1:] if argv is None else argv))
        _check_tuning(parser, args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        with _signals_cancel():
            status = int(args.func(args))
            sys.stdout.flush()
            return status
    except KeyboardInterrupt:
        print("cdimover: interrupted; the target is incomplete, run the command again",
              file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("cdimover: terminated; the target is incomplete, run the command again",
              file=sys.stderr)
        return EXIT_SIGTERM
    except CopyCancelled as e:
        cause = e.__cause__
        if isinstance(cause, Terminated):
            print("cdimover: terminated; the target is incomplete, run the command again",
                  file=sys.stderr)
            return EXIT_SIGTERM
        print(f"cdimover: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError as e:
        if e.filename is None and _stdout_is_broken():
            _silence_stdout()
            return EXIT_SIGPIPE
        print(f"cdimover: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, CdimoverError, ValueError) as e:
        print(f"cdimover: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _stdout_is_broken() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports POLLERR)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of the output nobody
    reads does not fail again (the recipe of Python's documentation on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _StderrHandler(logging.Handler):
    """Writes records to whatever sys.stderr is when they are emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: int) -> None:
    """Send the "cdimover" loggers to stderr: warnings by default, INFO with -v (the strategy
    of each copy), DEBUG with -vv."""
    log.setLevel(logging.WARNING - 10 * min(verbose, 2))
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("cdimover: %(message)s"))
        log.addHandler(handler)


def _log_strategy(r: CopyResult) -> None:
    """Log (INFO) how a copy or conversion was done, as ``cp --debug`` does; the whole result
    at DEBUG."""
    note = f" ({r.scan_note})" if r.scan_note else ""
    zeroing = ", ".join(m.label for m in r.zero_methods) or "none needed"
    if r.zero_fallbacks:
        zeroing += f" ({r.zero_fallbacks} fallbacks)"
    prealloc = r.preallocation
    if r.alloc_methods:
        prealloc += f" ({', '.join(m.label for m in r.alloc_methods)})"
    log.info("%s -> %s: %s source; scan %s%s; zeroing %s; direct I/O read %s, write %s; "
             "reflink %s; preallocation %s; inside reads %.2fs, writes %.2fs (summed over "
             "the workers), sync %.2fs", r.source, r.target, r.source_format,
             r.scan_method.label, note, zeroing, _yes(r.direct_read), _yes(r.direct_write),
             _yes(r.reflinked), prealloc, r.read_seconds, r.write_seconds, r.sync_seconds)
    log.debug("result: %s", json.dumps(r.as_dict(), sort_keys=True))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# What the command line calls the API's keyword arguments, for messages raised by the API
# ("pass force=True") that reach a user of the command line ("use --force").  Keywords
# without an underscore are translated only in the KEYWORD=VALUE form, so that prose such as
# "scan method" is left alone.
_CLI_OPTIONS: dict[str, str] = {
    "force": "--force", "source_format": "-f", "format": "-f",
    "target_size": "--target-size", "preallocation": "--preallocation",
    "filesystem_overhead": "--filesystem-overhead", "content_type": "--content-type",
    "request_size": "--request-size", "sparse_size": "--sparse-size", "threads": "--threads",
    "reflink": "--reflink", "scan": "--scan", "target_is_zero": "--target-is-zero",
}
_CLI_CALLS: dict[str, str] = {
    "cdimover.convert()": "cdimover convert", "cdimover.copy()": "cdimover copy",
    "cdimover.clone()": "cdimover clone", "cdimover.inspect()": "cdimover info",
}
_KEYWORD = re.compile(
    r"(?P<pass>\bpass )?\b(?P<name>" + "|".join(sorted(_CLI_OPTIONS, key=len, reverse=True))
    + r")\b(?:=(?P<value>True|'[^']*'|\"[^\"]*\"|[\w.-]+))?")


def cli_words(text: str) -> str:
    """TEXT with the API's keyword phrases in command-line terms: ``pass force=True`` ->
    ``use --force``, ``source_format='raw'`` -> ``-f raw``, ``target_size`` ->
    ``--target-size``, ``cdimover.convert()`` -> ``cdimover convert``."""
    def option(m: re.Match[str]) -> str:
        name, value = m["name"], m["value"]
        if value is None and "_" not in name:
            return m[0]
        flag = _CLI_OPTIONS[name]
        if value is not None and value != "True":
            flag = f"{flag} {value.strip(chr(39) + chr(34))}"
        return ("use " if m["pass"] else "") + flag

    for call, command in _CLI_CALLS.items():
        text = text.replace(call, command)
    return _KEYWORD.sub(option, text)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = cli_words(str(e))
    return " ".join(text.split())
