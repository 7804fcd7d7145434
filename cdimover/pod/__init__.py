"""Pod mode: ``cdimover pod clone`` and ``cdimover pod import``, configured from the
environment as CDI configures its clone and import pods, reporting through a termination
message and a Prometheus progress endpoint.

A CDI worker pod runs one command and is watched by a controller in two ways: it scrapes a
progress counter from the pod's metrics endpoint (:mod:`cdimover.metrics`) and, when the
container ends, reads its termination message.  This module is that command.

**Configuration.**  Environment variables, as CDI sets them; a missing or malformed one is a
:class:`~cdimover.errors.ConfigurationError` naming the variable (one line, exit status 1),
raised before anything is written.

- ``clone``: ``VOLUME_MODE`` (``block`` | ``filesystem``, the source's mode) and
  ``MOUNT_POINT`` (the source: a block device, or a directory holding ``disk.img``),
  ``PREALLOCATION`` (``true`` | ``false``), ``OWNER_UID``, all required; ``DESTINATION`` (the
  target: a block device, or a directory -- ``disk.img`` in it; a path ending in
  ``/disk.img`` names its directory), ``FILESYSTEM_OVERHEAD`` (default ``0.06``),
  ``UPLOAD_IMAGE_SIZE`` (a Kubernetes quantity: a Filesystem target's ``disk.img`` is grown
  to min(size, usable space); ignored for Block targets).  Every mode pair goes through
  :func:`cdimover.volume.clone`.
- ``import``: ``IMPORTER_ENDPOINT`` (required: a local path or a ``file://`` URL of a RAW or
  QCOW2 image, or of a tar archive), ``IMPORTER_CONTENTTYPE`` (``kubevirt``, the default, or
  ``archive``: the tar archive is extracted into a Filesystem ``DESTINATION``),
  ``IMPORTER_IMAGE_SIZE`` (a quantity: ``disk.img`` grows to min(size, usable space), never
  shrinks), ``IMPORTER_CHECKSUM`` (``sha256:<hex>``; also ``md5``, ``sha1``, ``sha512``),
  ``PREALLOCATION`` (default ``false``), ``FILESYSTEM_OVERHEAD``, ``OWNER_UID`` (optional:
  the metric's label), ``DESTINATION``.

``DESTINATION`` defaults to ``/dev/cdi-block-volume`` when it exists, else ``/data``.
Command-line flags override the paths: ``--mount-point``, ``--destination``, ``--endpoint``,
``--termination-log`` (default ``/dev/termination-log``) and ``--metrics-address``
(``HOST:PORT``, default ``:8443``; ``none`` serves nothing).  ``--tls-cert`` and
``--tls-key`` (or ``METRICS_TLS_CERT_FILE`` and ``METRICS_TLS_KEY_FILE``), PEM files, make
the endpoint HTTPS.  ``--metrics-linger SECONDS`` keeps serving the final value after the
work is done, for a last scrape.  Both take ``--threads`` and ``--request-size``
to tune the copy (RAW sources, for an import).

**Sizes.**  Before writing, an import compares the image's virtual size with the target's
capacity: CDI's usable space (free space after ``FILESYSTEM_OVERHEAD``) for a Filesystem
target, the device size for a Block one; a clone does the same in
:func:`cdimover.volume.clone`.  Both report CDI's words, "virtual image size N is larger than
the reported available storage M", which controllers map to "DataVolume too small"; a write
that still meets ENOSPC reports "no space left on device", as Go spells it.

**Checksums.**  The native core reads the source itself, so the bytes it reads cannot be
hashed on their way through.  Instead a background thread hashes the source file in a
streaming pass (4 MiB reads, one buffer, hashlib releasing the GIL) while the copy runs: no
extra wall time when the disk keeps up, bounded memory.  The two are joined at the end; on a
mismatch the written image is removed (``disk.img`` unlinked, a Block target's written range
zeroed, an archive's extracted entries deleted) and the run fails.  While hashing, the
progress counter shows the lesser of the two passes.

**What the controller sees.**  The termination message (``--termination-log``; one line, at
most 4096 bytes) is ``{"message":"Clone Complete"|"Import Complete",
"preallocationApplied":bool}`` on success, and ``Unable to process data: <reason>`` on
failure.  The progress counter (``kubevirt_cdi_clone_progress_total`` or
``kubevirt_cdi_import_progress_total``, label ``ownerUID``) counts virtual bytes processed in
percent, holes and conversion included, and reaches 100 on success.

**Exit status.**  0 success; 1 failure or configuration error; 2 usage; 143 SIGTERM and 130
SIGINT, which cancel the copy at its next request: the target is synced and left for a
re-run, which replaces it, and the termination message says the run was cancelled.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .messages import MAX_MESSAGE, TERMINATION_LOG, failure_message, success_message, \
    write_termination_log

if TYPE_CHECKING:
    from .config import Checksum, CloneConfig, ImportConfig, clone_config, import_config

# The configuration readers pull in the HTTP and registry sources (TLS, certificates): loaded
# on first use, so that registering the pod subcommands costs the command line nothing.
_LAZY = {"Checksum", "CloneConfig", "ImportConfig", "clone_config", "import_config"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cdimover.pod' has no attribute {name!r}")
    value = getattr(importlib.import_module(".config", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


__all__ = [
    "Checksum",
    "CloneConfig",
    "ImportConfig",
    "clone_config",
    "import_config",
    "success_message",
    "failure_message",
    "write_termination_log",
    "TERMINATION_LOG",
    "MAX_MESSAGE",
]
