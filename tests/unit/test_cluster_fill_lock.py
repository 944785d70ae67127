"""ClusterSource's fill lock (cluster/source.py) with counting fakes and no HTTP: which node a
blob is asked of when Redis says another holds its fill, and what becomes of the lock."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mirror.cluster import auth, ring
from mirror.cluster import source as cluster_source
from mirror.cluster.peers import Ask, HolderRedirect, Membership, PeerBlob, PeerUnavailable
from mirror.cluster.source import DONE_TTL, FILL_TTL, ClusterSource
from mirror.config import ClusterConfig
from mirror.oci.reference import Digest, digest_of
from tests.unit.test_proxy_policy import FakeBlob, FakeSource

ME, PEER, STRANGER = "http://127.0.0.11:5000", "http://127.0.0.12:5000", "http://10.9.9.9:80"
DATA = b"layer bytes " * 1000
DIGEST = digest_of(DATA)
REPO = "library/alpine"


class FakeLocks:
    """Redis's fill locks as the Lua scripts of cluster/shared.py keep them."""

    def __init__(self, held_by: str | None = None, usable: bool = True) -> None:
        self.held: dict[str, tuple[str, float]] = {}
        if held_by is not None:
            self.held[str(DIGEST)] = (held_by, FILL_TTL)
        self.usable = usable
        self.calls: collections.Counter[str] = collections.Counter()

    async def acquire_fill(self, digest: str, holder: str, ttl: float) -> str | None:
        self.calls["acquire"] += 1
        if not self.usable:
            return None
        if digest in self.held:
            return self.held[digest][0]
        self.held[digest] = (holder, ttl)
        return None

    async def renew_fill(self, digest: str, holder: str, ttl: float) -> bool:
        self.calls["renew"] += 1
        if self.held.get(digest, ("",))[0] != holder:
            return False
        self.held[digest] = (holder, ttl)
        return True

    async def release_fill(self, digest: str, holder: str) -> None:
        self.calls["release"] += 1
        if self.held.get(digest, ("",))[0] == holder:
            del self.held[digest]


class FakeMembership(Membership):
    """The peer at PEER is known and up; what is asked of peers is recorded, and answered
    unless `peer_down` (it stopped answering since its last health check)."""

    def __init__(self) -> None:
        config = ClusterConfig(node_id="m1", advertise_url=ME, secret=b"k" * 32, peers=(PEER,),
                               peer_fill_ranks=0)
        super().__init__(config, session=None)  # type: ignore[arg-type]
        # a peer ranked below this node for DIGEST: this node is the owner that fills it
        below = next(n for n in (f"m{i}" for i in range(2, 100))
                     if ring.owner(["m1", n], str(DIGEST)) == "m1")
        self.peers[PEER].up, self.peers[PEER].node_id = True, below
        self.asked: list[tuple[str, Ask]] = []
        self.peer_down = False

    async def open_blob(self, url: str, upstream: str, repository: str, digest: Digest,
                        offset: int, ask: Ask) -> PeerBlob:
        self.asked.append((url, ask))
        if self.peer_down:
            raise PeerUnavailable(f"{url}: refused")
        return FakeBlob(DATA, offset, None)  # type: ignore[return-value]


def source(locks: FakeLocks | None) -> tuple[ClusterSource, FakeMembership, FakeSource]:
    upstream = FakeSource()
    upstream.blobs[DIGEST] = DATA
    membership = FakeMembership()
    return ClusterSource(upstream, membership, relays=True, fill_locks=locks), membership, \
        upstream


async def drain(body: Any) -> bytes:
    data = b""
    while chunk := await body.read():
        data += chunk
    body.close()
    await asyncio.gather(*cluster_source._ENDING)
    return data


async def test_a_blob_another_node_is_filling_comes_from_that_node() -> None:
    locks = FakeLocks(held_by=PEER)
    cluster, membership, upstream = source(locks)
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert membership.asked == [(PEER, "holder")]
    assert upstream.calls["open_blob"] == 0


async def test_the_node_that_takes_the_lock_fills_and_keeps_it_for_late_askers() -> None:
    locks = FakeLocks()
    cluster, membership, upstream = source(locks)
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert upstream.calls["open_blob"] == 1 and not membership.asked
    assert locks.held[str(DIGEST)] == (ME, DONE_TTL)  # kept: a node asking now comes here


async def test_a_fill_that_stopped_short_releases_its_lock() -> None:
    locks = FakeLocks()
    cluster, _, _ = source(locks)
    body = await cluster.open_blob(REPO, DIGEST, 0)
    body.close()  # the download engine gave up on it (the client left, the disk filled...)
    await asyncio.gather(*cluster_source._ENDING)
    assert str(DIGEST) not in locks.held and locks.calls["release"] == 1


