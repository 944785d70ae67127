"""Prometheus metrics (prometheus-client). Labels have bounded cardinality: never a repository
name or a digest; `route` is a routes.Kind value or one of the mirror's own pages, `upstream` a
configured upstream name.

With `[server] workers > 1`, serve.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before this module is imported: every process writes its samples there and a scrape, answered
by any worker, adds them up (`registry()`). Gauges describing one process's state (downloads in
flight) are `livesum`: summed over the live workers, dropped when one exits.
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# --- the HTTP front ------------------------------------------------------------------------
REQUESTS = Counter(
    "mirror_http_requests_total", "Requests answered, by route kind, method and status",
    ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "mirror_http_request_duration_seconds",
    "Time from request to the end of the response body, by route kind", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
             300))
CACHE_RESULTS = Counter(
    "mirror_cache_requests_total",
    "Manifest and blob requests by how the cache answered: hit, miss, inflight (joined a "
    "download already running), revalidated, stale", ["kind", "result"])
UPSTREAM_BYTES = Counter(
    "mirror_upstream_bytes_total", "Blob bytes downloaded from upstreams", ["upstream"])
SERVED_BYTES = Counter(
    "mirror_served_bytes_total",
    "Body bytes sent to clients, by source: cache (stored content) or upstream (content "
    "streamed while it downloads)", ["source"])

# --- upstreams -----------------------------------------------------------------------------
UPSTREAM_REQUESTS = Counter(
    "mirror_upstream_requests_total",
    "Requests sent to upstream registries, by upstream, method and status (\"error\" when no "
    "answer came)", ["upstream", "method", "status"])
UPSTREAM_SECONDS = Histogram(
    "mirror_upstream_request_duration_seconds",
    "Time until an upstream's response headers (auth round trips and redirects included)",
    ["upstream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
UPSTREAM_UP = Gauge(
    "mirror_upstream_up",
    "Whether the upstream answered its last request or probe (1) or not (0)", ["upstream"],
    multiprocess_mode="livemostrecent")
RATELIMIT_REMAINING = Gauge(
    "mirror_upstream_ratelimit_remaining",
    "Pulls left in the upstream's rate-limit window (Docker Hub's ratelimit-remaining)",
    ["upstream"], multiprocess_mode="mostrecent")
RATELIMIT_LIMIT = Gauge(
    "mirror_upstream_ratelimit_limit", "The upstream's rate-limit window size (ratelimit-limit)",
    ["upstream"], multiprocess_mode="mostrecent")

# --- downloads -----------------------------------------------------------------------------
DOWNLOADS_IN_FLIGHT = Gauge(
    "mirror_downloads_in_flight", "Blob downloads from upstreams in progress",
    multiprocess_mode="livesum")
DOWNLOAD_FOLLOWERS = Gauge(
    "mirror_download_followers",
    "Clients streaming a blob from a download in progress (the single-flight's followers)",
    multiprocess_mode="livesum")
DOWNLOADS_RESUMED = Counter(
    "mirror_downloads_resumed_total", "Upstream downloads resumed with a Range request")
DIGEST_MISMATCHES = Counter(
    "mirror_digest_mismatches_total", "Upstream content discarded for not matching its digest",
    ["kind"])

# --- the store -----------------------------------------------------------------------------
EVICTIONS = Counter("mirror_evictions_total", "Entries evicted from the cache", ["kind"])
EVICTED_BYTES = Counter("mirror_evicted_bytes_total", "Bytes evicted from the cache")
DISK_FULL = Counter("mirror_disk_full_total", "Downloads that hit ENOSPC while caching")
UNCACHED_RELAYS = Counter(
    "mirror_uncached_relays_total",
    "Blob bodies (or their rest) a client got straight from the upstream because the cache "
    "could not hold them (a full or read-only disk)", ["reason"])
INDEX_FAILURES = Counter(
    "mirror_index_failures_total",
    "Index operations that failed (a full, read-only or damaged index); the request was "
    "served anyway", ["operation"])
STALE_ANSWERS = Counter(
    "mirror_stale_answers_total", "Answers served from cache because the upstream failed",
    ["kind"])
DENIED = Counter(
    "mirror_denied_total",
    "Requests refused by the rules (403 DENIED), by the upstream they named and why: deny (a "
    "[[upstream]] deny pattern), allow (not in a non-empty allow list), digest ([rules] "
    "deny_digests: the content, or the digest a tag resolved to)", ["upstream", "reason"])
CACHE_BYTES = Gauge("mirror_cache_bytes", "Bytes of verified content in the cache",
                    multiprocess_mode="livemax")
CACHE_ENTRIES = Gauge("mirror_cache_entries", "Blobs and manifests in the cache",
                      multiprocess_mode="livemax")
CACHE_MAX_BYTES = Gauge("mirror_cache_max_bytes", "The configured [cache] max_size",
                        multiprocess_mode="livemax")
CACHE_DISK_FREE = Gauge(
    "mirror_cache_disk_free_bytes",
    "Bytes available to the mirror on the cache dir's filesystem", multiprocess_mode="livemax")
CACHE_DISK_SIZE = Gauge(
    "mirror_cache_disk_size_bytes", "Size of the cache dir's filesystem",
    multiprocess_mode="livemax")
PINS_OVER_BOUND = Gauge(
    "mirror_pins_over_bound",
    "Bounds ([cache] max_size, an upstream's max_size) that the pinned images alone exceed "
    "(they cannot be evicted); checked at start", multiprocess_mode="max")

# Labelled series that exist from the start (at 0), so that a dashboard sees them before the
# first event.
for _kind in ("manifest", "blob"):
    DIGEST_MISMATCHES.labels(_kind)
    EVICTIONS.labels(_kind)
    STALE_ANSWERS.labels(_kind)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """What a scrape reports: this process's metrics, or every worker's when there are several."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=directory)  # type: ignore[no-untyped-call]
    return reg


