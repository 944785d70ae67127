"""Response headers for registry content (pure): digests, caching, ranges."""

from __future__ import annotations

from mirror.oci.reference import Digest

IMMUTABLE = "public, max-age=31536000, immutable"
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def etag(digest: Digest) -> str:
    return f'"{digest}"'


def etag_matches(if_none_match: str | None, digest: Digest) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag(digest) in tags or str(digest) in tags


def content_headers(digest: Digest, content_type: str, tag_max_age: float | None
                    ) -> dict[str, str]:
    """Headers shared by GET, HEAD and 304 answers for content named by digest or tag."""
    headers = {
        **API_VERSION,
        "Content-Type": content_type,
        "Docker-Content-Digest": str(digest),
        "ETag": etag(digest),
    }
    if tag_max_age is None:
        headers["Cache-Control"] = IMMUTABLE
    else:
        headers["Cache-Control"] = f"max-age={int(tag_max_age)}"
        headers["Vary"] = "Accept"
    return headers
