"""`mirror status`: what the cache holds, how well it serves, and the upstreams' rate limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.http import history
from mirror.oci.routing import parse_image
from mirror.pull.sync import is_running, next_run
from mirror.tiers.bounds import identity


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def status_lines(config: Config, store: BlobStore, index: Index) -> list[str]:
    index.flush()
    entries = list(index.entries())
    total = index.total_bytes()
    rows = index.history()
    start, hour = history.since_start(rows), history.last_hour(rows)
    as_of = time.strftime("%H:%M:%S UTC", time.gmtime(rows[-1]["at"])) if rows else "n/a"
    lines = [
        f"cache dir:    {config.cache.dir}",
        f"size:         {human(total)} of {human(config.cache.max_size)} "
        f"({100 * total / config.cache.max_size:.1f}%)",
        f"entries:      {len(entries)} ({sum(e.kind == 'manifest' for e in entries)} manifests)",
        f"hit ratio:    requests {pct(start.requests)} since start, {pct(hour.requests)} "
        f"last hour; bytes {pct(start.bytes)} since start, {pct(hour.bytes)} last hour "
        f"(as of {as_of})",
    ]
    if entries:
        oldest = min(e.last_access for e in entries)
        lines.append(f"oldest entry: last used {human_age(time.time() - oldest)} ago")
    names = [u.name for u in config.upstreams]
    for pin in config.cache.pin:
        ref = parse_image(pin, names)
        cached = isinstance(ref.reference, str) and index.get_tag(
            ref.upstream, ref.repository, ref.reference) is not None
        lines.append(f"pinned:       {pin}{'' if cached else ' (not cached yet)'}")
    for u in config.upstreams:
        if u.max_size is not None or u.max_unused is not None:
            share = index.upstream_total(u.name)
            bound = (f"of its share {human(u.max_size)} ({100 * share / u.max_size:.1f}%)"
                     if u.max_size else "(no share)")
            unused = (f", unpulled for {human_age(u.max_unused)} evicted"
                      if u.max_unused else "")
            lines.append(f"upstream:     {u.name}: {human(share)} {bound}{unused}")
    for name in names:
        rl = index.ratelimit(name)
        if rl is not None:
            lines.append(f"rate limit:   {name}: {rl[1]} remaining (limit {rl[0]})")
    return lines + sync_lines(config, index, store.lock_path) + bucket_lines(config, index)


def sync_lines(config: Config, index: Index, lock_path: Callable[[str], Path]) -> list[str]:
    """Each [[sync]] rule's last run and next one."""
    lines = []
    for rule in config.syncs:
        state = index.sync_state(rule.name)
        started = state.get("started")
        held = f"{len(index.synced(rule.name))} images{' pinned' if rule.pin else ''}"
        if started is None:
            lines.append(f"sync rule:    {rule.name}: not run yet; {held}")
            continue
        running = is_running(rule, lock_path)
        result = ("running" if running else "cut short" if "running" in state
                  else "ok" if state.get("ok") else "failed")
        now = time.time()
        due = next_run(state, rule, now, running) - now  # as the page says
        nxt = "due now" if due <= 0 else f"next in {human_age(due)}"
        lines.append(f"sync rule:    {rule.name}: {result} {human_age(now - started)} "
                     f"ago ({state.get('summary', '')}); {nxt}; {held}")
    return lines


def bucket_lines(config: Config, index: Index) -> list[str]:
    """The bucket's lines, per this node's index of it (none without [s3])."""
    s3 = config.s3
    if s3 is None:
        return []
    where = f"{s3.endpoint}/{s3.bucket}/{s3.prefix}"
    lines = [f"object store: {where}"]
    if not index.bucket_known(identity(s3)):
        return [*lines, "bucket:       not listed yet (a running mirror or `mirror gc` lists it)"]
    total = index.bucket_total()
    bound = (f"of {human(s3.max_size)} ({100 * total / s3.max_size:.1f}%)"
             if s3.max_size else "(no max_size)")
    lines.append(f"bucket size:  {human(total)} {bound}, {index.bucket_count()} objects")
    if s3.max_unused is not None:
        lines.append(f"bucket bound: objects unused for {human_age(s3.max_unused)} are deleted")
    objects = list(index.bucket_objects())
    if objects:
        oldest = min(e.last_access for e in objects)
        lines.append(f"bucket oldest: last used {human_age(time.time() - oldest)} ago")
    return lines


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
