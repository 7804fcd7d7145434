"""What the controller reads when a pod ends: the termination message, one line of at most
4096 bytes -- JSON on success, ``Unable to process data: <reason>`` on failure, with the
phrases CDI's controllers look for ("is larger than the reported available storage", "no
space left on device")."""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Final, Literal

from ..errors import TargetTooSmallError, Terminated

__all__ = ["Kind", "success_message", "failure_message", "write_termination_log", "describe",
           "deadline_message", "scratch_required_message", "TERMINATION_LOG", "MAX_MESSAGE",
           "FAILURE_PREFIX", "CLONE_COMPLETE", "IMPORT_COMPLETE", "UPLOAD_COMPLETE",
           "SCRATCH_SPACE_REQUIRED"]

log = logging.getLogger(__name__)

Kind = Literal["clone", "import", "upload"]

TERMINATION_LOG: Final = "/dev/termination-log"
"""Where Kubernetes reads a container's termination message."""
MAX_MESSAGE: Final = 4096
"""Kubernetes keeps at most this many bytes of a termination message."""
FAILURE_PREFIX: Final = "Unable to process data: "
CLONE_COMPLETE: Final = "Clone Complete"
IMPORT_COMPLETE: Final = "Import Complete"
UPLOAD_COMPLETE: Final = "Upload Complete"
DEADLINE_PASSED: Final = "Deadline Passed"
SCRATCH_SPACE_REQUIRED: Final = "scratch space required and none found"
"""CDI's words for a pod that needs the scratch volume it was not given."""
_COMPLETE: Final = {"clone": CLONE_COMPLETE, "import": IMPORT_COMPLETE,
                    "upload": UPLOAD_COMPLETE}
_GO_ERRNO_TEXT: Final = {errno.ENOSPC: "no space left on device",
                         errno.EDQUOT: "disk quota exceeded"}


def _clip(text: str) -> str:
    """TEXT on one line, at most MAX_MESSAGE bytes of UTF-8 (cut at a character boundary)."""
    line = " ".join(text.split())
    data = line.encode("utf-8", errors="replace")
    if len(data) <= MAX_MESSAGE:
        return line
    return data[:MAX_MESSAGE].decode("utf-8", errors="ignore")


def success_message(kind: Kind, preallocation_applied: bool, digest: str | None = None) -> str:
    """The termination message of a successful clone, import or upload (KIND); DIGEST: the
    disk digest a cdimover clone stream verified (hex), as ``diskDigest``."""
    out: dict[str, object] = {"message": _COMPLETE[kind],
                              "preallocationApplied": bool(preallocation_applied)}
    if digest:
        out["diskDigest"] = digest
    return json.dumps(out, separators=(",", ":"))


def deadline_message() -> str:
    """The termination message of an upload server whose DEADLINE passed without an upload."""
    return json.dumps({"message": DEADLINE_PASSED, "deadlinePassed": True},
                      separators=(",", ":"))


def scratch_required_message(why: str) -> str:
    """The termination message of a pod that needs scratch space (WHY: the reason, in words):
    the controller then recreates the pod with a scratch volume."""
    return json.dumps({"message": _clip(f"{FAILURE_PREFIX}{SCRATCH_SPACE_REQUIRED}: {why}")[
        :MAX_MESSAGE - 64], "scratchSpaceRequired": True}, separators=(",", ":"))


def _cancel_signal(exc: BaseException) -> str | None:
    """"SIGTERM" or "SIGINT" when EXC (or its cause) is the CLI's reaction to that signal."""
    for e in (exc, exc.__cause__):
        if isinstance(e, Terminated):
            return "SIGTERM"
        if isinstance(e, KeyboardInterrupt):
            return "SIGINT"
    return None


def describe(exc: BaseException) -> str:
    """EXC in words: OSErrors as ``path: reason`` with Go's spelling of ENOSPC and EDQUOT."""
    if isinstance(exc, TargetTooSmallError) and exc.required is not None \
            and exc.available is not None:
        return (f"virtual image size {exc.required} is larger than the reported available "
                f"storage {exc.available}. A larger PVC is required ({exc})")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        go = _GO_ERRNO_TEXT.get(exc.errno or 0)
        if go is not None:
            plain = os.strerror(exc.errno or 0)
            reason = go + reason[len(plain):] if reason.startswith(plain) else f"{go} ({reason})"
        if exc.filename is not None:
            return f"{exc.filename}: {reason}"
        return reason
    return str(exc) or type(exc).__name__


def failure_message(kind: Kind, exc: BaseException) -> str:
    """The termination message of a clone or import (KIND) that failed with EXC."""
    sig = _cancel_signal(exc)
    if sig is not None:
        text = (f"{kind} cancelled by {sig}; the target is incomplete and is replaced when the "
                f"{kind} runs again")
    else:
        text = describe(exc)
    return _clip(FAILURE_PREFIX + text)


def write_termination_log(path: str, message: str) -> None:
    """Write MESSAGE (one line, clipped to MAX_MESSAGE bytes) to PATH; a failure to write is
    logged, never raised: the exit status still tells the outcome."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(_clip(message))
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path,
                    e.strerror or e)


