"""The status page at `GET /`: server-rendered HTML that refreshes itself, for the person at the
edge node. Pure: `render(view)` turns the numbers into a page; `build_view` gathers them, its
counters read from the same scrape as /metrics so that both always agree.

Every number has an element id and a `data-value` attribute holding the raw value, so a test
(or a script) can read the page without parsing the human formatting.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

from mirror import __version__, metrics
from mirror.http import charts
from mirror.http.activity import InFlight
from mirror.http.charts import human_bytes
from mirror.http.history import NO_RATIO, HitRatio
from mirror.upstream.client import redact_url

REFRESH_SECONDS = 5
FROM_CACHE = ("hit", "revalidated", "stale")


@dataclass(frozen=True)
class UpstreamView:
    name: str
    url: str
    reachable: bool | None
    last_error: str | None
    ratelimit_remaining: float | None
    ratelimit_limit: float | None
    requests: float
    offline: bool = False  # `offline = true`: never contacted
    last_reached: float | None = None  # wall-clock seconds, this worker's view
    down_since: float | None = None


@dataclass(frozen=True)
class PeerView:
    url: str
    node_id: str | None
    up: bool
    fails: int


@dataclass(frozen=True)
class ClusterView:
    """This worker's view of the cluster: its own health checks decide who is up."""

    node_id: str
    peers: list[PeerView]
    bytes_in: float  # from peers (all workers)
    bytes_out: float  # to peers
    ring_changes: float
    redis_up: bool | None  # None: no [redis]


@dataclass(frozen=True)
class BucketView:
    """The `[s3]` bucket: where, what this node's index says it holds, its bounds, and the
    write-behind's counters (all workers)."""

    where: str  # endpoint/bucket/prefix
    listed: bool  # whether the index holds the bucket's listing yet
    objects: float
    bytes: float
    max_size: float | None
    max_unused: float | None
    oldest_use: float | None  # wall-clock seconds
    usable: bool
    last_error: str | None
    queued: float
    uploads: float
    skipped: float
    corrupt: float
    deleted: float
    hits: float


@dataclass(frozen=True)
class PolicyView:
    name: str
    mode: str
    allowed: float
    denied: float
    warned: float


@dataclass(frozen=True)
class SyncView:
    """A [[sync]] rule: its last run (times are wall-clock seconds; None: not yet)."""

    name: str
    what: str  # upstream, repositories and tags, as configured
    started: float | None
    finished: float | None
    ok: bool | None
    summary: str
    next_run: float | None
    running: bool
    images: int  # images it holds (pinned with pin = true)
    pin: bool


@dataclass(frozen=True)
class StatusView:
    cache_bytes: float
    cache_max_bytes: float
    cache_entries: float
    hits: float
    misses: float
    requests: float
    bytes_from_cache: float
    bytes_from_upstream: float
    downloads_in_flight: float
    followers: float
    disk_free: float
    disk_size: float
    stale: float  # answers from the cache because the upstream failed
    errors: float  # 5xx responses
    denied: float  # 403 responses (access rules, [[upstream]] allow/deny, policies)
    downloads: list[InFlight]
    upstreams: list[UpstreamView]
    top: list[tuple[str, int]]
    workers: int
    started: float
    generated: float = field(default_factory=time.time)
    cluster: ClusterView | None = None
    bucket: BucketView | None = None
    ratio_start: HitRatio = NO_RATIO  # http/history.py: the one definition
    ratio_hour: HitRatio = NO_RATIO
    history: list[dict[str, float]] = field(default_factory=list)  # rows, oldest first
    policies: list[PolicyView] = field(default_factory=list)
    shares: list[tuple[str, float, float | None]] = field(default_factory=list)  # name, bytes, max
    warnings: list[str] = field(default_factory=list)
    denials: list[tuple[float, str, str, str]] = field(default_factory=list)  # newest last
    syncs: list[SyncView] = field(default_factory=list)
    offline: bool = False


