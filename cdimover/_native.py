"""The one module that touches cffi: loads the native core, checks its ABI version, owns the
context wrapper, the progress trampoline and the single translator from C return codes to
Python exceptions.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ._cdimover import ffi, lib  # type: ignore[import-not-found]
from .errors import (
    AuthenticationError,
    ChecksumMismatchError,
    CopyCancelled,
    HttpStatusError,
    ImageFormatError,
    NetworkError,
    ProtocolError,
    RemoteNotFoundError,
    SourceChangedError,
    TlsError,
    TargetTooSmallError,
    UnsafeImageError,
    UnsupportedImageError,
)

ABI_VERSION = 5
if lib.CDM_ABI_VERSION != ABI_VERSION:
    raise ImportError(
        f"cdimover's native core has ABI {lib.CDM_ABI_VERSION}, the Python layer expects "
        f"{ABI_VERSION}: rebuild the package (pip install .)")

__all__ = ["ffi", "lib", "Context", "check", "Probe", "LoopStatus", "ProgressFn", "NativeWriter",
           "StreamResult", "run_stream", "NativeStream", "NativeSource"]

ProgressFn = Callable[[int, int], object]

_LIB_ERRORS: dict[int, type[Exception]] = {
    lib.CDM_EFORMAT: ImageFormatError,
    lib.CDM_EUNSUPPORTED: UnsupportedImageError,
    lib.CDM_EUNSAFE: UnsafeImageError,
    lib.CDM_ETOOSMALL: TargetTooSmallError,
    lib.CDM_ECANCELED: CopyCancelled,
    lib.CDM_ETLS: TlsError,
    lib.CDM_ENETWORK: NetworkError,
    lib.CDM_EPROTOCOL: ProtocolError,
    lib.CDM_ECHANGED: SourceChangedError,
    lib.CDM_EDIGEST: ChecksumMismatchError,
}


def _http_error(msg: str) -> HttpStatusError:
    m = re.search(r"HTTP (\d{3})", msg)
    status = int(m.group(1)) if m else 0
    cls: type[HttpStatusError] = HttpStatusError
    if status in (401, 403, 407):
        cls = AuthenticationError
    elif status in (404, 410):
        cls = RemoteNotFoundError
    return cls(msg, status)

# Exceptions raised at the very entry of a callback (before its try:) land here, per thread.
_pending = threading.local()


@dataclass(frozen=True, slots=True)
class Probe:
    """Facts about an open file or block device."""

    size: int
    dev: int
    ino: int
    rdev: int
    blocks: int
    logical_sector: int
    physical_sector: int
    fs_block: int
    is_blockdev: bool
    is_regular: bool


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """LOOP_GET_STATUS64 of a loop device."""

    backing_dev: int
    backing_ino: int
    offset: int
    sizelimit: int
    flags: int


def _on_callback_error(exc_type: type[BaseException], exc: BaseException,
                       tb: TracebackType | None) -> int:
    _pending.exc = exc
    return 1


@ffi.def_extern(onerror=_on_callback_error)  # type: ignore[untyped-decorator]
def _cdm_progress_cb(opaque: Any, done: int, total: int) -> int:
    ctx: Context = ffi.from_handle(opaque)
    try:
        if ctx.progress is None:
            return 0
        return 1 if ctx.progress(done, total) else 0
    except BaseException as exc:  # noqa: BLE001 - stored, re-raised after the C call
        ctx.callback_error = exc
        return 1


@ffi.def_extern(onerror=_on_callback_error)  # type: ignore[untyped-decorator]
def _cdm_reauth_cb(opaque: Any, header: Any, cap: int) -> int:
    src: NativeSource = ffi.from_handle(opaque)
    try:
        assert src.reauth is not None
        line = src.reauth()
        if line is None:
            return 1
        data = line.encode("latin-1") + b"\0"
        if len(data) > cap:
            return 1
        ffi.memmove(header, data, len(data))
        return 0
    except BaseException as exc:  # noqa: BLE001 - stored, re-raised after the C call
        src.reauth_error = exc
        return 1


class Context:
    """An owned ``cdm_ctx``: one operation at a time, cancellable from any thread."""

    def __init__(self) -> None:
        out = ffi.new("cdm_ctx **")
        rc = lib.cdm_ctx_new(out)
        if rc < 0:
            raise MemoryError("cannot allocate a cdimover context")
        self._ptr = ffi.gc(out[0], lib.cdm_ctx_free)
        self._lock = threading.Lock()
        self._handle = ffi.new_handle(self)
        self.progress: ProgressFn | None = None
        self.callback_error: BaseException | None = None
        self.closed = False

    @property
    def ptr(self) -> Any:
        if self.closed:
            raise ValueError("the context is closed")
        return self._ptr

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            ffi.release(self._ptr)

    def cancel(self) -> None:
        """Ask the running operation to stop at its next request (any thread)."""
        if not self.closed:
            lib.cdm_ctx_cancel(self._ptr)

    def call(self, fn: Callable[..., int], *args: Any, progress: ProgressFn | None = None,
             paths: Sequence[str | None] = (None, None)) -> int:
        """Run the C function FN(ctx, *ARGS) holding this context exclusively; translate its
        result with check().  PATHS names the source and target for OSError."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a cdimover context runs one operation at a time")
        try:
            self.progress = progress
            self.callback_error = None
            _pending.exc = None
            if progress is not None:
                lib.cdm_ctx_set_progress(self.ptr, lib._cdm_progress_cb, self._handle)
            else:
                lib.cdm_ctx_set_progress(self.ptr, ffi.NULL, ffi.NULL)
            rc = fn(self.ptr, *args)
            stored = self.callback_error or getattr(_pending, "exc", None)
            if stored is not None and rc < 0:
                if not isinstance(stored, Exception):
                    raise stored  # KeyboardInterrupt, SystemExit: keep their meaning
                raise CopyCancelled(f"cancelled: {stored}") from stored
            return check(rc, self, paths)
        finally:
            self.progress = None
            lib.cdm_ctx_set_progress(self._ptr, ffi.NULL, ffi.NULL)
            self._lock.release()

    def message(self) -> str:
        return str(ffi.string(lib.cdm_ctx_errmsg(self.ptr)).decode(errors="replace"))

    def side(self) -> int:
        return int(lib.cdm_ctx_errside(self.ptr))


