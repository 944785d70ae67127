"""A fault-injecting upstream registry: a thin aiohttp app that can do what a real registry
cannot be made to do on demand: reset or stall mid-body, send wrong bytes, ignore Range,
answer 429, redirect, challenge for Bearer or Basic credentials.

    up = await serve_upstream(FaultUpstream())  # on the running loop, 127.0.0.1
    digest = up.add_blob(random_bytes(1000), Behaviour(reset_after=100, times=1))
    ...
    assert up.count("GET", digest) == 2
    await close_upstream(up)

Used by tests/inprocess (the mirror's app in the same loop) and tests/faults (MatrixUpstream
extends it, served from a loop thread for mirror processes).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from .oci import sha256_digest


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


@dataclass
class Behaviour:
    """What the upstream does to a blob's GET responses; `times` counts the faulty answers."""

    reset_after: int | None = None  # close the connection after this many body bytes
    stall_after: int | None = None  # stop sending (forever) after this many bytes
    gate_after: int | None = None  # pause after this many bytes until `gate` is set
    corrupt: bool = False
    ignore_range: bool = False
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1_000_000


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FaultUpstream:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.seen: list[Seen] = []
        self.gate = asyncio.Event()
        self.reached_gate = asyncio.Event()
        self.never = asyncio.Event()
        self.server: TestServer | None = None
        self.manifest_delay: asyncio.Event | None = None
        self.manifest_reached = asyncio.Event()
        self.auth: str | None = None  # "bearer" or "basic": challenge unauthenticated requests
        self.token_requests: list[dict[str, str]] = []
        self.redirect_blobs_to: str | None = None  # base URL of another server (origin)
        self.private: dict[str, set[str]] = {}  # repository -> the only digests it holds

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def add_blob(self, data: bytes, behaviour: Behaviour | None = None) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        if behaviour is not None:
            self.behaviour[digest] = behaviour
        return digest

    def add_manifest(self, repo: str, tag: str, data: bytes, media_type: str) -> str:
        digest = sha256_digest(data)
        self.manifests[(repo, tag)] = (data, media_type)
        self.manifests[(repo, digest)] = (data, media_type)
        return digest

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for s in self.seen if s.method == method and fragment in s.path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/", self.base)
        app.router.add_get("/token", self.token)
        app.router.add_get("/cdn/{digest}", self.cdn)
        app.router.add_route("*", r"/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_route("*", r"/v2/{name:.+}/manifests/{ref}", self.manifest)
        return app

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.method, request.path, request.headers.get("Range"),
                              request.headers.get("Authorization")))

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append({**request.query,
                                    "authorization": request.headers.get("Authorization", "")})
        return web.json_response({"token": "tok-" + request.query.get("scope", ""),
                                  "expires_in": 300})

    def _challenge(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        name = request.match_info["name"]
        if self.auth == "bearer" and auth != f"Bearer tok-repository:{name}:pull":
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={
                    "WWW-Authenticate": f'Bearer realm="{self.url}/token",service="up.test",'
                                        f'scope="repository:{name}:pull"'})
        if self.auth == "basic" and auth != "Basic dXNlcjpwYXNz":  # user:pass
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="up"'})
        return None

    async def cdn(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(body=self.blobs[request.match_info["digest"]])

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (challenge := self._challenge(request)) is not None:
            return challenge
        self.manifest_reached.set()
        if self.manifest_delay is not None:
            await self.manifest_delay.wait()
        entry = self.manifests.get((request.match_info["name"], request.match_info["ref"]))
        if entry is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        data, media_type = entry
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256_digest(data)}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(headers=headers)
        return web.Response(body=data, headers=headers)

    def held_blob(self, request: web.Request) -> bytes | None:
        """The blob a request names, if the repository it names holds it."""
        digest = request.match_info["digest"]
        holds = self.private.get(request.match_info["name"])
        if holds is not None and digest not in holds:
            return None
        return self.blobs.get(digest)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (challenge := self._challenge(request)) is not None:
            return challenge
        digest = request.match_info["digest"]
        data = self.held_blob(request)
        if data is not None and self.redirect_blobs_to:
            raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/cdn/{digest}")
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        b = self.behaviour.get(digest, Behaviour())
        faulty = b.times > 0
        if request.method == "GET" and faulty:
            b.times -= 1
        if faulty and b.status is not None:
            return web.json_response({"errors": [{"code": "TOOMANYREQUESTS"}]},
                                     status=b.status, headers=b.headers)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        start = 0
        rng = request.headers.get("Range")
        if rng and not (faulty and b.ignore_range):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        if faulty and b.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_length = len(body)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        cut = None
        if faulty:
            cut = next((c for c in (b.reset_after, b.stall_after, b.gate_after) if c), None)
        if cut is None:
            await resp.write(body)
            return resp
        await resp.write(body[:cut])
        if b.reset_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if b.gate_after:
            self.reached_gate.set()
            await self.gate.wait()
            await resp.write(body[cut:])
            return resp
        await self.never.wait()  # stall
        return resp


async def serve_upstream(up: FaultUpstream) -> FaultUpstream:
    up.server = TestServer(up.app(), host="127.0.0.1")
    await up.server.start_server()
    return up


async def close_upstream(up: FaultUpstream) -> None:
    up.gate.set()
    up.never.set()
    assert up.server is not None
    await up.server.close()
