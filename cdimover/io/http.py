"""HTTP(S) sources: what to fetch and how (credentials, trusted CAs, extra headers, retries),
opened by the native core's libcurl source.

Secrets (the password, extra headers) stay in memory: they are handed to the core directly,
never put in argv or the environment, and left out of repr() and every message.  A custom CA
adds to the system's trusted certificates, as CDI's importer does.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .._native import Context, NativeSource
from ..errors import ConfigurationError

__all__ = ["HttpSource", "read_ca_bundle", "is_url", "user_agent"]


def user_agent() -> str:
    """What cdimover's requests send as User-Agent: cdimover/VERSION (the package's own
    __version__: reading the installed metadata costs an import of importlib.metadata,
    zipfile and csv, 8 ms of a cold start)."""
    from .. import __version__
    return f"cdimover/{__version__}"

_CA_SUFFIXES = (".crt", ".pem", ".cer")
MAX_CA_BYTES = 16 << 20


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether TEXT names an http:// or https:// source."""
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def read_ca_bundle(path: str | os.PathLike[str]) -> str:
    """The PEM certificates of PATH: one file, or every *.crt, *.pem and *.cer file of a
    directory (CDI mounts the CA ConfigMap as a directory).  ConfigurationError when there is
    none or it holds no certificate."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.suffix.lower() in _CA_SUFFIXES and f.is_file())
    else:
        files = [p]
    texts: list[str] = []
    total = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ConfigurationError(f"{f}: cannot read the CA certificate: "
                                     f"{e.strerror}") from None
        total += len(data)
        if total > MAX_CA_BYTES:
            raise ConfigurationError(f"{path}: CA certificates larger than 16 MiB")
        texts.append(data.decode("ascii", errors="replace"))
    bundle = "\n".join(texts)
    if "-----BEGIN CERTIFICATE-----" not in bundle:
        raise ConfigurationError(f"{path}: no PEM certificate found")
    return bundle


@dataclass(frozen=True)
class HttpSource:
    """An image at an http:// or https:// URL.

    - AUTH: (user, password) for basic auth; credentials inside the URL are taken out of it.
    - CA: a PEM file or a directory of them, trusted besides the system's certificates;
      INSECURE skips verification.  PROXY_CA: the same for an HTTPS proxy (the proxy itself
      comes from http_proxy / https_proxy / no_proxy, as for curl).
    - HEADERS: extra request headers, "Name: value" each; sent only to the URL's origin.
    - RETRIES, RETRY_DELAY: a failed request is repeated that many times from the last byte
      received, the pause doubling from RETRY_DELAY seconds.  IDLE_TIMEOUT: seconds below
      1 KiB/s before a request is given up.
    - NO_RANGES: read the file in one sequential stream even if ranges are served.
    """

    url: str
    auth: tuple[str, str] | None = field(default=None, repr=False)
    ca: str | None = None
    insecure: bool = False
    headers: tuple[str, ...] = field(default=(), repr=False)
    proxy_ca: str | None = None
    retries: int = 5
    retry_delay: float = 0.5
    idle_timeout: int = 600
    connect_timeout: int = 30
    max_redirects: int = 10
    no_ranges: bool = False

    def __post_init__(self) -> None:
        if not is_url(self.url):
            raise ConfigurationError(f"not an http:// or https:// URL: {self.display_url}")
        parts = urllib.parse.urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"
            object.__setattr__(self, "url", urllib.parse.urlunsplit(parts._replace(netloc=host)))
            if self.auth is None:
                object.__setattr__(self, "auth", (user, password))
        for h in self.headers:
            name, sep, _ = h.partition(":")
            if not sep or not name.strip() or "\n" in h or "\r" in h:
                raise ConfigurationError("an extra header is not of the form 'Name: value'")
        for name in ("retries", "idle_timeout", "connect_timeout", "max_redirects"):
            value = getattr(self, name)
            if not 0 <= value <= 1_000_000:
                raise ConfigurationError(f"{name}={value}: out of range")
        if not 0 <= self.retry_delay <= 3600:
            raise ConfigurationError(f"retry_delay={self.retry_delay}: out of range")

    @property
    def display_url(self) -> str:
        """The URL without user information, query or fragment (for messages and logs: a
        signed URL's query is a secret too)."""
        try:
            parts = urllib.parse.urlsplit(self.url)
        except ValueError:
            return "<unparsable URL>"
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))

    def open(self, ctx: Context) -> NativeSource:
        """Make the first request (size, ranges, validators, first bytes)."""
        user, password = self.auth if self.auth is not None else (None, None)
        return NativeSource(
            ctx, self.url, user=user, password=password,
            ca_pem=read_ca_bundle(self.ca) if self.ca else None,
            proxy_ca_pem=read_ca_bundle(self.proxy_ca) if self.proxy_ca else None,
            headers=self.headers, user_agent=user_agent(),
            insecure=self.insecure, no_ranges=self.no_ranges,
            max_redirects=self.max_redirects, retries=self.retries,
            retry_delay_ms=int(self.retry_delay * 1000), idle_timeout=self.idle_timeout,
            connect_timeout=self.connect_timeout)
