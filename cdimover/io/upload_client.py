"""A client for CDI's upload API (the upload part of ``virtctl image-upload``): one file sent
as the body of ``POST /v1beta1/upload`` (or ``-async``), streamed from disk in 1 MiB reads
through Python's ``http.client`` -- the memory held is one read, whatever the file's size.

- ``Authorization: Bearer TOKEN`` when a token is given (the upload proxy's JWT);
- TLS verified against the system's CAs or ``ca``, or not at all with ``insecure``; a client
  certificate (``cert``/``key``) for talking to an upload pod directly;
- ``use_async``: ``HEAD`` on the async route first, as virtctl does, and the async route when
  it answers 200;
- retries: a refused or reset connection, a connection that broke mid-body, or an answer 502,
  503 or 504 (the upload pod not ready yet, or busy) is retried after 1, 2, 4... seconds (at
  most 30) up to ``retries`` times.  CDI's upload server cannot resume an upload, so every
  attempt sends the file again from byte 0, and says so.  Any other answer is final.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final

from ..errors import HttpStatusError, NetworkError

__all__ = ["UploadResult", "upload_file", "tls_context", "upload_path"]

log = logging.getLogger("cdimover")

BLOCK: Final = 1 << 20
SYNC_PATH: Final = "/v1beta1/upload"
ASYNC_PATH: Final = "/v1beta1/upload-async"
_RETRY_STATUS: Final = (502, 503, 504)
_MAX_DELAY: Final = 30.0


@dataclass(frozen=True, slots=True)
class UploadResult:
    """One upload: where it went, the bytes of the file, the answer, attempts, seconds."""

    url: str
    size: int
    status: int
    body: str
    attempts: int
    used_async: bool
    elapsed: float


def tls_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None,
                insecure: bool = False) -> ssl.SSLContext:
    """TLS for the upload: CA (a PEM bundle; default the system's), a client CERT and KEY,
    INSECURE (no verification at all)."""
    ctx = ssl.create_default_context(cafile=ca)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def upload_path(url: str) -> tuple[urllib.parse.SplitResult, str]:
    """URL split, and the route it names: its own path when it has one, else the sync
    upload route (an upload proxy's or upload pod's base URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    path = parts.path.rstrip("/") or SYNC_PATH
    if parts.query:
        path += "?" + parts.query
    return parts, path


class _Counted:
    """FILE's read(), reporting the bytes read so far to PROGRESS."""

    def __init__(self, f: BinaryIO, size: int, progress: Callable[[int, int], None] | None):
        self._f = f
        self._size = size
        self._progress = progress
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(BLOCK if n < 0 else min(n, BLOCK))
        self.done += len(data)
        if self._progress is not None:
            self._progress(self.done, self._size)
        return data


class _Retry(Exception):
    """An attempt that may be repeated."""


def upload_file(path: str, url: str, *, token: str | None = None,
                context: ssl.SSLContext | None = None, use_async: bool = False,
                retries: int = 5, timeout: float = 600.0,
                progress: Callable[[int, int], None] | None = None,
                say: Callable[[str], None] = log.warning) -> UploadResult:
    """Send the file PATH to URL (see the module docstring).  SAY receives each retry's
    reason.  Returns the final answer's status and text for a 2xx; HttpStatusError for
    another answer, NetworkError when the connection failed on the last attempt."""
    parts, route = upload_path(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    host = parts.hostname or ""
    size = os.stat(path).st_size
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def connect() -> http.client.HTTPConnection:
        if https:
            ctx = context or tls_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ctx, blocksize=BLOCK)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout, blocksize=BLOCK)
        return conn

    def attempt(method: str, target: str, body: _Counted | None) -> tuple[int, str]:
        conn = connect()
        try:
            h = headers if body is not None else {k: v for k, v in headers.items()
                                                   if k == "Authorization"}
            conn.request(method, target, body=body, headers=h)
            r = conn.getresponse()
            text = r.read(1 << 16).decode("utf-8", "replace")
            return r.status, text
        except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        except ssl.SSLError:
            raise
        except OSError as e:
            raise _Retry(f"{e.strerror or e}") from None
        finally:
            conn.close()

    start = time.monotonic()
    tries = 0
    delay = 1.0
    used_async = False
    while True:
        tries += 1
        try:
            target = route
            used_async = False
            if use_async and route.split("?")[0] == SYNC_PATH:
                status, _ = attempt("HEAD", ASYNC_PATH, None)
                if status == 200:
                    target, used_async = ASYNC_PATH, True
                elif status in _RETRY_STATUS:
                    raise _Retry(f"HEAD answered {status}")
                else:
                    say(f"the server has no async route (HEAD answered {status}): "
                        f"using {route}")
            with open(path, "rb") as f:
                body = _Counted(f, size, progress)
                status, text = attempt("POST", target, body)
            if status in _RETRY_STATUS:
                raise _Retry(f"the server answered {status} {text.strip()}".rstrip())
        except _Retry as e:
            if tries > retries:
                raise NetworkError(f"upload to {url} failed after {tries} attempts: {e}") \
                    from None
            say(f"attempt {tries} failed ({e}); sending the whole file again from byte 0 in "
                f"{delay:g} s (the upload server cannot resume)")
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)
            continue
        if not 200 <= status < 300:
            raise HttpStatusError(f"upload to {url} refused: {status} {text.strip()}", status)
        return UploadResult(url=f"{parts.scheme}://{parts.netloc}{target}", size=size,
                            status=status, body=text, attempts=tries, used_async=used_async,
                            elapsed=time.monotonic() - start)
