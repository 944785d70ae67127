"""Manifests arrive whole and as what they are; relayed bodies are bounded (issue 10, items 6,
7, 8 and 14).

The upstream is a thin aiohttp app because a real registry cannot be made to drop its digest
header, mislabel a manifest or stream a 100 MB tags list; tests/integration has the same sizes
against Debian's docker-registry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import parse_config
from mirror.http.app import build_app
from tests.support.store import assert_store_verified

pytestmark = pytest.mark.timeout(120)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST = "sha256:" + "ab" * 32
MIB = 1024 * 1024


def image_manifest(size: int, media_type: str = OCI_MANIFEST) -> bytes:
    """A valid image manifest padded with an annotation to exactly `size` bytes."""
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": DIGEST, "size": 2},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": DIGEST, "size": 2}],
           "annotations": {"pad": ""}}
    base = len(json.dumps(doc).encode())
    doc["annotations"] = {"pad": "x" * (size - base)}
    data = json.dumps(doc).encode()
    assert len(data) == size
    return data


def index_manifest(size: int, media_type: str = OCI_INDEX) -> bytes:
    entry = {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 2,
             "platform": {"architecture": "amd64", "os": "linux"}}
    doc: dict[str, object] = {"schemaVersion": 2, "mediaType": media_type,
                              "manifests": [entry] * max(1, size // 400),
                              "annotations": {"pad": ""}}
    base = len(json.dumps(doc).encode())
    doc["annotations"] = {"pad": "x" * (size - base)}
    data = json.dumps(doc).encode()
    assert len(data) == size
    return data


@dataclass
class Served:
    data: bytes
    content_type: str
    digest_header: bool = True
    chunked: bool = False


@dataclass
class OddUpstream:
    manifests: dict[str, Served] = field(default_factory=dict)
    tags_bytes: int = 0
    tags_sent: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self.base)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self.manifest)
        app.router.add_get("/v2/{name:.+}/tags/list", self.tags)
        return app

    async def base(self, _request: web.Request) -> web.Response:
        return web.json_response({})

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        served = self.manifests.get(request.match_info["ref"])
        if served is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        resp = web.StreamResponse(headers={"Content-Type": served.content_type})
        if served.digest_header:
            resp.headers["Docker-Content-Digest"] = (
                "sha256:" + hashlib.sha256(served.data).hexdigest())
        if served.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(served.data)
        await resp.prepare(request)
        if request.method == "GET":
            for i in range(0, len(served.data), 16 * 1024):  # many segments, as a socket does
                await resp.write(served.data[i:i + 16 * 1024])
        await resp.write_eof()
        return resp

    async def tags(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        piece = b'"' + b"t" * 1000 + b'",'
        await resp.write(b'{"name": "r", "tags": [')
        while self.tags_sent < self.tags_bytes:
            await resp.write(piece * 64)
            self.tags_sent += len(piece) * 64
        await resp.write(b'"last"]}')
        await resp.write_eof()
        return resp


@pytest.fixture
async def odd() -> AsyncIterator[OddUpstream]:
    up = OddUpstream()
    up.server = TestServer(up.app(), host="127.0.0.1")
    await up.server.start_server()
    yield up
    await up.server.close()


@pytest.fixture
async def mirror(tmp_path: Path, odd: OddUpstream) -> AsyncIterator[str]:
    config = parse_config({"cache": {"dir": str(tmp_path / "cache")},
                           "upstream": [{"name": "odd.test", "url": odd.url}]})
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


SIZES = [1024, 20 * 1024, 60 * 1024, 338 * 1024, MIB, 4 * MIB]


@pytest.mark.parametrize("size", SIZES, ids=[f"{s // 1024}KiB" for s in SIZES])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("digest_header", [True, False], ids=["digest", "no-digest"])
async def test_manifests_up_to_4mib_arrive_whole(
        odd: OddUpstream, mirror: str, tmp_path: Path, size: int, chunked: bool,
        digest_header: bool) -> None:
    data = image_manifest(size) if size < 300 * 1024 else index_manifest(size)
    media_type = OCI_MANIFEST if size < 300 * 1024 else OCI_INDEX
    odd.manifests["v1"] = Served(data, media_type, digest_header, chunked)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession() as client:
        for path in ("v1", digest):  # by tag, then (from the cache) by digest
            async with client.get(f"{mirror}/v2/r/manifests/{path}") as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read() == data
                assert resp.headers["Docker-Content-Digest"] == digest
                assert resp.headers["Content-Type"] == media_type
    assert_store_verified(tmp_path / "cache")


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_manifest_over_4mib_is_refused_clearly(
        odd: OddUpstream, mirror: str, tmp_path: Path, chunked: bool) -> None:
    odd.manifests["big"] = Served(image_manifest(4 * MIB + 1), OCI_MANIFEST, True, chunked)
    async with aiohttp.ClientSession() as client, \
            client.get(f"{mirror}/v2/r/manifests/big") as resp:
        assert resp.status == 502
        error = (await resp.json())["errors"][0]
        assert error["code"] == "MANIFEST_INVALID" and "larger than" in error["message"]
    assert not any((tmp_path / "cache" / "blobs").rglob("*")) if (
        tmp_path / "cache" / "blobs").exists() else True


@pytest.mark.parametrize("label,data", [
    ("text/html", image_manifest(2000)),
    (OCI_MANIFEST, index_manifest(2000)),  # an index labelled as an image
    (OCI_INDEX, image_manifest(2000)),  # an image labelled as an index
    (DOCKER_MANIFEST, image_manifest(2000, OCI_MANIFEST)),  # mediaType says otherwise
    ("text/html", b"<html>rate limited</html>"),
    (OCI_MANIFEST, b"[1, 2, 3]"),
], ids=["html", "index-as-image", "image-as-index", "docker-vs-oci", "html-body", "array"])
async def test_a_manifest_contradicting_its_content_type_is_refused(
        odd: OddUpstream, mirror: str, tmp_path: Path, label: str, data: bytes) -> None:
    odd.manifests["v1"] = Served(data, label)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{mirror}/v2/r/manifests/v1") as resp:
            assert resp.status == 502
            assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        async with client.get(f"{mirror}/v2/r/manifests/{digest}") as resp:
            assert resp.status == 404  # not cached, and the upstream has no such digest
    blobs = tmp_path / "cache" / "blobs"
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]


async def test_an_unlabelled_manifest_takes_its_own_media_type(
        odd: OddUpstream, mirror: str) -> None:
    data = image_manifest(3000, DOCKER_MANIFEST)
    odd.manifests["v1"] = Served(data, "application/json")
    async with aiohttp.ClientSession() as client, \
            client.get(f"{mirror}/v2/r/manifests/v1") as resp:
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST


async def test_a_deeply_nested_manifest_is_refused_not_a_500(
        odd: OddUpstream, mirror: str) -> None:
    for depth in (40, 5000, 100_000):
        nested = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + \
            b'", "annotations": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
        odd.manifests[f"d{depth}"] = Served(nested, OCI_MANIFEST)
        async with aiohttp.ClientSession() as client, \
                client.get(f"{mirror}/v2/r/manifests/d{depth}") as resp:
            assert resp.status == 502, depth
            message = (await resp.json())["errors"][0]["message"]
            assert "nested deeper" in message


async def test_a_huge_tags_list_is_refused_without_holding_it(
        odd: OddUpstream, mirror: str) -> None:
    odd.tags_bytes = 100 * MIB
    async with aiohttp.ClientSession() as client, \
            client.get(f"{mirror}/v2/r/tags/list") as resp:
        assert resp.status == 502
        error = (await resp.json())["errors"][0]
        assert "larger than" in error["message"] and "?n=" in error["message"]
    # the mirror stopped reading soon after its bound instead of taking all 100 MiB
    assert odd.tags_sent < 40 * MIB


async def test_a_tags_list_of_thousands_is_relayed_whole(
        odd: OddUpstream, mirror: str) -> None:
    odd.tags_bytes = 2 * MIB  # ~2 000 tags of 1 000 characters
    async with aiohttp.ClientSession() as client, \
            client.get(f"{mirror}/v2/r/tags/list") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert len(body["tags"]) > 2000 and body["tags"][-1] == "last"
