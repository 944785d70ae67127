"""Manifests and indexes of realistic sizes, 1 KB to 4 MiB, through the mirror from Debian's
docker-registry, by tag and by digest, on one and two workers (issue 10, item 6)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import UpstreamRegistry

pytestmark = pytest.mark.integration

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SIZES = [1024, 30 * 1024, 130 * 1024, 1024 * 1024, 4 * 1024 * 1024 - 1]


def _padded(doc: dict[str, Any], size: int) -> bytes:
    doc = {**doc, "annotations": {"pad": ""}}
    doc["annotations"] = {"pad": "x" * (size - len(json.dumps(doc).encode()))}
    data = json.dumps(doc).encode()
    assert len(data) == size
    return data


def _put(upstream: UpstreamRegistry, repo: str, tag: str, data: bytes, media_type: str) -> str:
    with httpx.Client(base_url=upstream.url, timeout=60, trust_env=False) as c:
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=data,
                  headers={"Content-Type": media_type})
        assert r.status_code == 201, r.text
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_manifests_and_indexes_from_1kb_to_4mib_pass_whole(
        mirror_factory: Any, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        workers: int) -> None:
    small = test_images.small
    image = json.loads(small.manifest_bytes)
    child = small.manifest
    upstream.push_direct(small, "hard/base", "v1")  # the blobs the manifests reference
    cases = []
    for size in SIZES:
        manifest = _padded(image, size)
        index = _padded({"schemaVersion": 2, "mediaType": OCI_INDEX,
                         "manifests": [child.descriptor()]}, size)
        cases.append((f"m{size}", manifest, _put(upstream, "hard/base", f"m{size}", manifest,
                                                 image.get("mediaType", OCI_MANIFEST))))
        cases.append((f"i{size}", index, _put(upstream, "hard/base", f"i{size}", index,
                                              OCI_INDEX)))
    mirror = mirror_factory(server_extra={"workers": workers})
    with httpx.Client(base_url=mirror.url, timeout=60, trust_env=False) as c:
        for _ in range(3):  # cold by tag, then from memory / the other worker, by digest
            for tag, data, digest in cases:
                for ref in (tag, digest):
                    r = c.get(f"/v2/hard/base/manifests/{ref}", headers={
                        "Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
                    assert r.status_code == 200, (ref, len(data), r.text[:300])
                    assert r.content == data, (ref, len(data), len(r.content))
                    assert r.headers["Docker-Content-Digest"] == digest
    assert {digest for _, _, digest in cases} <= mirror.verify_cache()
