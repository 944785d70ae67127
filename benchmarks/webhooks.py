"""The `webhooks` group (issue 15): events told to a receiver under 1 000 pulls/s.

A fixed-rate load (RATE manifest GETs by digest per second, all hits, for the run's seconds)
against the mirror with a [[webhook]] to a real receiver (tests/support/webhookreceiver.py,
a process of its own), and the same load against distribution in proxy mode with a
notifications endpoint to the same kind of receiver: the anchor. Reported: events lost (GETs
answered 200 minus distinct events received, once the queue drained), the p99 delay from an
event's timestamp to its arrival, and what the webhook costs the requests (their p99 latency
against the same mirror without a webhook, in the same run).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from typing import Any

import aiohttp

from tests.support.webhookreceiver import UNSIGNED, Receiver

from .fetch import MANIFEST_ACCEPT
from .harness import log
from .report import Row
from .scenarios import Ctx
from .servers import Registry, Server

RATE = 1000  # requests per second
CONNECTIONS = 32
DRAIN_SECONDS = 60.0  # the longest wait for the last events to arrive


def bench_webhooks(ctx: Ctx) -> None:
    image = ctx.image("webhooks", "bench/hooked", "v1", [100_000])
    seconds = 3 if ctx.opts.quick else ctx.opts.wrk_seconds
    path = f"/v2/{image.repo}/manifests/{image.digest}"
    for w in ctx.opts.workers:
        receiver = Receiver(ctx.root / f"receiver-w{w}", UNSIGNED).start()
        try:
            hook = (f'\n[[webhook]]\nname = "bench"\nurl = "{receiver.url}"\n'
                    f'events = ["pull"]\ntimeout = "2s"\n')
            with ctx.mirror("mirror-hooked", ctx.upstream, w, extra_config=hook) as hooked, \
                    ctx.mirror("mirror-plain", ctx.upstream, w) as plain:
                if hooked is None or plain is None:
                    continue
                quiet = _load(plain.base, path, seconds)
                loud = _load(hooked.base, path, seconds)
                mine = _delivered(receiver, loud["ok"])
        finally:
            receiver.stop()
        anchor = _distribution(ctx, path, seconds, w)
        note = f"{RATE} GET/s for {seconds}s, {loud['ok']} answered 200"
        ctx.rows.append(Row("webhooks", "events lost at 1000 pulls/s", "events", mine["lost"],
                            "distribution's notifications", anchor["lost"] if anchor else None,
                            w, ("mirror<=", 0), note, {"mirror": mine, "anchor": anchor}))
        ctx.rows.append(Row("webhooks", "webhook delivery delay p99", "ms", mine["p99_ms"],
                            "distribution's notifications",
                            anchor["p99_ms"] if anchor else None, w, None,
                            "events buffered 50 ms per worker, then queued on disk", {}))
        ctx.rows.append(Row("webhooks", "manifest hit p99 at 1000 req/s, webhook on", "ms",
                            loud["p99_ms"], "same mirror, no webhook", quiet["p99_ms"], w,
                            ("ratio<=", 1.25), ctx.procs_note(w), {"hooked": loud,
                                                                   "plain": quiet}))


def _distribution(ctx: Ctx, path: str, seconds: int, workers: int) -> dict[str, Any] | None:
    """distribution in proxy mode, warmed, under the same load (its process count is its
    own: `workers` only names the row it anchors)."""
    receiver = Receiver(ctx.root / f"receiver-dist-w{workers}", UNSIGNED).start()
    d = ctx.root / f"dist-hooked-w{workers}"
    proxy: Server | None = None
    try:
        proxy = Registry("dist-hooked", d, d / f"store-{time.monotonic_ns()}",
                         remoteurl=ctx.upstream.base, notify_url=receiver.url)
        first = _load(proxy.base, path, 1, rate=10)  # the cold fetch, and its events
        if not first["ok"]:
            ctx.problem(f"webhooks: distribution answered no GET of {path}")
            return None
        _delivered(receiver, 0)
        before = len(receiver.events())
        load = _load(proxy.base, path, seconds)
        return _delivered(receiver, load["ok"], skip=before)
    finally:
        if proxy is not None:
            proxy.stop()
        receiver.stop()


def _delivered(receiver: Receiver, answered: int, skip: int = 0) -> dict[str, Any]:
    """Waits (bounded) for `answered` pull events past the first `skip`; what arrived."""
    deadline = time.monotonic() + DRAIN_SECONDS
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = [e for e in receiver.events()[skip:] if e["action"] == "pull"]
        if len(events) >= answered:
            break
        time.sleep(0.2)
    delays = sorted(max(0.0, e["received_at"] - _when(e["timestamp"])) for e in events)
    distinct = len({e["id"] for e in events})
    log(f"webhooks: {distinct} distinct events of {answered} pulls")
    return {"received": len(events), "distinct": distinct, "lost": max(0, answered - distinct),
            "p50_ms": _pct(delays, 0.50), "p99_ms": _pct(delays, 0.99)}


def _when(stamp: str) -> float:
    """RFC 3339 with up to nanoseconds (distribution's) or microseconds (the mirror's)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    zone = ""
    for sign in ("+", "-"):
        if sign in frac:
            frac, _, rest = frac.partition(sign)
            zone = sign + rest
    text = f"{head}.{(frac or '0')[:6].ljust(6, '0')}{zone or '+00:00'}"
    return datetime.fromisoformat(text).timestamp()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def _load(base: str, path: str, seconds: float, rate: int = RATE) -> dict[str, Any]:
    return asyncio.run(_fixed_rate(base + path, seconds, rate))


async def _fixed_rate(url: str, seconds: float, rate: int) -> dict[str, Any]:
    """`rate` GETs a second, each started on schedule (open loop, so a slow answer does not
    slow the load), over CONNECTIONS keep-alive connections."""
    latencies: list[float] = []
    failed = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:
            nonlocal failed
            t0 = time.perf_counter()
            try:
                async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                        return
            except aiohttp.ClientError:
                failed += 1
                return
            latencies.append(time.perf_counter() - t0)

        tasks = []
        start = time.perf_counter()
        for i in range(int(seconds * rate)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    latencies.sort()
    return {"ok": len(latencies), "failed": failed,
            "p50_ms": _pct(latencies, 0.50), "p99_ms": _pct(latencies, 0.99),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None}


__all__ = ["bench_webhooks"]
