"""Health checks on a fixed cadence (cluster/peers.py): a healed peer is up again after
health_passes answered checks, not after the checks sent into the partition time out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.cluster.peers import Membership, Peer
from mirror.config import ClusterConfig


class Peer2:
    """A peer's /_cluster/health: answering, refusing (503) or silent (never answers)."""

    def __init__(self) -> None:
        self.mode = "answer"
        self.release = asyncio.Event()
        self.waiting = 0  # checks received and not answered

    async def health(self, _request: web.Request) -> web.Response:
        if self.mode == "refuse":
            return web.Response(status=503)
        if self.mode == "silent":
            self.waiting += 1
            await self.release.wait()
        return web.json_response({"node_id": "m2"})


@pytest.fixture
async def peer2() -> AsyncIterator[tuple[Peer2, str]]:
    peer = Peer2()
    app = web.Application()
    app.router.add_get("/_cluster/health", peer.health)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield peer, str(server.make_url("")).rstrip("/")
    peer.release.set()
    await server.close()


async def until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_healed_peer_is_up_without_waiting_for_checks_sent_into_the_partition(
        peer2: tuple[Peer2, str]) -> None:
    fake, url = peer2
    config = ClusterConfig(node_id="m1", advertise_url="http://127.0.0.1:1", secret=b"k" * 32,
                           peers=(url,), health_interval=0.05, health_fails=1,
                           health_passes=2, peer_timeout=30.0)
    async with aiohttp.ClientSession() as session:
        membership = Membership(config, session)
        await membership.check_once()
        peer: Peer = membership.peers[url]
        assert peer.up
        checks = asyncio.ensure_future(membership.run())
        try:
            fake.mode = "refuse"
            assert await until(lambda: not peer.up, 5)
            fake.mode = "silent"  # the partition: checks are sent and never answered
            assert await until(lambda: fake.waiting >= 1, 5)
            fake.mode = "answer"  # healed
            assert await until(lambda: peer.up, 5), "the healed peer waited for old checks"
            assert fake.waiting >= 1 and not fake.release.is_set()  # still unanswered
            assert "m2" in membership.live()
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks


@pytest.mark.parametrize("heading", ["up", "down"])
async def test_a_peer_between_states_is_checked_again_soon_not_at_the_next_round(
        peer2: tuple[Peer2, str], heading: str) -> None:
    """One round's check of a peer whose answers changed is followed by more at a quarter of
    health_interval until it has changed state (HAProxy's fastinter), so a healed peer is up
    after about one interval, not health_passes of them; a failing one is down as soon."""
    fake, url = peer2
    interval = 2.0  # a round's wait; far longer than the follow-up checks' together
    config = ClusterConfig(node_id="m1", advertise_url="http://127.0.0.1:1", secret=b"k" * 32,
                           peers=(url,), health_interval=interval, health_fails=3,
                           health_passes=3, peer_timeout=5.0)
    async with aiohttp.ClientSession() as session:
        membership = Membership(config, session)
        await membership.check_once()
        peer = membership.peers[url]
        assert peer.up
        if heading == "up":
            membership.mark_down(url, "a relay from it broke")
        else:
            fake.mode = "refuse"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await membership._check(peer)  # one round's check of this peer, and what follows it
        assert peer.up == (heading == "up"), vars(peer)
        took = loop.time() - started
        assert interval * 0.25 * 2 <= took < interval, took  # two follow-ups, at a quarter each
