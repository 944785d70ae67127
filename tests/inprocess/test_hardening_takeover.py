"""A download whose leader died after its last byte but before the rename (or committed
while a follower was taking the lock) is finished from disk, never asked for again: a
Range request after the last byte is answered 416 by real registries (found with two
workers in tests/integration/test_token_auth.py)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

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
