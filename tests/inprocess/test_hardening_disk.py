"""A full disk, a read-only cache dir and eviction cost caching, never a client (issue 10,
items 10-12): every client gets the whole body, no 5xx, no leftovers in tmp/, and whatever is
answered from memory is still on disk."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.cache.eviction import evict
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest
from mirror.upstream.client import Upstream
from tests.support.appmirror import MirrorFactory, app_config
from tests.support.disk import fill
from tests.support.faultupstream import Behaviour, FaultUpstream, random_bytes
from tests.support.oci import image_manifest_naming as image
from tests.support.oci import sha256_digest
from tests.support.store import assert_store_verified, stored_files

pytestmark = pytest.mark.timeout(60)
MB = 1024 * 1024





@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` read-only under the running mirror: a read-only bind mount over it (a tmpfs
    with files open for writing cannot be remounted read-only)."""
    subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tmp").iterdir() if not p.name.startswith(".ready"))


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with client.get(url) as resp:
        return resp.status, await resp.read()


async def test_full_disk_late_joiner_after_the_memory_window_gets_the_whole_body(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tiny_disk: Path) -> None:
    big = random_bytes(20 * MB)
    digest = upstream.add_blob(big, Behaviour(gate_after=12 * MB))
    base = await start_mirror(cache={"dir": str(tiny_disk), "max_size": "5MiB",
                                     "prefetch": False})
    url = f"{base}/v2/r/blobs/{digest}"
    async with client.get(url) as first:
        assert first.status == 200
        head = await first.content.readexactly(12 * MB)  # past the disk, into the relay
        # Joins after the first client consumed (and the relay dropped) the bytes past the disk.
        late = asyncio.ensure_future(get(client, url))
        await asyncio.sleep(0)
        upstream.gate.set()
        rest = await first.read()
    assert head + rest == big
    assert await late == (200, big)
    assert digest not in stored_files(tiny_disk)
    assert leftovers(tiny_disk) == []


async def test_full_disk_cold_blob_and_manifest_are_relayed_whole(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tiny_disk: Path) -> None:
    blob = random_bytes(3 * MB)
    blob_digest = upstream.add_blob(blob)
    data = image(blob_digest)
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"dir": str(tiny_disk), "prefetch": False})
    assert (await get(client, f"{base}/v2/")) [0] == 200
    fill(tiny_disk)
    answers = await asyncio.gather(
        *(get(client, f"{base}/v2/app/blobs/{blob_digest}") for _ in range(4)),
        *(get(client, f"{base}/v2/app/manifests/v1") for _ in range(2)))
    assert answers == [(200, blob)] * 4 + [(200, data)] * 2
    assert stored_files(tiny_disk) == {}
    assert leftovers(tiny_disk) == []
    (tiny_disk / "filler").unlink()  # space again: the mirror caches again
    assert await get(client, f"{base}/v2/app/blobs/{blob_digest}") == (200, blob)
    assert blob_digest in stored_files(tiny_disk)
    assert_store_verified(tiny_disk)


async def test_read_only_cache_dir_relays_uncached_and_says_why(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tiny_disk: Path) -> None:
    cached = random_bytes(MB)
    cached_digest = upstream.add_blob(cached)
    cold = random_bytes(3 * MB)
    cold_digest = upstream.add_blob(cold)
    data = image(cold_digest)
    upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"dir": str(tiny_disk), "prefetch": False})
    assert await get(client, f"{base}/v2/app/blobs/{cached_digest}") == (200, cached)
    with read_only(tiny_disk):
        answers = await asyncio.gather(
            get(client, f"{base}/v2/app/blobs/{cached_digest}"),
            *(get(client, f"{base}/v2/app/blobs/{cold_digest}") for _ in range(3)),
            get(client, f"{base}/v2/app/manifests/v1"))
        assert answers == [(200, cached)] + [(200, cold)] * 3 + [(200, data)]
        async with client.get(f"{base}/readyz") as resp:
            assert resp.status == 503
            detail = (await resp.json())["checks"]["cache_writable"]["detail"]
        assert detail == f"cache directory is read-only: {tiny_disk}"
    assert cold_digest not in stored_files(tiny_disk)
    assert leftovers(tiny_disk) == []


async def test_a_manifest_answered_from_memory_is_still_on_disk(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = image(sha256_digest(b"config"))
    digest = upstream.add_manifest("app", "v1", data, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False})
    assert await get(client, f"{base}/v2/app/manifests/v1") == (200, data)
    # Another worker process evicts it (its own store and index over the same cache dir).
    cache = tmp_path / "cache"
    store, index = BlobStore(cache), Index(cache / "index")
    try:
        evict(store, index, 0, set())
    finally:
        index.close()
    assert sha256_digest(data) not in stored_files(cache)
    for ref in ("v1", digest):
        assert await get(client, f"{base}/v2/app/manifests/{ref}") == (200, data)
    assert stored_files(cache).get(digest) == data
    index = Index(cache / "index")
    try:
        assert any(e.digest == parse_digest(digest) for e in index.entries())
    finally:
        index.close()


async def test_full_disk_relay_still_withholds_a_wrong_blob(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tiny_disk: Path) -> None:
    digest = upstream.add_blob(random_bytes(2 * MB), Behaviour(corrupt=True))
    base = await start_mirror(cache={"dir": str(tiny_disk), "prefetch": False})
    assert (await get(client, f"{base}/v2/"))[0] == 200
    fill(tiny_disk)
    answers = await asyncio.gather(
        *(get(client, f"{base}/v2/r/blobs/{digest}") for _ in range(3)), return_exceptions=True)
    for answer in answers:  # a cut body or an error status: never the whole wrong blob
        assert isinstance(answer, aiohttp.ClientPayloadError) or answer[0] == 502, answer
    assert stored_files(tiny_disk) == {}
    assert leftovers(tiny_disk) == []


# An index damaged while a download waits is covered with real worker processes by
# tests/faults/test_disk_faults.py (index_damaged-w1/w2-inflight). Not here: overwriting an
# open SQLite database in this process leaves SQLite's process-wide per-inode state behind,
# and a later test whose new file reuses the inode failed with "disk I/O error".


async def test_an_upstream_body_read_slowly_leaves_no_stale_timeout_behind(
        tmp_path: Path) -> None:
    """The slow-client-on-a-full-disk row of tests/faults: a body read slower than it arrives
    (a relay paced by its client) re-arms aiohttp's read timer after its connection went back
    to the pool; the timer fires there, and the next request on that connection failed at
    once with "did not answer in time" (a 504 the upstream never caused)."""
    body = random_bytes(8 * MB)

    async def blob(_request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/v2/r/blobs/{digest}", blob)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    config = app_config(tmp_path, str(server.make_url("")).rstrip("/"),
                        upstream_extra={"read_timeout": "300ms"})
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            upstream = Upstream(config.upstreams[0], session)
            for _ in range(2):
                resp = await upstream.request("GET", "r", "blobs/x")
                got = b""
                while chunk := await resp.content.readany():
                    got += chunk
                    await asyncio.sleep(0.001)  # slower than loopback delivers
                resp.release()
                assert got == body
                await asyncio.sleep(0.5)  # past read_timeout, idle in the pool
    finally:
        await server.close()
