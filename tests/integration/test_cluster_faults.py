"""Peers that misbehave (issue 12): one that sends bytes not matching the digest, one that
stalls half way through a blob, one that accepts and never answers. Two real nodes and a
fake third (tests/support/fakepeer.py) that owns the digest asked for, so every relay goes to
it first. A client never gets a complete wrong blob and gets the right one from elsewhere;
the liar is held down and counted."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.cluster import ring
from tests.support import clients
from tests.support.cluster import Node, plan, wait_converged
from tests.support.fakepeer import FakePeer, Mode
from tests.support.mirror import Upstream

pytestmark = pytest.mark.integration

FAKE_ADDRESS = "127.0.0.14"


def owning_id(digest: str, others: list[str]) -> str:
    """A node id that ranks first for `digest` among `others` and itself."""
    return next(f"fake-{i}" for i in range(1000)
                if ring.rank(dict.fromkeys([*others, f"fake-{i}"], ""), digest)[0]
                == f"fake-{i}")


def layer(up: clients.UpstreamRegistry) -> tuple[str, bytes]:
    blob = max(up.pushed["test/big"]["v1"].layers, key=lambda b: b.size)  # type: ignore[union-attr]
    r = httpx.get(f"{up.url}/v2/test/big/blobs/{blob.digest}", trust_env=False, timeout=30)
    return blob.digest, r.content


def metric(node: Node, name: str, **labels: str) -> float:
    text = httpx.get(f"{node.url}/metrics", trust_env=False, timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def with_fake(tmp: Path, up: clients.UpstreamRegistry, started: list[Node], mode: Mode,
              workers: int) -> FakePeer:
    digest, data = layer(up)
    fake = FakePeer(FAKE_ADDRESS, owning_id(digest, ["m1", "m2"]), data, mode)
    nodes = plan(tmp, [Upstream(name=up.host, url=up.url, extra={"read_timeout": "5s"})], 2,
                 extra_peers=(fake.url,), server_extra={"workers": workers},
                 cache_extra={"prefetch": False}, cluster_extra={"peer_timeout": "1s"})
    started.extend(nodes)
    fake.__enter__()
    for n in nodes:
        n.start()
    wait_converged(nodes, also=(fake.node_id,))
    return fake


def get(node: Node, repo: str, digest: str) -> bytes | None:
    """The body, or None when the mirror cut it short (what a client must see for bytes
    that failed their digest)."""
    try:
        r = httpx.get(f"{node.url}/v2/{repo}/blobs/{digest}", trust_env=False, timeout=60)
    except httpx.RemoteProtocolError:
        return None
    assert r.status_code == 200, r.text
    return r.content


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_peer_sending_wrong_bytes_is_cut_off_held_down_and_the_blob_comes_from_elsewhere(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node],
        workers: int) -> None:
    fake = with_fake(tmp_path, upstream, started, "wrong", workers)
    digest = layer(upstream)[0]
    try:
        m1 = started[0]
        bodies = [get(m1, "test/big", digest) for _ in range(workers + 1)]
        # each worker learns once, with a body cut short, never a complete wrong one
        assert all(b is None or hashlib.sha256(b).hexdigest() == digest[7:] for b in bodies)
        assert bodies[-1] is not None
        assert None in bodies
        assert 1 <= fake.blob_requests <= workers
        assert metric(m1, "mirror_peer_wrong_bytes_total", peer=fake.url) == fake.blob_requests
        assert metric(m1, "mirror_digest_mismatches_total", kind="blob") >= 1
        if workers == 1:  # with two, /_cluster/ring may land on the worker not lied to
            assert fake.node_id not in m1.live()
        m1.verify_cache()  # whatever it holds hashes to its name
    finally:
        fake.__exit__(None, None, None)


@pytest.mark.parametrize("mode", ["stall", "silent"])
def test_a_peer_that_goes_silent_costs_a_pause_of_peer_timeout_not_an_error(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node],
        mode: Mode) -> None:
    fake = with_fake(tmp_path, upstream, started, mode, 1)
    digest = layer(upstream)[0]
    try:
        m1 = started[0]
        t0 = time.monotonic()
        body = get(m1, "test/big", digest)
        took = time.monotonic() - t0
        assert body is not None and hashlib.sha256(body).hexdigest() == digest[7:]
        assert fake.blob_requests == 1
        assert took < 15, took  # peer_timeout is 1 s: the next rank, not minutes
        # marked down (its health checks bring it back: only wrong bytes hold a peer down)
        assert metric(m1, "mirror_peer_failures_total", peer=fake.url) == 1
    finally:
        fake.__exit__(None, None, None)
