"""References to images in a container registry (``docker://host[:port]/repo[:tag|@digest]``)
and the machine's architecture in the OCI spelling: what a pod's configuration checks before
anything is fetched.  A module of its own so that checking a reference loads none of the
registry client's HTTP and TLS modules (:mod:`cdimover.io.registry` uses these names).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["ImageRef", "parse_reference", "is_registry_url", "machine_arch", "DIGEST"]

_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")    # the digests pulled and checked
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def is_registry_url(text: object) -> bool:
    """Whether TEXT names an image in a registry (docker://...)."""
    return isinstance(text, str) and text.lower().startswith("docker://")


def machine_arch() -> str:
    """This machine's architecture in the OCI spelling (amd64, arm64, ...)."""
    m = platform.machine().lower()
    return _ARCHES.get(m, m)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """docker://REGISTRY/REPOSITORY[:TAG][@DIGEST]: a digest, when given, is what is pulled
    (the tag is then only a name)."""

    registry: str           # host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What the manifest request names: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageRef:
    """Parse a docker:// reference; ConfigurationError when malformed."""
    if not is_registry_url(text):
        raise ConfigurationError(f"{text!r}: not a docker:// image reference")
    rest = text[len("docker://"):]
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not DIGEST.fullmatch(digest):
            raise ConfigurationError(f"{text!r}: the digest must be sha256: and 64 hex digits")
    first, sep, remainder = rest.partition("/")
    if sep and (("." in first or ":" in first or first == "localhost" or first.startswith("["))):
        registry, path = first, remainder
    else:
        registry, path = "registry-1.docker.io", rest
        if "/" not in path:
            path = "library/" + path
    tag = None
    slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > slash:
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ConfigurationError(f"{text!r}: malformed tag {tag!r}")
    if not _HOST.fullmatch(registry):
        raise ConfigurationError(f"{text!r}: malformed registry host {registry!r}")
    if not path or not _NAME.fullmatch(path) or len(path) > 255:
        raise ConfigurationError(f"{text!r}: malformed repository name {path!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry=registry, repository=path, tag=tag, digest=digest)
