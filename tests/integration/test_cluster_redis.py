"""mirror/cluster/shared.py against a real redis-server: tags, fill locks, credentials, and
what the mirror sees when Redis goes away (shut down, frozen with SIGSTOP, restarted)."""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from prometheus_client import REGISTRY

from mirror.cluster.shared import SharedState
from tests.support.redisserver import RedisServer
from tests.support.registry import HOST, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server not installed (tests/install-system-deps.sh)"),
]

T = TypeVar("T")
TIMEOUT = 0.05
MARGIN = 0.05  # what a call may take beyond its timeout
FAST = TIMEOUT / 5  # a call that did not touch the network
UP, REPO, TAG = "docker.io", "library/alpine", "3.20"
DIGEST = "sha256:" + "a" * 64
TAG_KEY = f"mirror:tag:{UP}/{REPO}:{TAG}"
FILL_KEY = f"mirror:fill:{DIGEST}"


class Harness:
    """One event loop for a synchronous test, so that wait_until can poll async calls."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.opened: list[SharedState] = []

    def state(self, url: str, **kw: Any) -> SharedState:
        kw.setdefault("timeout", TIMEOUT)
        self.opened.append(SharedState(url, **kw))
        return self.opened[-1]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def timed(self, coro: Coroutine[Any, Any, T]) -> tuple[T, float]:
        start = time.monotonic()
        result = self.runner.run(coro)
        return result, time.monotonic() - start


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingPort:
    """A listening socket on a dead server's port that never answers and counts the
    connections made to it (drained from the accept queue): a call's network attempts."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.accepted: list[socket.socket] = []

    def attempts(self) -> int:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError as exc:
                assert exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
                return len(self.accepted)

    def close(self) -> None:
        for s in [*self.accepted, self.sock]:
            s.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    with asyncio.Runner() as runner:
        harness = Harness(runner)
        yield harness
        for state in harness.opened:
            runner.run(state.close())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=HOST, port=server.port, decode_responses=True)


def settle(h: Harness, s: SharedState, clock: FakeClock) -> None:
    """Writes the tag until a call succeeds: with a 50 ms timeout, a first connection on a
    loaded machine may miss it, and three misses would open the breaker before the test
    begins (each retry is past the open interval, so it is the half-open probe)."""
    def written() -> bool:
        clock.now += 2.1
        h.run(s.set_tag(UP, REPO, TAG, DIGEST, 60))
        return s.up

    wait_until(written, 10, what="a first Redis call inside the timeout")


def errors(op: str) -> float:
    return REGISTRY.get_sample_value("mirror_redis_errors_total", {"op": op}) or 0.0


def assert_unusable_answers(h: Harness, s: SharedState, bound: float) -> None:
    """Every method returns its "unusable" answer, each within `bound` seconds."""
    calls: list[tuple[Coroutine[Any, Any, Any], Any]] = [
        (s.get_tag(UP, REPO, TAG), None),
        (s.set_tag(UP, REPO, TAG, DIGEST, 60), None),
        (s.acquire_fill(DIGEST, "me", 30), None),
        (s.renew_fill(DIGEST, "me", 30), False),
        (s.release_fill(DIGEST, "me"), None),
    ]
    for coro, answer in calls:
        result, took = h.timed(coro)
        assert result == answer
        assert took < bound, f"{coro.__qualname__} took {took:.3f}s"


async def concurrently(n: int, call: Callable[[], Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*(call() for _ in range(n))))


# --- tags ----------------------------------------------------------------------------------


def test_tag_round_trip(server: RedisServer, h: Harness) -> None:
    s = h.state(server.url)
    assert h.run(s.get_tag(UP, REPO, TAG)) is None
    h.run(s.set_tag(UP, REPO, TAG, DIGEST, 60))
    assert h.run(s.get_tag(UP, REPO, TAG)) == DIGEST
    assert h.run(s.get_tag(UP, REPO, "other")) is None
    assert 0 < raw(server).pttl(TAG_KEY) <= 60_000
    assert s.up


