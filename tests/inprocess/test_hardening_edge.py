"""Issue 10 at the HTTP level, in process: range amplification (13), status codes the spec's
pull and discovery tests name (18), offline means no upstream traffic (17), the status page's
access setting (4), an upstream needing credentials the mirror lacks (19), the access log and
clients that leave or half-close (20)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from mirror.logs import ACCESS_LOG
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import FaultUpstream, random_bytes

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings(
    "ignore:Overriding the \"event_loop_policy\" fixture:DeprecationWarning")]


async def error_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json(content_type=None)
    code: str = body["errors"][0]["code"]
    return code


def access_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if '"logger": "mirror.access"' in line:
            out.append(json.loads(line))
    return out


# --- 13 -----------------------------------------------------------------------------------------

async def test_overlapping_ranges_send_the_blob_once(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = random_bytes(100_000)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    url = f"{base}/v2/r/blobs/{digest}"
    async with client.get(url) as resp:  # cache it
        assert await resp.read() == data
    async with client.get(url, headers={"Range": "bytes=" + ",".join(["0-"] * 64)}) as resp:
        body = await resp.read()
        assert resp.status == 206 and body == data
        assert resp.headers["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    disjoint = ",".join(f"{i * 10}-{i * 10 + 4}" for i in range(50)) + ",0-4,2-7"
    async with client.get(url, headers={"Range": "bytes=" + disjoint}) as resp:
        body = await resp.read()
        assert resp.status == 206 and resp.content_type == "multipart/byteranges"
        assert len(body) < 50 * 8 + 50 * 200  # 50 merged parts, no duplicate bytes
    many = ",".join(f"{i * 10}-{i * 10}" for i in range(101))
    async with client.get(url, headers={"Range": "bytes=" + many}) as resp:
        assert resp.status == 200 and await resp.read() == data


# --- 18 -----------------------------------------------------------------------------------------

HEX = "a" * 64
D = f"sha256:{HEX}"
STATUS_TABLE = [
    # reads: what the spec's pull tests expect
    ("GET", "/v2/r/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/r/manifests/.INVALID_MANIFEST_NAME", 404, None),
    ("GET", "/v2/r/manifests/missing", 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/r/manifests/missing", 404, None),
    ("GET", f"/v2/r/manifests/{D}", 404, "MANIFEST_UNKNOWN"),
    ("GET", f"/v2/r/blobs/{D}", 404, "BLOB_UNKNOWN"),
    ("HEAD", f"/v2/r/blobs/{D}", 404, None),
    ("GET", "/v2/r/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/r/blobs/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/R/manifests/v1", 400, "NAME_INVALID"),
    ("GET", "/v2/R/tags/list", 400, "NAME_INVALID"),
    ("GET", "/v2/r/referrers/sha256:x", 400, "DIGEST_INVALID"),
    # writes: malformed first (400, with a code from the spec's list), then read-only (405)
    ("PUT", "/v2/r/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("PUT", "/v2/r/manifests/.INVALID_MANIFEST_NAME", 400, "MANIFEST_INVALID"),
    ("PUT", "/v2/R/manifests/v1", 400, "NAME_INVALID"),
    ("DELETE", "/v2/r/blobs/sha256:nope", 400, "DIGEST_INVALID"),
    ("POST", "/v2/R/blobs/uploads/", 400, "NAME_INVALID"),
    ("PUT", "/v2/r/blobs/uploads/u1?digest=sha256:nope", 400, "DIGEST_INVALID"),
    ("PUT", "/v2/r/manifests/v1", 405, "UNSUPPORTED"),
    ("DELETE", f"/v2/r/manifests/{D}", 405, "UNSUPPORTED"),
    ("DELETE", f"/v2/r/blobs/{D}", 405, "UNSUPPORTED"),
    ("POST", "/v2/r/blobs/uploads/", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/r/blobs/uploads/u1", 405, "UNSUPPORTED"),
    ("PUT", f"/v2/r/blobs/uploads/u1?digest={D}", 405, "UNSUPPORTED"),
    ("POST", "/v2", 405, "UNSUPPORTED"),
]
SPEC_CODES = {"BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
              "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
              "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
              "TOOMANYREQUESTS"}


async def test_status_codes_the_spec_names(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    base = await start_mirror()
    failures = []
    for method, path, status, code in STATUS_TABLE:
        async with client.request(method, URL(base + path, encoded=True)) as resp:
            got = (resp.status, await error_of(resp) if code else None)
        if got != (status, code):
            failures.append((method, path, (status, code), got))
        assert code is None or code in SPEC_CODES
    assert failures == []


# --- 17 -----------------------------------------------------------------------------------------

@pytest.fixture
async def counting_upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """An upstream that records every request, `/v2/` included."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), seen
    await server.close()


