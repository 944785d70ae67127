"""The shipped load-balancer configurations (docs/haproxy-cluster.cfg, docs/nginx-cluster.conf)
in front of three mirror nodes (issue 12), with real HAProxy and nginx, the real upstream
registry and concurrent skopeo copies.

What hashing on the digest buys, measured: every request for a blob lands on one node, so a
blob is relayed at most once (when that node is not its owner on the mirror's ring; the
balancer's hash and the ring's rendezvous hash are different functions and agree only by
chance), and not at all once that node holds it. What it must never be needed for: one
upstream GET per blob, which round robin gets too; and a node killed -9 leaves the pulls
working once the health checks take it out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import clients, oci
from tests.support.balancer import (
    HAProxy,
    NginxBalancer,
    Relays,
    binary,
    client_gets,
    relay_counters,
    total,
)
from tests.support.cluster import Node, owner_of, start_cluster, wait_converged
from tests.support.mirror import Upstream
from tests.support.registry import ClosedPort, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Concurrent copies per image in one round: test/big (1, 10 and 100 MB layers and a config),
# test/small (64 and 300 KiB layers and a config), test/multi (an index: skopeo takes its
# amd64 manifest by digest, then that image's two small layers and config).
COPIES = {"test/big": 2, "test/small": 3, "test/multi": 2}


@pytest.fixture
def stoppers() -> Iterator[list[Callable[[], object]]]:
    """What a test started, stopped in reverse order whatever happens."""
    stops: list[Callable[[], object]] = []
    yield stops
    for stop in reversed(stops):
        stop()


def need(name: str) -> None:
    if binary(name) is None:
        pytest.skip(f"{name} is not installed (tests/install-system-deps.sh)")


def three_nodes(tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
                stoppers: list[Callable[[], object]]) -> list[Node]:
    (tmp_path / "nodes").mkdir()
    ups = [Upstream(name=blackhole.host, url=upstream.url, extra={"read_timeout": "5s"})]
    # relay_cache: the relaying node keeps what it relayed, as docs/cluster-balancer.md advises
    nodes = start_cluster(tmp_path / "nodes", ups, 3, cache_extra={"prefetch": False},
                          cluster_extra={"relay_cache": "1GiB"})
    stoppers.extend(n.stop for n in nodes)
    return nodes


def images(upstream: clients.UpstreamRegistry) -> dict[str, oci.Image]:
    out: dict[str, oci.Image] = {}
    for repo in COPIES:
        image = upstream.pushed[repo]["v1"]
        if isinstance(image, oci.ImageIndex):  # what a copy without --all takes on amd64
            image = next(i for i in image.images if i.arch == "amd64")
        out[repo] = image
    return out


def by_digest(upstream: clients.UpstreamRegistry) -> list[str]:
    """The manifests the copies ask for by digest (an index's platform manifest)."""
    return sorted(images(upstream)[repo].manifest.digest for repo in COPIES
                  if isinstance(upstream.pushed[repo]["v1"], oci.ImageIndex))


def pull_round(tmp_path: Path, name: str, balancer_host: str, blackhole: ClosedPort,
               upstream: clients.UpstreamRegistry) -> None:
    """COPIES concurrent `skopeo copy`s through the balancer, each checked blob by blob."""
    conf = clients.write_registries_conf(tmp_path / f"{name}.conf", registry=blackhole.host,
                                         mirrors=[balancer_host])
    jobs = [(repo, i) for repo, n in COPIES.items() for i in range(n)]
    want = images(upstream)

    def copy(job: tuple[str, int]) -> None:
        repo, i = job
        out = tmp_path / f"{name}-{repo.replace('/', '_')}-{i}"
        pulled = clients.skopeo_pull(conf, blackhole.host, repo, "v1", out, timeout=300)
        clients.assert_pulled(pulled, want[repo])

    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(copy, j) for j in jobs]:
            f.result(330)


def sizes(upstream: clients.UpstreamRegistry) -> dict[str, int]:
    return {b.digest: b.size for image in images(upstream).values() for b in image.blobs}


def landings(nodes: list[Node], digests: list[str], kind: str = "blobs"
             ) -> dict[str, set[str]]:
    """The nodes the balancer sent each digest's client GETs to."""
    per_node = {n.node_id: client_gets(n, kind, digests) for n in nodes if n.running}
    return {d: {node for node, counts in per_node.items() if counts[d]} for d in digests}


def tag_landings(nodes: list[Node]) -> dict[str, set[str]]:
    """The nodes the balancer sent each repository's tag manifest GETs to."""
    return {repo: {n.node_id for n in nodes if n.requests_for(f"/v2/{repo}/manifests/v1", "GET")}
            for repo in COPIES}


def counters(nodes: list[Node]) -> dict[str, Relays]:
    return {n.node_id: relay_counters(n) for n in nodes if n.running}


def since(nodes: list[Node], before: dict[str, Relays]) -> Relays:
    now = counters(nodes)
    return total(now[k] - before.get(k, Relays()) for k in now)


