"""One upstream download per blob, followers streaming as bytes arrive, resume and faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mirror.cache.locks import try_lock
from mirror.cache.store import BlobStore
from mirror.oci.reference import parse_digest
from mirror.pull import downloads
from tests.support.appmirror import MirrorFactory, app_config, serve_app
from tests.support.faultupstream import (
    Behaviour,
    FaultUpstream,
    close_upstream,
    random_bytes,
    serve_upstream,
)
from tests.support.oci import sha256_digest
from tests.support.store import assert_store_verified, stored_files

pytestmark = pytest.mark.timeout(60)
SIZE = 4 * 1024 * 1024


async def get(client: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, bytes]:
    async with client.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read()


async def leave_mid_body(url: str) -> None:
    """A client that reads the start of a body, then disconnects."""
    async with aiohttp.ClientSession() as leaver:
        resp = await leaver.get(url)
        await resp.content.readexactly(1000)
        resp.close()


async def test_concurrent_cold_requests_make_one_upstream_get(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(gate_after=SIZE // 2))
    base = await start_mirror()
    # different repository names: the store is content-addressed
    urls = [f"{base}/v2/repo{i % 3}/blobs/{digest}" for i in range(12)]
    tasks = [asyncio.ensure_future(get(client, u)) for u in urls]
    await upstream.reached_gate.wait()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(status == 200 and body == data for status, body in results)
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert stored_files(tmp_path / "cache") == {digest: data}


async def test_followers_receive_bytes_before_the_download_finishes(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    data = random_bytes(SIZE)
    half = SIZE // 2
    digest = upstream.add_blob(data, Behaviour(gate_after=half))
    base = await start_mirror()
    async with client.get(f"{base}/v2/r/blobs/{digest}") as first:
        assert first.status == 200 and first.content_length == SIZE
        got_first = await first.content.readexactly(half)
        # a late joiner while the upstream is paused mid-body: it gets the landed half now
        async with client.get(f"{base}/v2/other/blobs/{digest}") as late:
            got_late = await late.content.readexactly(half)
            assert got_first == got_late == data[:half]
            upstream.gate.set()
            assert got_late + await late.read() == data
        assert got_first + await first.read() == data
    assert upstream.count("GET", digest) == 1


async def test_reset_mid_body_resumes_with_range(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(reset_after=SIZE // 3, times=2))
    base = await start_mirror()
    status, body = await get(client, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data
    ranges = [s.range for s in upstream.seen if digest in s.path]
    assert ranges[0] is None and len(ranges) == 3
    assert all(r and r.startswith("bytes=") for r in ranges[1:])
    assert stored_files(tmp_path / "cache") == {digest: data}


async def test_stall_resumes_after_read_timeout(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(stall_after=SIZE // 2, times=1))
    base = await start_mirror(upstream_extra={"read_timeout": "300ms"})
    status, body = await get(client, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data
    assert [s.range for s in upstream.seen if digest in s.path] == [None, f"bytes={SIZE // 2}-"]
    assert_store_verified(tmp_path / "cache")


async def test_upstream_ignoring_range_is_skipped_not_duplicated(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(reset_after=SIZE // 2, ignore_range=True, times=1))
    upstream.behaviour[digest].ignore_range = True
    base = await start_mirror()
    status, body = await get(client, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data


async def test_wrong_bytes_are_never_cached_and_clients_are_aborted(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(corrupt=True, times=1))
    base = await start_mirror()
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(client, f"{base}/v2/r/blobs/{digest}")
    assert stored_files(tmp_path / "cache") == {}
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    # the next request starts a fresh download, which is now correct
    status, body = await get(client, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data
    assert upstream.count("GET", digest) == 2


async def test_resume_impossible_aborts_clients_and_caches_nothing(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(reset_after=1000))
    base = await start_mirror(upstream_extra={"resume_attempts": 3})
    results = await asyncio.gather(*[get(client, f"{base}/v2/r/blobs/{digest}")
                                     for _ in range(3)], return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientPayloadError) for r in results), results
    assert upstream.count("GET", digest) == 3
    assert stored_files(tmp_path / "cache") == {}
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_a_client_leaving_does_not_disturb_others_and_the_cache_fills(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(gate_after=SIZE // 2))
    base = await start_mirror()
    async with aiohttp.ClientSession() as leaver:
        resp = await leaver.get(f"{base}/v2/r/blobs/{digest}")
        await resp.content.readexactly(1000)
        stayer = asyncio.ensure_future(get(client, f"{base}/v2/r/blobs/{digest}"))
        resp.close()  # disconnect mid-stream
    upstream.gate.set()
    status, body = await stayer
    assert status == 200 and body == data
    assert stored_files(tmp_path / "cache") == {digest: data}


async def test_abandoned_download_still_completes(
        upstream: FaultUpstream, start_mirror: MirrorFactory, tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(gate_after=SIZE // 2))
    base = await start_mirror()
    await leave_mid_body(f"{base}/v2/r/blobs/{digest}")
    upstream.gate.set()
    async with aiohttp.ClientSession() as later:
        status, body = await get(later, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data
    assert upstream.count("GET", digest) == 1


async def test_abandoned_download_is_cancelled_when_configured(
        upstream: FaultUpstream, start_mirror: MirrorFactory, tmp_path: Path) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(gate_after=SIZE // 2, times=1))
    base = await start_mirror(cache={"finish_abandoned": False})
    await leave_mid_body(f"{base}/v2/r/blobs/{digest}")
    upstream.gate.set()
    async with aiohttp.ClientSession() as later:
        status, body = await get(later, f"{base}/v2/r/blobs/{digest}")
    assert status == 200 and body == data
    assert upstream.count("GET", digest) == 2  # the first was cancelled, not finished


async def test_ranges_on_hits_and_in_flight_blobs(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data, Behaviour(gate_after=SIZE // 2))
    base = await start_mirror()
    url = f"{base}/v2/r/blobs/{digest}"
    full = asyncio.ensure_future(get(client, url))
    await upstream.reached_gate.wait()
    # in flight: a range inside the landed half is served now, while the upstream is paused
    async with client.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
        assert await resp.read() == data[100:200]
    upstream.gate.set()
    assert (await full)[1] == data
    for header, expected in [("bytes=-10", data[-10:]), (f"bytes={SIZE - 5}-", data[-5:]),
                             ("bytes=0-0", data[:1])]:
        async with client.get(url, headers={"Range": header}) as resp:
            assert resp.status == 206 and await resp.read() == expected
    async with client.get(url, headers={"Range": f"bytes={SIZE}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
    async with client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"sha256:other"'}) as r:
        assert r.status == 200 and await r.read() == data
    async with client.get(url, headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'}) as r:
        assert r.status == 206 and r.headers["Accept-Ranges"] == "bytes"


async def test_another_worker_download_is_followed_then_taken_over(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """A partial file locked by another process is followed, not downloaded again; when its
    holder dies (its lock goes), this worker takes over and resumes from the bytes on disk."""
    import fcntl
    import json
    import os

    data = random_bytes(SIZE)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    tmp = tmp_path / "cache" / "tmp"
    partial = tmp / f"{digest.replace(':', '-')}.partial"
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another worker" leads
    (tmp / f"{partial.name}.meta").write_text(json.dumps({"size": SIZE}))
    os.write(fd, data[: SIZE // 2])
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200 and resp.content_length == SIZE
        assert await resp.content.readexactly(SIZE // 2) == data[: SIZE // 2]
        assert upstream.count("GET", digest) == 0
        os.close(fd)  # the other worker dies
        assert await resp.read() == data[SIZE // 2:]
    assert [s.range for s in upstream.seen if digest in s.path] == [f"bytes={SIZE // 2}-"]
    assert stored_files(tmp_path / "cache") == {digest: data}


async def test_missing_blob_is_blob_unknown(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    base = await start_mirror()
    async with client.get(f"{base}/v2/r/blobs/{sha256_digest(b'missing')}") as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_429_is_relayed_and_not_retried_into(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    cached = upstream.add_blob(random_bytes(100))
    limited = upstream.add_blob(random_bytes(100), Behaviour(status=429,
                                                             headers={"Retry-After": "7"}))
    other = upstream.add_blob(random_bytes(100))
    base = await start_mirror()
    async with client.get(f"{base}/v2/r/blobs/{cached}") as resp:
        assert resp.status == 200
    async with client.get(f"{base}/v2/r/blobs/{limited}") as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "7"
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    seen = len(upstream.seen)
    # while the limit lasts the upstream is not asked again; the cache still answers
    async with client.get(f"{base}/v2/r/blobs/{other}") as resp:
        assert resp.status == 429 and 0 < int(resp.headers["Retry-After"]) <= 7
    async with client.get(f"{base}/v2/r/blobs/{cached}") as resp:
        assert resp.status == 200
    assert len(upstream.seen) == seen


async def test_unreachable_upstream_is_a_502_json(
        start_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    base = await start_mirror(upstreams=[{"name": "dead", "url": "http://127.0.0.1:9"}])
    async with client.get(f"{base}/v2/r/blobs/{sha256_digest(b'x')}") as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body["errors"][0]["code"] == "UPSTREAM_UNREACHABLE"
        assert "dead" in body["errors"][0]["message"]


async def test_several_ranges_of_a_stored_blob_are_a_multipart_body(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
) -> None:
    data = random_bytes(SIZE)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    url = f"{base}/v2/r/blobs/{digest}"
    assert (await get(client, url))[1] == data  # now stored
    async with client.get(url, headers={"Range": "bytes=0-9, 100-199, -5"}) as resp:
        assert resp.status == 206
        ctype = resp.headers["Content-Type"]
        assert ctype.startswith("multipart/byteranges; boundary=")
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
    boundary = ctype.split("boundary=")[1].encode()
    parts = body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    got = []
    for part in parts[1:-1]:
        head, _, payload = part.partition(b"\r\n\r\n")
        assert payload.endswith(b"\r\n")
        got.append((head.split(b"Content-Range: ")[1].decode(), payload[:-2]))
    assert got == [(f"bytes 0-9/{SIZE}", data[:10]), (f"bytes 100-199/{SIZE}", data[100:200]),
                   (f"bytes {SIZE - 5}-{SIZE - 1}/{SIZE}", data[-5:])]
    # a single range stays a plain 206; several ranges of a blob still downloading: 200
    async with client.get(url, headers={"Range": "bytes=3-4"}) as resp:
        assert resp.status == 206 and await resp.read() == data[3:5]
    other = upstream.add_blob(random_bytes(SIZE), Behaviour(gate_after=SIZE // 2))
    pending = asyncio.ensure_future(get(client, f"{base}/v2/r/blobs/{other}"))
    await upstream.reached_gate.wait()
    async with client.get(f"{base}/v2/r/blobs/{other}", headers={"Range": "bytes=0-1,5-6"}
                          ) as resp:
        assert resp.status == 200
        upstream.gate.set()
        assert len(await resp.read()) == SIZE
    await pending


class HeldUpstream(FaultUpstream):
    """Holds its blob answers under the repository `held` until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def blob(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] == "held":
            self.holding.set()
            await self.release.wait()
        return await super().blob(request)