def check(rc: int, ctx: Context, paths: Sequence[str | None] = (None, None)) -> int:
    """Return RC if it is a success; otherwise raise the matching exception: a cdimover
    error for -CDM_E*, or OSError (with the path of the endpoint concerned) for -errno."""
    if rc >= 0:
        return rc
    err = -rc
    msg = ctx.message()
    if err in _LIB_ERRORS:
        raise _LIB_ERRORS[err](msg)
    if err == lib.CDM_EHTTP:
        raise _http_error(msg)
    side = ctx.side()
    path = None
    if side == lib.CDM_SIDE_SOURCE:
        path = paths[0]
    elif side == lib.CDM_SIDE_TARGET and len(paths) > 1:
        path = paths[1]
    elif len(set(paths)) == 1:
        path = paths[0]  # a call about one endpoint
    text = os.strerror(err)
    if msg:
        text = f"{text} ({msg})"
    raise OSError(err, text, path)


def probe(ctx: Context, fd: int, path: str | None = None) -> Probe:
    out = ffi.new("struct cdm_probe *")
    ctx.call(lib.cdm_probe_fd, fd, out, paths=(path, path))
    return Probe(size=out.size, dev=out.dev, ino=out.ino, rdev=out.rdev, blocks=out.blocks,
                 logical_sector=out.logical_sector, physical_sector=out.physical_sector,
                 fs_block=out.fs_block, is_blockdev=bool(out.is_blockdev),
                 is_regular=bool(out.is_regular))


