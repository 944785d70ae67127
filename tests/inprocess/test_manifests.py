"""Manifests: exact bytes and headers, tag TTL and HEAD revalidation, coalescing, Accept."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from mirror.oci import mediatypes as mt
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import Behaviour, FaultUpstream, random_bytes
from tests.support.oci import sha256_digest

pytestmark = pytest.mark.timeout(60)


def image_manifest(*blobs: str) -> bytes:
    # deliberately odd formatting: the mirror must never re-serialize
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": blobs[0], "size": 1},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": b, "size": 1} for b in blobs[1:]]}
    return json.dumps(doc, indent=3).encode() + b"\n\n"


def index_manifest(child: str) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": child, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()


async def test_exact_bytes_and_headers_for_get_and_head(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = image_manifest(sha256_digest(b"c"), sha256_digest(b"l"))
    digest = upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False})
    accept = {"Accept": mt.OCI_MANIFEST}
    for ref in ("v1", digest):
        async with client.get(f"{base}/v2/app/manifests/{ref}", headers=accept) as resp:
            assert resp.status == 200 and await resp.read() == data
            assert resp.headers["Content-Type"] == mt.OCI_MANIFEST  # no "; charset=utf-8"
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.headers["Content-Length"] == str(len(data))
        async with client.head(f"{base}/v2/app/manifests/{ref}", headers=accept) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.headers["Content-Type"] == mt.OCI_MANIFEST
    async with client.get(f"{base}/v2/app/manifests/{digest}") as resp:
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["ETag"] == f'"{digest}"'
    async with client.get(f"{base}/v2/app/manifests/v1", headers=accept) as resp:
        assert resp.headers["Cache-Control"].startswith("max-age=")
        assert resp.headers["Vary"] == "Accept"
    async with client.get(f"{base}/v2/app/manifests/{digest}",
                          headers={"If-None-Match": f'"{digest}"'}) as resp:
        assert resp.status == 304 and resp.headers["Docker-Content-Digest"] == digest


async def test_head_never_becomes_an_upstream_get(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = image_manifest(sha256_digest(b"c"))
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    blob = upstream.add_blob(random_bytes(1000))
    base = await start_mirror()
    async with client.head(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    async with client.head(f"{base}/v2/app/blobs/{blob}") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "1000"
    assert [s.method for s in upstream.seen] == ["HEAD", "HEAD"]


async def test_tag_trusted_for_ttl_then_revalidated_with_head(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    v1 = image_manifest(sha256_digest(b"one"))
    upstream.add_manifest("app", "latest", v1, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"tag_ttl": "0s", "prefetch": False})
    url = f"{base}/v2/app/manifests/latest"
    async with client.get(url) as resp:
        assert await resp.read() == v1 and resp.headers["X-Mirror-Cache"] == "miss"
    async with client.get(url) as resp:  # expired at once: revalidated with a HEAD
        assert await resp.read() == v1 and resp.headers["X-Mirror-Cache"] == "revalidated"
    assert [s.method for s in upstream.seen] == ["GET", "HEAD"]
    v2 = image_manifest(sha256_digest(b"two"))
    upstream.add_manifest("app", "latest", v2, mt.OCI_MANIFEST)  # the tag moved
    async with client.get(url) as resp:
        assert await resp.read() == v2
    assert [s.method for s in upstream.seen] == ["GET", "HEAD", "HEAD", "GET"]


async def test_tag_within_ttl_never_contacts_upstream(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.add_manifest("app", "v1", image_manifest(sha256_digest(b"c")), mt.OCI_MANIFEST)
    base = await start_mirror(cache={"tag_ttl": "1h", "prefetch": False})
    for _ in range(5):
        async with client.get(f"{base}/v2/app/manifests/v1") as resp:
            assert resp.status == 200
    assert len(upstream.seen) == 1


async def test_stale_tag_served_when_upstream_fails(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = image_manifest(sha256_digest(b"c"))
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"tag_ttl": "0s", "prefetch": False})
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200
    assert upstream.server is not None
    await upstream.server.close()  # the upstream goes away
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["X-Mirror-Cache"] == "stale"


async def test_concurrent_manifest_misses_coalesce(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.add_manifest("app", "v1", image_manifest(sha256_digest(b"c")), mt.OCI_MANIFEST)
    upstream.manifest_delay = asyncio.Event()
    base = await start_mirror(cache={"prefetch": False})

    async def fetch() -> bytes:
        async with client.get(f"{base}/v2/app/manifests/v1") as resp:
            return await resp.read()

    tasks = [asyncio.ensure_future(fetch()) for _ in range(10)]
    await upstream.manifest_reached.wait()
    upstream.manifest_delay.set()
    assert len(set(await asyncio.gather(*tasks))) == 1
    assert upstream.count("GET", "/manifests/v1") == 1


async def test_cached_index_not_served_to_a_client_that_cannot_parse_it(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    child = image_manifest(sha256_digest(b"c"))
    index = index_manifest(sha256_digest(child))
    upstream.add_manifest("app", "v1", index, mt.OCI_INDEX)
    base = await start_mirror(cache={"prefetch": False})
    async with client.get(f"{base}/v2/app/manifests/v1",
                          headers={"Accept": f"{mt.OCI_INDEX}, {mt.OCI_MANIFEST}"}) as resp:
        assert resp.headers["Content-Type"] == mt.OCI_INDEX
    # a schema2-only client: the cached index is not acceptable, so the upstream is asked
    async with client.get(f"{base}/v2/app/manifests/v1",
                          headers={"Accept": mt.DOCKER_MANIFEST}) as resp:
        await resp.read()
    assert upstream.count("GET", "/manifests/v1") == 2
    assert upstream.seen[-1].method == "GET"


async def test_manifest_digest_mismatch_is_not_cached(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, tmp_path: Path) -> None:
    data = image_manifest(sha256_digest(b"c"))
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    wrong = sha256_digest(b"something else")
    upstream.manifests[("app", wrong)] = (data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False})
    async with client.get(f"{base}/v2/app/manifests/{wrong}") as resp:
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert not list((tmp_path / "cache" / "blobs").rglob("*/*/*"))


async def test_prefetch_starts_layer_downloads_on_a_manifest_miss(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    blobs = [upstream.add_blob(random_bytes(100_000)) for _ in range(4)]
    upstream.add_manifest("app", "v1", image_manifest(*blobs), mt.OCI_MANIFEST)
    base = await start_mirror()
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200
    for b in blobs:
        async with client.get(f"{base}/v2/app/blobs/{b}") as resp:
            assert sha256_digest(await resp.read()) == b
            # joined the prefetch's download (or found it finished): never started one
            assert resp.headers["X-Mirror-Cache"] in ("inflight", "hit")
    assert upstream.count("GET", "/blobs/") == len(blobs)


async def test_prefetch_keeps_only_a_few_downloads_ahead(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    """Prefetch fills idle time on the link; it never starts every layer at once."""
    from mirror.pull.prefetch import PREFETCH_AHEAD

    blobs = [upstream.add_blob(random_bytes(10_000), Behaviour(gate_after=100))
             for _ in range(6)]
    upstream.add_manifest("app", "v1", image_manifest(*blobs), mt.OCI_MANIFEST)
    base = await start_mirror()
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200
    async with client.get(f"{base}/metrics") as resp:
        exposition = await resp.text()
    assert f"mirror_downloads_in_flight {PREFETCH_AHEAD:.1f}" in exposition
    upstream.gate.set()
    for b in blobs:  # the rest follow as the first ones finish
        async with client.get(f"{base}/v2/app/blobs/{b}") as resp:
            assert sha256_digest(await resp.read()) == b
    assert upstream.count("GET", "/blobs/") == len(blobs)


async def test_prefetch_off_fetches_nothing_ahead(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    blobs = [upstream.add_blob(random_bytes(1000)) for _ in range(2)]
    upstream.add_manifest("app", "v1", image_manifest(*blobs), mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False})
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200
    for b in blobs:
        async with client.get(f"{base}/v2/app/blobs/{b}") as resp:
            assert resp.headers["X-Mirror-Cache"] == "miss"


async def test_index_alone_triggers_no_prefetch(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    blob = upstream.add_blob(random_bytes(1000))
    child = image_manifest(blob)
    upstream.add_manifest("app", sha256_digest(child), child, mt.OCI_MANIFEST)
    upstream.add_manifest("app", "v1", index_manifest(sha256_digest(child)), mt.OCI_INDEX)
    base = await start_mirror()
    async with client.get(f"{base}/v2/app/manifests/v1") as resp:
        assert resp.status == 200
    async with client.get(f"{base}/v2/app/blobs/{blob}") as resp:
        assert resp.headers["X-Mirror-Cache"] == "miss"
