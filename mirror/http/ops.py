"""The operator's endpoints next to the registry API, and the graceful stop.

    GET /          the status page (statuspage.py)
    GET /metrics   Prometheus exposition (metrics.py), every worker's samples added up
    GET /healthz   200 while the process answers
    GET /readyz    200 when the cache dir is writable and the index open, else 503

On shutdown (SIGTERM: the listening socket is already closed), downloads in flight get
`shutdown_timeout` seconds to finish and be committed; what is still running then is cancelled
and awaited, so its partial file is removed and the store holds only verified content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror import metrics
from mirror.cache.eviction import pins, pins_over_bounds
from mirror.config import Config, SyncConfig, shutdown_timeout
from mirror.http import access, health, history, statuspage
from mirror.http.activity import Activity, in_flight, merged_top
from mirror.http.keys import ACTIVITY, MIRROR
from mirror.pull.sync import is_running, next_run
from mirror.runtime import Mirror
from mirror.tiers.bounds import identity
from mirror.upstream.client import ratelimit_number

log = logging.getLogger("mirror.ops")

TOP_SHOWN = 15


def _mirror(request: web.Request) -> Mirror:
    return request.app[MIRROR]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, indent=1).encode(),
                        headers={"Content-Type": "application/json", "Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    ready, report = await health.readiness(_mirror(request))
    return _json(report, 200 if ready else 503)


async def metrics_page(request: web.Request) -> web.Response:
    await access.check_status(request, _mirror(request).config.auth)
    request.app[ACTIVITY].refresh()
    body = await asyncio.to_thread(_exposition, _mirror(request))
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE,
                                            "Cache-Control": "no-store"})


def _exposition(mirror: Mirror) -> bytes:
    """The scrape, with the hit ratios of history.py set from the same counters."""
    ratios = {"start": history.since_start([{"at": 0.0, **history.values(metrics.samples())}]),
              "1h": history.last_hour(mirror.index.history())}
    for window, r in ratios.items():
        for basis, value in (("requests", r.requests), ("bytes", r.bytes)):
            if value is not None:
                metrics.HIT_RATIO.labels(basis, window).set(value)
    return metrics.exposition()


async def status_page(request: web.Request) -> web.Response:
    mirror = _mirror(request)
    await access.check_status(request, mirror.config.auth)
    activity = request.app[ACTIVITY]
    await health.refresh_upstreams(list(mirror.upstreams.values()), mirror.offline)
    activity.refresh()
    snapshot = await asyncio.to_thread(metrics.samples)
    rows = await asyncio.to_thread(mirror.index.history)
    upstreams = []
    for name, u in mirror.upstreams.items():
        remaining = metrics.total(snapshot, "mirror_upstream_ratelimit_remaining", upstream=name)
        limit = metrics.total(snapshot, "mirror_upstream_ratelimit_limit", upstream=name)
        has_limit = ratelimit_number(u.ratelimit_limit) is not None or any(
            n == "mirror_upstream_ratelimit_remaining" and ("upstream", name) in labels
            for n, labels in snapshot)
        upstreams.append(statuspage.UpstreamView(
            name, u.config.url, u.reachable, u.last_error,
            remaining if has_limit else None, limit if has_limit else None,
            metrics.total(snapshot, "mirror_upstream_requests_total", upstream=name),
            offline=mirror.offline, last_reached=u.last_answer, down_since=u.down_since))
    view = statuspage.StatusView(
        **statuspage.counts_from(snapshot),
        ratio_start=history.since_start([{"at": 0.0, **history.values(snapshot)}]),
        ratio_hour=history.last_hour(rows),
        history=rows,
        downloads=in_flight(mirror),
        upstreams=upstreams,
        top=await _visible_top(request, activity),
        workers=mirror.config.server.workers,
        started=activity.started,
        cluster=_cluster_view(mirror, snapshot),
        bucket=await asyncio.to_thread(_bucket_view, mirror, snapshot),
        policies=[statuspage.PolicyView(p.name, p.mode, *(
            metrics.total(snapshot, "mirror_policy_decisions_total", policy=p.name,
                          decision=d) for d in ("allowed", "denied", "warned")))
            for p in mirror.config.policies],
        denials=mirror.index.recent_denials() if mirror.config.policies else [],
        shares=[(u.name, mirror.index.upstream_total(u.name), u.max_size)
                for u in mirror.config.upstreams
                if u.max_size is not None or u.max_unused is not None],
        syncs=[sync_view(rule, mirror) for rule in mirror.config.syncs],
        warnings=await asyncio.to_thread(pins_over_bounds, mirror.config, mirror.store,
                                         mirror.index) if pins(mirror.config, mirror.index) else [],
        offline=mirror.offline,
    )
    return web.Response(body=statuspage.render(view).encode(), headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


async def _visible_top(request: web.Request, activity: Activity) -> list[tuple[str, int]]:
    """The most-pulled repositories, those the viewer may pull only (admins see all), as
    the cache browser shows them."""
    if request.app[access.AUTHENTICATOR] is None:
        return merged_top(activity.top, TOP_SHOWN)
    who, grants = await access.identity(request), request.app[access.GRANTS]
    top = await asyncio.to_thread(merged_top, activity.top, 1 << 16)
    if not grants.is_admin(who):
        top = [(name, n) for name, n in top
               if "/" in name and grants.decide(who, *name.split("/", 1))]
    return top[:TOP_SHOWN]


def sync_view(rule: SyncConfig, mirror: Mirror) -> statuspage.SyncView:
    index = mirror.index
    state = index.sync_state(rule.name)
    started = state.get("started")
    running = is_running(rule, mirror.store.lock_path)
    return statuspage.SyncView(
        rule.name, f"{rule.upstream}: {', '.join(p.text for p in rule.repositories)} "
        f"tags {rule.tags_text}", started, state.get("finished"), state.get("ok"),
        str(state.get("summary", "")),
        next_run(state, rule, time.time(), running), running,
        len(index.synced(rule.name)), rule.pin)


def _bucket_view(mirror: Mirror, snapshot: metrics.Samples) -> statuspage.BucketView | None:
    s3, bucket = mirror.config.s3, mirror.bucket
    if s3 is None or bucket is None:
        return None
    index = mirror.index
    oldest = min((e.last_access for e in index.bucket_objects()), default=None)
    t = metrics.total
    return statuspage.BucketView(
        f"{s3.endpoint}/{s3.bucket}/{s3.prefix}", index.bucket_known(identity(s3)),
        index.bucket_count(), index.bucket_total(), s3.max_size, s3.max_unused, oldest,
        bucket.usable and bucket.last_error is None, bucket.last_error,
        t(snapshot, "mirror_bucket_queue"), t(snapshot, "mirror_bucket_uploads_total"),
        t(snapshot, "mirror_bucket_skipped_total"), t(snapshot, "mirror_bucket_corrupt_total"),
        t(snapshot, "mirror_bucket_deleted_total"), t(snapshot, "mirror_bucket_hits_total"))


def _cluster_view(mirror: Mirror, snapshot: metrics.Samples) -> statuspage.ClusterView | None:
    if mirror.cluster is None:
        return None
    membership = mirror.cluster.membership
    peers = [statuspage.PeerView(p.url, p.node_id, p.up, p.fails)
             for p in membership.peers.values()]
    redis_up = None if mirror.config.redis is None else bool(
        metrics.total(snapshot, "mirror_redis_up"))
    return statuspage.ClusterView(
        membership.config.node_id, peers,
        metrics.total(snapshot, "mirror_peer_bytes_total", direction="in"),
        metrics.total(snapshot, "mirror_peer_bytes_total", direction="out"),
        metrics.total(snapshot, "mirror_ring_changes_total"), redis_up)


async def _start(app: web.Application) -> None:
    activity = Activity(app[MIRROR])
    app[ACTIVITY] = activity
    activity.start()


def _drain(config: Config) -> Callable[[web.Application], Awaitable[None]]:
    async def drain(app: web.Application) -> None:
        """Let downloads in flight finish (for `shutdown_timeout`), then cancel the rest and wait
        for them to clean up their partial files."""
        await app[MIRROR].downloads.drain(shutdown_timeout(config))
        with contextlib.suppress(KeyError):
            await app[ACTIVITY].stop()

    return drain


def install(app: web.Application, config: Config) -> None:
    """Add the operator's routes and the start/stop hooks (before the catch-all route)."""
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_startup.append(_start)
    app.on_shutdown.append(_drain(config))

