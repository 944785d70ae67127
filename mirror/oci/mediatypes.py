"""Manifest media types and `Accept` negotiation (pure)."""

from __future__ import annotations

import json
from collections.abc import Iterable

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1})
ALL_MANIFEST_TYPES = (*MANIFEST_TYPES, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)


def parse_accept(header_values: Iterable[str]) -> tuple[str, ...]:
    """Media types from every `Accept` header line, without parameters, in order, deduplicated.

    Clients (dockerd, podman) send several `Accept` lines; all of them count.
    """
    seen: dict[str, None] = {}
    for value in header_values:
        for item in value.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                seen.setdefault(media_type, None)
    return tuple(seen)


def is_acceptable(media_type: str, accepted: tuple[str, ...]) -> bool:
    """Whether a manifest of `media_type` may be served to a client that sent `accepted`.

    No Accept at all means the client takes anything (HTTP semantics).
    """
    if not accepted or "*/*" in accepted:
        return True
    if media_type in accepted:
        return True
    # Signed and unsigned schema1 are the same document format.
    return media_type in SCHEMA1_TYPES and bool(SCHEMA1_TYPES & set(accepted))


def upstream_accept(accepted: tuple[str, ...]) -> str:
    """The Accept header to send upstream: the client's types, or every manifest type."""
    types = [t for t in accepted if t != "*/*"] or list(MANIFEST_TYPES)
    return ", ".join(types)


def sniff_media_type(data: bytes) -> str:
    """A manifest's media type from its own bytes (used when the index lost it)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return OCI_MANIFEST
    if not isinstance(doc, dict):
        return OCI_MANIFEST
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


# The spec's shapes nest at most ~5 levels (index → manifests → platform → os.features);
# anything far deeper is hostile (and json's recursive decoder would fail on it anyway).
MAX_MANIFEST_DEPTH = 32
# Content types some registries send for a manifest without naming its format.
_UNLABELLED = frozenset({"", "application/json", "application/octet-stream"})


class ManifestInvalid(ValueError):
    """A manifest body the mirror will not cache or relay; the message says why."""


def _depth(doc: dict[str, object] | list[object]) -> int:
    deepest = 0
    stack: list[tuple[dict[str, object] | list[object], int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_MANIFEST_DEPTH:
            return depth
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _shape(doc: dict[str, object]) -> str | None:
    if doc.get("schemaVersion") == 1:
        return "schema1"
    if "manifests" in doc:
        return "index"
    if "layers" in doc or "config" in doc:
        return "image"
    return None


def checked_media_type(data: bytes, declared: str) -> str:
    """The media type to cache and serve a manifest with, once its bytes agree with the
    upstream's `Content-Type` (`declared`, without parameters). Raises ManifestInvalid for a
    body that is not a JSON object, nests beyond MAX_MANIFEST_DEPTH, or contradicts its label
    (a `mediaType` field that differs from it, an index labelled as an image, `text/html`)."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ManifestInvalid(f"nested deeper than {MAX_MANIFEST_DEPTH} levels") from None
    except ValueError:
        raise ManifestInvalid("not JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("not a JSON object")
    if _depth(doc) > MAX_MANIFEST_DEPTH:
        raise ManifestInvalid(f"nested deeper than {MAX_MANIFEST_DEPTH} levels")
    declared = declared.strip().lower()
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid("its mediaType is not a string")
    if body_type and declared not in _UNLABELLED and body_type.lower() != declared:
        raise ManifestInvalid(f"labelled {declared} but its mediaType says {body_type}")
    media_type = body_type or (sniff_media_type(data) if declared in _UNLABELLED else declared)
    if media_type not in ALL_MANIFEST_TYPES and not body_type:
        raise ManifestInvalid(f"{media_type} is not a manifest media type")
    shape = _shape(doc)
    if (media_type in INDEX_TYPES and shape == "image") or (
            media_type in IMAGE_TYPES and shape == "index"):
        raise ManifestInvalid(f"labelled {media_type} but shaped like an {shape}")
    return media_type


def _descriptors(doc: dict[str, object], key: str) -> list[dict[str, object]]:
    value = doc.get(key)
    items = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    return [d for d in items if isinstance(d, dict) and isinstance(d.get("digest"), str)]


def _document(data: bytes) -> dict[str, object]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def child_manifests(data: bytes) -> list[dict[str, object]]:
    """An index's manifest descriptors (each with a string digest; platform as sent)."""
    return _descriptors(_document(data), "manifests")


def layer_media_types(data: bytes) -> list[str]:
    """The media types of a manifest's layers (a layer without one counts as "")."""
    layers = _document(data).get("layers")
    if not isinstance(layers, list):
        return []
    return [str(d.get("mediaType", "")) if isinstance(d, dict) else "" for d in layers]


def referenced_blobs(data: bytes) -> tuple[list[str], list[str]]:
    """(config + layer digests, child manifest digests) named by a manifest's bytes."""
    doc = _document(data)
    # Foreign layers (with `urls`) are fetched by clients from elsewhere, not the registry.
    blobs = [str(d["digest"]) for d in _descriptors(doc, "config") + _descriptors(doc, "layers")
             if not d.get("urls")]
    return blobs, [str(d["digest"]) for d in _descriptors(doc, "manifests")]


def manifest_references(data: bytes) -> tuple[list[str], list[str]] | None:
    """`referenced_blobs` of bytes that are a manifest (an image manifest, an index, an
    artifact manifest), None for anything else (a config, a layer, a signature payload)."""
    doc = _document(data)
    media_type = doc.get("mediaType")
    shaped = doc.get("schemaVersion") == 2 and (
        isinstance(doc.get("manifests"), list) or isinstance(doc.get("layers"), list)
        or bool(_descriptors(doc, "config")))
    if media_type not in ALL_MANIFEST_TYPES and not shaped:
        return None
    return referenced_blobs(data)