def assert_hashing_saves_relays(tmp_path: Path, nodes: list[Node], balancer_host: str,
                                blackhole: ClosedPort,
                                upstream: clients.UpstreamRegistry) -> None:
    blob_sizes = sizes(upstream)
    digests = sorted(blob_sizes)
    mark = upstream.registry.mark()
    before = counters(nodes)
    pull_round(tmp_path, "first", balancer_host, blackhole, upstream)

    gets = upstream.registry.blob_gets(mark)
    assert {d: gets[d] for d in digests} == dict.fromkeys(digests, 1), gets
    # Every copy's GETs of a blob landed on one node ...
    landed = landings(nodes, digests)
    assert all(len(where) == 1 for where in landed.values()), landed
    # ... so a blob was relayed once if that node is not its owner on the ring, else never
    # (the node a blob landed on keeps what it relayed: concurrent copies follow that one
    # relay). The ring and the balancer hash differently: their agreement is computed, not
    # assumed.
    off_owner = [d for d in digests if landed[d] != {owner_of(nodes, d).node_id}]
    # the same for the manifests asked for by digest; and a repository's tag on one node
    manifests = by_digest(upstream)
    landed_manifests = landings(nodes, manifests, "manifests")
    assert all(len(where) == 1 for where in landed_manifests.values()), landed_manifests
    manifests_off_owner = [d for d in manifests
                           if landed_manifests[d] != {owner_of(nodes, d).node_id}]
    assert all(len(where) == 1 for where in tag_landings(nodes).values())
    relays = since(nodes, before)
    assert relays.fill == 0
    assert relays.owner == len(off_owner), (relays, off_owner, landed)
    assert relays.manifest == len(manifests_off_owner), (relays, landed_manifests)
    assert relays.bytes_in == sum(blob_sizes[d] for d in off_owner), (relays, off_owner)
    served = sum(COPIES[repo] * sum(b.size for b in image.blobs)
                 for repo, image in images(upstream).items())
    assert relays.bytes_in <= served / min(COPIES.values())

    # A second round: every blob is already on the node it lands on. No relay, no upstream.
    mark = upstream.registry.mark()
    before = counters(nodes)
    pull_round(tmp_path, "second", balancer_host, blackhole, upstream)
    assert not {d: n for d, n in upstream.registry.blob_gets(mark).items() if d in digests}
    again = since(nodes, before)
    assert again == Relays(), again
    assert landings(nodes, digests) == landed


def test_haproxy_hashing_on_the_digest_relays_each_blob_at_most_once(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        stoppers: list[Callable[[], object]]) -> None:
    need("haproxy")
    nodes = three_nodes(tmp_path, upstream, blackhole, stoppers)
    lb = HAProxy(tmp_path / "haproxy", [n.host for n in nodes])
    stoppers.append(lb.stop)
    lb.start()
    assert_hashing_saves_relays(tmp_path, nodes, lb.host, blackhole, upstream)


def test_nginx_hashing_on_the_digest_relays_each_blob_at_most_once(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        stoppers: list[Callable[[], object]]) -> None:
    need("nginx")
    nodes = three_nodes(tmp_path, upstream, blackhole, stoppers)
    lb = NginxBalancer(tmp_path / "nginx", [n.host for n in nodes])
    stoppers.append(lb.stop)
    lb.start()
    assert_hashing_saves_relays(tmp_path, nodes, lb.host, blackhole, upstream)


def test_round_robin_still_costs_one_upstream_get_per_blob(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        stoppers: list[Callable[[], object]]) -> None:
    """Correctness never depends on the balancer: the same config balancing round robin
    spreads a blob's GETs over the nodes, and the cluster still fetches it once."""
    need("haproxy")
    nodes = three_nodes(tmp_path, upstream, blackhole, stoppers)
    lb = HAProxy(tmp_path / "haproxy", [n.host for n in nodes], balance="balance roundrobin")
    stoppers.append(lb.stop)
    lb.start()
    digests = sorted(sizes(upstream))
    mark = upstream.registry.mark()
    before = counters(nodes)
    pull_round(tmp_path, "rr", lb.host, blackhole, upstream)
    gets = upstream.registry.blob_gets(mark)
    assert {d: gets[d] for d in digests} == dict.fromkeys(digests, 1), gets
    landed = landings(nodes, digests)
    # the balancer really spread them (else this test would show nothing)
    assert any(len(where) > 1 for where in landed.values()), landed
    relays = since(nodes, before)
    # every node that got a blob it does not own relayed it (once: then it holds it)
    expected = sum(len(where - {owner_of(nodes, d).node_id}) for d, where in landed.items())
    assert relays.owner == expected, (relays, landed)
    for node in nodes:
        assert node.verify_cache()


def test_a_node_killed_behind_haproxy_leaves_the_pulls_working(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        stoppers: list[Callable[[], object]]) -> None:
    need("haproxy")
    nodes = three_nodes(tmp_path, upstream, blackhole, stoppers)
    lb = HAProxy(tmp_path / "haproxy", [n.host for n in nodes])
    stoppers.append(lb.stop)
    lb.start()
    digests = sorted(sizes(upstream))
    pull_round(tmp_path, "before", lb.host, blackhole, upstream)
    landed = landings(nodes, digests)
    # the victim: the node the most blobs landed on (its keys must move elsewhere)
    victim = max(nodes, key=lambda n: sum(n.node_id in where for where in landed.values()))
    moved = [d for d in digests if victim.node_id in landed[d]]
    assert moved
    victim.kill9()
    wait_until(lambda: lb.server_states().get(victim.node_id) == "DOWN", 15,
               interval=0.1, what=f"haproxy to mark {victim.node_id} DOWN")
    assert {k: v for k, v in lb.server_states().items() if k != victim.node_id} == {
        n.node_id: "UP" for n in nodes if n is not victim}
    survivors = [n for n in nodes if n is not victim]
    wait_converged(survivors)

    mark = upstream.registry.mark()
    pull_round(tmp_path, "after", lb.host, blackhole, upstream)
    gets = upstream.registry.blob_gets(mark)
    # what only the dead node held is fetched again, once; the rest came from the survivors
    assert all(gets[d] <= 1 for d in digests), gets
    after = landings(survivors, digests)
    for d in moved:  # its blobs now land on one survivor each
        assert len(after[d] - landed[d]) == 1, (d, landed[d], after[d])
    for d in set(digests) - set(moved):  # consistent hashing: the others did not move
        assert after[d] == landed[d], (d, landed[d], after[d])
