"""A small client of the container registry HTTP API (distribution v2 / OCI distribution):
what a containerDisk import needs, no more.

Covered:

- references ``docker://host[:port]/repo[:tag|@sha256:HEX]`` (a host is required; a name
  without a registry part means docker.io, ``library/`` added to one-component names);
- manifests: ``GET /v2/<name>/manifests/<ref>`` with the OCI index and manifest and the Docker
  manifest list and v2 manifest types in ``Accept``; the body (at most 4 MiB) is checked
  against its digest: sha256 of the exact bytes, equal to the pinned digest, or for a tag to
  ``Docker-Content-Digest`` when the registry sends it;
- an index or manifest list: the manifest for os ``linux`` and the architecture asked for
  (``IMPORTER_REGISTRY_IMAGE_ARCHITECTURE``, default the machine's), with the variant when
  one is asked for or the architecture needs one (arm64: v8);
- authentication: anonymous, basic (``Authorization: Basic`` when a ``Basic`` challenge comes
  back), and Bearer: the ``WWW-Authenticate: Bearer realm=,service=,scope=`` challenge sends
  the client to the token endpoint (with the basic credentials when given); ``token`` or
  ``access_token`` of the answer is renewed before a new request when its ``expires_in``
  (default 60 s) is about to pass, and when a 401 says it expired -- also in the middle of a
  blob download, whose next request (a resume) then carries the new token;
- trust: the CA bundle of ``read_ca_bundle`` added to the system's, or no verification
  (INSECURE_TLS); plain HTTP only for registries listed as insecure; proxies from the
  environment (http_proxy, https_proxy, no_proxy), as urllib reads them;
- redirects of these small requests are followed here (at most 5), and credentials are sent
  only to the registry's own origin.

Blobs are not fetched here: they are large, and go through the native core's libcurl source
(``NativeSource``: resume with Range, the digest computed while they stream, the registry's
``Authorization`` header dropped on a redirect to another origin, e.g. object storage).  The
manifests and tokens use Python's urllib because the client needs status codes and response
headers (``WWW-Authenticate``, ``Docker-Content-Digest``) of small bodies, which the core's
stream interface does not return.

Not covered: pushing, the registry's catalog and tag listing, schema 1 manifests, foreign
(non-distributable) layers fetched from their ``urls``, manifest lists nested in indexes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from ..errors import AuthenticationError, HttpStatusError, \
    ImageFormatError, NetworkError, ProtocolError, RemoteNotFoundError, TlsError
from .http import read_ca_bundle, user_agent
from .imageref import DIGEST, ImageRef, is_registry_url, machine_arch, parse_reference

__all__ = ["ImageRef", "parse_reference", "is_registry_url", "Layer", "Resolved",
           "RegistryClient", "machine_arch", "LAYER_TYPES", "parse_challenge"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20
MAX_TOKEN = 1 << 20
MAX_REDIRECTS = 5
DEFAULT_TOKEN_LIFETIME = 60     # seconds, when the token endpoint does not say (the spec's)
TOKEN_MARGIN = 5                # seconds before its end a token is renewed for a new request

# Layer media types -> the compression their bytes must have.
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A WWW-Authenticate header: (scheme in lower case, parameters)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))', rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return scheme.lower(), params


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    size: int
    media_type: str

    @property
    def compression(self) -> str:
        return LAYER_TYPES[self.media_type]


@dataclass(frozen=True, slots=True)
class Resolved:
    """The image manifest an import uses."""

    ref: ImageRef
    digest: str             # of the image manifest
    index_digest: str | None  # of the index it was chosen from, if any
    platform: str           # "os/arch[/variant]" when chosen from an index, else ""
    layers: tuple[Layer, ...]   # base first, as in the manifest
    media_type: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class RegistryClient:
    """Requests to one registry for one repository.  AUTH: (user, password) or None; CA: a PEM
    file or directory trusted besides the system's; PROXY_CA: the same for a proxy (a proxy
    that intercepts TLS signs with it); INSECURE_TLS: no verification;
    PLAIN_HTTP: the registry speaks http:// (listed as insecure by the user)."""

    ref: ImageRef
    auth: tuple[str, str] | None = field(default=None, repr=False)
    ca: str | None = None
    proxy_ca: str | None = None
    insecure_tls: bool = False
    plain_http: bool = False
    timeout: float = 60.0
    token: str | None = field(default=None, repr=False)
    token_expires: float = 0.0      # time.monotonic() when the token runs out
    tokens: int = 0                 # tokens fetched
    use_basic: bool = False
    challenge: dict[str, str] | None = None
    requests: int = 0

    def __post_init__(self) -> None:
        ctx = ssl.create_default_context()
        for bundle in (self.ca, self.proxy_ca):
            if bundle:
                ctx.load_verify_locations(cadata=read_ca_bundle(bundle))
        if self.insecure_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(), urllib.request.HTTPSHandler(context=ctx),
            _NoRedirect())
        # The manifests and tokens name cdimover as the blobs' requests do, not Python-urllib.
        self._opener.addheaders = [("User-Agent", user_agent())]

    # ---- plumbing ---------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"{'http' if self.plain_http else 'https'}://{self.ref.registry}"

    def url(self, kind: str, reference: str) -> str:
        return f"{self.origin}/v2/{self.ref.repository}/{kind}/{reference}"

    def authorization(self) -> str | None:
        """The Authorization header the registry's origin gets now, or None."""
        if self.token is not None:
            return f"Bearer {self.token}"
        if self.use_basic and self.auth is not None:
            raw = f"{self.auth[0]}:{self.auth[1]}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    def _same_origin(self, url: str) -> bool:
        a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(self.origin)
        return (a.scheme, a.hostname, a.port or (443 if a.scheme == "https" else 80)) == \
            (b.scheme, b.hostname, b.port or (443 if b.scheme == "https" else 80))

    def _raw(self, url: str, headers: dict[str, str], limit: int,
             credentials: str | None) -> tuple[int, Message, bytes, str]:
        """GET URL following redirects; CREDENTIALS (an Authorization value) go to the
        registry's origin only.  (status, headers, body of at most LIMIT bytes, final URL)."""
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if credentials is not None and self._same_origin(url):
                h["Authorization"] = credentials
            req = urllib.request.Request(url, headers=h, method="GET")
            self.requests += 1
            try:
                resp = self._opener.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                resp = e
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, ssl.SSLError):
                    raise TlsError(f"{self.ref.registry}: TLS: {reason}") from None
                raise NetworkError(f"{self.ref.registry}: {reason}") from None
            except (OSError, ValueError) as e:
                raise NetworkError(f"{self.ref.registry}: {e}") from None
            with resp:
                status = resp.status if resp.status is not None else 0
                if status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise ProtocolError(f"{url}: a redirect without a Location")
                    url = urllib.parse.urljoin(url, location)
                    continue
                body = resp.read(limit + 1)
                if len(body) > limit:
                    raise ProtocolError(f"{url}: the answer is larger than {limit} bytes")
                return status, resp.headers, body, url
        raise ProtocolError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _fetch_token(self, params: dict[str, str]) -> None:
        realm = params.get("realm")
        if not realm or not realm.lower().startswith(("https://", "http://")):
            raise AuthenticationError(f"{self.ref.registry}: a Bearer challenge without a "
                                      "usable realm", 401)
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        if "scope" not in query:
            query["scope"] = f"repository:{self.ref.repository}:pull"
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        basic = None
        if self.auth is not None:
            basic = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        h = {"Accept": "application/json"}
        if basic is not None:
            h["Authorization"] = basic      # the realm's own origin: not the registry's
        req = urllib.request.Request(url, headers=h)
        self.requests += 1
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(MAX_TOKEN + 1)
        except urllib.error.HTTPError as e:
            cls = AuthenticationError if e.code in (401, 403) else HttpStatusError
            raise cls(f"{self.ref.registry}: the token endpoint answered {e.code}"
                      f"{' (wrong credentials?)' if e.code in (401, 403) else ''}",
                      e.code) from None
        except urllib.error.URLError as e:
            raise NetworkError(f"{realm}: {e.reason}") from None
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or len(body) > MAX_TOKEN:
            raise ProtocolError(f"{realm}: the token endpoint gave no token")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        self.token = token
        self.tokens += 1
        self.token_expires = time.monotonic() + lifetime

    def authenticate(self, www_authenticate: str | None) -> None:
        """Answer a 401: a Bearer challenge fetches a token, a Basic one turns basic auth on
        (credentials needed)."""
        if not www_authenticate:
            raise AuthenticationError(f"{self.ref.registry}: 401 without a challenge", 401)
        scheme, params = parse_challenge(www_authenticate)
        if scheme == "bearer":
            self.challenge = params
            self.token = None
            self._fetch_token(params)
        elif scheme == "basic":
            if self.auth is None:
                raise AuthenticationError(f"{self.ref.registry}: the registry wants a user "
                                          "and password", 401)
            if self.use_basic:
                raise AuthenticationError(f"{self.ref.registry}: the registry refused the "
                                          "user and password (401)", 401)
            self.use_basic = True
        else:
            raise AuthenticationError(f"{self.ref.registry}: unsupported authentication "
                                      f"scheme {scheme!r}", 401)

    def refresh(self) -> bool:
        """A 401 in the middle of a pull: fetch a new token (once per caller's attempt).
        False when there is nothing to refresh."""
        if self.challenge is None:
            return False
        self.token = None
        self._fetch_token(self.challenge)
        return True

    def fresh_authorization(self) -> str | None:
        """The Authorization value for a new request: a token about to run out (within
        TOKEN_MARGIN seconds) is replaced first."""
        if self.token is not None and self.challenge is not None and \
                time.monotonic() > self.token_expires - TOKEN_MARGIN:
            self.refresh()
        return self.authorization()

    def reauth_header(self) -> str | None:
        """For a blob download answered 401 midway (its token expired): the header line
        with a new token, or None when there is no token to renew (basic credentials)."""
        if not self.refresh():
            return None
        value = self.authorization()
        return f"Authorization: {value}" if value else None

    def get(self, url: str, headers: dict[str, str], limit: int) -> tuple[Message, bytes]:
        """GET with authentication: a 401 is answered once."""
        for attempt in range(2):
            status, h, body, final = self._raw(url, headers, limit, self.fresh_authorization())
            if status == 401 and attempt == 0:
                self.authenticate(h.get("WWW-Authenticate"))
                continue
            if status == 200:
                return h, body
            if status == 401 and self.use_basic:
                raise AuthenticationError(f"{self.ref}: the registry refused the user and "
                                          "password (401)", status)
            if status in (401, 403):
                raise AuthenticationError(f"{self.ref}: access denied ({status})", status)
            if status == 404:
                raise RemoteNotFoundError(f"{self.ref}: not found in the registry ({final})",
                                          status)
            raise HttpStatusError(f"{final}: the registry answered {status}", status)
        raise AssertionError("unreachable")

    # ---- manifests --------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[str, str, dict[str, Any]]:
        """The manifest REFERENCE (a tag or a digest): (its digest, media type, document),
        the digest checked."""
        h, body = self.get(self.url("manifests", reference), {"Accept": ACCEPT}, MAX_MANIFEST)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        want = reference if reference.startswith("sha256:") else \
            h.get("Docker-Content-Digest")
        if want and want.startswith("sha256:") and not hmac.compare_digest(want, digest):
            raise ImageFormatError(f"{self.ref}: the manifest's sha256 is {digest}, the "
                                   f"registry announced {want}: refusing it")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ImageFormatError(f"{self.ref}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise ImageFormatError(f"{self.ref}: the manifest is not a JSON object")
        media = doc.get("mediaType") or (h.get_content_type() if h.get("Content-Type") else "")
        return digest, str(media), doc

    def resolve(self, arch: str | None = None, variant: str | None = None) -> Resolved:
        """The image manifest for linux/ARCH[/VARIANT] (default: this machine's)."""
        digest, media, doc = self.manifest(self.ref.reference)
        index_digest = None
        chosen = ""
        if media in (OCI_INDEX, DOCKER_LIST) or ("manifests" in doc and "layers" not in doc):
            index_digest = digest
            entry, chosen = self._pick(doc, arch or machine_arch(), variant)
            digest, media, doc = self.manifest(entry)
        if media not in (OCI_MANIFEST, DOCKER_MANIFEST) and "layers" not in doc:
            raise ImageFormatError(f"{self.ref}: unsupported manifest type {media!r}")
        layers = []
        for item in doc.get("layers") or []:
            if not isinstance(item, dict):
                raise ImageFormatError(f"{self.ref}: a malformed layer entry")
            ld, ls, lm = item.get("digest"), item.get("size"), item.get("mediaType")
            if not isinstance(ld, str) or not DIGEST.fullmatch(ld):
                raise ImageFormatError(f"{self.ref}: a layer digest {ld!r} that is not sha256")
            if not isinstance(ls, int) or ls < 0:
                raise ImageFormatError(f"{self.ref}: layer {ld} has no valid size")
            if lm not in LAYER_TYPES:
                raise ImageFormatError(f"{self.ref}: layer {ld} has media type {lm!r}: "
                                       "expected a tar, tar+gzip or tar+zstd layer")
            layers.append(Layer(digest=ld, size=ls, media_type=lm))
        if not layers:
            raise ImageFormatError(f"{self.ref}: the image has no layers")
        return Resolved(ref=self.ref, digest=digest, index_digest=index_digest,
                        platform=chosen, layers=tuple(layers), media_type=media)

    def _pick(self, index: dict[str, Any], arch: str, variant: str | None) -> tuple[str, str]:
        want_variant = variant or ("v8" if arch == "arm64" else None)
        seen = []
        candidates = []
        for m in index.get("manifests") or []:
            p = m.get("platform") if isinstance(m, dict) else None
            if not isinstance(p, dict):
                continue
            name = f"{p.get('os')}/{p.get('architecture')}" + \
                (f"/{p['variant']}" if p.get("variant") else "")
            seen.append(name)
            if p.get("os") == "linux" and p.get("architecture") == arch:
                candidates.append((m, p.get("variant"), name))
        for m, v, name in candidates:
            if v == want_variant or (variant is None and (v is None or len(candidates) == 1)):
                d = m.get("digest")
                if not isinstance(d, str) or not DIGEST.fullmatch(d):
                    raise ImageFormatError(f"{self.ref}: {name}: a digest that is not sha256")
                return d, name
        raise ImageFormatError(
            f"{self.ref}: no image for linux/{arch}{'/' + variant if variant else ''} "
            f"(the index has {', '.join(seen) or 'no platforms'})")

    def blob_url(self, digest: str) -> str:
        return self.url("blobs", digest)
