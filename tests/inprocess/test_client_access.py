"""Client access control: htpasswd users, the token endpoint, public vs authenticated
upstreams, and anonymous reads kept possible."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import FaultUpstream, random_bytes

pytestmark = pytest.mark.timeout(60)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"alice:{hashed}\n")
    return path


async def test_token_flow_for_public_and_authenticated_upstreams(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, htpasswd: Path) -> None:
    public_blob = upstream.add_blob(random_bytes(100))
    private_data = random_bytes(100)
    private_blob = other_origin.add_blob(private_data)
    base = await start_mirror(auth={"htpasswd": str(htpasswd)}, upstreams=[
        {"name": "pub.test", "url": upstream.url},
        {"name": "priv.test", "url": other_origin.url, "access": "authenticated"}])

    # the ping challenges clients without a token, naming the realm
    async with client.get(f"{base}/v2/") as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{base}/token"')
    # anonymous reads of a public upstream need nothing at all
    async with client.get(f"{base}/v2/r/blobs/{public_blob}") as resp:
        assert resp.status == 200
    # an authenticated upstream challenges with the repository's scope
    async with client.get(f"{base}/v2/priv.test/r/blobs/{private_blob}") as resp:
        assert resp.status == 401
        assert 'scope="repository:r:pull"' in resp.headers["WWW-Authenticate"]
    # an anonymous token opens the ping, not the authenticated upstream
    async with client.get(f"{base}/token?service=registry-mirror") as resp:
        anonymous = (await resp.json())["token"]
    async with client.get(f"{base}/v2/", headers={"Authorization": f"Bearer {anonymous}"}) as r:
        assert r.status == 200
    async with client.get(f"{base}/v2/priv.test/r/blobs/{private_blob}",
                          headers={"Authorization": f"Bearer {anonymous}"}) as resp:
        assert resp.status == 401
    # a user's token (and plain Basic) does
    async with client.get(f"{base}/token", headers={"Authorization": basic("alice", "s3cret")}
                          ) as resp:
        body = await resp.json()
        assert body["expires_in"] > 0
    for auth in (f"Bearer {body['token']}", basic("alice", "s3cret")):
        async with client.get(f"{base}/v2/priv.test/r/blobs/{private_blob}",
                              headers={"Authorization": auth}) as resp:
            assert resp.status == 200 and await resp.read() == private_data
    # wrong passwords and forged tokens are refused
    async with client.get(f"{base}/token", headers={"Authorization": basic("alice", "no")}) as r:
        assert r.status == 401
    async with client.get(f"{base}/v2/priv.test/r/blobs/{private_blob}",
                          headers={"Authorization": "Bearer x.y"}) as resp:
        assert resp.status == 401


async def test_access_control_off_by_default(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    base = await start_mirror()
    async with client.get(f"{base}/v2/") as resp:
        assert resp.status == 200 and "WWW-Authenticate" not in resp.headers
    async with client.get(f"{base}/token") as resp:
        assert resp.status == 404
