"""The fill lock in a real Redis breaks the tie when two nodes disagree about who owns a
digest (issue 12): m1 never saw m2 come up, so both think they own it; one upstream fetch,
and the other node streams from the lock's holder — during its fill and after it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.cluster import ring
from tests.support import clients
from tests.support.cluster import Node, plan
from tests.support.mirror import Upstream
from tests.support.redisserver import RedisServer
from tests.support.registry import ThrottledProxy, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def link(upstream: clients.UpstreamRegistry) -> Iterator[ThrottledProxy]:
    proxy = ThrottledProxy(upstream.registry.port, rate=20_000_000).start()
    yield proxy
    proxy.stop()


def layers(up: clients.UpstreamRegistry) -> list[str]:
    """test/big's layers, the largest first (100 MB, 10 MB, 1 MB)."""
    blobs = up.pushed["test/big"]["v1"].layers  # type: ignore[union-attr]
    return [b.digest for b in sorted(blobs, key=lambda b: -b.size)]


def disputing_id(digests: list[str]) -> str:
    """A node id that outranks m1 for every one of `digests`, so that both nodes think they
    own them once m1 is blind to it."""
    return next(n for n in (f"m2-{i}" for i in range(10_000))
                if all(ring.owner(["m1", n], d) == n for d in digests))


@pytest.fixture
def split(tmp_path: Path, upstream: clients.UpstreamRegistry, redis: RedisServer,
          link: ThrottledProxy) -> Iterator[list[Node]]:
    """m1 checked its peers once, before m2 was up, and not again for an hour: it sees only
    itself. m2 sees both, and owns test/big's two largest layers."""
    nodes = plan(tmp_path, [Upstream(name=upstream.host, url=link.url)], 2, redis=redis.url,
                 cache_extra={"prefetch": False})
    nodes[0].cluster["health_interval"] = "1h"
    m2 = disputing_id(layers(upstream)[:2])
    nodes[1].node_id = nodes[1].cluster["node_id"] = m2
    try:
        for n in nodes:
            n.start()
        wait_until(lambda: nodes[1].live() == ["m1", m2], 20, what="m2 to see m1")
        assert nodes[0].live() == ["m1"]
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def fetch(node: Node, digest: str) -> str:
    r = httpx.get(f"{node.url}/v2/test/big/blobs/{digest}", trust_env=False, timeout=120)
    r.raise_for_status()
    return f"sha256:{hashlib.sha256(r.content).hexdigest()}"


def holder_relays(node: Node) -> float:
    text = httpx.get(f"{node.url}/metrics", trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('mirror_peer_relays_total{reason="holder"}'))


def test_two_nodes_that_each_think_they_own_a_blob_fetch_it_once(
        upstream: clients.UpstreamRegistry, split: list[Node], link: ThrottledProxy) -> None:
    m1, m2 = split
    digest, later = layers(upstream)[:2]
    mark = upstream.registry.mark()
    with ThreadPoolExecutor(4) as pool:
        first = [pool.submit(fetch, m1, digest) for _ in range(2)]
        wait_until(lambda: link.bytes_forwarded > 2_000_000, 30, what="m1's fill under way")
        second = [pool.submit(fetch, m2, digest) for _ in range(2)]
        assert {f.result(120) for f in first + second} == {digest}
    upstream.registry.barrier()
    assert upstream.registry.blob_gets(mark)[digest] == 1
    assert holder_relays(m1) + holder_relays(m2) == 1  # the one that lost the race
    # after a fill, its holder still answers for the digest for a while: a node asked then
    # streams from it
    mark = upstream.registry.mark()
    assert fetch(m1, later) == later
    assert fetch(m2, later) == later
    upstream.registry.barrier()
    assert upstream.registry.blob_gets(mark)[later] == 1
    assert holder_relays(m2) == 1


def test_with_redis_gone_both_nodes_fill_alone_and_serve(
        upstream: clients.UpstreamRegistry, split: list[Node], redis: RedisServer,
        link: ThrottledProxy) -> None:
    """The same race without Redis: a duplicate fetch (what the lock saves), no error."""
    m1, m2 = split
    digest = layers(upstream)[0]
    redis.shutdown()
    mark = upstream.registry.mark()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(fetch, m1, digest)
        wait_until(lambda: link.bytes_forwarded > 2_000_000, 30, what="m1's fill under way")
        assert fetch(m2, digest) == digest and first.result(120) == digest
    upstream.registry.barrier()
    assert upstream.registry.blob_gets(mark)[digest] == 2
