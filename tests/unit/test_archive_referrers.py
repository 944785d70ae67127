"""`mirror export`/`import` (commands/archive.py) carry what is attached to an image: its
tag-schema tags (cosign's sha256-<hex>.sig, ...) and its cached referrers answer, restored on
import as the referrers API's answer, so an offline mirror can still show signatures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.commands.archive import export, import_archive
from mirror.oci.reference import Digest, digest_of

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UP = "registry.test"


def manifest(*layers: bytes, subject: Digest | None = None) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(digest_of(b"{}")), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": str(digest_of(x)), "size": len(x)} for x in layers]}
    if subject is not None:
        doc["subject"] = {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 1}
    return json.dumps(doc).encode()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[BlobStore, Index]]:
    store = BlobStore(tmp_path / "src")
    index = Index(store.index_dir)
    store.on_commit = index.add_entry
    yield store, index
    index.close()


def put(store: BlobStore, index: Index, data: bytes, media_type: str = "") -> Digest:
    digest = digest_of(data)
    store.put_bytes(digest, data)
    if media_type:
        index.set_media_type(digest, media_type)
    return digest


def populated(store: BlobStore, index: Index) -> tuple[Digest, Digest, Digest]:
    """app:v1 with a cosign signature (by tag) and an SBOM (by the referrers API)."""
    for blob in (b"{}", b"layer", b"sig payload", b"sbom"):
        put(store, index, blob)
    image = put(store, index, manifest(b"layer"), OCI_MANIFEST)
    index.set_tag(UP, "app", "v1", image, OCI_MANIFEST)
    sig = put(store, index, manifest(b"sig payload"), OCI_MANIFEST)
    index.set_tag(UP, "app", f"sha256-{image.hex}.sig", sig, OCI_MANIFEST)
    sbom = put(store, index, manifest(b"sbom", subject=image), OCI_MANIFEST)
    referrers = put(store, index, json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(sbom), "size": 1,
                       "artifactType": "application/spdx+json"}]}).encode(), OCI_INDEX)
    index.set_referrers(UP, "app", image, "", referrers, OCI_INDEX, "")
    return image, sig, referrers


@pytest.mark.parametrize("referrers", [True, False])
def test_what_is_attached_travels_unless_asked_not_to(
        tmp_path: Path, cache: tuple[BlobStore, Index], referrers: bool) -> None:
    store, index = cache
    image, sig, answer = populated(store, index)
    archive = tmp_path / "out.tar"
    files = export(store, index, [UP], [f"{UP}/app:v1"], archive, referrers)
    assert files == (8 if referrers else 3)  # + the signature, the SBOM and their blobs

    other = BlobStore(tmp_path / "dst")
    restored = Index(other.index_dir)
    other.on_commit = restored.add_entry
    try:
        _, refs = import_archive(other, restored, [UP], archive)
        assert refs == [f"{UP}/app:v1"]  # what is attached is no image of its own
        tag = restored.get_tag(UP, "app", f"sha256-{image.hex}.sig")
        kept = restored.get_referrers(UP, "app", image, "")
        if referrers:
            assert tag is not None and tag.digest == str(sig)
            assert kept is not None and kept[0].digest == str(answer)
            assert other.read_bytes(answer) == store.read_bytes(answer)
            assert other.size(digest_of(b"sbom")) == 4
        else:
            assert tag is None and kept is None
    finally:
        restored.close()
