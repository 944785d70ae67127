"""The last day of what the mirror did, minute by minute: the status page's charts, and the
one hit ratio that the page, `mirror status` and /metrics all show.

Once a slot (HISTORY_SECONDS, a minute), the first worker to see it due takes a file lock
and appends the scrape's cumulative counters (every worker's, from metrics.samples()) to
the index (`Index.append_history`, the last DAY_SLOTS kept), so the history is shared by
the workers and survives restarts. A restart resets the counters: a value below the one
before it starts again from zero (`deltas`).

The hit ratio, by requests and by bytes, "since start" (the counters of the last row: since
the server started) and over "the last hour" (the rows' deltas):
  requests: manifest and blob requests answered from the cache (hit, revalidated, stale)
            over all manifest and blob requests answered;
  bytes:    body bytes sent from stored content over all body bytes sent of content.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mirror import metrics
from mirror.cache.index import Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore

HISTORY_SECONDS = float(os.environ.get("MIRROR_HISTORY_SECONDS", "60"))  # the tests: less
DAY_SLOTS = int(86400 / HISTORY_SECONDS)
FROM_CACHE = ("hit", "revalidated", "stale")
FIELDS = ("requests", "errors", "hits", "answered", "bytes_cache", "bytes_upstream",
          "upstreams_up", "upstreams")

Row = dict[str, float]  # "at" (wall clock), FIELDS (cumulative, as scraped)


def values(snapshot: metrics.Samples) -> Row:
    """The FIELDS of one scrape."""
    t = metrics.total
    errors = sum(v for (name, labels), v in snapshot.items()
                 if name == "mirror_http_requests_total" and dict(labels).get(
                     "status", "").startswith("5"))
    ups = [v for (name, _), v in snapshot.items() if name == "mirror_upstream_up"]
    return {
        "requests": t(snapshot, "mirror_http_requests_total"),
        "errors": errors,
        "hits": sum(t(snapshot, "mirror_cache_requests_total", result=r) for r in FROM_CACHE),
        "answered": t(snapshot, "mirror_cache_requests_total"),
        "bytes_cache": t(snapshot, "mirror_served_bytes_total", source="cache"),
        "bytes_upstream": t(snapshot, "mirror_served_bytes_total", source="upstream"),
        "upstreams_up": sum(ups),
        "upstreams": float(len(ups)),
    }


def deltas(rows: Sequence[Row]) -> list[Row]:
    """Per slot: what happened in it (counters), and the gauges as they were."""
    out = []
    for before, row in itertools.pairwise(rows):
        d = {"at": row["at"], "upstreams_up": row["upstreams_up"],
             "upstreams": row["upstreams"]}
        for f in FIELDS[:6]:
            d[f] = row[f] - before[f] if row[f] >= before[f] else row[f]  # a restart
        out.append(d)
    return out


@dataclass(frozen=True)
class HitRatio:
    requests: float | None
    bytes: float | None


NO_RATIO = HitRatio(None, None)


def ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def since_start(rows: Sequence[Row]) -> HitRatio:
    if not rows:
        return NO_RATIO
    last = rows[-1]
    return HitRatio(ratio(last["hits"], last["answered"]),
                    ratio(last["bytes_cache"], last["bytes_cache"] + last["bytes_upstream"]))


def last_hour(rows: Sequence[Row], now: float | None = None) -> HitRatio:
    now = time.time() if now is None else now
    recent = [d for d in deltas(rows) if d["at"] > now - 3600]
    hits, answered = sum(d["hits"] for d in recent), sum(d["answered"] for d in recent)
    cache = sum(d["bytes_cache"] for d in recent)
    upstream = sum(d["bytes_upstream"] for d in recent)
    return HitRatio(ratio(hits, answered), ratio(cache, cache + upstream))


def record_due(store: BlobStore, index: Index,
               snapshot: Callable[[], metrics.Samples] = metrics.samples,
               now: float | None = None) -> bool:
    """Append this slot's row unless a worker did already; True when this one did."""
    now = time.time() if now is None else now
    slot = int(now // HISTORY_SECONDS)
    if index.history_slot() >= slot:
        return False
    with try_exclusive(str(store.lock_path("history"))) as mine:
        if not mine or index.history_slot() >= slot:
            return False
        index.append_history(slot, {"at": now, **values(snapshot())}, DAY_SLOTS)
    return True
