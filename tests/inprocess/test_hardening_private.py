"""Private content stays private whichever upstream, repository name or worker is asked
(issue 10, items 1 and 2).

"Two workers" here are two mirror apps in this process sharing one cache directory: each has
its own downloads, memory and flocks (flock conflicts between open file descriptions, so the
second app follows the first one's partial file exactly as another worker process would).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import Behaviour, FaultUpstream, random_bytes

pytestmark = pytest.mark.timeout(60)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BASIC_USER = "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{bcrypt.hashpw(b's3cret', bcrypt.gensalt(rounds=4)).decode()}\n")
    return path


def _upstreams(public: FaultUpstream, private: FaultUpstream, how: str) -> list[dict[str, object]]:
    """The public default upstream first; the private one reached with credentials, or
    anonymously but readable by authenticated clients only."""
    extra: dict[str, object] = ({"username": "user", "password": "pass"} if how == "credentials"
                                else {"access": "authenticated"})
    return [{"name": "pub.test", "url": public.url},
            {"name": "priv.test", "url": private.url, **extra}]


async def _token(client: aiohttp.ClientSession, base: str) -> dict[str, str]:
    async with client.get(f"{base}/token", headers={"Authorization": BASIC_USER}) as resp:
        assert resp.status == 200
        return {"Authorization": f"Bearer {(await resp.json())['token']}"}


def _manifest(layer: str) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": layer, "size": 1},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                       "size": 1}]}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("how", "auth_on"), [
    ("credentials", True), ("credentials", False),
    ("authenticated", True),  # access = "authenticated" needs [auth]
], ids=["credentials-auth", "credentials-no-auth", "authenticated-auth"])
async def test_private_content_is_not_served_through_the_public_default_upstream(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, htpasswd: Path, how: str, auth_on: bool) -> None:
    private = other_origin
    if how == "credentials":
        private.auth = "basic"
    secret = random_bytes(50_000)
    layer = private.add_blob(secret)
    manifest = private.add_manifest("team/app", "v1", _manifest(layer), OCI_MANIFEST)
    base = await start_mirror(upstreams=_upstreams(upstream, private, how),
                              auth={"htpasswd": str(htpasswd)} if auth_on else None)
    user = await _token(client, base) if auth_on else {}

    async with client.get(f"{base}/v2/priv.test/team/app/manifests/v1", headers=user) as resp:
        assert resp.status == 200
    async with client.get(f"{base}/v2/priv.test/team/app/blobs/{layer}", headers=user) as resp:
        assert resp.status == 200 and await resp.read() == secret

    # Anyone, through the public default upstream, under any name: the public upstream is
    # asked (anonymously) and does not hold it.
    for path in (f"anything/blobs/{layer}", f"anything/manifests/{manifest}",
                 f"library/x/blobs/{layer}"):
        for method in ("GET", "HEAD"):
            async with client.request(method, f"{base}/v2/{path}") as resp:
                assert resp.status == 404, (method, path)
                assert await resp.read() != secret
    assert all(s.authorization is None for s in upstream.seen)
    assert {s.method for s in upstream.seen if layer in s.path} == {"HEAD"}


async def test_private_content_also_public_upstream_is_served_once_confirmed(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    other_origin.auth = "basic"
    data = random_bytes(20_000)
    digest = other_origin.add_blob(data)
    upstream.add_blob(data)
    upstream.private = {"holds/it": {digest}, "lacks/it": set()}
    base = await start_mirror(upstreams=_upstreams(upstream, other_origin, "credentials"))
    async with client.get(f"{base}/v2/priv.test/team/app/blobs/{digest}") as resp:
        assert resp.status == 200
    async with client.get(f"{base}/v2/lacks/it/blobs/{digest}") as resp:
        assert resp.status == 404
    async with client.get(f"{base}/v2/holds/it/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data
    # confirmed with a HEAD, never downloaded again from the public upstream
    assert upstream.count("GET", digest) == 0
    # what an anonymous upstream serves is public: other names need no more questions
    seen = len(upstream.seen)
    async with client.get(f"{base}/v2/another/name/blobs/{digest}") as resp:
        assert resp.status == 200
    assert len(upstream.seen) == seen


async def test_a_download_followed_from_another_worker_needs_confirmation(
        other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    private = other_origin
    private.auth = "basic"
    secret = random_bytes(2_000_000)
    digest = private.add_blob(secret, Behaviour(gate_after=500_000, times=1))
    private.private = {"team/a": {digest}, "team/b": set()}
    upstreams = [{"name": "priv.test", "url": private.url, "username": "user",
                  "password": "pass", "read_timeout": "10s"}]
    first = await start_mirror(upstreams=upstreams)
    second = await start_mirror(upstreams=upstreams)

    owner = asyncio.ensure_future(client.get(f"{first}/v2/team/a/blobs/{digest}"))
    await asyncio.wait_for(private.reached_gate.wait(), 10)
    # The second "worker" finds the partial file locked and would follow it.
    async with client.get(f"{second}/v2/team/b/blobs/{digest}") as resp:
        assert resp.status == 404
    async with client.get(f"{second}/v2/team/a/blobs/{digest}") as resp:
        # the rightful owner through the second worker: confirmed, then joins the download
        assert resp.status == 200
        private.gate.set()
        assert await resp.read() == secret
    async with await owner as resp:
        assert resp.status == 200 and await resp.read() == secret
    assert sum(1 for s in private.seen if s.method == "GET" and s.authorization) == 1
    # ... and team/b was not remembered as confirmed: still refused, from either worker
    for base in (first, second):
        async with client.get(f"{base}/v2/team/b/blobs/{digest}") as resp:
            assert resp.status == 404


async def test_an_in_process_download_for_another_repository_needs_confirmation(
        other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    private = other_origin
    private.auth = "basic"
    secret = random_bytes(1_000_000)
    digest = private.add_blob(secret, Behaviour(gate_after=100_000, times=1))
    private.private = {"team/a": {digest}, "team/b": set()}
    base = await start_mirror(upstreams=[{"name": "priv.test", "url": private.url,
                                          "username": "user", "password": "pass"}])
    owner = asyncio.ensure_future(client.get(f"{base}/v2/team/a/blobs/{digest}"))
    await asyncio.wait_for(private.reached_gate.wait(), 10)
    async with client.get(f"{base}/v2/team/b/blobs/{digest}") as resp:
        assert resp.status == 404
    private.gate.set()
    async with await owner as resp:
        assert resp.status == 200 and await resp.read() == secret
