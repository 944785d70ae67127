"""A download whose leader died after its last byte but before the rename (or committed
while a follower was taking the lock) is finished from disk, never asked for again: a
Range request after the last byte is answered 416 by real registries (found with two
workers in tests/integration/test_token_auth.py)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from mirror.cache.locks import try_lock
from mirror.cache.store import BlobStore
from mirror.oci.reference import parse_digest
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import FaultUpstream, random_bytes
from tests.support.store import stored_files

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("written", ["all", "half"])
async def test_an_orphaned_partial_file_is_finished_from_disk(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path, written: str) -> None:
    data = random_bytes(3_000_000)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    store = BlobStore(tmp_path / "cache")
    partial = store.partial_path(parse_digest(digest))
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = len(data) if written == "all" else len(data) // 2
    partial.write_bytes(data[:have])  # unlocked: its worker is gone
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data
    gets = [s for s in upstream.seen if s.method == "GET" and digest in s.path]
    if written == "all":
        assert gets == []  # nothing left to ask for
    else:
        assert [s.range for s in gets] == [f"bytes={have}-"]
    assert stored_files(tmp_path / "cache")[digest] == data


async def test_a_refused_request_that_started_a_follow_does_not_break_the_takeover(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """Another worker leads the download of a private blob (its partial file locked). An
    intruder asking under a repository that does not hold it starts this worker's follower,
    then is refused; a client of the repository that holds it joins. When the leader dies,
    this worker takes over with the client's fetch, not the intruder's (which the upstream
    refuses): the client gets the whole blob (found by CI with two workers and a full disk)."""
    data = random_bytes(2_000_000)
    digest = upstream.add_blob(data)
    upstream.auth = "basic"
    upstream.private = {"team/app": {digest}, "intruder/repo": set()}
    base = await start_mirror(upstream_extra={"username": "user", "password": "pass"})
    store = BlobStore(tmp_path / "cache")
    d = parse_digest(digest)
    fd = store.open_partial(d)  # the leading worker: holds the lock, wrote half, said the size
    try:
        assert try_lock(fd)
        os.pwrite(fd, data[: len(data) // 2], 0)
        store.write_partial_meta(d, len(data))
        async with client.get(f"{base}/v2/intruder/repo/blobs/{digest}") as resp:
            assert resp.status == 404  # refused, after it started following the leader
        async with client.get(f"{base}/v2/team/app/blobs/{digest}") as resp:
            assert resp.status == 200
            first = await resp.content.readexactly(len(data) // 4)
            os.close(fd)  # the leading worker dies: its lock goes with it
            fd = -1
            body = first + await resp.read()
        assert body == data
    finally:
        if fd >= 0:
            os.close(fd)