def loop_status(ctx: Context, fd: int) -> LoopStatus | None:
    """The loop status of block device FD, or None when it is not an attached loop device."""
    out = ffi.new("struct cdm_loop_status *")
    rc = lib.cdm_loop_status(ctx.ptr, fd, out)
    if rc < 0:
        return None
    return LoopStatus(backing_dev=out.backing_dev, backing_ino=out.backing_ino,
                      offset=out.offset, sizelimit=out.sizelimit, flags=out.flags)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    buf = ffi.from_buffer(data)
    return bool(lib.cdm_is_zero(buf, len(buf)))


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of DATA, continued from CRC."""
    buf = ffi.from_buffer(data)
    return int(lib.cdm_crc32c(crc, buf, len(buf)))


_PEM_ROOM = 8192     # a P-256 certificate with a few names is under 1 KiB of PEM


def self_signed_cert(common_name: str, subject_alt_names: Sequence[str],
                     days: int) -> tuple[bytes, bytes]:
    """A new self-signed certificate (EC P-256, SHA-256) and its key: (certificate PEM,
    PKCS #8 key PEM).  SUBJECT_ALT_NAMES: entries such as "DNS:localhost" or "IP:::1"."""
    import ipaddress

    if not 1 <= len(common_name.encode()) <= 64:
        raise ValueError(f"common name {common_name!r}: 1 to 64 bytes")
    if not 1 <= days <= 36500:
        raise ValueError(f"{days} days of validity: 1 to 36500")
    for name in subject_alt_names:
        kind, _, value = name.partition(":")
        ok = kind in ("DNS", "IP") and value != "" and value.isascii() and "," not in value
        if ok and kind == "IP":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"subject alternative name {name!r}: expected DNS:name or "
                             "IP:address (ASCII, without commas)")
    cert, key = ffi.new("char[]", _PEM_ROOM), ffi.new("char[]", _PEM_ROOM)
    cert_len, key_len = ffi.new("size_t *", _PEM_ROOM), ffi.new("size_t *", _PEM_ROOM)
    try:
        with Context() as ctx:
            ctx.call(lib.cdm_self_signed_cert, common_name.encode(),
                     ",".join(subject_alt_names).encode(), days, cert, cert_len, key, key_len)
        return ffi.buffer(cert, cert_len[0])[:], ffi.buffer(key, key_len[0])[:]
    finally:
        ffi.memmove(key, bytes(_PEM_ROOM), _PEM_ROOM)


def new_stats() -> Any:
    return ffi.new("struct cdm_copy_stats *")


def new_copy_opts() -> Any:
    return ffi.new("struct cdm_copy_opts *")


def scan_extents(ctx: Context, fd: int, offset: int, length: int, *, map_offset: int = 0,
                 path: str | None = None, cap: int = 1024) -> list[tuple[int, int, bool]]:
    """All extents of [OFFSET, OFFSET+LENGTH) as (offset, length, is_data)."""
    out = ffi.new("struct cdm_extent[]", cap)
    n = ffi.new("size_t *")
    result: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    while pos < end:
        more = ctx.call(lib.cdm_scan_extents, fd, map_offset, pos, end - pos, out, cap, n,
                        paths=(path, path))
        for i in range(n[0]):
            e = out[i]
            result.append((e.offset, e.length, e.flags == lib.CDM_EXTENT_DATA))
        if not more or n[0] == 0:
            break
        pos = out[n[0] - 1].offset + out[n[0] - 1].length
    return result


def const(name: str) -> int:
    """The value of the core's constant NAME (an enum member or #define of cdimover.h)."""
    return int(getattr(lib, name))


def cstring(field: Any) -> str:
    """A NUL-terminated char array of a core struct as text (undecodable bytes escaped)."""
    return str(ffi.string(field).decode("utf-8", errors="surrogateescape"))


def run_copy(ctx: Context, src_fd: int, dst_fd: int, opts: Any, stats: Any, *,
             progress: ProgressFn | None, paths: Sequence[str | None]) -> None:
    """cdm_copy: the RAW copy job."""
    ctx.call(lib.cdm_copy, src_fd, dst_fd, opts, stats, progress=progress, paths=paths)


def run_qcow2_convert(ctx: Context, src_fd: int, dst_fd: int, opts: Any, stats: Any, *,
                      progress: ProgressFn | None, paths: Sequence[str | None]) -> None:
    """cdm_qcow2_convert: the QCOW2-to-RAW job."""
    ctx.call(lib.cdm_qcow2_convert, src_fd, dst_fd, opts, stats, progress=progress,
             paths=paths)