def counts_from(snapshot: metrics.Samples) -> dict[str, float]:
    """The page's counters, read from one scrape."""
    t = metrics.total
    hits = sum(t(snapshot, "mirror_cache_requests_total", result=r) for r in FROM_CACHE)
    statuses = [(dict(labels).get("status", ""), v) for (name, labels), v in snapshot.items()
                if name == "mirror_http_requests_total"]
    return {
        "cache_bytes": t(snapshot, "mirror_cache_bytes"),
        "cache_max_bytes": t(snapshot, "mirror_cache_max_bytes"),
        "cache_entries": t(snapshot, "mirror_cache_entries"),
        "hits": hits,
        "misses": t(snapshot, "mirror_cache_requests_total") - hits,
        "requests": t(snapshot, "mirror_http_requests_total"),
        "bytes_from_cache": t(snapshot, "mirror_served_bytes_total", source="cache"),
        "bytes_from_upstream": t(snapshot, "mirror_served_bytes_total", source="upstream"),
        "downloads_in_flight": t(snapshot, "mirror_downloads_in_flight"),
        "followers": t(snapshot, "mirror_download_followers"),
        "disk_free": t(snapshot, "mirror_cache_disk_free_bytes"),
        "disk_size": t(snapshot, "mirror_cache_disk_size_bytes"),
        "stale": t(snapshot, "mirror_stale_answers_total"),
        "errors": sum(v for status, v in statuses if status.startswith("5")),
        "denied": sum(v for status, v in statuses if status == "403"),
    }


def human_seconds(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _num(id_: str, value: float | None, text: str) -> str:
    raw = "" if value is None else repr(float(value))
    return f'<span id="{id_}" data-value="{raw}">{html.escape(text)}</span>'


def _pct(id_: str, value: float | None) -> str:
    return _num(id_, value, "n/a" if value is None else f"{value:.1%}")


def _bar(fraction: float | None, label: str) -> str:
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="bar" title="{html.escape(label)}"><div class="fill" '
            f'style="width:{pct:.1f}%"></div><span>{html.escape(label)}</span></div>')


def _downloads(view: StatusView) -> str:
    if not view.downloads:
        return '<p class="none">No downloads in flight.</p>'
    rows = []
    for d in sorted(view.downloads, key=lambda d: d.digest):
        fraction = d.written / d.size if d.size else None
        label = (f"{human_bytes(d.written)} of {human_bytes(d.size)}"
                 + (f" ({fraction:.0%})" if fraction is not None else ""))
        followers = "another worker" if d.followers is None else str(d.followers)
        age = "" if d.seconds is None else human_seconds(d.seconds)
        rows.append(
            f'<tr class="download" data-digest="{html.escape(d.digest)}" '
            f'data-written="{d.written}" data-size="{"" if d.size is None else d.size}">'
            f'<td class="digest">{html.escape(d.digest[:19])}…</td>'
            f'<td class="progress">{_bar(fraction, label)}</td>'
            f'<td class="followers">{followers}</td><td>{age}</td></tr>')
    return ('<table><tr><th>digest</th><th>progress</th><th>clients</th><th>running</th>'
            '</tr>' + "".join(rows) + "</table>")


def _upstreams(view: StatusView) -> str:
    rows = []
    for u in view.upstreams:
        if u.offline:
            state, cls = "offline", "unknown"
        elif u.reachable is None:
            state, cls = "not contacted yet", "unknown"
        elif u.reachable:
            state, cls = "reachable", "ok"
        else:
            state, cls = f"unreachable: {u.last_error or ''}", "bad"
        if u.ratelimit_remaining is None:
            limit = "no limit reported"
        else:
            limit = f"{u.ratelimit_remaining:g}" + (
                f" of {u.ratelimit_limit:g}" if u.ratelimit_limit is not None else "")
        rows.append(
            f'<tr class="upstream" data-name="{html.escape(u.name)}">'
            f'<td>{html.escape(u.name)}</td><td class="url">{html.escape(redact_url(u.url))}</td>'
            f'<td class="{cls}">{html.escape(state)}</td>'
            f'<td class="ratelimit" data-value="'
            f'{"" if u.ratelimit_remaining is None else f"{u.ratelimit_remaining:g}"}">'
            f'{html.escape(limit)}</td>'
            f'<td class="requests" data-value="{u.requests:g}">{u.requests:g}</td>'
            f'<td class="last-reached" data-value="{u.last_reached or ""}">'
            f'{when_utc(u.last_reached)}</td><td class="down-since" data-value="'
            f'{u.down_since or ""}">{when_utc(u.down_since)}</td></tr>')
    return ('<table><tr><th>upstream</th><th>url</th><th>state</th><th>rate limit left</th>'
            '<th>requests</th><th>last reached (UTC)</th><th>down since</th></tr>'
            + "".join(rows) + "</table>")


