"""Expected digests: ``ALGORITHM:HEX`` as CDI's IMPORTER_CHECKSUM and ``--checksum`` hold them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["Checksum", "DIGEST_HEX"]

DIGEST_HEX: Final = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
"""Hex digits of each algorithm's digest."""


@dataclass(frozen=True, slots=True)
class Checksum:
    """An expected digest: ``algorithm`` (hashlib name) and ``hexdigest`` (lower case)."""

    algorithm: str
    hexdigest: str

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.hexdigest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """TEXT as ALGORITHM:HEX (either case); ValueError saying what is wrong."""
        algorithm, sep, digest = text.strip().partition(":")
        algorithm = algorithm.lower()
        if not sep or algorithm not in DIGEST_HEX:
            raise ValueError(f"{text!r} is not ALGORITHM:HEX with ALGORITHM one of md5, sha1, "
                             "sha256, sha512")
        digest = digest.lower()
        if len(digest) != DIGEST_HEX[algorithm] or not re.fullmatch(r"[0-9a-f]+", digest):
            raise ValueError(f"{text!r}: a {algorithm} digest is {DIGEST_HEX[algorithm]} "
                             "hexadecimal digits")
        return cls(algorithm, digest)
