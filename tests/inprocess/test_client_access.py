"""Client access control: htpasswd users, the token endpoint, public vs authenticated
upstreams, and anonymous reads kept possible."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from yarl import URL

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


def _raw_get(base: str, path: str, authorization: bytes) -> bytes:
    url = URL(base)
    with socket.create_connection((url.host or "127.0.0.1", url.port or 80), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                  + b"Authorization: " + authorization + b"\r\n\r\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_bad_tokens_get_a_challenge_never_a_500(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        htpasswd: Path) -> None:
    blob = other_origin.add_blob(random_bytes(100))
    base = await start_mirror(auth={"htpasswd": str(htpasswd)}, upstreams=[
        {"name": "pub.test", "url": upstream.url},
        {"name": "priv.test", "url": other_origin.url, "access": "authenticated"}])
    expired = base64.urlsafe_b64encode(b'{"sub":"alice","exp":1}').decode().rstrip("=")
    for token in (b"Bearer \xc3\xa9t\xc3\xa9.abc", b"Bearer \xe9\xff", b"Bearer ",
                  b"Bearer " + b"a" * 6000, b"Bearer e30.e30.e30",
                  b"Bearer " + expired.encode() + b".00", b"Basic \xe9\xe9", b"Digest x"):
        for path in ("/v2/", f"/v2/priv.test/r/blobs/{blob}", "/"):
            response = await asyncio.to_thread(_raw_get, base, path, token)
            head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            assert head.startswith("HTTP/1.1 401"), (token, path, head)
            assert "WWW-Authenticate:" in head, (token, path, head)
