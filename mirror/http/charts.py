"""The status page's charts, server-rendered SVG (edge sites are often offline: no script,
nothing loaded from elsewhere): the last hour and the last day of http/history.py's rows.

Each chart is an <svg class="chart" data-chart=NAME data-window=hour|day> with one
<polyline data-series=SERIES data-points="v1,v2,..."> per series (the values drawn, oldest
first, so a test or a person can read the numbers behind the lines)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from mirror.http.history import HISTORY_SECONDS, Row, deltas, ratio

WIDTH, HEIGHT, PAD = 560, 120, 4
COLOURS = {"cache": "#4c8bf5", "upstream": "#e8912d", "requests": "#4c8bf5",
           "errors": "#b42318", "hit ratio": "#17803d", "reachable": "#17803d"}

Series = tuple[str, Callable[[Row], float | None]]
SLOT = "minute" if HISTORY_SECONDS == 60 else f"{HISTORY_SECONDS:g} s"
CHARTS: list[tuple[str, str, list[Series], float | None]] = [
    # name, unit, series, fixed top (None: the largest value)
    ("bytes served", f"bytes per {SLOT}", [
        ("cache", lambda d: d["bytes_cache"]), ("upstream", lambda d: d["bytes_upstream"])],
     None),
    ("requests", f"per {SLOT}", [
        ("requests", lambda d: d["requests"]), ("errors", lambda d: d["errors"])], None),
    ("hit ratio", "requests from the cache", [
        ("hit ratio", lambda d: ratio(d["hits"], d["answered"]))], 1.0),
    ("upstreams reachable", "share of upstreams up", [
        ("reachable", lambda d: ratio(d["upstreams_up"], d["upstreams"]))], 1.0),
]


def _window(rows: Sequence[Row], now: float, seconds: float, points: int) -> list[Row]:
    """The deltas of the window, merged into at most `points` buckets (sums; gauges: the
    last)."""
    recent = [d for d in deltas(rows) if d["at"] > now - seconds]
    per = max(1, -(-len(recent) // points))
    merged = []
    for i in range(0, len(recent), per):
        group = recent[i:i + per]
        row = {k: sum(g[k] for g in group) for k in group[0]}
        row.update({k: group[-1][k] for k in ("at", "upstreams_up", "upstreams")})
        merged.append(row)
    return merged


def _svg(name: str, unit: str, series: list[Series], top: float | None,
         rows: list[Row], window: str, start: float, seconds: float) -> str:
    values = {s: [f(r) for r in rows] for s, f in series}
    biggest = top or max([v for vs in values.values() for v in vs if v is not None] + [1.0])
    scale = (HEIGHT - 2 * PAD) / biggest
    xs = [PAD + (r["at"] - start) / seconds * (WIDTH - 2 * PAD) for r in rows]  # time axis
    lines = []
    for s, vs in values.items():
        drawn = [(x, HEIGHT - PAD - v * scale) for x, v in zip(xs, vs, strict=True)
                 if v is not None]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in drawn)
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{COLOURS[s]}"/>'
                       for x, y in drawn)
        data = ",".join("" if v is None else f"{v:g}" for v in vs)
        lines.append(f'<polyline data-series="{html.escape(s)}" data-points="{data}" '
                     f'fill="none" stroke="{COLOURS[s]}" stroke-width="2" points="{points}"/>'
                     + dots)
    legend = " · ".join(f'<span style="color:{COLOURS[s]}">{html.escape(s)}</span>'
                        for s, _ in series)
    shown = human_bytes(biggest) if unit.startswith("bytes") else f"{biggest:g}"
    return (f'<figure class="chart-box"><figcaption>{html.escape(name)} ({html.escape(unit)}'
            f', top {shown}) — {legend}</figcaption>'
            f'<svg class="chart" data-chart="{html.escape(name)}" data-window="{window}" '
            f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'role="img" aria-label="{html.escape(name)}, last {window}">'
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff" stroke="#dde"/>'
            f'{"".join(lines)}</svg></figure>')


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render(rows: Sequence[Row], now: float) -> str:
    if len(rows) < 2:
        return ('<p class="none">Charts appear once two samples are taken (one every '
                f'{HISTORY_SECONDS:g} s).</p>')
    out = []
    for window, seconds in (("hour", 3600.0), ("day", 86400.0)):
        merged = _window(rows, now, seconds, 60 if window == "hour" else 144)
        charts = "".join(_svg(name, unit, series, top, merged, window, now - seconds,
                              seconds) for name, unit, series, top in CHARTS)
        out.append(f'<h3>Last {window}</h3><div class="charts">{charts}</div>')
    return "".join(out)
