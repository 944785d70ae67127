"""Operating the mirror: /metrics moving with real pulls, the status page's numbers, health,
CDN-origin headers (304, Cache-Control, HEAD == GET), the systemd notify protocol, TLS reload."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mirror.http.activity import TopCounter
from mirror.http.statuspage import human_bytes
from mirror.oci import mediatypes as mt
from mirror.process import notify, tls
from tests.support.appmirror import MirrorFactory
from tests.support.faultupstream import Behaviour, FaultUpstream, random_bytes
from tests.support.oci import sha256_digest

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(client: aiohttp.ClientSession, base: str) -> Samples:
    async with client.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await resp.text())


def image_manifest(*blobs: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blobs[0], "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": b,
                    "size": 1} for b in blobs[1:]]}).encode()


class RateLimitedUpstream(FaultUpstream):
    """Docker Hub's rate-limit headers on every manifest answer."""

    remaining = 76

    async def manifest(self, request: web.Request) -> web.Response:
        resp = await super().manifest(request)
        resp.headers["ratelimit-limit"] = "100;w=21600"
        resp.headers["ratelimit-remaining"] = f"{self.remaining};w=21600"
        return resp


@pytest.fixture
async def upstream() -> FaultUpstream:  # type: ignore[override]
    from aiohttp.test_utils import TestServer

    up = RateLimitedUpstream()
    up.server = TestServer(up.app(), host="127.0.0.1")
    await up.server.start_server()
    yield up  # type: ignore[misc]
    up.gate.set()
    up.never.set()
    await up.server.close()


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_move_with_pulls(upstream: FaultUpstream, start_mirror: MirrorFactory,
                                       client: aiohttp.ClientSession) -> None:
    layer = random_bytes(300_000)
    layer_digest = upstream.add_blob(layer)
    config_digest = upstream.add_blob(b"{}")
    upstream.add_manifest("team/app", "v1", image_manifest(config_digest, layer_digest),
                          mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False})
    before = await scrape(client, base)

    async with client.get(f"{base}/v2/team/app/manifests/v1",
                          headers={"Accept": mt.OCI_MANIFEST}) as resp:
        assert resp.status == 200
    for _ in range(3):  # one miss, then hits
        async with client.get(f"{base}/v2/team/app/blobs/{layer_digest}") as resp:
            assert await resp.read() == layer
    async with client.get(f"{base}/v2/team/app/blobs/{sha256_digest(b'nope')}") as resp:
        assert resp.status == 404
    await asyncio.sleep(0)
    after = await scrape(client, base)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("mirror_http_requests_total", route="manifest", method="GET", status="200") == 1
    assert delta("mirror_http_requests_total", route="blob", method="GET", status="200") == 3
    assert delta("mirror_http_requests_total", route="blob", status="404") == 1
    assert delta("mirror_http_request_duration_seconds_count", route="blob") == 4
    assert delta("mirror_cache_requests_total", kind="blob", result="miss") == 1  # not the 404
    assert delta("mirror_cache_requests_total", kind="blob", result="hit") == 2
    assert delta("mirror_cache_requests_total", kind="manifest", result="miss") == 1
    assert delta("mirror_served_bytes_total", source="cache") == 2 * len(layer)
    assert delta("mirror_served_bytes_total", source="upstream") >= len(layer)
    assert delta("mirror_upstream_requests_total", upstream="up.test", method="GET",
                 status="200") == 2
    assert delta("mirror_upstream_requests_total", upstream="up.test", status="404") == 1
    assert delta("mirror_upstream_request_duration_seconds_count", upstream="up.test") == 3
    assert total(after, "mirror_upstream_ratelimit_remaining", upstream="up.test") == 76
    assert total(after, "mirror_upstream_ratelimit_limit", upstream="up.test") == 100
    assert total(after, "mirror_upstream_up", upstream="up.test") == 1
    assert total(after, "mirror_cache_max_bytes") == 20 * 1024**3
    # The counters the core increments are exported under their names.
    for name in ("mirror_downloads_resumed_total", "mirror_digest_mismatches_total",
                 "mirror_evicted_bytes_total", "mirror_downloads_in_flight",
                 "mirror_download_followers", "mirror_cache_bytes", "mirror_cache_entries"):
        assert any(n == name for n, _ in after), name
    # Bounded labels: no repository name or digest anywhere.
    labels = {v for _, ls in after for _, v in ls}
    assert not any("team/app" in v or "sha256" in v for v in labels)


