"""The state a mirror cluster shares through an optional Redis (redis-py's `redis.asyncio`).

Two things are shared: tag → digest answers (`<prefix>tag:<upstream>/<repository>:<tag>`, with
a TTL), so one mirror's upstream lookup serves the others; and fill locks
(`<prefix>fill:<digest>`, value: the holder's string, with a TTL the holder renews), so one
mirror downloads a blob while the others wait for it or fetch it from that mirror.

Redis is an optimisation, never a dependency: no method raises for a Redis problem (refused,
timed out, rejected credentials, a stopped server). It logs once per change of state, counts
the error (`mirror_redis_errors_total`) and returns the answer that lets the caller go on
alone: no tag (ask the upstream), the fill lock held (download it yourself), no renewal.

Every call is bounded by `timeout` (the client's socket timeouts and an asyncio.timeout around
the whole call; redis-py's retries are off). After `breaker_failures` consecutive failures the
circuit breaker opens: calls answer "unusable" at once, without touching the network, for
`breaker_open_seconds`; then one call is let through as a probe (half-open) and its success
closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mirror import metrics
from mirror.cache.index import TagEntry

log = logging.getLogger("mirror.redis")

T = TypeVar("T")

# The SET and the GET in one script so that "someone else holds it" always names the holder
# (two commands could see the lock released in between); EVAL works on any Redis >= 2.6.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('get', KEYS[1])
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class SharedState:
    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.05,
        key_prefix: str = "mirror:",
        breaker_failures: int = 3,
        breaker_open_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = Redis.from_url(
            url, username=username, password=password, decode_responses=True,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0))  # a retry would outlast the timeout
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._timeout = timeout
        self._prefix = key_prefix
        self._breaker_failures = breaker_failures
        self._open_seconds = breaker_open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._last_ok = True
        metrics.REDIS_UP.set(1)

    @property
    def up(self) -> bool:
        """False while the breaker is open or after the last call failed."""
        return self._last_ok and self._opened_at is None

    async def get_tag(self, upstream: str, repository: str, tag: str) -> str | None:
        """The digest, or None (absent, or Redis unusable)."""
        key = self._tag_key(upstream, repository, tag)
        return await self._call("get_tag", lambda: self._get(key), None)

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: str, ttl: float
    ) -> None:
        key = self._tag_key(upstream, repository, tag)
        await self._call("set_tag", lambda: self._client.set(key, digest, px=_ms(ttl)), None)

    async def acquire_fill(self, digest: str, holder: str, ttl: float) -> str | None:
        """None: we hold the lock now (also when Redis is unusable: the caller goes on alone);
        else the current holder's string (ours, if we held it already)."""
        fill = self._fill_key(digest)
        return await self._call("acquire_fill", lambda: self._acquire_script(fill, holder, ttl),
                                None)

    async def renew_fill(self, digest: str, holder: str, ttl: float) -> bool:
        """True if the lock is still ours and its TTL is now `ttl`."""
        args: list[str | int] = [holder, _ms(ttl)]
        fill = self._fill_key(digest)
        renewed = await self._call(
            "renew_fill", lambda: self._renew(keys=[fill], args=args), 0)
        return bool(renewed)

    async def release_fill(self, digest: str, holder: str) -> None:
        """Deletes the lock if it is ours (an expired lock may be someone else's by now)."""
        fill = self._fill_key(digest)
        await self._call("release_fill", lambda: self._release(keys=[fill], args=[holder]), 0)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def _get(self, key: str) -> str | None:
        value = await self._client.get(key)
        return None if value is None else str(value)  # str already: decode_responses

    async def _acquire_script(self, fill: str, holder: str, ttl: float) -> str | None:
        value = await self._acquire(keys=[fill], args=[holder, _ms(ttl)])
        return None if value is None else str(value)

    def _tag_key(self, upstream: str, repository: str, tag: str) -> str:
        return f"{self._prefix}tag:{upstream}/{repository}:{tag}"

    def _fill_key(self, digest: str) -> str:
        return f"{self._prefix}fill:{digest}"

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], unusable: T) -> T:
        if not self._admit():
            return unusable
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                result = await fn()
        except (RedisError, OSError) as exc:  # asyncio.timeout's TimeoutError is an OSError
            self._failed(op, exc)
            return unusable
        finally:
            self._probing = False  # also when the caller is cancelled mid-probe
        if deadline.expired():  # the client swallowed the timeout's cancellation
            self._failed(op, TimeoutError(f"no answer in {self._timeout} s"))
            return unusable
        self._succeeded()
        return result

    def _admit(self) -> bool:
        """Whether a call may use the network: the breaker is closed, or it is time for the
        one probe of the half-open state."""
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self._open_seconds:
            return False
        self._probing = True
        return True

    def _failed(self, op: str, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels(op).inc()
        metrics.REDIS_UP.set(0)
        self._failures += 1
        if self._last_ok:
            log.warning("redis unusable: going on without shared state", extra={
                "op": op, "error": str(exc) or type(exc).__name__})
        self._last_ok = False
        if self._failures < self._breaker_failures:
            return
        if self._opened_at is None:
            log.warning("redis circuit breaker open", extra={
                "failures": self._failures, "open_seconds": self._open_seconds})
        self._opened_at = self._clock()

    def _succeeded(self) -> None:
        if not self.up:
            log.info("redis usable again", extra={"failures": self._failures})
            metrics.REDIS_UP.set(1)
        self._failures = 0
        self._opened_at = None
        self._last_ok = True


class RedisTags:
    """The proxy's SharedTags (pull/source.py) over SharedState: each value is
    "<digest> <media type> <fetched_at>", expiring when the answer is tag_ttl old."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    async def get(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        value = await self.state.get_tag(upstream, repository, tag)
        try:
            digest, media_type, fetched_at = (value or "").split(" ")
            return TagEntry(digest, media_type, float(fetched_at))
        except ValueError:
            return None  # absent, or not written by this version: a miss

    async def put(self, upstream: str, repository: str, tag: str, entry: TagEntry,
                  ttl: float) -> None:
        left = ttl - entry.age()
        if left > 0 and " " not in entry.media_type:
            await self.state.set_tag(upstream, repository, tag,
                                     f"{entry.digest} {entry.media_type} {entry.fetched_at!r}",
                                     left)
