"""Cache lifecycle: size bound with LRU eviction, pins, disk full, offline, index rebuild."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import aiohttp
import pytest

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import Behaviour, FaultUpstream, random_bytes
from tests.support.oci import image_manifest_naming as image
from tests.support.oci import sha256_digest
from tests.support.store import assert_store_verified, stored_files

pytestmark = pytest.mark.timeout(60)
MB = 1024 * 1024



async def pull(client: aiohttp.ClientSession, url: str) -> bytes:
    async with client.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def wait_evicted(cache: Path, limit: int) -> None:
    """Eviction runs in the background: wait (bounded) until the index says it is done."""
    index = Index(cache / "index")
    try:
        for _ in range(200):
            if index.total_bytes() <= limit:
                return
            await asyncio.sleep(0.05)
    finally:
        index.close()
    raise AssertionError("eviction did not bring the store under its limit in 10 s")


async def test_store_stays_under_max_size_evicting_least_recently_used(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    blobs = {upstream.add_blob(random_bytes(MB)): None for _ in range(8)}
    digests = list(blobs)
    base = await start_mirror(cache={"max_size": "4MiB", "low_watermark": "3MiB",
                                     "prefetch": False})
    cache = tmp_path / "cache"
    for d in digests[:3]:
        await pull(client, f"{base}/v2/r/blobs/{d}")
    await pull(client, f"{base}/v2/r/blobs/{digests[0]}")  # recently used again
    for d in digests[3:]:
        await pull(client, f"{base}/v2/r/blobs/{d}")
    await wait_evicted(cache, 4 * MB)
    stored = stored_files(cache)
    assert sum(len(v) for v in stored.values()) <= 4 * MB
    assert digests[-1] in stored  # the newest stays
    assert digests[1] not in stored  # least recently used went first
    assert_store_verified(cache)
    # an evicted blob is fetched again on demand
    data = await pull(client, f"{base}/v2/r/blobs/{digests[1]}")
    assert sha256_digest(data) == digests[1]


async def test_pinned_images_survive_eviction(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    pinned_blobs = [upstream.add_blob(random_bytes(MB)) for _ in range(2)]
    upstream.add_manifest("keep/me", "v1", image(*pinned_blobs), mt.OCI_MANIFEST)
    others = [upstream.add_blob(random_bytes(MB)) for _ in range(6)]
    base = await start_mirror(cache={"max_size": "4MiB", "low_watermark": "3MiB",
                                     "prefetch": False, "pin": ["up.test/keep/me:v1"]})
    await pull(client, f"{base}/v2/keep/me/manifests/v1")
    for d in pinned_blobs + others:
        await pull(client, f"{base}/v2/keep/me/blobs/{d}")
    await wait_evicted(tmp_path / "cache", 4 * MB)
    stored = stored_files(tmp_path / "cache")
    assert all(d in stored for d in pinned_blobs)
    assert sha256_digest(image(*pinned_blobs)) in stored



async def test_disk_full_relays_to_clients_without_caching(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tiny_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    big = random_bytes(10 * MB)
    digest = upstream.add_blob(big, Behaviour(gate_after=5 * MB))
    base = await start_mirror(cache={"dir": str(tiny_disk), "max_size": "5MiB"})
    clients = [asyncio.ensure_future(pull(client, f"{base}/v2/r/blobs/{digest}"))
               for _ in range(3)]
    await upstream.reached_gate.wait()
    upstream.gate.set()
    assert all(body == big for body in await asyncio.gather(*clients))
    assert "disk full: relaying without caching" in caplog.messages
    assert digest not in stored_files(tiny_disk)
    assert list((tiny_disk / "tmp").glob("*.partial")) == []
    # the mirror is still healthy and caches what fits
    small = upstream.add_blob(random_bytes(1000))
    assert sha256_digest(await pull(client, f"{base}/v2/r/blobs/{small}")) == small
    assert small in stored_files(tiny_disk)


async def test_offline_serves_the_cache_and_nothing_else(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    blob = upstream.add_blob(random_bytes(1000))
    data = image(blob)
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    online = await start_mirror(cache={"tag_ttl": "0s"})
    assert await pull(client, f"{online}/v2/app/manifests/v1") == data
    await pull(client, f"{online}/v2/app/blobs/{blob}")
    seen = len(upstream.seen)
    offline = await start_mirror(cache={"offline": True, "tag_ttl": "0s"})
    assert await pull(client, f"{offline}/v2/app/manifests/v1") == data  # even past its TTL
    await pull(client, f"{offline}/v2/app/blobs/{blob}")
    for path, code in [("/v2/app/manifests/v2", "MANIFEST_UNKNOWN"),
                       (f"/v2/app/blobs/{sha256_digest(b'new')}", "BLOB_UNKNOWN")]:
        async with client.get(offline + path) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == code
    assert len(upstream.seen) == seen


async def test_upstream_down_serves_every_cached_image(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    blob = upstream.add_blob(random_bytes(1000))
    data = image(blob)
    digest = upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"tag_ttl": "0s"})
    await pull(client, f"{base}/v2/app/manifests/v1")
    await pull(client, f"{base}/v2/app/blobs/{blob}")
    assert upstream.server is not None
    await upstream.server.close()
    for ref in ("v1", digest):
        assert await pull(client, f"{base}/v2/app/manifests/{ref}") == data
    assert sha256_digest(await pull(client, f"{base}/v2/app/blobs/{blob}")) == blob


def test_index_rebuilt_from_the_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    contents = [random_bytes(100 + i) for i in range(50)]
    for c in contents:
        store.put_bytes(parse_digest(sha256_digest(c)), c)
    shutil.rmtree(store.index_dir, ignore_errors=True)
    index = Index(store.index_dir)
    assert not index.entries_complete()
    assert index.rebuild_entries(store.iter_stored()) == 50
    assert index.total_bytes() == sum(len(c) for c in contents)
    assert index.entries_complete()
    index.close()


def test_damaged_index_is_replaced(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "cache.db").write_bytes(b"this is not sqlite" * 100)
    index = Index(index_dir)
    assert not index.entries_complete()
    index.close()


def test_start_up_cleanup_keeps_live_downloads_of_other_workers(tmp_path: Path) -> None:
    import fcntl
    import os

    store = BlobStore(tmp_path)
    live = store.tmp_dir / "sha256-aa.partial"
    dead = store.tmp_dir / "sha256-bb.partial"
    for p in (live, dead, store.tmp_dir / "sha256-aa.partial.meta",
              store.tmp_dir / "sha256-bb.partial.meta", store.tmp_dir / "x.small"):
        p.write_bytes(b"x")
    fd = os.open(live, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live worker's download
    try:
        assert store.clean_temporaries() == 3
        assert sorted(p.name for p in store.tmp_dir.iterdir()) == [
            "sha256-aa.partial", "sha256-aa.partial.meta"]
    finally:
        os.close(fd)