def exposition() -> bytes:
    return generate_latest(registry())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples() -> Samples:
    """Every sample of a scrape, keyed by (sample name, sorted labels): the status page reads
    its numbers from here so that they match /metrics."""
    out: Samples = {}
    for family in registry().collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(snapshot: Samples, name: str, **match: str) -> float:
    """The sum of a metric's samples whose labels include `match`."""
    return sum(v for (n, labels), v in snapshot.items()
               if n == name and all((k, w) in labels for k, w in match.items()))


# --- webhooks (events/) ---------------------------------------------------------------------
WEBHOOK_QUEUE = Gauge(
    "mirror_webhook_queue_length", "Events waiting in a webhook's queue on disk", ["webhook"],
    multiprocess_mode="livemostrecent")
WEBHOOK_EVENTS = Counter(
    "mirror_webhook_events_total",
    "Webhook events by result: sent (acknowledged by the receiver), failed (in a delivery "
    "attempt that failed; they stay queued), dropped (the queue was full)",
    ["webhook", "result"])
WEBHOOK_DELAY = Histogram(
    "mirror_webhook_delivery_seconds",
    "Time from an event to its receiver's acknowledgement", ["webhook"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))

# --- sync rules (pull/sync.py) ---------------------------------------------------------------
SYNC_RUNS = Counter(
    "mirror_sync_runs_total",
    "Runs of a [[sync]] rule, by result (ok, failed, stopped: a reload removed or changed it)",
    ["rule", "result"])
SYNC_LAST_OK = Gauge(
    "mirror_sync_last_success_timestamp_seconds",
    "When a [[sync]] rule's last run that failed nothing finished (Unix time)", ["rule"],
    multiprocess_mode="max")

# --- redis (cluster shared state) ---
REDIS_UP = Gauge(
    "mirror_redis_up",
    "Whether the cluster's shared Redis answered the last call (1) or not, or its circuit "
    "breaker is open (0)", multiprocess_mode="livemax")
REDIS_ERRORS = Counter(
    "mirror_redis_errors_total",
    "Redis calls that failed (refused, timed out, rejected), by operation; calls the open "
    "circuit breaker answered without trying are not counted", ["op"])

