"""A cluster's shared tags through a real Redis (issue 12): one upstream lookup per tag per
tag_ttl for the whole cluster, one manifest GET per digest (the ring's owner fetches it), and
Redis stopped or frozen costs a request no more than its timeout."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import clients
from tests.support.cluster import Node, owner_of, start_cluster
from tests.support.mirror import Upstream
from tests.support.redisserver import RedisServer

pytestmark = pytest.mark.integration

ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json,"
          " application/vnd.docker.distribution.manifest.v2+json,"
          " application/vnd.docker.distribution.manifest.list.v2+json")


def cluster(tmp_path: Path, upstream: clients.UpstreamRegistry, redis: RedisServer,
            workers: int, redis_timeout: str) -> Iterator[list[Node]]:
    started = start_cluster(tmp_path, [Upstream(name=upstream.host, url=upstream.url)], 3,
                            redis=redis.url, redis_timeout=redis_timeout,
                            server_extra={"workers": workers}, cache_extra={"prefetch": False})
    yield started
    for n in started:
        n.stop()


@pytest.fixture
def nodes(tmp_path: Path, upstream: clients.UpstreamRegistry, redis: RedisServer,
          request: pytest.FixtureRequest) -> Iterator[list[Node]]:
    yield from cluster(tmp_path, upstream, redis, getattr(request, "param", 1), "1s")


@pytest.fixture
def impatient(tmp_path: Path, upstream: clients.UpstreamRegistry,
              redis: RedisServer) -> Iterator[list[Node]]:
    """Nodes that give Redis the default 50 ms."""
    yield from cluster(tmp_path, upstream, redis, 1, "50ms")


def manifest(node: Node, repo: str, ref: str, method: str = "GET") -> httpx.Response:
    r = httpx.request(method, f"{node.url}/v2/{repo}/manifests/{ref}",
                      headers={"Accept": ACCEPT}, trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("nodes", [1, 2], indirect=True, ids=lambda w: f"w{w}")
def test_a_tag_asked_of_every_node_is_looked_up_upstream_once(
        upstream: clients.UpstreamRegistry, nodes: list[Node]) -> None:
    mark = upstream.registry.mark()
    answers = [manifest(n, "test/big", "v1", method)
               for method in ("HEAD", "GET") for n in nodes for _ in range(2)]
    assert len({r.headers["Docker-Content-Digest"] for r in answers}) == 1
    digest = answers[0].headers["Docker-Content-Digest"]
    assert all(r.content == answers[-1].content for r in answers if r.request.method == "GET")
    upstream.registry.barrier()
    asked = [(e.method, e.manifest_ref) for e in upstream.registry.manifest_requests(mark)]
    assert {ref for _, ref in asked} <= {"v1", digest}, asked
    # one lookup of the tag for the whole cluster (the first HEAD), and the manifest
    # fetched once (by the tag's owner, by tag)
    assert [m for m, _ in asked].count("HEAD") <= 1, asked
    assert [m for m, _ in asked].count("GET") <= 1, asked


def test_redis_frozen_or_stopped_costs_a_request_at_most_its_timeout(
        upstream: clients.UpstreamRegistry, impatient: list[Node], redis: RedisServer) -> None:
    nodes = impatient
    manifest(nodes[0], "test/big", "v1")  # warm: the node's own index has the tag now
    redis.pause()
    try:
        t0 = time.monotonic()
        for n in nodes:  # nodes 2 and 3 never saw the tag: they ask Redis, then the upstream
            manifest(n, "test/big", "v1")
        frozen = time.monotonic() - t0
    finally:
        redis.resume()
    redis.shutdown()
    t0 = time.monotonic()
    for n in nodes:
        manifest(n, "test/small", "v1")
    stopped = time.monotonic() - t0
    assert frozen < 3.0 and stopped < 3.0, (frozen, stopped)
    assert all("redis unusable" in n.stderr_path.read_text() for n in nodes[1:])


def page_value(page: str, element_id: str) -> float:
    match = re.search(rf'id="{element_id}" data-value="([^"]*)"', page)
    assert match, element_id
    return float(match.group(1))


def test_the_status_page_shows_the_ring_the_peer_bytes_and_redis(
        upstream: clients.UpstreamRegistry, nodes: list[Node], redis: RedisServer) -> None:
    blob = upstream.pushed["test/small"]["v1"].layers[0]  # type: ignore[union-attr]
    owner = owner_of(nodes, blob.digest)
    other = next(n for n in nodes if n is not owner)
    r = httpx.get(f"{other.url}/v2/test/small/blobs/{blob.digest}", trust_env=False,
                  timeout=30)
    assert r.status_code == 200
    page = httpx.get(f"{owner.url}/", trust_env=False, timeout=30).text
    peers = re.findall(r'<tr class="peer" data-node="([^"]*)">.*?class="(ok|bad)"', page)
    assert sorted(peers) == [(n.node_id, "ok") for n in nodes]
    assert page_value(page, "peer-bytes-out") >= blob.size
    assert page_value(httpx.get(f"{other.url}/", trust_env=False).text,
                      "peer-bytes-in") >= blob.size
    assert '<span id="redis">up</span>' in page
    redis.shutdown()
    manifest(owner, "test/small", "v2")  # a tag it never saw: it asks Redis, which is gone
    assert '<span id="redis">unusable' in httpx.get(f"{owner.url}/", trust_env=False).text


@pytest.mark.parametrize("nodes", [1, 2], indirect=True, ids=lambda w: f"w{w}")
def test_a_tag_asked_of_every_node_at_once_with_redis_costs_one_lookup_and_no_error(
        upstream: clients.UpstreamRegistry, nodes: list[Node]) -> None:
    """Found by the cluster benchmark (F1 round robin with Redis): concurrent cold lookups
    of one tag on every node, with Redis sharing tags and the tag's owner on the ring."""
    mark = upstream.registry.mark()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: httpx.get(
            f"{nodes[i % 3].url}/v2/test/big/manifests/v1", headers={"Accept": ACCEPT},
            trust_env=False, timeout=30), range(32)))
    assert [r.status_code for r in answers] == [200] * 32, [r.text for r in answers][:3]
    upstream.registry.barrier()
    by_tag = [e for e in upstream.registry.manifest_requests(mark) if e.manifest_ref == "v1"]
    assert len(by_tag) == 1, by_tag