def reflink(ctx: Context, src_fd: int, dst_fd: int, paths: Sequence[str | None]) -> None:
    """cdm_reflink: share all of SRC_FD's extents with DST_FD (FICLONE), then sync."""
    ctx.call(lib.cdm_reflink, src_fd, dst_fd, paths=paths)


def preallocate(ctx: Context, fd: int, direct_fd: int, is_blockdev: bool, sector: int,
                offset: int, length: int, mode: int, stats: Any,
                paths: Sequence[str | None]) -> None:
    """cdm_preallocate over [OFFSET, OFFSET+LENGTH) of FD."""
    ctx.call(lib.cdm_preallocate, fd, direct_fd, int(is_blockdev), sector, offset, length,
             mode, stats, paths=paths)


def zero_range(ctx: Context, fd: int, is_blockdev: bool, sector: int, offset: int,
               length: int, stats: Any, paths: Sequence[str | None]) -> None:
    """cdm_zero_range: make [OFFSET, OFFSET+LENGTH) of FD read as zeros."""
    ctx.call(lib.cdm_zero_range, fd, int(is_blockdev), sector, offset, length, stats,
             paths=paths)


def qcow2_inspect(ctx: Context, fd: int, path: str) -> Any:
    """cdm_qcow2_inspect: the validated header of the QCOW2 image FD (a struct
    cdm_qcow2_info)."""
    out = ffi.new("struct cdm_qcow2_info *")
    ctx.call(lib.cdm_qcow2_inspect, fd, out, paths=(path, path))
    return out


class NativeWriter:
    """An owned ``cdm_writer``: bytes pushed at any offset onto an open target.  Every call
    holds CTX exclusively, as Context.call does, and raises through check()."""

    def __init__(self, ctx: Context, fd: int, direct_fd: int, *, size: int, sector: int,
                 is_blockdev: bool, sparse_size: int, flags: int, preallocation: int,
                 path: str | None) -> None:
        self._ctx = ctx
        self._path = path
        opts = ffi.new("struct cdm_writer_opts *")
        opts.size = size
        opts.sector = sector
        opts.sparse_size = sparse_size
        opts.flags = flags
        opts.is_blockdev = int(is_blockdev)
        opts.preallocation = preallocation
        out = ffi.new("cdm_writer **")
        ctx.call(lib.cdm_writer_open, fd, direct_fd, opts, out, paths=(None, path))
        self._ptr: Any = ffi.gc(out[0], lib.cdm_writer_free)

    def _run(self, fn: Callable[..., int], *args: Any) -> int:
        lock = self._ctx._lock
        if not lock.acquire(blocking=False):
            raise RuntimeError("a cdimover context runs one operation at a time")
        try:
            return check(fn(*args), self._ctx, (None, self._path))
        finally:
            lock.release()

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not view.contiguous:
            view = memoryview(view.tobytes())
        buf = ffi.from_buffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        self._run(lib.cdm_writer_put, self._ptr, buf, len(buf), offset)

    def zero(self, offset: int, length: int) -> None:
        self._run(lib.cdm_writer_zero, self._ptr, offset, length)

    def finish(self) -> Any:
        stats = new_stats()
        self._run(lib.cdm_writer_finish, self._ptr, stats)
        return stats

    def abort(self) -> None:
        self._run(lib.cdm_writer_abort, self._ptr)

    def free(self) -> None:
        ffi.release(self._ptr)


# ---- remote sources ----------------------------------------------------------------------

