"""Progress and checksums of a pod's job: the counter the controller scrapes, fed by the copy
and, when a checksum is verified, by the hashing pass (the counter shows the lesser); the
hashing pass itself; syncing a target after a failure."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..errors import ChecksumMismatchError
from .config import Checksum

if TYPE_CHECKING:
    from .metrics import ProgressCounter

__all__ = ["Progress", "Hasher", "sync_quietly"]

log = logging.getLogger(__name__)

_HASH_CHUNK: Final = 4 << 20


class Progress:
    """Feeds the progress counter from the copy (its progress callback) and, when a checksum
    is verified, from the hashing thread: the counter shows the lesser of the two."""

    def __init__(self, counter: ProgressCounter, hashing: bool = False) -> None:
        self.counter = counter
        self._lock = threading.Lock()
        self._copy = 0.0
        self._hash = 0.0 if hashing else 1.0

    def _publish(self) -> None:
        self.counter.set(100.0 * min(self._copy, self._hash))

    def copied(self, done: int, total: int) -> None:
        """The copy's progress callback: DONE of TOTAL virtual bytes."""
        with self._lock:
            self._copy = max(self._copy, done / total if total else 1.0)
            self._publish()

    def hashed(self, done: int, total: int) -> None:
        """DONE of TOTAL source bytes hashed."""
        with self._lock:
            self._hash = max(self._hash, done / total if total else 1.0)
            self._publish()


class Hasher:
    """Hash a file in a daemon thread, 4 MiB at a time, reporting progress; stoppable.

    What it read is dropped from the page cache as it goes (``POSIX_FADV_DONTNEED`` after
    each chunk, and over the whole file at the end), so a pass over a large source does not
    fill the pod's memory cgroup with cache; pages another reader brings in again are that
    reader's."""

    def __init__(self, path: str, checksum: Checksum,
                 progress: Callable[[int, int], None], *, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.checksum = checksum
        self.progress = progress
        self._stop = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cdimover-checksum",
                                        daemon=True)

    def start(self) -> Hasher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            h = hashlib.new(self.checksum.algorithm, usedforsecurity=False)
            # The image already open (a second open file description, so that its offset
            # and readahead are the hasher's own), never the path again.
            fd = os.open(f"/proc/self/fd/{self.fd}" if self.fd is not None else self.path,
                         os.O_RDONLY | os.O_CLOEXEC)
            try:
                total = os.lseek(fd, 0, os.SEEK_END)
                os.lseek(fd, 0, os.SEEK_SET)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                buf = bytearray(_HASH_CHUNK)
                view = memoryview(buf)
                done = 0
                while not self._stop.is_set():
                    n = os.readv(fd, [buf])
                    if n == 0:
                        break
                    h.update(view[:n])
                    _drop_cache(fd, done, n)
                    done += n
                    self.progress(done, total)
            finally:
                _drop_cache(fd, 0, 0)  # and what readahead brought in beyond the last chunk
                os.close(fd)
            if not self._stop.is_set():
                self._digest = h.hexdigest()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by verify()
            self._error = e

    def stop(self) -> None:
        """Stop hashing (the copy failed) and wait briefly for the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def verify(self) -> None:
        """Wait for the digest; raise the thread's error, or ChecksumMismatchError."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._digest != self.checksum.hexdigest:
            raise ChecksumMismatchError(
                f"checksum mismatch: IMPORTER_CHECKSUM is {self.checksum} but {self.path} has "
                f"{self.checksum.algorithm}:{self._digest}; the written image was removed")


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop FD's clean cached pages in [OFFSET, OFFSET+LENGTH) (LENGTH 0: to the end); a
    file that cannot be advised (a pipe) keeps them."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def sync_quietly(path: str) -> None:
    """fsync PATH (a file or a block device) so what was written survives; errors are logged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        log.warning("cannot sync %s: %s", path, e.strerror or e)
    finally:
        os.close(fd)


