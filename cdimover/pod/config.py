"""A pod's configuration: the environment variables CDI sets for its clone and import pods,
read and checked before anything is written.  A missing or malformed variable is a
:class:`~cdimover.errors.ConfigurationError` naming it."""

from __future__ import annotations

import datetime
import os
import ssl
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from ..checksum import Checksum
from ..errors import ConfigurationError
from ..io.http import HttpSource, is_url
from ..io.imageref import is_registry_url, parse_reference
from ..sizing import DEFAULT_OVERHEAD, parse_overhead, parse_quantity

__all__ = ["Checksum", "CloneConfig", "ImportConfig", "RegistrySource", "UploadConfig",
           "clone_config", "import_config", "upload_config", "BLOCK_VOLUME", "DATA_DIR", "UPLOAD_DESTINATION",
           "SCRATCH_DIR", "get_env"]

BLOCK_VOLUME: Final = "/dev/cdi-block-volume"
DATA_DIR: Final = "/data"
UPLOAD_DESTINATION: Final = "/data/disk.img"
"""CDI's upload server writes here unless DESTINATION says otherwise."""
SCRATCH_DIR: Final = "/scratch"
"""CDI's scratch volume, when the pod has one."""


@dataclass(frozen=True, slots=True)
class CloneConfig:
    """A clone pod's configuration (see the module docstring for the variables)."""

    volume_mode: Literal["block", "filesystem"]
    mount_point: str
    destination: str
    preallocation: bool
    owner_uid: str
    filesystem_overhead: str
    image_size: int | None


@dataclass(frozen=True, slots=True)
class ImportConfig:
    """An import pod's configuration (see the module docstring for the variables)."""

    endpoint: str
    content_type: Literal["kubevirt", "archive"]
    destination: str
    preallocation: bool
    owner_uid: str
    filesystem_overhead: str
    image_size: int | None
    checksum: Checksum | None
    http: HttpSource | None = None      # IMPORTER_SOURCE=http: the remote image
    registry: RegistrySource | None = None  # IMPORTER_SOURCE=registry: the containerDisk
    scratch_dir: str | None = None      # SCRATCH_DIR (default /scratch) when it exists


@dataclass(frozen=True, slots=True)
class RegistrySource:
    """IMPORTER_SOURCE=registry: the containerDisk image and how to reach its registry."""

    image: str                          # docker://host/repo:tag or @sha256:...
    auth: tuple[str, str] | None = field(default=None, repr=False)
    ca: str | None = None               # IMPORTER_CERT_DIR
    proxy_ca: str | None = None         # IMPORTER_PROXY_CERT_DIR or /proxycerts
    insecure_tls: bool = False          # INSECURE_TLS
    insecure_registries: tuple[str, ...] = ()   # CDIMOVER_INSECURE_REGISTRIES: plain HTTP
    arch: str | None = None             # IMPORTER_REGISTRY_IMAGE_ARCHITECTURE


def get_env(env: Mapping[str, str], name: str, *, required: bool = False,
         hint: str = "") -> str | None:
    """ENV[NAME] without surrounding whitespace; None when unset or empty, which is a
    ConfigurationError when REQUIRED (HINT says what is expected)."""
    value = env.get(name, "").strip()
    if value:
        return value
    if required:
        raise ConfigurationError(f"{name}: not set{f' (expected {hint})' if hint else ''}")
    return None


def _bool(env: Mapping[str, str], name: str, *, required: bool) -> bool:
    """ENV[NAME] as ``true`` or ``false`` (False when unset and not REQUIRED)."""
    value = get_env(env, name, required=required, hint="true or false")
    if value is None:
        return False
    if value not in ("true", "false"):
        raise ConfigurationError(f"{name}: {value!r} is not 'true' or 'false'")
    return value == "true"


def _overhead(env: Mapping[str, str]) -> str:
    """FILESYSTEM_OVERHEAD, checked, as given (default 0.06)."""
    value = get_env(env, "FILESYSTEM_OVERHEAD") or str(DEFAULT_OVERHEAD)
    try:
        parse_overhead(value)
    except ValueError as e:
        raise ConfigurationError(f"FILESYSTEM_OVERHEAD: {e}") from None
    return value


def _quantity(env: Mapping[str, str], name: str) -> int | None:
    """ENV[NAME] as a Kubernetes quantity in bytes, None when unset."""
    value = get_env(env, name)
    if value is None:
        return None
    try:
        return parse_quantity(value)
    except ValueError as e:
        raise ConfigurationError(f"{name}: {e}") from None