HASHES = {"": 0, "md5": 1, "sha1": 2, "sha256": 3, "sha512": 4}
FORMATS = {"auto": 0, "raw": 1, "qcow2": 2}
FORMAT_NAMES = {1: "raw", 2: "qcow2"}
COMPRESSIONS = {"auto": 0, "none": 1, "gzip": 2, "xz": 3, "zstd": 4}
COMPRESSION_NAMES = {1: "none", 2: "gzip", 3: "xz", 4: "zstd"}


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What is known of a remote source: from its first answer, and counters so far."""

    url: str
    size: int | None
    ranges: bool
    http_version: int
    etag: str
    last_modified: str
    content_type: str
    bytes_fetched: int
    requests: int
    retries: int
    restarts: int


@dataclass(frozen=True, slots=True)
class StreamResult:
    """What a stream decoded: bytes received and produced, the image found, the digest."""

    bytes_in: int
    bytes_out: int
    image_size: int
    peak_held: int
    format: str
    compression: str
    digest: bytes
    tar: TarResult | None = None     # a container layer (opts with tar_dir)


@dataclass(frozen=True, slots=True)
class TarResult:
    """What the tar stage saw in a container layer."""

    found: bool                 # the image came from MEMBER
    hidden: bool                # the layer hides lower layers' directory (whiteout, opaque)
    member: str                 # the image's path in the archive
    member_compression: str     # "none" | "gzip" | "xz" | "zstd" inside the member
    member_size: int
    entries: int
    names: tuple[str, ...]      # other entries under the directory ("x/" directories,
                                # ".wh.NAME" whiteouts; "..." ends a cut list)


def _stream_result(res: Any) -> StreamResult:
    tar = None
    if int(res.tar_entries) or int(res.tar_found) or int(res.tar_hidden):
        tar = TarResult(
            found=bool(res.tar_found), hidden=bool(res.tar_hidden),
            member=cstring(res.tar_member),
            member_compression=COMPRESSION_NAMES.get(int(res.tar_compression), "none"),
            member_size=int(res.tar_member_size), entries=int(res.tar_entries),
            names=tuple(n for n in cstring(res.tar_names).split("\n") if n))
    return StreamResult(
        bytes_in=int(res.bytes_in), bytes_out=int(res.bytes_out),
        image_size=int(res.image_size), peak_held=int(res.peak_held),
        format=FORMAT_NAMES.get(int(res.format), "raw"),
        compression=COMPRESSION_NAMES.get(int(res.compression), "none"),
        digest=bytes(ffi.buffer(res.digest, int(res.digest_len))), tar=tar)


# The strings a cdm_stream_opts points to live as long as it does.
_OPTS_STRINGS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def new_stream_opts(*, format: str = "auto", compression: str = "auto", hash: str = "",
                    mem_limit: int = 0, tar_dir: str | None = None,
                    tar_skip: Sequence[str] = (), expect_digest: bytes | None = None,
                    expect_size: int = 0) -> Any:
    """Options of a stream.  TAR_DIR: the stream is a container layer (a tar archive after
    COMPRESSION) whose single regular file directly under TAR_DIR is the image (FORMAT then
    applies to it); TAR_SKIP: names under TAR_DIR hidden by upper layers' whiteouts.
    EXPECT_DIGEST: the HASH digest the bytes must have (a mismatch is ChecksumMismatchError,
    also when the corrupted bytes failed to decode first); EXPECT_SIZE: their length."""
    opts = ffi.new("struct cdm_stream_opts *")
    opts.format = FORMATS[format]
    opts.compression = COMPRESSIONS[compression]
    opts.hash = HASHES[hash]
    opts.mem_limit = mem_limit
    keep: list[Any] = []
    if expect_digest is not None:
        if not hash:
            raise ValueError("an expected digest needs a hash")
        keep.append(ffi.new("uint8_t[]", expect_digest))
        opts.expect_digest = keep[-1]
        opts.expect_size = expect_size
    if tar_dir is not None:
        if any("\n" in n or "\0" in n for n in tar_skip) or "\0" in tar_dir:
            raise ValueError("names with a newline or NUL")
        names = [ffi.new("char[]", tar_dir.encode()),
                 ffi.new("char[]", "\n".join(tar_skip).encode())]
        opts.tar_dir, opts.tar_skip = names
        keep += names
    if keep:
        _OPTS_STRINGS[opts] = keep
    return opts


class NativeSource:
    """An owned ``cdm_source`` on an HTTP(S) URL, opened (first request made) at creation.
    Secrets are handed to the core in memory only, never through argv or the environment."""

    def __init__(self, ctx: Context, url: str, *, user: str | None = None,
                 password: str | None = None, ca_pem: str | None = None,
                 proxy_ca_pem: str | None = None, headers: Sequence[str] = (),
                 user_agent: str = "cdimover", insecure: bool = False,
                 no_ranges: bool = False, max_redirects: int = 10, retries: int = 5,
                 retry_delay_ms: int = 500, idle_timeout: int = 600,
                 connect_timeout: int = 30,
                 reauth: Callable[[], str | None] | None = None) -> None:
        """REAUTH: called when a request of a stream is answered 401 (an expired token): a
        new header line ("Authorization: Bearer ...") replacing the extra header of that
        name, or None to keep the 401; what it raises ends the stream."""
        self.url = url
        self.reauth = reauth
        self.reauth_error: BaseException | None = None
        self._handle = ffi.new_handle(self) if reauth is not None else ffi.NULL
        keep: list[Any] = []

        def cstr(s: str | None) -> Any:
            if s is None:
                return ffi.NULL
            b = ffi.new("char[]", s.encode())
            keep.append(b)
            return b

        opts = ffi.new("struct cdm_http_opts *")
        opts.url = cstr(url)
        opts.user = cstr(user)
        opts.password = cstr(password)
        opts.ca_pem = cstr(ca_pem)
        opts.proxy_ca_pem = cstr(proxy_ca_pem)
        opts.headers = cstr("\n".join(headers)) if headers else ffi.NULL
        opts.user_agent = cstr(user_agent)
        opts.flags = ((lib.CDM_HTTP_INSECURE if insecure else 0) |
                      (lib.CDM_HTTP_NO_RANGES if no_ranges else 0))
        opts.max_redirects = max_redirects
        opts.retries = retries
        opts.retry_delay_ms = retry_delay_ms
        opts.idle_timeout = idle_timeout
        opts.connect_timeout = connect_timeout
        if reauth is not None:
            opts.reauth = lib._cdm_reauth_cb
            opts.reauth_opaque = self._handle
        out = ffi.new("cdm_source **")
        try:
            ctx.call(lib.cdm_http_open, opts, out)
        finally:
            for b in keep:      # the core keeps its own copies: wipe ours
                ffi.memmove(b, b"\0" * len(b), len(b))
        self._ptr: Any = ffi.gc(out[0], lib.cdm_source_free)

    def info(self) -> SourceInfo:
        i = ffi.new("struct cdm_source_info *")
        lib.cdm_source_info(self._ptr, i)
        return SourceInfo(
            url=cstring(i.url), size=int(i.size) if i.size_known else None,
            ranges=bool(i.ranges), http_version=int(i.http_version), etag=cstring(i.etag),
            last_modified=cstring(i.last_modified), content_type=cstring(i.content_type),
            bytes_fetched=int(i.bytes_fetched), requests=int(i.requests),
            retries=int(i.retries), restarts=int(i.restarts))

    def pread(self, ctx: Context, length: int, offset: int) -> bytes:
        buf = ffi.new("uint8_t[]", max(length, 1))
        ctx.call(lib.cdm_source_pread, self._ptr, buf, length, offset, paths=(self.url,))
        return bytes(ffi.buffer(buf, length))

    def qcow2_inspect(self, ctx: Context) -> Any:
        out = ffi.new("struct cdm_qcow2_info *")
        ctx.call(lib.cdm_source_qcow2_inspect, self._ptr, out, paths=(self.url,))
        return out

    def copy(self, ctx: Context, dst_fd: int, opts: Any, stats: Any, *, hash: str = "",
             progress: ProgressFn | None = None,
             paths: Sequence[str | None] = (None, None)) -> StreamResult:
        res = ffi.new("struct cdm_stream_result *")
        ctx.call(lib.cdm_source_copy, self._ptr, dst_fd, opts, HASHES[hash], stats, res,
                 progress=progress, paths=paths)
        return _stream_result(res)

    def qcow2_convert(self, ctx: Context, dst_fd: int, opts: Any, stats: Any, *,
                      progress: ProgressFn | None = None,
                      paths: Sequence[str | None] = (None, None)) -> None:
        ctx.call(lib.cdm_source_qcow2_convert, self._ptr, dst_fd, opts, stats,
                 progress=progress, paths=paths)

    def stream(self, ctx: Context, writer: NativeWriter, opts: Any, *,
               progress: ProgressFn | None = None,
               paths: Sequence[str | None] = (None, None)) -> StreamResult:
        res = ffi.new("struct cdm_stream_result *")
        self.reauth_error = None
        try:
            ctx.call(lib.cdm_source_stream, self._ptr, writer._ptr, opts, res,
                     progress=progress, paths=paths)
        except Exception:
            if self.reauth_error is not None:
                raise self.reauth_error from None   # why new credentials were not had
            raise
        return _stream_result(res)

    def free(self) -> None:
        ffi.release(self._ptr)
def run_stream(ctx: Context, src_fd: int, writer: NativeWriter, *, format: int = 0,
               compression: int = 0, hash: int = 0, mem_limit: int = 0,
               progress: ProgressFn | None = None, path: str | None = None) -> StreamResult:
    """cdm_stream_fd: read SRC_FD (a file or a pipe) to its end and decode it onto WRITER,
    which stays open (the caller finishes or aborts it).  FORMAT, COMPRESSION and HASH are
    CDM_FORMAT_*, CDM_COMPRESSION_* and CDM_HASH_* (0: detect, detect, none); MEM_LIMIT bounds
    a QCOW2 conversion (0: the core's default).  PATH names the source in errors; PROGRESS
    receives (bytes read, 0) now and then."""
    opts = ffi.new("struct cdm_stream_opts *")
    opts.format = format
    opts.compression = compression
    opts.hash = hash
    opts.mem_limit = mem_limit
    res = ffi.new("struct cdm_stream_result *")
    wlock = writer._ctx._lock if writer._ctx is not ctx else None
    if wlock is not None and not wlock.acquire(blocking=False):
        raise RuntimeError("a cdimover context runs one operation at a time")
    try:
        ctx.call(lib.cdm_stream_fd, src_fd, writer._ptr, opts, res, progress=progress,
                 paths=(path, writer._path))
    finally:
        if wlock is not None:
            wlock.release()
    return _stream_result(res)


class NativeStream:
    """An owned ``cdm_stream``: bytes pushed in order (a request body) decoded onto WRITER as
    cdm_stream_fd decodes a descriptor.  Every call holds CTX, and WRITER's context when it is
    another one."""

    def __init__(self, ctx: Context, writer: NativeWriter, opts: Any, *,
                 path: str | None = None) -> None:
        self._ctx = ctx
        self._writer = writer
        self._paths = (path, writer._path)
        out = ffi.new("cdm_stream **")
        self._run(lib.cdm_stream_open, ctx.ptr, writer._ptr, opts, out)
        self._ptr: Any = ffi.gc(out[0], lib.cdm_stream_free)

    def _run(self, fn: Callable[..., int], *args: Any) -> int:
        locks = [self._ctx._lock]
        if self._writer._ctx is not self._ctx:
            locks.append(self._writer._ctx._lock)
        taken: list[threading.Lock] = []
        try:
            for lock in locks:
                if not lock.acquire(blocking=False):
                    raise RuntimeError("a cdimover context runs one operation at a time")
                taken.append(lock)
            return check(fn(*args), self._ctx, self._paths)
        finally:
            for lock in taken:
                lock.release()

    def push(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not view.contiguous or view.format != "B" or view.ndim != 1:
            view = memoryview(view.tobytes())
        buf = ffi.from_buffer(view)
        self._run(lib.cdm_stream_push, self._ptr, buf, len(buf))

    @property
    def bytes_in(self) -> int:
        return int(lib.cdm_stream_bytes_in(self._ptr))

    def finish(self) -> StreamResult:
        res = ffi.new("struct cdm_stream_result *")
        self._run(lib.cdm_stream_finish, self._ptr, res)
        return _stream_result(res)

    def free(self) -> None:
        ffi.release(self._ptr)