async def test_a_rejected_fill_releases_its_lock() -> None:
    locks = FakeLocks()
    cluster, _, _ = source(locks)
    body = await cluster.open_blob(REPO, DIGEST, 0)
    await body.read()
    assert await body.read() == b""
    body.reject()  # its bytes did not match the digest: nobody should be sent here
    body.close()
    await asyncio.gather(*cluster_source._ENDING)
    assert str(DIGEST) not in locks.held


async def test_a_holder_that_is_not_a_peer_is_never_asked() -> None:
    cluster, membership, upstream = source(FakeLocks(held_by=STRANGER))
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert not membership.asked and upstream.calls["open_blob"] == 1


async def test_a_holder_that_does_not_answer_costs_a_duplicate_fetch_not_an_error() -> None:
    locks = FakeLocks(held_by=PEER)
    cluster, membership, upstream = source(locks)
    membership.peer_down = True
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert membership.asked == [(PEER, "holder")] and upstream.calls["open_blob"] == 1
    assert locks.held[str(DIGEST)][0] == PEER  # not ours to release


async def test_a_holder_seen_down_is_not_asked() -> None:
    cluster, membership, upstream = source(FakeLocks(held_by=PEER))
    membership.peers[PEER].up = False  # a partition: asking would hold the fill a while
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert not membership.asked and upstream.calls["open_blob"] == 1


@pytest.mark.parametrize("locks", [None, FakeLocks(usable=False)], ids=["no-redis", "down"])
async def test_without_usable_redis_the_node_fills_alone(locks: FakeLocks | None) -> None:
    cluster, membership, upstream = source(locks)
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert not membership.asked and upstream.calls["open_blob"] == 1


def redirecting(locks: FakeLocks) -> tuple[ClusterSource, FakeMembership, FakeSource]:
    """A node with holder_redirect that sees the lock's holder, PEER, down (a partition)."""
    cluster, membership, upstream = source(locks)
    membership.config = dataclasses.replace(membership.config, holder_redirect=True)
    membership.peers[PEER].up = False
    return cluster, membership, upstream


@pytest.mark.parametrize("relays", [True, False], ids=["client", "peer-relaying"])
async def test_a_node_cut_off_from_the_holder_sends_its_client_there_with_a_grant(
        relays: bool) -> None:
    cluster, membership, upstream = redirecting(FakeLocks(held_by=PEER))
    cluster.relays = relays  # a peer relaying for its client passes the 307 on
    with pytest.raises(HolderRedirect) as raised:
        await cluster.open_blob(REPO, DIGEST, 0)
    assert raised.value.status == 307 and upstream.calls["open_blob"] == 0
    location = urlsplit(raised.value.headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == PEER
    assert location.path == Membership.blob_path(cluster.name, REPO, DIGEST)
    query = parse_qs(location.query)
    assert query["holder"] == ["1"]
    secret = membership.config.secret
    assert auth.verify_grant(secret, query["grant"][0], "GET", location.path,
                             time.time()) == "m1"
    with pytest.raises(auth.ClusterAuthError, match="does not match"):  # one path only
        auth.verify_grant(secret, query["grant"][0], "GET",
                          Membership.blob_path(cluster.name, "other/repo", DIGEST), time.time())
    with pytest.raises(auth.ClusterAuthError, match="expired"):
        auth.verify_grant(secret, query["grant"][0], "GET", location.path,
                          time.time() + cluster_source.GRANT_TTL + 2)


@pytest.mark.parametrize("why", ["off", "private", "resume", "not-a-peer"])
async def test_the_holder_redirect_only_for_a_clients_public_blob_from_its_start(
        why: str) -> None:
    cluster, membership, upstream = redirecting(FakeLocks(held_by=STRANGER if why ==
                                                          "not-a-peer" else PEER))
    offset = 0
    if why == "off":
        membership.config = dataclasses.replace(membership.config, holder_redirect=False)
    elif why == "private":
        upstream.private = True
        upstream.holds.add((REPO, DIGEST))
    elif why == "resume":
        offset = 100
    assert await drain(await cluster.open_blob(REPO, DIGEST, offset)) == DATA[offset:]
    assert upstream.calls["open_blob"] == 1


async def test_a_holder_that_failed_this_node_is_not_where_its_client_is_sent() -> None:
    """A holder seen up that then did not answer is failing, not cut off: this node fetches
    the blob itself rather than send its client to it."""
    cluster, membership, upstream = redirecting(FakeLocks(held_by=PEER))
    membership.peers[PEER].up, membership.peer_down = True, True
    assert await drain(await cluster.open_blob(REPO, DIGEST, 0)) == DATA
    assert membership.asked == [(PEER, "holder")] and upstream.calls["open_blob"] == 1
