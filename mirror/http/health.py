"""Liveness and readiness.

`/healthz`: the process answers. `/readyz`: the cache directory is writable and the index
opens; each upstream's reachability is reported but not required (a mirror whose upstream is
down still serves what it has cached). With `offline = true` upstreams are never probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from mirror.runtime import Mirror
from mirror.upstream.client import Upstream, redact_url

PROBE_AFTER = 30.0  # seconds without news from an upstream before it is probed again
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def check_cache_writable(mirror: Mirror) -> Check:
    try:
        mirror.store.probe_write()
    except OSError as exc:
        return Check(False, mirror.store.write_problem(exc))
    return Check(True, str(mirror.store.root))


def check_index(mirror: Mirror) -> Check:
    try:
        mirror.index.db.get("readiness-probe")
    except Exception as exc:  # sqlite3 and OS errors alike: the index is not usable
        return Check(False, f"index unusable: {exc}")
    return Check(True, "open")


async def refresh_upstreams(upstreams: list[Upstream], offline: bool) -> None:
    """Probe the upstreams nothing was heard from lately (concurrently, briefly). Offline,
    nothing is sent (nor looked up in DNS)."""
    if offline:
        return
    now = time.time()
    stale = [u for u in upstreams
             if max(u.last_answer or 0.0, u.last_failure or 0.0) < now - PROBE_AFTER]
    if stale:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(u.probe() for u in stale)), PROBE_TIMEOUT)


def upstream_report(u: Upstream, offline: bool) -> dict[str, Any]:
    return {
        "url": redact_url(u.config.url),
        "offline": offline,
        "reachable": None if offline else u.reachable,
        "last_error": u.last_error if u.reachable is False and not offline else None,
        "ratelimit_remaining": u.ratelimit_remaining,
        "ratelimit_limit": u.ratelimit_limit,
    }


async def readiness(mirror: Mirror) -> tuple[bool, dict[str, Any]]:
    checks = {"cache_writable": check_cache_writable(mirror), "index": check_index(mirror)}
    await refresh_upstreams(list(mirror.upstreams.values()), mirror.offline)
    ready = all(c.ok for c in checks.values())
    report: dict[str, Any] = {
        "status": "ready" if ready else "not ready",
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
        "upstreams": {name: upstream_report(u, mirror.offline)
                      for name, u in mirror.upstreams.items()},
    }
    if mirror.bucket is not None:  # reported, not required: the local tier still serves
        try:
            problem = await asyncio.wait_for(mirror.bucket.check(), PROBE_TIMEOUT)
        except TimeoutError:
            problem = f"no answer within {PROBE_TIMEOUT:g} s"
        report["bucket"] = {"endpoint": mirror.bucket.config.endpoint,
                            "bucket": mirror.bucket.config.bucket,
                            "usable": problem is None, "error": problem}
    return ready, report