@pytest.mark.parametrize("arrives", ["before the follower noticed", "after"])
async def test_a_client_arriving_after_the_leader_dropped_its_file_starts_afresh(
        client: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        arrives: str) -> None:
    """tests/faults 5xx-blob-w2-inflight: another worker led and failed (its file dropped);
    this worker's follower, started by a request under a name the upstream refuses, relays
    the rest under that name. A client arriving then (after the fault is gone) must not join
    that relay and be cut when it fails: it gets a download of its own."""
    monkeypatch.setattr(downloads, "REMOTE_POLL_SECONDS", 0.5)  # the follower polls slowly
    up = await serve_upstream(HeldUpstream())
    data = random_bytes(SIZE)
    digest = up.add_blob(data)
    up.private = {"held": set()}  # the follower's name: the upstream holds nothing there
    store = BlobStore(tmp_path / "cache")
    d = parse_digest(digest)
    # Another worker leads: half the blob in its locked partial file, the size beside it.
    store.partial_path(d).write_bytes(data[: SIZE // 2])
    store.write_partial_meta(d, SIZE)
    leader_fd = os.open(store.partial_path(d), os.O_RDONLY)
    assert try_lock(leader_fd)
    server, base = await serve_app(app_config(tmp_path / "cache", up.url))
    try:
        follower = asyncio.ensure_future(get(client, f"{base}/v2/held/blobs/{digest}"))
        await asyncio.sleep(0.2)  # following the other worker's file
        store.drop_partial(d)  # the other worker failed: its file is gone, its lock too
        os.close(leader_fd)
        if arrives == "after":
            await asyncio.wait_for(up.holding.wait(), 10)  # the follower relays the rest
        late = asyncio.ensure_future(get(client, f"{base}/v2/r/blobs/{digest}"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(up.holding.wait(), 10)
        up.release.set()  # the follower's relay fails (404 under its name)
        assert await asyncio.wait_for(late, 20) == (200, data)
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await follower  # cut: its name does not hold the blob
        assert stored_files(tmp_path / "cache")[digest] == data
    finally:
        await server.close()
        await close_upstream(up)