def _checksum(env: Mapping[str, str]) -> Checksum | None:
    """IMPORTER_CHECKSUM as ALGORITHM:HEX, None when unset."""
    value = get_env(env, "IMPORTER_CHECKSUM")
    if value is None:
        return None
    try:
        return Checksum.parse(value)
    except ValueError as e:
        raise ConfigurationError(f"IMPORTER_CHECKSUM: {e}") from None


def _default_destination() -> str:
    """The volume CDI mounts: the block device when present, else the directory."""
    if os.path.exists(BLOCK_VOLUME):
        return BLOCK_VOLUME
    if os.path.isdir(DATA_DIR):
        return DATA_DIR
    raise ConfigurationError(f"DESTINATION: not set, and neither {BLOCK_VOLUME} nor "
                             f"{DATA_DIR} exists")


def _volume_path(path: str, name: str) -> str:
    """The volume PATH names (variable NAME): a directory or a block device; a path ending in
    ``/disk.img`` whose directory exists names that directory.  No symbolic link is followed
    at the end of PATH (nor at ``disk.img``): a tenant's link must not redirect the job."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise ConfigurationError(f"{name}: {path} is a symbolic link, which is never followed")
    if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return path
    parent = os.path.dirname(path.rstrip("/"))
    if os.path.basename(path.rstrip("/")) == "disk.img" and parent and (
            st is None or stat.S_ISREG(st.st_mode)):
        try:
            pst = os.lstat(parent)
        except FileNotFoundError:
            pst = None
        if pst is not None and stat.S_ISLNK(pst.st_mode):
            raise ConfigurationError(f"{name}: {parent} is a symbolic link, which is never "
                                     f"followed")
        if pst is not None and stat.S_ISDIR(pst.st_mode):
            return parent
    what = "does not exist" if st is None else "is neither a directory nor a block device"
    raise ConfigurationError(f"{name}: {path} {what}")


def source_volume(env: Mapping[str, str], mount_point: str | None = None
                  ) -> tuple[Literal["block", "filesystem"], str]:
    """VOLUME_MODE and MOUNT_POINT (or the MOUNT_POINT given) of a clone's source, checked:
    a block device or a directory as the mode says, never a symbolic link."""
    mode = (get_env(env, "VOLUME_MODE", required=True, hint="block or filesystem") or "").lower()
    if mode not in ("block", "filesystem"):
        raise ConfigurationError(f"VOLUME_MODE: {mode!r} is not 'block' or 'filesystem'")
    volume_mode: Literal["block", "filesystem"] = "block" if mode == "block" else "filesystem"
    source = mount_point or get_env(env, "MOUNT_POINT", required=True,
                                 hint="the source volume's path")
    assert source is not None
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise ConfigurationError(f"MOUNT_POINT: {source} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigurationError(f"MOUNT_POINT: {source} is a symbolic link, which is never "
                                 f"followed")
    if volume_mode == "block" and not stat.S_ISBLK(st.st_mode):
        raise ConfigurationError(f"MOUNT_POINT: {source} is not a block device, but "
                                 f"VOLUME_MODE is block")
    if volume_mode == "filesystem" and not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"MOUNT_POINT: {source} is not a directory, but "
                                 f"VOLUME_MODE is filesystem")
    return volume_mode, source


def clone_config(env: Mapping[str, str], *, mount_point: str | None = None,
                 destination: str | None = None) -> CloneConfig:
    """Read a clone pod's configuration from ENV; MOUNT_POINT and DESTINATION override the
    variables of those names.  ConfigurationError naming the variable at fault."""
    volume_mode, source = source_volume(env, mount_point)
    preallocation = _bool(env, "PREALLOCATION", required=True)
    owner = get_env(env, "OWNER_UID", required=True, hint="the owner's UID, the metric's label")
    assert owner is not None
    overhead = _overhead(env)
    size = _quantity(env, "UPLOAD_IMAGE_SIZE")
    dest = destination or get_env(env, "DESTINATION") or _default_destination()
    return CloneConfig(volume_mode=volume_mode, mount_point=source,
                       destination=_volume_path(dest, "DESTINATION"),
                       preallocation=preallocation, owner_uid=owner,
                       filesystem_overhead=overhead, image_size=size)


def _endpoint_path(value: str) -> str:
    """The local path of IMPORTER_ENDPOINT VALUE: a path, or a ``file://`` URL."""
    if "://" not in value:
        return value
    url = urllib.parse.urlsplit(value)
    if url.scheme.lower() != "file":
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: the {url.scheme!r} scheme is "
                                 f"not supported yet (a local path or a file:// URL)")
    if url.netloc not in ("", "localhost"):
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: a file:// URL names a local "
                                 f"file (no host)")
    path = urllib.parse.unquote(url.path)
    if not path:
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r} has no path")
    return path


