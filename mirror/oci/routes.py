"""Pure parsing of `/v2/...` paths into registry API routes.

Repository names may themselves contain `manifests`, `blobs` or `tags`, so a path is
classified by its last two components only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

from mirror.oci.errors import ErrorCode, RegistryError


class Kind(Enum):
    BASE = "base"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    name: str = ""  # the raw repository path, possibly with an upstream prefix
    reference: str = ""  # tag or digest for manifests, digest for blobs/referrers


_BY_SECOND_LAST = {"manifests": Kind.MANIFEST, "blobs": Kind.BLOB, "referrers": Kind.REFERRERS}


@functools.lru_cache(maxsize=8192)  # pure, and hot: the same paths come again and again
def parse_v2_path(tail: str) -> Route:
    """Classify the part of the path after `/v2/`."""
    if tail in ("", "/"):
        return Route(Kind.BASE)
    if tail.rstrip("/") == "_catalog":
        return Route(Kind.CATALOG)
    parts = tail.split("/")
    if "uploads" in parts[-3:-1] or (len(parts) >= 3 and parts[-2:] == ["uploads", ""]):
        return Route(Kind.UPLOAD, "/".join(parts[: parts.index("uploads") - 1]))
    if len(parts) >= 3:
        if parts[-2:] == ["tags", "list"]:
            return Route(Kind.TAGS, "/".join(parts[:-2]))
        kind = _BY_SECOND_LAST.get(parts[-2])
        if kind is not None and parts[-1]:
            return Route(kind, "/".join(parts[:-2]), parts[-1])
    raise RegistryError(ErrorCode.NAME_UNKNOWN, f"no registry API endpoint at /v2/{tail}")