def test_tag_expires_after_its_ttl(server: RedisServer, h: Harness) -> None:
    s = h.state(server.url)
    h.run(s.set_tag(UP, REPO, TAG, DIGEST, 0.3))
    assert h.run(s.get_tag(UP, REPO, TAG)) == DIGEST
    wait_until(lambda: h.run(s.get_tag(UP, REPO, TAG)) is None, 5, what="the tag to expire")
    assert s.up


def test_keys_are_isolated_by_prefix(server: RedisServer, h: Harness) -> None:
    a, b = h.state(server.url, key_prefix="a:"), h.state(server.url, key_prefix="b:")
    h.run(a.set_tag(UP, REPO, TAG, DIGEST, 60))
    assert h.run(b.get_tag(UP, REPO, TAG)) is None
    assert h.run(a.acquire_fill(DIGEST, "holder-a", 30)) is None
    assert h.run(b.acquire_fill(DIGEST, "holder-b", 30)) is None
    assert sorted(raw(server).keys("*")) == [
        f"a:fill:{DIGEST}", f"a:tag:{UP}/{REPO}:{TAG}", f"b:fill:{DIGEST}"]


# --- fill locks ----------------------------------------------------------------------------


def test_fill_lock_between_two_mirrors(server: RedisServer, h: Harness) -> None:
    a, b = h.state(server.url), h.state(server.url)
    assert h.run(a.acquire_fill(DIGEST, "mirror-a", 30)) is None
    assert h.run(b.acquire_fill(DIGEST, "mirror-b", 30)) == "mirror-a"
    assert h.run(b.renew_fill(DIGEST, "mirror-b", 300)) is False
    assert raw(server).pttl(FILL_KEY) <= 30_000
    h.run(b.release_fill(DIGEST, "mirror-b"))
    assert h.run(b.acquire_fill(DIGEST, "mirror-b", 30)) == "mirror-a"
    assert h.run(a.renew_fill(DIGEST, "mirror-a", 300)) is True
    assert raw(server).pttl(FILL_KEY) > 30_000
    h.run(a.release_fill(DIGEST, "mirror-a"))
    assert raw(server).exists(FILL_KEY) == 0
    assert h.run(b.acquire_fill(DIGEST, "mirror-b", 30)) is None
    assert raw(server).get(FILL_KEY) == "mirror-b"


def test_fill_lock_expires_unless_renewed(server: RedisServer, h: Harness) -> None:
    a, b = h.state(server.url), h.state(server.url)
    assert h.run(a.acquire_fill(DIGEST, "mirror-a", 0.3)) is None
    assert h.run(b.acquire_fill(DIGEST, "mirror-b", 30)) == "mirror-a"
    wait_until(lambda: h.run(b.acquire_fill(DIGEST, "mirror-b", 30)) is None, 5,
               what="a's lock to expire and b to take it")
    assert h.run(a.renew_fill(DIGEST, "mirror-a", 30)) is False
    h.run(a.release_fill(DIGEST, "mirror-a"))
    assert raw(server).get(FILL_KEY) == "mirror-b"


# --- credentials ---------------------------------------------------------------------------


def test_acl_user_and_wrong_password(tmp_path: Path, h: Harness) -> None:
    srv = RedisServer(tmp_path / "redis", user=("mirror", "s3cret")).start()
    try:
        good = h.state(srv.url, username="mirror", password="s3cret")
        h.run(good.set_tag(UP, REPO, TAG, DIGEST, 60))
        assert h.run(good.get_tag(UP, REPO, TAG)) == DIGEST
        assert good.up
        before = errors("get_tag")
        bad = h.state(srv.url, username="mirror", password="wrong", breaker_failures=100)
        assert_unusable_answers(h, bad, TIMEOUT + MARGIN)
        assert not bad.up
        assert errors("get_tag") == before + 1
        anonymous = h.state(srv.url, breaker_failures=100)
        assert_unusable_answers(h, anonymous, TIMEOUT + MARGIN)
        assert not anonymous.up
        assert srv.cli("exists", FILL_KEY).stdout.strip() == "0"
    finally:
        srv.stop()