EXTRA_HEADERS_DIR: Final = "/extraheaders"
PROXY_CERT_DIR: Final = "/proxycerts"


def _extra_headers(env: Mapping[str, str], headers_dir: str) -> tuple[str, ...]:
    """IMPORTER_EXTRA_HEADER_<n> in order of N, then one header per file under HEADERS_DIR
    (CDI mounts each secret of secretExtraHeaders there)."""
    found: list[tuple[int, str]] = []
    for name, value in env.items():
        if name.startswith("IMPORTER_EXTRA_HEADER_"):
            suffix = name[len("IMPORTER_EXTRA_HEADER_"):]
            if not suffix.isdigit():
                raise ConfigurationError(f"{name}: expected IMPORTER_EXTRA_HEADER_<number>")
            found.append((int(suffix), value))
    headers = [v for _, v in sorted(found)]
    if os.path.isdir(headers_dir):
        for root, dirs, files in os.walk(headers_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
            for f in sorted(files):
                if f.startswith("."):
                    continue        # the projected volume's ..data bookkeeping
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    text = fh.read(64 << 10).strip()
                if text:
                    headers.append(text)
    for h in headers:
        name, sep, _ = h.partition(":")
        if not sep or not name.strip():
            raise ConfigurationError("an extra header is not of the form 'Name: value' "
                                     "(IMPORTER_EXTRA_HEADER_<n> or /extraheaders)")
    return tuple(headers)


@dataclass(frozen=True, slots=True)
class _Trust:
    """What HTTP and registry sources share: credentials, CAs, INSECURE_TLS."""

    auth: tuple[str, str] | None
    cert_dir: str | None
    proxy_dir: str | None
    insecure: bool


def _trust(env: Mapping[str, str]) -> _Trust:
    """Basic credentials (IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY), the CA directory
    (IMPORTER_CERT_DIR), the proxy's CA (IMPORTER_PROXY_CERT_DIR, or /proxycerts when it holds
    certificates) and INSECURE_TLS."""
    user = get_env(env, "IMPORTER_ACCESS_KEY_ID")
    secret = env.get("IMPORTER_SECRET_KEY", "")
    cert_dir = get_env(env, "IMPORTER_CERT_DIR")
    if cert_dir is not None and not os.path.isdir(cert_dir):
        raise ConfigurationError(f"IMPORTER_CERT_DIR: {cert_dir} is not a directory")
    proxy_dir = get_env(env, "IMPORTER_PROXY_CERT_DIR")
    if proxy_dir is None and os.path.isdir(PROXY_CERT_DIR) and any(
            f.endswith((".crt", ".pem")) for f in os.listdir(PROXY_CERT_DIR)):
        proxy_dir = PROXY_CERT_DIR
    return _Trust(auth=(user, secret) if user else None, cert_dir=cert_dir,
                  proxy_dir=proxy_dir, insecure=_bool(env, "INSECURE_TLS", required=False))


def _registry_source(env: Mapping[str, str], image: str) -> RegistrySource:
    """IMPORTER_SOURCE=registry: the image IMPORTER_ENDPOINT names, with the trust of
    :func:`_trust`, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE (default this machine's) and
    CDIMOVER_INSECURE_REGISTRIES (host[:port] reached over plain HTTP, comma-separated)."""
    try:
        ref = parse_reference(image)
    except ConfigurationError as e:
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {e}") from None
    trust = _trust(env)
    insecure = tuple(h.strip() for h in env.get("CDIMOVER_INSECURE_REGISTRIES", "").split(",")
                     if h.strip())
    return RegistrySource(image=str(ref), auth=trust.auth, ca=trust.cert_dir,
                          proxy_ca=trust.proxy_dir, insecure_tls=trust.insecure,
                          insecure_registries=insecure,
                          arch=get_env(env, "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE"))


def _http_source(env: Mapping[str, str], url: str) -> HttpSource:
    """IMPORTER_SOURCE=http: the URL with the trust of :func:`_trust`, extra headers and
    IMPORTER_IDLE_TIMEOUT (seconds, default 600)."""
    trust = _trust(env)
    idle = get_env(env, "IMPORTER_IDLE_TIMEOUT")
    try:
        idle_timeout = int(idle) if idle is not None else 600
        if not 1 <= idle_timeout <= 7 * 24 * 3600:
            raise ValueError
    except ValueError:
        raise ConfigurationError(f"IMPORTER_IDLE_TIMEOUT: {idle!r} is not a number of seconds "
                                 "from 1 to 604800") from None
    headers_dir = get_env(env, "IMPORTER_EXTRA_HEADERS_DIR") or EXTRA_HEADERS_DIR
    try:
        return HttpSource(url, auth=trust.auth, ca=trust.cert_dir, insecure=trust.insecure,
                          headers=_extra_headers(env, headers_dir), proxy_ca=trust.proxy_dir,
                          idle_timeout=idle_timeout)
    except ConfigurationError as e:
        raise ConfigurationError(f"IMPORTER_ENDPOINT: {e}") from None


def _scratch_dir(env: Mapping[str, str]) -> str | None:
    """The scratch volume, SCRATCH_DIR (default /scratch), when the pod has it."""
    scratch = get_env(env, "SCRATCH_DIR") or SCRATCH_DIR
    return scratch if os.path.isdir(scratch) else None


def import_config(env: Mapping[str, str], *, endpoint: str | None = None,
                  destination: str | None = None) -> ImportConfig:
    """Read an import pod's configuration from ENV; ENDPOINT and DESTINATION override the
    variables IMPORTER_ENDPOINT and DESTINATION.  ConfigurationError naming the variable."""
    value = endpoint or get_env(env, "IMPORTER_ENDPOINT", required=True,
                             hint="a local path, a file:// URL, an http(s):// URL or a "
                             "docker:// image")
    assert value is not None
    kind = (get_env(env, "IMPORTER_SOURCE") or "").lower()
    http = None
    registry = None
    if kind == "registry" or (kind == "" and is_registry_url(value)):
        if not is_registry_url(value):
            raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: IMPORTER_SOURCE=registry "
                                     "needs a docker://host/repository[:tag|@sha256:...] image")
        registry = _registry_source(env, value)
        path = registry.image
    elif kind == "http" or (kind in ("", "file") and is_url(value)):
        if not is_url(value):
            raise ConfigurationError(f"IMPORTER_ENDPOINT: {value!r}: IMPORTER_SOURCE=http "
                                     "needs an http:// or https:// URL")
        http = _http_source(env, value)
        path = http.display_url
    elif kind not in ("", "file"):
        raise ConfigurationError(f"IMPORTER_SOURCE: {kind!r} is not supported (http, "
                                 "registry, or a local file)")
    else:
        path = _endpoint_path(value)
    content = get_env(env, "IMPORTER_CONTENTTYPE") or "kubevirt"
    if content not in ("kubevirt", "archive"):
        raise ConfigurationError(f"IMPORTER_CONTENTTYPE: {content!r} is not 'kubevirt' or "
                                 f"'archive'")
    content_type: Literal["kubevirt", "archive"] = \
        "archive" if content == "archive" else "kubevirt"
    size = _quantity(env, "IMPORTER_IMAGE_SIZE")
    checksum = _checksum(env)
    preallocation = _bool(env, "PREALLOCATION", required=False)
    overhead = _overhead(env)
    owner = get_env(env, "OWNER_UID") or ""
    dest = _volume_path(destination or get_env(env, "DESTINATION") or _default_destination(),
                        "DESTINATION")
    if content_type == "archive" and (http is not None or registry is not None):
        raise ConfigurationError("IMPORTER_CONTENTTYPE: archive imports come from a local file "
                                 f"for now, not from IMPORTER_SOURCE={kind or 'http'}")
    if checksum is not None and registry is not None:
        raise ConfigurationError("IMPORTER_CHECKSUM: a registry image is verified by its "
                                 "digests; pin it as docker://host/repository@sha256:<hex>")
    if content_type == "archive" and not os.path.isdir(dest):
        raise ConfigurationError(f"IMPORTER_CONTENTTYPE: archive is extracted into a "
                                 f"directory, but DESTINATION {dest} is a block device")
    return ImportConfig(endpoint=path, content_type=content_type, destination=dest,
                        preallocation=preallocation, owner_uid=owner,
                        filesystem_overhead=overhead, image_size=size, checksum=checksum,
                        http=http, registry=registry, scratch_dir=_scratch_dir(env))