# --- cluster (peers) ---
PEER_UP = Gauge(
    "mirror_peer_up", "Whether a peer node passes its health checks (1) or not (0)", ["peer"],
    multiprocess_mode="livemostrecent")
RING_CHANGES = Counter(
    "mirror_ring_changes_total",
    "Times this node's view of the live nodes changed (a peer up or down): each change moves "
    "about 1/N of the digests to another owner")
PEER_BYTES = Counter(
    "mirror_peer_bytes_total",
    "Blob bytes between this node and its peers: direction=in received from them (relayed "
    "to clients or filled), direction=out sent to them (/_cluster/blobs)",
    ["direction"])
PEER_RELAYS = Counter(
    "mirror_peer_relays_total",
    "Fetches answered by a peer, by why it was asked: owner (it owns the blob's digest), "
    "fill (the owner found the blob stored on a next-ranked peer), holder (it holds the blob's "
    "fill lock in Redis), redirect (it holds the fill lock but this node cannot reach it: the "
    "client was sent there), manifest (it owns the manifest's digest) or tag (it owns the tag "
    "and looks it up for the cluster)", ["reason"])
PEER_FAILURES = Counter(
    "mirror_peer_failures_total",
    "Peers marked down outside their health checks (a refused, broken or silent relay)",
    ["peer"])
SHARED_TAG_HITS = Counter(
    "mirror_shared_tag_hits_total",
    "Tags answered from the cluster's shared tag cache (Redis) instead of the upstream")
PEER_WRONG_BYTES = Counter(
    "mirror_peer_wrong_bytes_total",
    "Blobs a peer sent that did not match their digest (the peer is held down a while)",
    ["peer"])

# --- the bucket (S3-compatible second tier) ---
BUCKET_UP = Gauge(
    "mirror_bucket_up",
    "Whether the object store answered the last call (1) or not (0)", multiprocess_mode="livemax")
BUCKET_ERRORS = Counter(
    "mirror_bucket_errors_total",
    "Object store calls that failed (unreachable, timed out, refused), by operation", ["op"])
BUCKET_BYTES = Counter(
    "mirror_bucket_bytes_total",
    "Blob bytes read from the bucket (direction=in) and written behind to it (out)",
    ["direction"])
BUCKET_HITS = Counter(
    "mirror_bucket_hits_total", "Blobs the local dir lacked that the bucket had")
BUCKET_UPLOADS = Counter(
    "mirror_bucket_uploads_total", "Blobs written behind to the bucket")
BUCKET_SKIPPED = Counter(
    "mirror_bucket_skipped_total",
    "Blobs not written behind: the write-behind queue was full, or every attempt failed")
BUCKET_CORRUPT = Counter(
    "mirror_bucket_corrupt_total",
    "Bucket objects whose bytes did not match their digest (deleted, refetched)")
BUCKET_DELETED = Counter(
    "mirror_bucket_deleted_total",
    "Bucket objects deleted to keep [s3] max_size and max_unused")
BUCKET_QUEUE = Gauge(
    "mirror_bucket_queue", "Blobs waiting in the write-behind queues (all workers)",
    multiprocess_mode="livesum")

# signature policies ([[policy]], pull/trust.py)
POLICY_DECISIONS = Counter(
    "mirror_policy_decisions_total",
    "Signature policy decisions: allowed (a digest verified, per worker; its hits are not "
    "counted), denied and warned (warn mode: served anyway), per request",
    ["policy", "decision"])
SIGNATURE_LOOKUPS = Counter(
    "mirror_signature_lookups_total",
    "First verifications of a digest under a policy (each looks its signatures up)",
    ["policy"])

# the one hit ratio (http/history.py), set when /metrics is scraped
HIT_RATIO = Gauge(
    "mirror_hit_ratio",
    "Manifest and blob requests (basis=requests) or content bytes (basis=bytes) answered "
    "from the cache, since the server started (window=start) or over the last hour "
    "(window=1h); set once something was answered", ["basis", "window"],
    multiprocess_mode="livemostrecent")