async def test_downloads_in_flight_and_followers(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    size = 2_000_000
    data = random_bytes(size)
    digest = upstream.add_blob(data, Behaviour(gate_after=size // 2))
    base = await start_mirror()

    async def pull() -> bytes:
        async with client.get(f"{base}/v2/app/blobs/{digest}") as resp:
            return await resp.read()

    pulls = [asyncio.ensure_future(pull()) for _ in range(3)]
    await asyncio.wait_for(upstream.reached_gate.wait(), 10)
    for _ in range(100):
        now = await scrape(client, base)
        if total(now, "mirror_download_followers") == 3:
            break
        await asyncio.sleep(0.05)
    assert total(now, "mirror_downloads_in_flight") == 1
    assert total(now, "mirror_download_followers") == 3
    async with client.get(f"{base}/") as resp:
        page = await resp.text()
    row = re.search(r'<tr class="download" data-digest="([^"]+)" data-written="(\d+)" '
                    r'data-size="(\d+)"', page)
    assert row is not None and row[1] == digest and int(row[3]) == size
    assert 0 < int(row[2]) <= size
    assert '<td class="followers">3</td>' in page
    upstream.gate.set()
    assert all(body == data for body in await asyncio.gather(*pulls))
    after = await scrape(client, base)
    assert total(after, "mirror_downloads_in_flight") == 0
    assert total(after, "mirror_download_followers") == 0


# --- the status page ------------------------------------------------------------------------


def page_numbers(page: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'id="([a-z-]+)" data-value="([0-9.e+-]+)"',
                                                   page)}


async def test_status_page_numbers_match_metrics(
        upstream: FaultUpstream, start_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    layer = random_bytes(100_000)
    layer_digest = upstream.add_blob(layer)
    upstream.add_manifest("stats/app", "v1", image_manifest(layer_digest), mt.OCI_MANIFEST)
    upstream.add_manifest("stats/other", "v1", image_manifest(layer_digest), mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False, "max_size": "1GiB"})
    for repo, times in (("stats/app", 3), ("stats/other", 1)):
        for _ in range(times):
            async with client.get(f"{base}/v2/{repo}/manifests/v1",
                                  headers={"Accept": mt.OCI_MANIFEST}) as resp:
                assert resp.status == 200
    for _ in range(2):
        async with client.get(f"{base}/v2/stats/app/blobs/{layer_digest}") as resp:
            await resp.read()
    async with client.get(f"{base}/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        page = await resp.text()
    metrics = await scrape(client, base)
    numbers = page_numbers(page)
    hits = sum(total(metrics, "mirror_cache_requests_total", result=r)
               for r in ("hit", "revalidated", "stale"))
    misses = total(metrics, "mirror_cache_requests_total") - hits
    assert numbers["hits"] == hits and numbers["misses"] == misses
    assert numbers["hit-ratio"] == pytest.approx(hits / (hits + misses))
    assert numbers["cache-max-bytes"] == 1024**3
    assert numbers["cache-bytes"] == total(metrics, "mirror_cache_bytes")
    assert numbers["bytes-from-cache"] == total(metrics, "mirror_served_bytes_total",
                                                source="cache")
    # /metrics was requested after the page: its request counter is one further along.
    assert numbers["requests"] + 1 == total(metrics, "mirror_http_requests_total")
    assert '<meta http-equiv="refresh"' in page
    top = re.findall(r'<tr class="repo"><td>([^<]+)</td><td class="pulls" data-value="(\d+)"',
                     page)
    assert top[:2] == [("up.test/stats/app", "3"), ("up.test/stats/other", "1")]
    assert 'data-name="up.test"' in page and "reachable" in page
    assert '<td class="ratelimit" data-value="76">76 of 100</td>' in page


def test_top_counter_stays_bounded() -> None:
    c = TopCounter(limit=10)
    for i in range(100):
        c.add("hot")
        c.add(f"cold{i}")
    assert len(c.counts) <= 10
    assert c.top(1) == [("hot", 100)]
    assert human_bytes(1536) == "1.5 KiB"


# --- health ---------------------------------------------------------------------------------


async def test_health_and_readiness(upstream: FaultUpstream, start_mirror: MirrorFactory,
                                    client: aiohttp.ClientSession, tmp_path: Path) -> None:
    base = await start_mirror(upstreams=[{"name": "up.test", "url": upstream.url},
                                         {"name": "dead.test", "url": "http://127.0.0.1:9"}])
    async with client.get(f"{base}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "alive"
    async with client.get(f"{base}/readyz") as resp:
        body = await resp.json()
        # A dead upstream is reported, not required.
        assert resp.status == 200, body
        assert body["upstreams"]["up.test"]["reachable"] is True
        assert body["upstreams"]["dead.test"]["reachable"] is False
        assert body["checks"]["cache_writable"]["ok"] and body["checks"]["index"]["ok"]
    tmp_dir = tmp_path / "cache" / "tmp"
    tmp_dir.rename(tmp_path / "cache" / "tmp.away")
    tmp_dir.write_text("not a directory")  # root ignores permissions; this breaks writes
    try:
        async with client.get(f"{base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert body["checks"]["cache_writable"]["ok"] is False
    finally:
        tmp_dir.unlink()
        (tmp_path / "cache" / "tmp.away").rename(tmp_dir)


# --- as a CDN origin ------------------------------------------------------------------------


async def test_cdn_origin_headers(upstream: FaultUpstream, start_mirror: MirrorFactory,
                                  client: aiohttp.ClientSession) -> None:
    layer = random_bytes(50_000)
    digest = upstream.add_blob(layer)
    manifest = image_manifest(digest)
    mdigest = upstream.add_manifest("app", "v1", manifest, mt.OCI_MANIFEST)
    base = await start_mirror(cache={"prefetch": False, "tag_ttl": "60s"})
    accept = {"Accept": mt.OCI_MANIFEST}
    for path in (f"blobs/{digest}", f"manifests/{mdigest}"):
        url = f"{base}/v2/app/{path}"
        async with client.get(url, headers=accept) as resp:
            assert resp.status == 200
            await resp.read()
        async with client.get(url, headers=accept) as resp:
            get_headers = resp.headers.copy()
            body = await resp.read()
        assert get_headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert get_headers["ETag"] == f'"{path.split("/")[1]}"'
        async with client.head(url, headers=accept) as resp:
            assert resp.status == 200
            for name in ("Content-Length", "Content-Type", "Docker-Content-Digest", "ETag",
                         "Cache-Control"):
                assert resp.headers[name] == get_headers[name], name
            assert int(resp.headers["Content-Length"]) == len(body)
        for inm in (get_headers["ETag"], f'W/{get_headers["ETag"]}', f'"x", {get_headers["ETag"]}'):
            async with client.get(url, headers={**accept, "If-None-Match": inm}) as resp:
                assert resp.status == 304, inm
                assert await resp.read() == b""
                assert resp.headers["ETag"] == get_headers["ETag"]
                assert resp.headers["Cache-Control"] == get_headers["Cache-Control"]
        async with client.get(url, headers={**accept, "If-None-Match": '"sha256:other"'}) as resp:
            assert resp.status == 200
    # By tag: trusted for what is left of tag_ttl, and the answer varies with Accept.
    async with client.get(f"{base}/v2/app/manifests/v1", headers=accept) as resp:
        cc = resp.headers["Cache-Control"]
        assert re.fullmatch(r"max-age=(\d+)", cc) and int(cc.split("=")[1]) <= 60
        assert resp.headers["Vary"] == "Accept"
        assert "immutable" not in cc and "public" not in cc
        get_len = resp.headers["Content-Length"]
    async with client.head(f"{base}/v2/app/manifests/v1", headers=accept) as resp:
        assert resp.headers["Content-Length"] == get_len
        assert resp.headers["Vary"] == "Accept"


# --- systemd notify -------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_notify_sends_datagrams(notify_socket: socket.socket) -> None:
    assert notify.notify("READY=1", "STATUS=serving")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notify.notify("STOPPING=1")
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_socket_and_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mirror-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False  # not under systemd: a no-op
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert notify.notify("READY=1") is False  # never raises


# --- TLS reload -----------------------------------------------------------------------------


def test_tls_reload_keeps_the_old_certificate_on_a_bad_file(tmp_path: Path) -> None:
    from tests.inprocess.test_ops_certs import write_ca_and_cert

    ca = write_ca_and_cert(tmp_path / "a", "127.0.0.1")
    other = write_ca_and_cert(tmp_path / "b", "127.0.0.1")
    ctx = tls.server_context(str(ca.cert), str(ca.key))
    assert not tls.reload(ctx, str(ca.cert), str(other.key))  # mismatched pair: refused
    assert tls.reload(ctx, str(other.cert), str(other.key))
    with pytest.raises(tls.TLSError):
        tls.server_context(str(tmp_path / "missing.pem"), str(ca.key))
    assert isinstance(ctx, ssl.SSLContext)
