"""Three mirror nodes as one cache (issue 12), against the real upstream registry: one
upstream fetch per blob however the clients spread over the nodes, relays from the owner,
the owner's death, the cluster API's HMAC."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mirror.cluster import ring
from tests.support import clients, oci
from tests.support.cluster import Node, owner_of, plan, start_cluster, wait_converged
from tests.support.mirror import Upstream
from tests.support.registry import ClosedPort, ThrottledProxy, wait_until

pytestmark = pytest.mark.integration


def upstreams_for(up: clients.UpstreamRegistry, url: str | None = None) -> list[Upstream]:
    return [Upstream(name=up.host, url=url or up.url, extra={"read_timeout": "5s"})]


def fetch(node: Node, repo: str, digest: str) -> bytes:
    with httpx.Client(trust_env=False, timeout=120) as client:
        r = client.get(f"{node.url}/v2/{repo}/blobs/{digest}")
        r.raise_for_status()
        return r.content


def blobs_of(up: clients.UpstreamRegistry, repo: str) -> list[str]:
    image = up.pushed[repo]["v1"]
    return [b.digest for b in image.blobs]  # type: ignore[union-attr]


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_clients_spread_over_three_nodes_cost_one_upstream_fetch_per_blob(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node],
        workers: int) -> None:
    nodes = start_cluster(tmp_path, upstreams_for(upstream), 3,
                          server_extra={"workers": workers}, cache_extra={"prefetch": False})
    started.extend(nodes)
    digests = blobs_of(upstream, "test/big")[:3] + blobs_of(upstream, "test/small")
    mark = upstream.registry.mark()
    jobs = [(nodes[i % 3], repo, d) for i in range(6)
            for repo, d in [("test/big", d) for d in digests[:3]]
            + [("test/small", d) for d in digests[3:]]]
    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda j: fetch(*j), jobs))
    for (_, _, digest), body in zip(jobs, bodies, strict=True):
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
    gets = upstream.registry.blob_gets(mark)
    assert {d: gets[d] for d in digests} == dict.fromkeys(digests, 1), gets
    # the owner keeps each blob; and every relayed request went through the owner
    for digest in digests:
        owner = owner_of(nodes, digest)
        assert digest in owner.verify_cache()
        relayed = [e for e in owner.requests_for(digest) if "/_cluster/" in str(e["path"])]
        assert relayed, f"{owner.node_id} was never asked for {digest}"


def test_relay_copies_go_once_cold_and_the_owner_keeps_its_own(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node]) -> None:
    """relay_cache = "0" (the default): a node keeps what it relayed only while it is pulled,
    so the cluster holds each blob once; the next request relays again, upstream-free."""
    nodes = start_cluster(tmp_path, upstreams_for(upstream), 2, cache_extra={"prefetch": False})
    started.extend(nodes)
    digest = blobs_of(upstream, "test/big")[-1]
    owner = owner_of(nodes, digest)
    other = next(n for n in nodes if n is not owner)
    mark = upstream.registry.mark()
    assert hashlib.sha256(fetch(other, "test/big", digest)).hexdigest() == digest[7:]
    assert digest in owner.cached_digests()
    wait_until(lambda: digest not in other.cached_digests(), 30, interval=0.2,
               what="the relay copy to be trimmed")
    assert digest in owner.cached_digests()
    wait_until(lambda: any(e.get("msg") == "relay copies trimmed" and e.get("entries") == 1
                           for e in other.log_entries()), 10, what="the trim's log line")
    assert hashlib.sha256(fetch(other, "test/big", digest)).hexdigest() == digest[7:]
    upstream.registry.barrier()
    assert upstream.registry.blob_gets(mark)[digest] == 1


def test_a_node_joining_late_pulls_what_the_others_hold_without_the_upstream(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node]) -> None:
    nodes = plan(tmp_path, upstreams_for(upstream), 3, cache_extra={"prefetch": False})
    started.extend(nodes)
    for n in nodes[:2]:
        n.start()
    wait_converged(nodes[:2])
    digests = blobs_of(upstream, "test/small")
    for d in digests:
        fetch(nodes[0], "test/small", d)
    nodes[2].start()
    wait_converged(nodes)
    mark = upstream.registry.mark()
    for d in digests:  # m3 owns some now: it fills them from their old owner (rank 2)
        for n in nodes:
            assert f"sha256:{hashlib.sha256(fetch(n, 'test/small', d)).hexdigest()}" == d
    assert not upstream.registry.blob_gets(mark)


def test_the_owner_killed_mid_stream_costs_its_relaying_clients_nothing(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node]) -> None:
    link = ThrottledProxy(upstream.registry.port, rate=20_000_000).start()  # 100 MB in ~5 s
    try:
        nodes = start_cluster(tmp_path, upstreams_for(upstream, link.url), 3,
                              cache_extra={"prefetch": False})
        started.extend(nodes)
        digest = max(upstream.pushed["test/big"]["v1"].layers,  # type: ignore[union-attr]
                     key=lambda b: b.size).digest
        owner = owner_of(nodes, digest)
        others = [n for n in nodes if n is not owner]
        mark = upstream.registry.mark()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(fetch, others[i % 2], "test/big", digest) for i in range(8)]
            # the owner dies once its fill is under way (bytes in its partial file)
            owner.wait_log(lambda log: any("/_cluster/blobs/" in str(e.get("path", ""))
                                           for e in log) or link.bytes_forwarded > 20_000_000,
                           timeout=30)
            owner.kill9()
            bodies = [f.result(120) for f in futures]
        assert all(f"sha256:{hashlib.sha256(b).hexdigest()}" == digest for b in bodies)
        # it died mid-stream: the relaying nodes resumed from where its bytes stopped
        assert any(e.get("msg") == "upstream body broke, resuming" and e.get("offset")
                   for n in others for e in n.log_entries())
        assert upstream.registry.blob_gets(mark)[digest] <= 3
    finally:
        link.stop()


def test_cluster_requests_without_the_hmac_are_refused(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node]) -> None:
    nodes = start_cluster(tmp_path, upstreams_for(upstream), 2)
    started.extend(nodes)
    node = nodes[0]
    digest = blobs_of(upstream, "test/small")[0]
    path = f"/_cluster/blobs/{upstream.host}/test/small/{digest}"
    anonymous = httpx.get(f"{node.url}{path}", trust_env=False)
    assert anonymous.status_code == 401
    assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert node.signed_get(path, secret=b"x" * 40).status_code == 401
    assert node.signed_get("/_cluster/health").json() == {"node_id": "m1", "status": "up"}
    assert node.signed_get(f"/_cluster/blobs/{upstream.host}/test/small/sha256:zz"
                           ).status_code == 400
    assert node.signed_get(path + "?stored=1").status_code == 404  # asks nobody
    body = node.signed_get(path)
    assert body.status_code == 200
    assert f"sha256:{hashlib.sha256(body.content).hexdigest()}" == digest
    assert node.signed_get(path + "?stored=1").status_code == 200


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_private_blobs_held_by_a_peer_are_not_served_under_another_name(
        tmp_path: Path, token_upstream: clients.UpstreamRegistry, test_images: oci.ImageSet,
        started: list[Node], workers: int) -> None:
    """The owner confirms the repository with its upstream before it relays private content,
    whether a client or a peer asks, and a stored-only probe is no way around it."""
    priv = Upstream(name="priv.test", url=token_upstream.url, username="reader",
                    password="readerpw")
    nodes = start_cluster(tmp_path, [priv], 3, server_extra={"workers": workers},
                          cache_extra={"prefetch": False})
    started.extend(nodes)
    blobs = test_images.small.blobs
    for i, blob in enumerate(blobs):
        assert fetch(nodes[i % 3], "private/small", blob.digest) == blob.read()
    for blob in blobs:
        assert digest_in_some_cache(nodes, blob.digest)
        for node in nodes:
            for name in ("intruder/repo", "private/nothing"):
                r = httpx.get(f"{node.url}/v2/{name}/blobs/{blob.digest}", trust_env=False,
                              timeout=30)
                assert r.status_code in (401, 404) and r.content != blob.read(), name
                for query in ("", "?stored=1"):
                    r = node.signed_get(f"/_cluster/blobs/priv.test/{name}/{blob.digest}"
                                        f"{query}")
                    assert r.status_code in (401, 404) and r.content != blob.read(), name


def digest_in_some_cache(nodes: list[Node], digest: str) -> bool:
    return any(digest in n.verify_cache() for n in nodes)


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_tag_pulled_at_once_through_every_node_is_looked_up_upstream_once(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node],
        workers: int) -> None:
    """Without Redis too: the tag's owner on the ring looks it up for the cluster, the other
    nodes ask it (and fetch the manifest by digest from that digest's owner)."""
    nodes = start_cluster(tmp_path, upstreams_for(upstream), 3,
                          server_extra={"workers": workers}, cache_extra={"prefetch": False})
    started.extend(nodes)
    accept = "application/vnd.oci.image.manifest.v1+json"
    mark = upstream.registry.mark()

    def get(node: Node) -> httpx.Response:
        return httpx.get(f"{node.url}/v2/test/big/manifests/v1", headers={"Accept": accept},
                         trust_env=False, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(get, [nodes[i % 3] for i in range(12)]))
    assert {r.status_code for r in answers} == {200}
    assert {r.content for r in answers} == {upstream.pushed["test/big"]["v1"].manifest_bytes}
    upstream.registry.barrier()
    asked = [(e.method, e.manifest_ref) for e in upstream.registry.manifest_requests(mark)]
    assert len(asked) == 1, asked


def test_a_pull_through_a_node_not_owning_the_tag_fetches_each_blob_once_with_prefetch(
        tmp_path: Path, upstream: clients.UpstreamRegistry, started: list[Node]) -> None:
    """Found by the cluster benchmark: the tag's owner, answering a peer, prefetched the
    image's blobs from its own upstream while the peer prefetched them through their owners
    (1.9x the image). Only the node whose client asked prefetches."""
    nodes = start_cluster(tmp_path, upstreams_for(upstream), 3)  # prefetch on (the default)
    started.extend(nodes)
    tag_owner = ring.owner([n.node_id for n in nodes], f"tag:{upstream.host}/test/big:v1")
    node = next(n for n in nodes if n.node_id != tag_owner)
    mark = upstream.registry.mark()
    accept = "application/vnd.oci.image.manifest.v1+json"
    r = httpx.get(f"{node.url}/v2/test/big/manifests/v1", headers={"Accept": accept},
                  trust_env=False, timeout=30)
    assert r.status_code == 200
    digests = blobs_of(upstream, "test/big")
    for d in digests:
        assert hashlib.sha256(fetch(node, "test/big", d)).hexdigest() == d[7:]
    for d in digests:
        owner_of(nodes, d).wait_cached([d], timeout=60)
    upstream.registry.barrier()
    gets = upstream.registry.blob_gets(mark)
    assert {d: gets[d] for d in digests} == dict.fromkeys(digests, 1), gets
    assert sum(gets.values()) == len(digests), gets


def test_containerd_pulling_through_each_node_in_turn_costs_one_upstream_fetch_per_blob(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        ctd: clients.Containerd, started: list[Node]) -> None:
    """ctr, its hosts.toml naming one node after the other: the image arrives verified each
    time, and the upstream serves each blob once for the cluster."""
    nodes = start_cluster(tmp_path, [Upstream(name=blackhole.host, url=upstream.url)], 3,
                          cache_extra={"prefetch": False})
    started.extend(nodes)
    image = upstream.pushed["test/big"]["v1"]
    mark = upstream.registry.mark()
    for i, node in enumerate(nodes):
        hosts = clients.write_hosts_toml(tmp_path / f"hosts{i}", blackhole.host, node.url)
        ctd.remove_all()
        ctd.pull(f"{blackhole.host}/test/big:v1", hosts_dir=hosts)
        assert ctd.image_digest(f"{blackhole.host}/test/big:v1") == image.manifest.digest
        ctd.check_image(f"{blackhole.host}/test/big:v1")
        assert {b.digest for b in image.blobs} <= ctd.verify_content()  # type: ignore[union-attr]
    upstream.registry.barrier()
    gets = upstream.registry.blob_gets(mark)
    assert set(gets.values()) == {1}, gets
