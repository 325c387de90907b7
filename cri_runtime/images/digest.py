"""Content digests ("sha256:<hex>"): validation and hashing, the one place that knows which
algorithms the store accepts, so every blob is verified the same way."""

from __future__ import annotations

import hashlib
import re

from cri_runtime.images.errors import DigestMismatch, InvalidReference

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


def is_digest(value: str) -> bool:
    match = _DIGEST.match(value)
    return match is not None and len(match.group(2)) == HEX_LENGTHS[match.group(1)]


def check_digest(value: str) -> str:
    """Return `value` if it is a digest the store can verify, else raise InvalidReference."""
    if not is_digest(value):
        raise InvalidReference(
            f"invalid digest {value!r}: expected sha256:<64 hex> or sha512:<128 hex>"
        )
    return value


def hex_of(digest: str) -> str:
    return digest.partition(":")[2]


class Hasher:
    """Incremental hash in the algorithm a digest names; `verify` raises DigestMismatch."""

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)

    @classmethod
    def for_digest(cls, digest: str) -> Hasher:
        return cls(check_digest(digest).partition(":")[0])

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"

    def verify(self, what: str, expected: str) -> None:
        if self.digest != expected:
            raise DigestMismatch(what, expected, self.digest)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    hasher = Hasher(algorithm)
    hasher.update(data)
    return hasher.digest
