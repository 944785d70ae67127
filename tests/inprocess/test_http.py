"""The HTTP surface: errors as registry JSON, hostile input, routing, upstream auth."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from mirror.oci import mediatypes as mt
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import FaultUpstream, random_bytes
from tests.support.oci import sha256_digest

pytestmark = pytest.mark.timeout(60)


async def error_of(resp: aiohttp.ClientResponse) -> str:
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    code: str = body["errors"][0]["code"]
    assert body["errors"][0]["message"]
    return code


async def test_base_endpoint(start_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    base = await start_mirror()
    for path in ("/v2/", "/v2"):
        async with client.get(base + path) as resp:
            assert resp.status == 200 and await resp.json() == {}
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_writes_are_unsupported(method: str, start_mirror: MirrorFactory,
                                      client: aiohttp.ClientSession) -> None:
    base = await start_mirror()
    for path in ("/v2/a/manifests/v1", "/v2/a/blobs/uploads/", f"/v2/a/blobs/{sha256_digest(b'')}"):
        async with client.request(method, base + path) as resp:
            assert resp.status == 405 and await error_of(resp) == "UNSUPPORTED"


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v2/a/blobs/sha256:..%2F..%2Fetc%2Fpasswd", 404, "NAME_UNKNOWN"),
    ("/v2/a/blobs/sha256:..", 400, "DIGEST_INVALID"),
    ("/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
    ("/v2/a/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("/v2/%2E%2E/%2E%2E/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("/v2/a/..%2F..%2Fx/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/UPPER/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/a/manifests/bad:tag", 400, "DIGEST_INVALID"),
    ("/v2/a/manifests/.tag", 404, "MANIFEST_UNKNOWN"),  # the spec's pull tests want 404
    ("/v2/a/nothing", 404, "NAME_UNKNOWN"),
    ("/v2/_catalog", 404, "UNSUPPORTED"),
    ("/etc/passwd", 404, "NAME_UNKNOWN"),
])
async def test_hostile_paths_are_rejected_before_touching_disk(
        path: str, status: int, code: str, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, upstream: FaultUpstream, tmp_path: Path) -> None:
    base = await start_mirror()
    async with client.get(URL(base + path, encoded=True)) as resp:
        assert resp.status == status and await error_of(resp) == code
    assert upstream.seen == []
    assert {p.name for p in tmp_path.iterdir()} == {"cache"}


async def test_routing_by_ns_prefix_and_default(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    first = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "n": 1}).encode()
    second = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "n": 2}).encode()
    upstream.add_manifest("library/app", "v1", first, mt.OCI_MANIFEST)
    other_origin.add_manifest("team/app", "v1", second, mt.OCI_MANIFEST)
    base = await start_mirror(upstreams=[
        {"name": "docker.io", "url": upstream.url},
        {"name": "ghcr.io", "url": other_origin.url}])
    for path, expected in [("/v2/app/manifests/v1", first),
                           ("/v2/docker.io/app/manifests/v1", first),
                           ("/v2/team/app/manifests/v1?ns=ghcr.io", second),
                           ("/v2/ghcr.io/team/app/manifests/v1", second)]:
        async with client.get(base + path) as resp:
            assert resp.status == 200 and await resp.read() == expected, path
    async with client.get(base + "/v2/team/app/manifests/v1?ns=quay.io") as resp:
        assert resp.status == 404 and await error_of(resp) == "NAME_UNKNOWN"
        assert "ghcr.io" in (await resp.json())["errors"][0]["message"]


async def test_bearer_token_flow(upstream: FaultUpstream, start_mirror: MirrorFactory,
                                 client: aiohttp.ClientSession) -> None:
    upstream.auth = "bearer"
    blobs = [random_bytes(1000) for _ in range(3)]
    digests = [upstream.add_blob(b) for b in blobs]
    base = await start_mirror(upstream_extra={"username": "user", "password": "pass"})
    for repo, digest, data in zip(("one", "one", "two"), digests, blobs, strict=True):
        async with client.get(f"{base}/v2/{repo}/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == data
    # one token per scope, fetched with the credentials, reused while valid
    assert [t["scope"] for t in upstream.token_requests] == ["repository:one:pull",
                                                             "repository:two:pull"]
    assert all(t["authorization"] == "Basic dXNlcjpwYXNz" for t in upstream.token_requests)


async def test_basic_auth_upstream(upstream: FaultUpstream, start_mirror: MirrorFactory,
                                   client: aiohttp.ClientSession) -> None:
    upstream.auth = "basic"
    data = random_bytes(1000)
    digest = upstream.add_blob(data)
    base = await start_mirror(upstream_extra={"username": "user", "password": "pass"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data


async def test_wrong_credentials_are_a_clear_403(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.auth = "basic"
    digest = upstream.add_blob(random_bytes(10))
    base = await start_mirror(upstream_extra={"username": "user", "password": "wrong"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        # not a 401: the client cannot fix the mirror's upstream credentials by logging in
        assert resp.status == 403 and await error_of(resp) == "DENIED"
        assert "WWW-Authenticate" not in resp.headers


async def test_redirects_are_followed_without_authorization(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.auth = "basic"
    data = random_bytes(10_000)
    digest = upstream.add_blob(data)
    other_origin.blobs[digest] = data
    upstream.redirect_blobs_to = other_origin.url
    base = await start_mirror(upstream_extra={"username": "user", "password": "pass"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200 and await resp.read() == data
    [cdn_request] = other_origin.seen
    assert cdn_request.authorization is None
    assert any(s.authorization for s in upstream.seen)


async def test_tags_list_passes_through_with_link_rewritten(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    from aiohttp import web

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"name": "library/app", "tags": ["a"]}, headers={
            "Link": '</v2/library/app/tags/list?last=a&n=1>; rel="next"'})

    assert upstream.server is not None
    upstream.server.app.router._frozen = False
    upstream.server.app.router.add_get("/v2/library/app/tags/list", tags)
    base = await start_mirror(upstreams=[{"name": "docker.io", "url": upstream.url}])
    async with client.get(f"{base}/v2/docker.io/app/tags/list?n=1") as resp:
        assert resp.status == 200 and (await resp.json())["tags"] == ["a"]
        assert resp.headers["Link"] == '</v2/docker.io/app/tags/list?last=a&n=1>; rel="next"'


async def test_referrers_pass_through_and_404_without_the_api(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    from aiohttp import web

    subject = sha256_digest(b"subject")
    seen: list[str] = []

    async def referrers(request: web.Request) -> web.Response:
        seen.append(request.query_string)
        return web.json_response({"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                                  "manifests": []},
                                 content_type=mt.OCI_INDEX, headers={
                                     "OCI-Filters-Applied": "artifactType"})

    assert upstream.server is not None
    upstream.server.app.router._frozen = False
    upstream.server.app.router.add_get(f"/v2/with/api/referrers/{subject}", referrers)
    base = await start_mirror()
    async with client.get(f"{base}/v2/with/api/referrers/{subject}?artifactType=a%2Fb") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith(mt.OCI_INDEX)
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert (await r.json())["manifests"] == []
    assert seen == ["artifactType=a/b&ns=up.test"]  # ns: the upstream URL is not up.test
    async with client.get(f"{base}/v2/without/api/referrers/{subject}") as resp:
        assert resp.status == 404 and await error_of(resp) == "MANIFEST_UNKNOWN"
    async with client.get(f"{base}/v2/with/api/referrers/sha256:bad") as resp:
        assert resp.status == 400 and await error_of(resp) == "DIGEST_INVALID"