def _offline(view: StatusView) -> str:
    if not view.offline:
        return ""
    return ('<p class="bad" id="offline">Offline mode (<code>[cache] offline = true</code>): '
            "no upstream is contacted; only cached content is served.</p>")


def _cluster(c: ClusterView) -> str:
    rows = [f'<tr class="peer" data-node="{html.escape(c.node_id)}"><td>{html.escape(c.node_id)}'
            '</td><td class="url">this node</td><td class="ok">up</td><td></td></tr>']
    for p in c.peers:
        state, cls = ("up", "ok") if p.up else ("down", "bad")
        rows.append(f'<tr class="peer" data-node="{html.escape(p.node_id or "")}">'
                    f'<td>{html.escape(p.node_id or "?")}</td>'
                    f'<td class="url">{html.escape(p.url)}</td>'
                    f'<td class="{cls}" data-value="{int(p.up)}">{state}</td>'
                    f'<td data-value="{p.fails}">{p.fails}</td></tr>')
    redis = ("not configured" if c.redis_up is None else "up" if c.redis_up
             else "unusable (each node goes on alone)")
    return ('<table><tr><th>node</th><th>url</th><th>state</th><th>failed checks</th></tr>'
            + "".join(rows) + "</table>"
            f'<p>From peers {_num("peer-bytes-in", c.bytes_in, human_bytes(c.bytes_in))} · '
            f'to peers {_num("peer-bytes-out", c.bytes_out, human_bytes(c.bytes_out))} · '
            f'ring changes {_num("ring-changes", c.ring_changes, f"{c.ring_changes:g}")} · '
            f'Redis <span id="redis">{html.escape(redis)}</span></p>')


def _bucket(b: BucketView) -> str:
    state = "usable" if b.usable else f"unusable: {b.last_error or '?'}"
    held = (f"{human_bytes(b.bytes)}" + (f" of {human_bytes(b.max_size)}" if b.max_size
                                         else " (no max_size)")) if b.listed else "not listed yet"
    oldest = ("n/a" if b.oldest_use is None
              else human_seconds(max(0.0, time.time() - b.oldest_use)) + " ago")
    rows = [
        ("Where", html.escape(b.where) + " · " + html.escape(state)),
        ("Held", _num("bucket-bytes", b.bytes if b.listed else None, held) + " in "
         + _num("bucket-objects", b.objects, f"{b.objects:g}") + " objects"),
        ("Unused limit", _num("bucket-max-unused", b.max_unused, "none" if b.max_unused is None
                              else human_seconds(b.max_unused))),
        ("Oldest use", _num("bucket-oldest-use", b.oldest_use, oldest)),
        ("Write-behind queue", _num("bucket-queued", b.queued, f"{b.queued:g}")),
        ("Uploaded / skipped", _num("bucket-uploads", b.uploads, f"{b.uploads:g}") + " / "
         + _num("bucket-skipped", b.skipped, f"{b.skipped:g}")),
        ("Read from bucket", _num("bucket-hits", b.hits, f"{b.hits:g}")),
        ("Corrupt / trimmed", _num("bucket-corrupt", b.corrupt, f"{b.corrupt:g}") + " / "
         + _num("bucket-deleted", b.deleted, f"{b.deleted:g}")),
    ]
    use = b.bytes / b.max_size if b.max_size and b.listed else None
    body = "".join(f"<tr><td>{label}</td><td>{value}</td></tr>" for label, value in rows)
    return _bar(use, held) + f'<table style="margin-top:.5em">{body}</table>'