def test_requirepass(tmp_path: Path, h: Harness) -> None:
    srv = RedisServer(tmp_path / "redis", password="pw").start()
    try:
        s = h.state(srv.url, password="pw")
        h.run(s.set_tag(UP, REPO, TAG, DIGEST, 60))
        assert h.run(s.get_tag(UP, REPO, TAG)) == DIGEST
        wrong = h.state(srv.url, password="nope")
        assert h.run(wrong.get_tag(UP, REPO, TAG)) is None
        assert not wrong.up
    finally:
        srv.stop()


# --- Redis going away ----------------------------------------------------------------------


def test_shutdown_opens_the_breaker_and_probes_once(
    server: RedisServer, h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.redis")
    clock = FakeClock()
    s = h.state(server.url, clock=clock)
    settle(h, s, clock)
    caplog.clear()  # a first call slower than TIMEOUT on a loaded machine logged already
    server.shutdown()
    before = errors("get_tag")
    for n in range(1, 4):
        result, took = h.timed(s.get_tag(UP, REPO, TAG))
        assert result is None and took < TIMEOUT + MARGIN
        assert errors("get_tag") == before + n, f"call {n} after shutdown was not a failure"
    assert not s.up
    port = CountingPort(server.port)
    try:
        for _ in range(5):  # open: no call touches the network
            assert_unusable_answers(h, s, FAST)
        assert port.attempts() == 0
        assert errors("get_tag") == before + 3
        clock.now += 2.1  # half-open: one probe among concurrent calls; the port is silent
        results, took = h.timed(concurrently(5, lambda: s.get_tag(UP, REPO, TAG)))
        assert results == [None] * 5 and TIMEOUT * 0.8 < took < TIMEOUT + MARGIN
        assert port.attempts() == 1
        assert_unusable_answers(h, s, FAST)  # open again
        assert port.attempts() == 1
    finally:
        port.close()
    server.start()
    settle(h, s, clock)
    assert h.run(s.get_tag(UP, REPO, TAG)) == DIGEST
    messages = [r.getMessage() for r in caplog.records if r.name == "mirror.redis"]
    assert messages == ["redis unusable: going on without shared state",
                        "redis circuit breaker open", "redis usable again"]
    assert REGISTRY.get_sample_value("mirror_redis_up") == 1


def test_restart_on_the_same_port_recovers(server: RedisServer, h: Harness) -> None:
    s = h.state(server.url)
    h.run(s.set_tag(UP, REPO, TAG, DIGEST, 60))
    server.shutdown()
    assert_unusable_answers(h, s, TIMEOUT + MARGIN)
    assert not s.up
    assert REGISTRY.get_sample_value("mirror_redis_up") == 0
    server.start()

    def recovered() -> bool:
        h.run(s.get_tag(UP, REPO, TAG))
        return s.up

    wait_until(recovered, 5, what="the breaker to close again")
    h.run(s.set_tag(UP, REPO, TAG, DIGEST, 60))  # nothing persisted across the restart
    assert h.run(s.get_tag(UP, REPO, TAG)) == DIGEST


def test_sigstopped_server_bounds_every_call(server: RedisServer, h: Harness) -> None:
    s = h.state(server.url, breaker_failures=1000)  # every call goes to the network
    h.run(s.set_tag(UP, REPO, "one", "sha256:one", 60))
    h.run(s.set_tag(UP, REPO, "two", "sha256:two", 60))
    server.pause()
    for _ in range(3):
        result, took = h.timed(s.get_tag(UP, REPO, "one"))
        assert result is None and TIMEOUT * 0.8 < took < TIMEOUT + MARGIN
    assert_unusable_answers(h, s, TIMEOUT + MARGIN)
    assert not s.up
    server.resume()
    # The replies to the abandoned calls arrive now: none may be taken for a later call's.
    assert h.run(s.get_tag(UP, REPO, "two")) == "sha256:two"
    assert s.up
    assert h.run(s.get_tag(UP, REPO, "one")) == "sha256:one"
