"""Prometheus metrics (prometheus-client). Labels have bounded cardinality: never a repository
name or a digest."""

from __future__ import annotations

from prometheus_client import Counter

DOWNLOADS_RESUMED = Counter(
    "mirror_downloads_resumed_total", "Upstream downloads resumed with a Range request")
DIGEST_MISMATCHES = Counter(
    "mirror_digest_mismatches_total", "Upstream content discarded for not matching its digest",
    ["kind"])
EVICTIONS = Counter("mirror_evictions_total", "Entries evicted from the cache", ["kind"])
EVICTED_BYTES = Counter("mirror_evicted_bytes_total", "Bytes evicted from the cache")
DISK_FULL = Counter("mirror_disk_full_total", "Downloads that hit ENOSPC while caching")
STALE_ANSWERS = Counter(
    "mirror_stale_answers_total", "Answers served from cache because the upstream failed",
    ["kind"])
