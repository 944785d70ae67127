"""Private upstream content and upstream credentials from a docker credential helper."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.appmirror import MirrorFactory
from tests.support.credhelper import write_credential_helper
from tests.support.faultupstream import FaultUpstream, random_bytes

pytestmark = pytest.mark.timeout(60)


async def test_private_blob_not_readable_under_another_repository(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.auth = "basic"
    secret = random_bytes(5000)
    digest = upstream.add_blob(secret)
    upstream.private = {"team/private": {digest}, "someone/public": set()}
    base = await start_mirror(upstream_extra={"username": "user", "password": "pass"})
    async with client.get(f"{base}/v2/team/private/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == secret
    # now cached: asking for the same digest under a repository that lacks it is refused
    async with client.get(f"{base}/v2/someone/public/blobs/{digest}") as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    async with client.head(f"{base}/v2/someone/public/blobs/{digest}") as resp:
        assert resp.status == 404
    # the owner keeps reading it from the cache, without asking upstream again
    before = len(upstream.seen)
    async with client.get(f"{base}/v2/team/private/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == secret
    assert len(upstream.seen) == before
    # a repository the upstream confirms also holds the blob is served from the cache
    upstream.private["team/other"] = {digest}
    async with client.get(f"{base}/v2/team/other/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == secret
    assert [s.method for s in upstream.seen[before:] if s.authorization] == ["HEAD"]


async def test_anonymous_upstream_content_is_shared_across_repositories(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = random_bytes(5000)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    for repo in ("a/one", "b/two"):
        async with client.get(f"{base}/v2/{repo}/blobs/{digest}") as resp:
            assert resp.status == 200
    assert upstream.count("GET", digest) + upstream.count("HEAD", digest) == 1


@pytest.fixture
def credential_helper(tmp_path: Path) -> Iterator[Path]:
    """A `docker-credential-test` on PATH that logs each call and answers user/pass."""
    bindir = tmp_path / "bin"
    log = tmp_path / "helper.log"
    write_credential_helper(bindir, "test", "user", "pass", log)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bindir}:{old}"
    try:
        yield log
    finally:
        os.environ["PATH"] = old


async def test_credential_helper_supplies_the_upstream_credentials(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        credential_helper: Path) -> None:
    upstream.auth = "bearer"
    data = random_bytes(1000)
    digest = upstream.add_blob(data)
    base = await start_mirror(upstream_extra={"credential_helper": "test"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data
    host = upstream.url.removeprefix("http://")
    assert credential_helper.read_text().split() == [host]
    assert upstream.token_requests[0]["authorization"] == "Basic dXNlcjpwYXNz"


async def test_missing_credential_helper_is_a_clear_error(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.auth = "bearer"
    digest = upstream.add_blob(random_bytes(10))
    base = await start_mirror(upstream_extra={"credential_helper": "nonexistent-xyz"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 403  # DENIED: never a 401 the client could not answer
        message = (await resp.json())["errors"][0]["message"]
        assert "docker-credential-nonexistent-xyz is not on PATH" in message
