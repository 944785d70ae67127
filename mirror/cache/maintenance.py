"""The background work of a serving process: recording what enters the store, writing the
batched access times and counters, publishing upstream rate limits, rebuilding a lost index,
and evicting when the store passes `max_size`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mirror.cache.eviction import evict_to_watermark
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.oci.reference import Digest
from mirror.upstream.client import Upstream

log = logging.getLogger("mirror.maintenance")



class Maintenance:
    def __init__(self, config: Config, store: BlobStore, index: Index,
                 upstreams: list[Upstream], forget: Callable[[Digest], None]) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.upstreams = upstreams
        self.forget = forget  # called for every evicted digest
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.on_commit = self.committed
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.index.flush()

    def committed(self, digest: Digest, size: int, kind: str) -> None:
        self.index.add_entry(digest, size, kind)
        if self.index.total_bytes() > self.config.cache.max_size:
            self._wake.set()

    def request_eviction(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        if not self.index.entries_complete():
            # A new or lost index: recreate entries from the files, off the event loop, while
            # requests are served; one worker does it.
            await asyncio.to_thread(self._rebuild_index)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ACCESS_FLUSH_SECONDS)
            self._wake.clear()
            try:
                self._publish_rate_limits()
                self.index.flush()
                if self.index.total_bytes() > self.config.cache.max_size:
                    await asyncio.to_thread(evict_to_watermark, self.config, self.store,
                                            self.index, self.forget)
            except Exception:
                log.exception("cache maintenance failed")

    def _rebuild_index(self) -> None:
        with try_exclusive(str(self.store.lock_path("rebuild"))) as mine:
            if mine and not self.index.entries_complete():
                self.index.rebuild_entries(self.store.iter_stored())

    def _publish_rate_limits(self) -> None:
        """For `mirror status`, which reads the index."""
        for upstream in self.upstreams:
            if upstream.ratelimit_remaining is not None:
                self.index.set_ratelimit(upstream.name, upstream.ratelimit_limit,
                                         upstream.ratelimit_remaining)
