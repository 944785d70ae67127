"""What the mirror is doing right now, for /metrics and the status page: scrape-time gauges,
the most-pulled repositories, the downloads in flight.

With several workers each process only knows its own requests and downloads. Gauges are
`livesum` in the multiprocess registry (see metrics.py); the most-pulled counts are written by
every worker to `$MIRROR_RUNTIME_DIR/top-<pid>.json` and added up by whoever renders the page;
downloads led by another worker are found through the store's partial files.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import metrics
from mirror.http import history
from mirror.runtime import Mirror

log = logging.getLogger("mirror.activity")

RUNTIME_DIR_ENV = "MIRROR_RUNTIME_DIR"
TOP_LIMIT = 1000  # repositories remembered per worker
REFRESH_SECONDS = 1.0


class TopCounter:
    """Counts per key with bounded memory: when full, the least counted half is forgotten
    (the repositories that matter on a status page are the ones pulled again and again)."""

    def __init__(self, limit: int = TOP_LIMIT) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.changed = False

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        self.changed = True
        if len(self.counts) > self.limit:
            keep = heapq.nlargest(self.limit // 2, self.counts.items(), key=lambda kv: kv[1])
            self.counts = dict(keep)

    def top(self, n: int) -> list[tuple[str, int]]:
        """The n most counted, ties in name order."""
        return heapq.nsmallest(n, self.counts.items(), key=lambda kv: (-kv[1], kv[0]))


def runtime_dir() -> Path | None:
    value = os.environ.get(RUNTIME_DIR_ENV)
    return Path(value) if value else None


def merged_top(local: TopCounter, n: int) -> list[tuple[str, int]]:
    """The most-pulled repositories over every worker (just this one when alone)."""
    directory = runtime_dir()
    if directory is None:
        return local.top(n)
    merged = TopCounter(limit=1 << 30)
    for path in directory.glob("top-*.json"):
        if path.name == f"top-{os.getpid()}.json":
            continue
        with contextlib.suppress(OSError, ValueError, TypeError):
            for key, count in json.loads(path.read_text()).items():
                merged.add(str(key), int(count))
    for key, count in local.counts.items():
        merged.add(key, count)
    return merged.top(n)


def _write_top(counter: TopCounter) -> None:
    directory = runtime_dir()
    if directory is None or not counter.changed:
        return
    counter.changed = False
    path = directory / f"top-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(counter.counts))
        os.replace(tmp, path)


@dataclass(frozen=True)
class InFlight:
    digest: str
    written: int
    size: int | None
    followers: int | None  # None: led by another worker, its clients are not known here
    seconds: float | None


def in_flight(mirror: Mirror) -> list[InFlight]:
    """Downloads in progress: this worker's, then other workers' found in the store."""
    now = time.monotonic()
    out = [InFlight(str(d.digest), d.written, d.size, d.readers, now - d.started)
           for d in mirror.downloads.in_flight()]
    local = {d.digest for d in out}
    for digest, written, size in mirror.store.in_flight_partials():
        if str(digest) not in local:
            out.append(InFlight(str(digest), written, size, None, None))
    return out


class Activity:
    """Per-process bookkeeping behind the gauges and the status page."""

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.top = TopCounter()  # pulls per repository (http/app.py counts them)
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        """Set the gauges that describe this process from its live state."""
        downloads = self.mirror.downloads.in_flight()
        metrics.DOWNLOADS_IN_FLIGHT.set(len(downloads))
        metrics.DOWNLOAD_FOLLOWERS.set(sum(d.readers for d in downloads))
        metrics.CACHE_MAX_BYTES.set(self.mirror.config.cache.max_size)
        with contextlib.suppress(Exception):  # a busy index never fails a scrape
            metrics.CACHE_BYTES.set(self.mirror.index.total_bytes())
            metrics.CACHE_ENTRIES.set(self.mirror.index.entry_count())
        with contextlib.suppress(OSError):
            disk = os.statvfs(self.mirror.store.root)
            metrics.CACHE_DISK_FREE.set(disk.f_bavail * disk.f_frsize)
            metrics.CACHE_DISK_SIZE.set(disk.f_blocks * disk.f_frsize)
        _write_top(self.top)

    async def _loop(self) -> None:
        shared = metrics.multiprocess_dir() is not None
        while True:
            if shared:  # alone, a scrape refreshes the gauges itself
                self.refresh()
            try:
                await asyncio.to_thread(history.record_due, self.mirror.store,
                                        self.mirror.index)
            except Exception:  # a busy or full index: the next slot is tried again
                log.warning("status history not recorded", exc_info=True)
            await asyncio.sleep(REFRESH_SECONDS)

    def start(self) -> None:
        """Keep the gauges fresh for scrapes answered by other workers, and the status
        page's history recorded (http/history.py)."""
        self.refresh()
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _write_top(self.top)


# --- per-request metrics (called by http/app.py's middleware) -------------------------------
ROUTE_NAMES = {"/": "status", "/metrics": "metrics", "/healthz": "health", "/readyz": "health",
               "/token": "token"}
FROM_CACHE = frozenset({"hit", "revalidated", "stale"})
CONTENT_ROUTES = frozenset({"manifest", "blob"})


def observe(route: str, method: str, status: int, cache: str, sent: int,
            seconds: float) -> None:
    """Count one answered request. `route` is a routes.Kind value or a page name; `cache` the
    access log's cache field ("-" when the cache was not consulted)."""
    key = (route, method, status, cache)
    children = _children.get(key)
    if children is None:
        children = _children[key] = _make_children(*key)
    requests, seconds_hist, cache_result, served = children
    requests.inc()
    seconds_hist.observe(seconds)
    if cache_result is not None:
        cache_result.inc()
        if sent and served is not None:
            served.inc(sent)


# The labelled children per (route, method, status, cache): a bounded set, looked up once.
_Children = tuple[Any, Any, Any, Any]
_children: dict[tuple[str, str, int, str], _Children] = {}


def _make_children(route: str, method: str, status: int, cache: str) -> _Children:
    cache_result = served = None
    if route in CONTENT_ROUTES and cache != "-":
        cache_result = metrics.CACHE_RESULTS.labels(route, cache)
        served = metrics.SERVED_BYTES.labels("cache" if cache in FROM_CACHE else "upstream")
    return (metrics.REQUESTS.labels(route, method, str(status)),
            metrics.REQUEST_SECONDS.labels(route), cache_result, served)
