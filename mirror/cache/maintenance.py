"""The background work of a serving process: writing the batched access times and counters,
publishing upstream rate limits, rebuilding a lost index, evicting when the store passes
`max_size`, in a cluster trimming relay copies past `relay_cache` once they are cold, and
then the `extra` work runtime.py hands it (with [s3]: the bucket's bounds, tiers/bounds.py).

It calls nothing above the cache: runtime.py hands it the rate limits to publish and what to
do with an evicted digest, and calls `committed` and `request_eviction` from the store's and
the downloads' callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from mirror import metrics
from mirror.cache.eviction import (
    enforce_shares,
    evict_to_watermark,
    pins,
    pins_over_bounds,
    shares_due,
    trim_relay_copies,
)
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.oci.reference import Digest

log = logging.getLogger("mirror.maintenance")

TRIM_SECONDS = 5.0  # relay copies past relay_cache are looked for at most this often
UNUSED_SECONDS = 60.0  # content past an upstream's max_unused is looked for this often
# (upstream name, its `ratelimit-limit`, its `ratelimit-remaining`) as last seen
RateLimit = tuple[str, str | None, str]


class Maintenance:
    def __init__(self, config: Config, store: BlobStore, index: Index,
                 rate_limits: Callable[[], Iterable[RateLimit]],
                 on_evict: Callable[[Digest], None]) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.rate_limits = rate_limits
        self.on_evict = on_evict  # called for every evicted digest
        # In a cluster: whether this node owns a digest now (its relay copies are trimmed
        # to `[cluster] relay_cache`, what it owns never is); None on a single node.
        self.owns: Callable[[Digest], bool] | None = None
        # More work each round, set by runtime.py (with [s3]: the bucket's bounds); each
        # is awaited in turn and its failure logged.
        self.extra: list[Callable[[], Awaitable[None]]] = []
        self._trimmed_at = 0.0
        self._unused_at = float("-inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.index.flush()

    def committed(self, digest: Digest, size: int, kind: str) -> None:
        """After the commit's index entry was added: wake up when the store is over size."""
        if self.index.total_bytes() > self.config.cache.max_size:
            self._wake.set()

    def request_eviction(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        if not self.index.entries_complete():
            # A new or lost index: recreate entries from the files, off the event loop, while
            # requests are served; one worker does it.
            await asyncio.to_thread(self._rebuild_index)
        try:
            over = await asyncio.to_thread(self._pins_over_bounds)
        except Exception:  # a check that fails must not end maintenance for the process
            log.exception("the pins could not be checked against the bounds")
            over = []
        metrics.PINS_OVER_BOUND.set(len(over))
        for warning in over:
            log.warning("pins exceed a bound", extra={"problem": warning})
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ACCESS_FLUSH_SECONDS)
            self._wake.clear()
            try:
                self._publish_rate_limits()
                self.index.flush()
                if self.index.total_bytes() > self.config.cache.max_size:
                    await asyncio.to_thread(evict_to_watermark, self.config, self.store,
                                            self.index, self.on_evict)
                await self._trim_relay_copies()
                await self._enforce_shares()
            except Exception:
                log.exception("cache maintenance failed")
            for work in self.extra:
                try:
                    await work()
                except Exception:
                    log.exception("cache maintenance failed")

    async def _trim_relay_copies(self) -> None:
        """At most every TRIM_SECONDS: copies in use are kept, and looking at every entry
        again at each flush would cost a large cache a core."""
        budget = self.config.cluster.relay_cache if self.config.cluster else 0
        now = time.monotonic()
        if self.owns is not None and self.index.copy_bytes() > budget \
                and now - self._trimmed_at >= TRIM_SECONDS:
            self._trimmed_at = now
            await asyncio.to_thread(trim_relay_copies, self.config, self.store, self.index,
                                    budget, self.owns, self.on_evict)

    async def _enforce_shares(self) -> None:
        """An upstream over its share: at once; its max_unused: at most every UNUSED_SECONDS
        (that looks at every entry)."""
        now = time.monotonic()
        unused_due = any(u.max_unused for u in self.config.upstreams) \
            and now - self._unused_at >= UNUSED_SECONDS
        if unused_due or shares_due(self.config, self.index):
            if unused_due:
                self._unused_at = now
            await asyncio.to_thread(enforce_shares, self.config, self.store, self.index,
                                    self.on_evict)

    def _pins_over_bounds(self) -> list[str]:
        """Once per start (the first worker), and only with bounds to exceed."""
        if not pins(self.config, self.index):
            return []
        with try_exclusive(str(self.store.lock_path("pins-check"))) as mine:
            return pins_over_bounds(self.config, self.store, self.index) if mine else []

    def _rebuild_index(self) -> None:
        with try_exclusive(str(self.store.lock_path("rebuild"))) as mine:
            if mine and not self.index.entries_complete():
                self.index.rebuild_entries(self.store.iter_stored())

    def _publish_rate_limits(self) -> None:
        """For `mirror status`, which reads the index."""
        for upstream, limit, remaining in self.rate_limits():
            self.index.set_ratelimit(upstream, limit, remaining)