async def test_offline_sends_nothing_upstream(
        counting_upstream: tuple[str, list[str]], start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    url, seen = counting_upstream
    base = await start_mirror(cache={"offline": True},
                              upstreams=[{"name": "up.test", "url": url}])
    for _ in range(2):
        async with client.get(f"{base}/") as resp:
            page = await resp.text()
            assert resp.status == 200
        async with client.get(f"{base}/readyz") as resp:
            report = await resp.json()
    async with client.get(f"{base}/v2/r/manifests/v1") as resp:
        assert resp.status == 404
    assert seen == []
    assert "offline" in page and "unreachable" not in page and 'id="offline"' in page
    assert report["upstreams"]["up.test"]["offline"] is True


def _cell(page: str, upstream: str, cls: str) -> str:
    row = re.search(rf'<tr class="upstream" data-name="{re.escape(upstream)}">.*?</tr>', page)
    assert row, page
    found = re.search(rf'<td class="{cls}" data-value="([^"]*)"', row.group(0))
    assert found, row.group(0)
    return found.group(1)


async def test_the_status_page_says_when_each_upstream_was_reached_or_went_down(
        counting_upstream: tuple[str, list[str]], start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = time.time()
    base = await start_mirror(upstreams=[{"name": "up.test", "url": counting_upstream[0]},
                                         {"name": "down.test", "url": closed}])
    async with client.get(f"{base}/") as resp:  # probes both
        page = await resp.text()
    assert float(_cell(page, "up.test", "last-reached")) >= before
    assert _cell(page, "up.test", "down-since") == ""
    assert float(_cell(page, "down.test", "down-since")) >= before
    assert _cell(page, "down.test", "last-reached") == ""
    assert 'id="offline"' not in page and 'id="disk-free" data-value="' in page


# --- 4 ------------------------------------------------------------------------------------------

def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{bcrypt.hashpw(b's3cret', bcrypt.gensalt(rounds=4)).decode()}\n")
    return path


async def test_status_page_and_metrics_need_a_user_when_auth_is_on(
        upstream: FaultUpstream, other_origin: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, htpasswd: Path) -> None:
    private = other_origin.add_blob(random_bytes(100))
    base = await start_mirror(auth={"htpasswd": str(htpasswd)}, upstreams=[
        {"name": "pub.test", "url": upstream.url},
        {"name": "priv.test", "url": other_origin.url, "access": "authenticated"}])
    async with client.get(f"{base}/v2/priv.test/secret-team/app/blobs/{private}",
                          headers={"Authorization": basic("alice", "s3cret")}) as resp:
        assert resp.status == 200
    async with client.get(f"{base}/token?service=registry-mirror") as resp:
        anonymous = (await resp.json())["token"]
    async with client.get(f"{base}/token",
                          headers={"Authorization": basic("alice", "s3cret")}) as resp:
        user_token = (await resp.json())["token"]
    for path in ("/", "/metrics"):
        for headers in ({}, {"Authorization": f"Bearer {anonymous}"},
                        {"Authorization": basic("alice", "wrong")}):
            async with client.get(base + path, headers=headers) as resp:
                body = await resp.text()
                assert resp.status == 401, (path, headers)
                challenges = resp.headers.getall("WWW-Authenticate")
                assert any(c.startswith("Basic ") for c in challenges)
                assert any(c.startswith(f'Bearer realm="{base}/token"') for c in challenges)
                assert "secret-team" not in body
        for auth in (basic("alice", "s3cret"), f"Bearer {user_token}"):
            async with client.get(base + path, headers={"Authorization": auth}) as resp:
                assert resp.status == 200, (path, auth)
    for path in ("/healthz", "/readyz"):
        async with client.get(base + path) as resp:
            assert resp.status == 200


async def test_status_page_can_be_public(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, htpasswd: Path) -> None:
    base = await start_mirror(auth={"htpasswd": str(htpasswd), "status": "public"})
    for path in ("/", "/metrics"):
        async with client.get(base + path) as resp:
            assert resp.status == 200


# --- 19 -----------------------------------------------------------------------------------------

class PrivateUpstream(FaultUpstream):
    """Docker Hub for a private repository: anyone gets a token, an anonymous one opens
    nothing."""

    async def token(self, request: web.Request) -> web.Response:
        anonymous = "Authorization" not in request.headers
        return web.json_response({"token": "anonymous" if anonymous else
                                  "tok-" + request.query.get("scope", "")})


@pytest.fixture
async def private_upstream() -> AsyncIterator[PrivateUpstream]:
    up = PrivateUpstream()
    up.server = TestServer(up.app(), host="127.0.0.1")
    await up.server.start_server()
    yield up
    await up.server.close()


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_an_upstream_needing_credentials_the_mirror_lacks(
        scheme: str, private_upstream: PrivateUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    private_upstream.auth = scheme
    digest = private_upstream.add_blob(random_bytes(10))
    base = await start_mirror(upstreams=[{"name": "priv.test", "url": private_upstream.url}])
    for method in ("GET", "HEAD"):
        async with client.request(method, f"{base}/v2/r/blobs/{digest}") as resp:
            # never a 401 without a challenge: the client cannot fix this by logging in
            assert resp.status == 403, method
            if method == "GET":
                body = await resp.json()
                assert body["errors"][0]["code"] == "DENIED"
                message = body["errors"][0]["message"]
                assert "no credentials configured" in message and "username" in message
                assert "refused" not in message


async def test_refused_credentials_are_not_a_bare_401(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.auth = "basic"
    digest = upstream.add_blob(random_bytes(10))
    base = await start_mirror(upstream_extra={"username": "user", "password": "wrong"})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        body = await resp.json()
        assert resp.status == 403 and body["errors"][0]["code"] == "DENIED"
        assert "refused the credentials configured" in body["errors"][0]["message"]


# --- 20 -----------------------------------------------------------------------------------------

async def test_access_log_counts_bytes_and_names_the_client(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]) -> None:
    base = await start_mirror()
    sizes = {}
    for path in ("/", "/v2/", "/metrics", "/healthz", "/readyz", "/v2/r/manifests/.x",
                 "/nothing"):
        async with client.get(base + path, headers={"User-Agent": "probe/1.0"}) as resp:
            sizes[path] = len(await resp.read())
    ACCESS_LOG.flush()
    lines = {line["path"]: line for line in access_lines(capsys.readouterr().err)}
    for path, size in sizes.items():
        assert size > 0 and lines[path]["bytes"] == size, path
        assert lines[path]["client"] == "127.0.0.1"
        assert lines[path]["user_agent"] == "probe/1.0"


async def _half_closed_get(base: str, path: str) -> bytes:
    url = URL(base)

    def run() -> bytes:
        with socket.create_connection((url.host, url.port), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)

    return await asyncio.to_thread(run)


async def test_a_half_closed_client_gets_its_whole_response(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    data = random_bytes(3_000_000)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    # cold (streamed from the upstream), then cached (sendfile), then a small page
    for _ in range(2):
        answer = await _half_closed_get(base, f"/v2/r/blobs/{digest}")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == data
    answer = await _half_closed_get(base, "/healthz")
    assert answer.startswith(b"HTTP/1.1 200") and b'"alive"' in answer


async def test_a_client_leaving_during_a_hit_is_logged_as_leaving(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = random_bytes(32 << 20)
    digest = upstream.add_blob(data)
    base = await start_mirror()
    url = URL(base)
    async with aiohttp.ClientSession() as session, \
            session.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert await resp.read() == data

    def leave() -> None:
        for _ in range(5):
            with socket.create_connection((url.host, url.port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(f"GET /v2/r/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(1024)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00"
                             b"\x00\x00")  # close with a reset

    await asyncio.to_thread(leave)
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    err = ""
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        ACCESS_LOG.flush()
        err += capsys.readouterr().err
        lines = [line for line in access_lines(err) if line["path"].endswith(digest)]
        if len(lines) >= 6:
            break
    assert len(lines) == 6
    assert "unhandled error" not in err
    for line in lines[1:]:
        assert line["status"] in (200, 499) and "client went away" in line["error"], line


@pytest.fixture(scope="module")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The loop `mirror serve` runs on: uvloop differs from asyncio where a client leaves."""
    return uvloop.EventLoopPolicy()


async def test_behind_a_trusted_proxy_the_log_and_login_limit_use_the_forwarded_client(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        htpasswd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = await start_mirror(auth={"htpasswd": str(htpasswd)},
                              server={"trusted_proxies": ["127.0.0.1"]})
    attacker, victim = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "203.0.113.8"}
    statuses = []
    for _ in range(12):  # past the failed-login budget of one address
        async with client.get(f"{base}/token", headers={
                **attacker, "Authorization": basic("alice", "wrong")}) as resp:
            statuses.append(resp.status)
    assert statuses[-1] == 429 and 429 not in statuses[:10], statuses
    async with client.get(f"{base}/token", headers={
            **victim, "Authorization": basic("alice", "s3cret")}) as resp:
        assert resp.status == 200  # another client behind the same proxy is not locked out
    ACCESS_LOG.flush()
    lines = [line for line in access_lines(capsys.readouterr().err) if line["path"] == "/token"]
    assert {line["client"] for line in lines} == {"203.0.113.7", "203.0.113.8"}
    assert [line["user"] for line in lines if line["client"] == "203.0.113.8"] == ["alice"]
    assert {line["user"] for line in lines if line["client"] == "203.0.113.7"} == {"-"}


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = await start_mirror(server={"trusted_proxies": ["10.0.0.0/8"]})
    async with client.get(f"{base}/v2/", headers={"X-Forwarded-For": "203.0.113.7"}) as resp:
        assert resp.status == 200
    ACCESS_LOG.flush()
    (line,) = [x for x in access_lines(capsys.readouterr().err) if x["path"] == "/v2/"]
    assert line["client"] == "127.0.0.1"


def _raw(base: str, request: bytes) -> bytes:
    url = URL(base)
    with socket.create_connection((url.host or "127.0.0.1", url.port or 80), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_non_ascii_bytes_in_any_header_or_path_are_never_a_500(
        upstream: FaultUpstream, start_mirror: MirrorFactory, client: aiohttp.ClientSession
        ) -> None:
    digest = upstream.add_blob(random_bytes(1000))
    base = await start_mirror(server={"trusted_proxies": ["127.0.0.1"]})
    async with client.get(f"{base}/v2/r/blobs/{digest}") as resp:
        assert resp.status == 200  # cached: the hit path sees the headers too
    junk = b"\xe9\xff\xc3\xa9"
    paths = [f"/v2/r/blobs/{digest}".encode(), b"/v2/r/manifests/" + junk,
             b"/v2/" + junk + b"/blobs/sha256:" + junk, b"/v2/r/tags/list?n=" + junk,
             b"/v2/r/blobs/" + digest.encode() + b"?ns=" + junk, b"/" + junk]
    headers = [b"Range: bytes=" + junk, b"Accept: " + junk, b"If-None-Match: " + junk,
               b"X-Forwarded-For: " + junk, b"User-Agent: " + junk, b"Host: " + junk,
               b"Cookie: " + junk]
    for path in paths:
        for header in headers:
            response = await asyncio.to_thread(
                _raw, base, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n"
                + (b"" if header.startswith(b"Host") else b"Host: x\r\n") + header + b"\r\n\r\n")
            status = response[9:12]
            assert status and status != b"500" and not status.startswith(b"5"), (
                path, header, response[:300])


async def test_every_kind_of_answer_says_nosniff(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    """A layer is whatever bytes its pusher chose, HTML included: a browser must not sniff
    it into a page of the mirror's origin (nor a JSON error, nor the pages themselves)."""
    data = b"<html><script>alert(1)</script></html>" * 100
    digest = upstream.add_blob(data)
    base = await start_mirror()
    url = f"{base}/v2/r/blobs/{digest}"
    answers = {}
    for name, target in (("miss", url), ("hit", url), ("range", url), ("base", f"{base}/v2/"),
                         ("error", f"{base}/v2/r/blobs/{D}"), ("status", f"{base}/"),
                         ("metrics", f"{base}/metrics"), ("nothing", f"{base}/nothing")):
        headers = {"Range": "bytes=0-9"} if name == "range" else {}
        async with client.get(target, headers=headers) as resp:
            await resp.read()
            answers[name] = (resp.status, resp.headers.get("X-Content-Type-Options"))
    assert {n: h for n, (_, h) in answers.items()} == dict.fromkeys(answers, "nosniff"), answers
    assert answers["hit"][0] == 200 and answers["range"][0] == 206, answers
