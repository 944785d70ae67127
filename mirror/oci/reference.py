"""Pure parsing and validation of repository names, tags and digests (OCI distribution grammar).

Nothing here touches the disk or the network; every path the store builds comes from values
that passed through these functions first.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from mirror.oci.errors import ErrorCode, RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_ALGORITHM_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
MAX_NAME_LENGTH = 255

# algorithm -> length of its lowercase hex encoding
HEX_LENGTH = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


@functools.lru_cache(maxsize=8192)
def parse_digest(value: str) -> Digest:
    algorithm, sep, encoded = value.partition(":")
    if not sep or not _ALGORITHM_RE.fullmatch(algorithm):
        raise RegistryError(ErrorCode.DIGEST_INVALID,
                            f"invalid digest {value!r}: expected algorithm:hex")
    length = HEX_LENGTH.get(algorithm)
    if length is None:
        raise RegistryError(
            ErrorCode.DIGEST_INVALID,
            f"unsupported digest algorithm {algorithm!r}: use sha256 or sha512",
        )
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise RegistryError(
            ErrorCode.DIGEST_INVALID,
            f"invalid digest {value!r}: {algorithm} needs {length} lowercase hex",
        )
    return Digest(algorithm, encoded)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise RegistryError(
            ErrorCode.NAME_INVALID,
            f"invalid repository name {name!r}: lowercase components [a-z0-9] joined by . _ __ -"
            " separated by /",
        )
    return name


def validate_tag(tag: str) -> str:
    # The spec's error codes have no TAG_INVALID (conformance tests refuse codes outside
    # them): a reference that is neither a tag nor a digest is MANIFEST_INVALID.
    if not _TAG_RE.fullmatch(tag):
        raise RegistryError(ErrorCode.MANIFEST_INVALID, f"invalid reference {tag!r}: a tag is "
                            "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}, a digest algorithm:hex")
    return tag


def is_digest_reference(reference: str) -> bool:
    """A reference with ':' is a digest (tags cannot contain ':')."""
    return ":" in reference


def parse_reference(reference: str) -> Digest | str:
    """A manifest reference: a Digest, or a validated tag string (400 when it is neither)."""
    if is_digest_reference(reference):
        return parse_digest(reference)
    return validate_tag(reference)


def manifest_reference_for_read(reference: str) -> Digest | str:
    """As parse_reference, for a GET or HEAD: no manifest can exist under a malformed tag, and
    the spec's pull tests expect 404 MANIFEST_UNKNOWN for one (`.INVALID_MANIFEST_NAME`)."""
    if is_digest_reference(reference):
        return parse_digest(reference)
    if not _TAG_RE.fullmatch(reference):
        raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, f"no manifest {reference!r}: not a "
                            "valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{0,127}) nor a digest")
    return reference