@dataclass(frozen=True, slots=True)
class UploadConfig:
    """An upload server's configuration (see :mod:`cdimover.pod.upload` for the variables)."""

    host: str
    port: int
    tls_cert: str
    tls_key: str
    client_ca: str | None
    client_name: str | None
    tls_min_version: ssl.TLSVersion | None
    tls_ciphers: str | None
    destination: str
    preallocation: bool
    owner_uid: str
    filesystem_overhead: str
    image_size: int | None
    deadline: datetime.datetime | None
    scratch_dir: str | None


_TLS_VERSIONS: Final = {"VersionTLS10": ssl.TLSVersion.TLSv1,
                        "VersionTLS11": ssl.TLSVersion.TLSv1_1,
                        "VersionTLS12": ssl.TLSVersion.TLSv1_2,
                        "VersionTLS13": ssl.TLSVersion.TLSv1_3}


def _deadline(env: Mapping[str, str]) -> datetime.datetime | None:
    """DEADLINE as an aware datetime (RFC 3339), None when unset."""
    value = get_env(env, "DEADLINE")
    if value is None:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigurationError(f"DEADLINE: {value!r} is not an RFC 3339 time "
                                 f"(e.g. 2024-05-01T12:00:00Z)")
    return when


def _listen(env: Mapping[str, str], listen: str | None) -> tuple[str, int]:
    """LISTEN_ADDRESS (an empty value is every address) and LISTEN_PORT, or LISTEN
    (HOST:PORT) when given; default 0.0.0.0:8443."""
    if listen is not None:
        host, _, port_text = listen.rpartition(":")
        what = "--listen"
    else:
        host = env.get("LISTEN_ADDRESS", "0.0.0.0").strip()
        port_text = get_env(env, "LISTEN_PORT") or "8443"
        what = "LISTEN_PORT"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(f"{what}: {port_text!r} is not a port number (0 to 65535)")
    return host, int(port_text)


