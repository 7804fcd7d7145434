"""The names both ends of a host-assisted clone agree on: CDI's clone content types and
cdimover's clone stream route and headers (no HTTP library is loaded here, so the clone
source starts without the server's)."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_TYPE_HEADER", "BLOCKDEVICE_CLONE", "FILESYSTEM_CLONE", "CLONE_STREAM_PATH",
           "SESSION_HEADER", "SIZE_HEADER", "OFFSET_HEADER"]

CONTENT_TYPE_HEADER: Final = "x-cdi-content-type"
BLOCKDEVICE_CLONE: Final = "blockdevice-clone"
FILESYSTEM_CLONE: Final = "filesystem-clone"
CLONE_STREAM_PATH: Final = "/v1beta1/clone-stream"
"""cdimover's clone stream (GET: the resume point; POST: the stream).  CDI's server answers
404 here, which is how a cdimover source knows to fall back to CDI's wire format."""
SESSION_HEADER: Final = "x-cdimover-session"
SIZE_HEADER: Final = "x-cdimover-size"
OFFSET_HEADER: Final = "x-cdimover-offset"