def _shares(view: StatusView) -> str:
    if not view.shares:
        return ""
    rows = "".join(
        f'<tr class="share"><td>{html.escape(name)}</td>'
        f'<td data-value="{held:g}">{human_bytes(held)}</td>'
        f"<td>{'none' if bound is None else human_bytes(bound)}</td></tr>"
        for name, held, bound in view.shares)
    return ('<table style="margin-top:.5em"><tr><th>upstream</th><th>holds</th>'
            f"<th>its max_size</th></tr>{rows}</table>")


def _policies(view: StatusView) -> str:
    rows = "".join(
        f'<tr class="policy"><td>{html.escape(p.name)}</td><td>{html.escape(p.mode)}</td>'
        f'<td data-value="{p.allowed:g}">{p.allowed:g}</td>'
        f'<td class="denied" data-value="{p.denied:g}">{p.denied:g}</td>'
        f'<td data-value="{p.warned:g}">{p.warned:g}</td></tr>' for p in view.policies)
    table = ("<table><tr><th>policy</th><th>mode</th><th>allowed</th><th>denied</th>"
             f"<th>warned</th></tr>{rows}</table>")
    if not view.denials:
        return table + '<p class="none">No denials.</p>'
    denied = "".join(
        f'<tr class="denial"><td>{time.strftime("%H:%M:%S", time.gmtime(at))}</td>'
        f'<td>{html.escape(policy)}</td><td class="digest">{html.escape(what)}</td>'
        f"<td>{html.escape(reason)}</td></tr>"
        for at, policy, what, reason in reversed(view.denials))
    return (table + '<h3>Recent denials</h3><table><tr><th>UTC</th><th>policy</th>'
            f"<th>image</th><th>why</th></tr>{denied}</table>")


def when_utc(at: float | None) -> str:
    return "—" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _next(rule: SyncView, now: float) -> str:
    """A rule the scheduler runs at its next check (never run, changed by a reload, cut
    short, or overdue behind another rule's run) says so, not a time already past."""
    if rule.next_run is not None and rule.next_run <= now:
        return "due now"
    return when_utc(rule.next_run)


def _syncs(view: StatusView) -> str:
    rows = []
    for r in view.syncs:
        if r.running:
            state, cls = "running", "unknown"
        elif r.ok is None:
            state, cls = "not run yet", "unknown"
        else:
            state, cls = ("ok", "ok") if r.ok else ("failed", "bad")
        rows.append(
            f'<tr class="sync-rule" data-name="{html.escape(r.name)}">'
            f"<td>{html.escape(r.name)}</td><td>{html.escape(r.what)}</td>"
            f'<td data-value="{r.finished or ""}">{when_utc(r.finished)}</td>'
            f'<td class="{cls}">{state}</td><td>{html.escape(r.summary)}</td>'
            f'<td data-value="{r.next_run or ""}">{_next(r, view.generated)}</td>'
            f'<td data-value="{r.images}">{r.images}{" pinned" if r.pin else ""}</td></tr>')
    return ("<table><tr><th>rule</th><th>what</th><th>last run (UTC)</th><th>result</th>"
            "<th></th><th>next run</th><th>images</th></tr>" + "".join(rows) + "</table>")


def _top(view: StatusView) -> str:
    if not view.top:
        return '<p class="none">Nothing pulled yet.</p>'
    rows = "".join(f'<tr class="repo"><td>{html.escape(name)}</td>'
                   f'<td class="pulls" data-value="{count}">{count}</td></tr>'
                   for name, count in view.top)
    return f"<table><tr><th>repository</th><th>pulls</th></tr>{rows}</table>"


STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:2em;color:#1d2433;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.sub{color:#667;margin-bottom:1em}
.cards{display:flex;flex-wrap:wrap;gap:1em}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:.8em 1.1em;min-width:12em}
.card .label{color:#667;font-size:.85em}.card .big{font-size:1.6em;font-weight:600}
table{border-collapse:collapse;background:#fff;border:1px solid #dde;min-width:40em}
th,td{padding:.35em .8em;border-bottom:1px solid #eef;text-align:left}
th{background:#eef1f6;font-weight:600}
.bar{position:relative;background:#e4e8ef;border-radius:4px;height:1.3em;min-width:16em}
.bar .fill{background:#4c8bf5;height:100%;border-radius:4px}
.bar span{position:absolute;left:.5em;top:0;font-size:.85em;line-height:1.3em}
.ok{color:#17803d}.bad{color:#b42318}.unknown{color:#667}.none{color:#667}
.digest,.url{font-family:ui-monospace,monospace;font-size:.9em}
.charts{display:flex;flex-wrap:wrap;gap:1em}.chart-box{margin:0}
.chart-box figcaption{color:#667;font-size:.85em}
"""


def render(view: StatusView) -> str:
    start, hour = view.ratio_start, view.ratio_hour
    use = view.cache_bytes / view.cache_max_bytes if view.cache_max_bytes else None
    use_label = (f"{human_bytes(view.cache_bytes)} of {human_bytes(view.cache_max_bytes)}"
                 + (f" ({use:.1%})" if use is not None else ""))
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.generated))
    cards = [
        ("Cache used", _num("cache-bytes", view.cache_bytes, human_bytes(view.cache_bytes))
         + " of " + _num("cache-max-bytes", view.cache_max_bytes,
                         human_bytes(view.cache_max_bytes))),
        ("Entries", _num("cache-entries", view.cache_entries, f"{view.cache_entries:g}")),
        ("Hit ratio, requests", _pct("hit-ratio", start.requests) + " since start · "
         + _pct("hit-ratio-hour", hour.requests) + " last hour"),
        ("Hit ratio, bytes", _pct("hit-ratio-bytes", start.bytes) + " since start · "
         + _pct("hit-ratio-bytes-hour", hour.bytes) + " last hour"),
        ("Hits / misses", _num("hits", view.hits, f"{view.hits:g}") + " / "
         + _num("misses", view.misses, f"{view.misses:g}")),
        ("Requests", _num("requests", view.requests, f"{view.requests:g}")),
        ("Errors (5xx) / denied (403)", _num("errors", view.errors, f"{view.errors:g}") + " / "
         + _num("denied", view.denied, f"{view.denied:g}")),
        ("Stale answers (upstream failed)", _num("stale", view.stale, f"{view.stale:g}")),
        ("Disk free", _num("disk-free", view.disk_free, human_bytes(view.disk_free)) + " of "
         + _num("disk-size", view.disk_size, human_bytes(view.disk_size))),
        ("Served from cache", _num("bytes-from-cache", view.bytes_from_cache,
                                   human_bytes(view.bytes_from_cache))),
        ("Served from upstream", _num("bytes-from-upstream", view.bytes_from_upstream,
                                      human_bytes(view.bytes_from_upstream))),
    ]
    in_flight = (_num("downloads-in-flight", view.downloads_in_flight,
                      f"{view.downloads_in_flight:g}")
                 + " (" + _num("followers", view.followers, f"{view.followers:g}")
                 + " clients)")
    card_html = "".join(f'<div class="card"><div class="label">{label}</div>'
                        f'<div class="big">{value}</div></div>' for label, value in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>registry mirror</title><style>{STYLE}</style></head>
<body>
<h1>Registry mirror</h1>
<div class="sub">version {html.escape(__version__)} · {view.workers} worker(s) · up
{human_seconds(view.generated - view.started)} · {generated} · refreshes every
{REFRESH_SECONDS}s · <a href="/cache">cache browser</a> · <a href="/metrics">/metrics</a> ·
<a href="/readyz">/readyz</a></div>
{_offline(view)}
<h2>Cache</h2>
{"".join(f'<p class="bad warning">{html.escape(w)}</p>' for w in view.warnings)}
{_bar(use, use_label)}
{_shares(view)}
<div class="cards" style="margin-top:1em">{card_html}</div>
<h2>Over time</h2>
{charts.render(view.history, view.generated)}
<h2>Downloads in flight: {in_flight}</h2>
{_downloads(view)}
<h2>Upstreams</h2>
{_upstreams(view)}
{"" if view.cluster is None else "<h2>Cluster</h2>" + _cluster(view.cluster)}
{"" if view.bucket is None else "<h2>Object store</h2>" + _bucket(view.bucket)}
{"" if not view.policies else "<h2>Signature policies</h2>" + _policies(view)}
{"" if not view.syncs else "<h2>Sync rules</h2>" + _syncs(view)}
<h2>Most pulled repositories</h2>
{_top(view)}
</body></html>
"""