def _readable(env: Mapping[str, str], name: str, *, required: bool) -> str | None:
    """ENV[NAME], a file that must exist."""
    value = get_env(env, name, required=required, hint="a PEM file")
    if value is not None and not os.path.isfile(value):
        raise ConfigurationError(f"{name}: {value} is not a file")
    return value


def upload_config(env: Mapping[str, str], *, listen: str | None = None,
                  destination: str | None = None) -> UploadConfig:
    """Read an upload server's configuration from ENV; LISTEN (HOST:PORT) and DESTINATION
    override LISTEN_ADDRESS/LISTEN_PORT and DESTINATION.  ConfigurationError naming the
    variable at fault."""
    host, port = _listen(env, listen)
    cert = _readable(env, "TLS_CERT_FILE", required=True)
    key = _readable(env, "TLS_KEY_FILE", required=True)
    assert cert is not None and key is not None
    client_ca = _readable(env, "CLIENT_CERT_FILE", required=False)
    client_name = get_env(env, "CLIENT_NAME")
    if client_name is not None and client_ca is None:
        raise ConfigurationError("CLIENT_NAME: set, but CLIENT_CERT_FILE (the CA that signs "
                                 "client certificates) is not")
    version = get_env(env, "TLS_MIN_VERSION")
    min_version = None
    if version is not None:
        if version not in _TLS_VERSIONS:
            raise ConfigurationError(f"TLS_MIN_VERSION: {version!r} is not one of "
                                     f"{', '.join(_TLS_VERSIONS)}")
        min_version = _TLS_VERSIONS[version]
    ciphers = get_env(env, "TLS_CIPHERS")
    if ciphers is not None:
        ciphers = ":".join(c.strip() for c in ciphers.split(",") if c.strip()) or None
    dest = _volume_path(destination or get_env(env, "DESTINATION") or UPLOAD_DESTINATION,
                        "DESTINATION")
    return UploadConfig(
        host=host, port=port, tls_cert=cert, tls_key=key, client_ca=client_ca,
        client_name=client_name, tls_min_version=min_version, tls_ciphers=ciphers,
        destination=dest, preallocation=_bool(env, "PREALLOCATION", required=False),
        owner_uid=get_env(env, "OWNER_UID") or "", filesystem_overhead=_overhead(env),
        image_size=_quantity(env, "UPLOAD_IMAGE_SIZE"), deadline=_deadline(env),
        scratch_dir=_scratch_dir(env))
