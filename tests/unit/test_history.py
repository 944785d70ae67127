"""http/history.py and http/charts.py: the one hit ratio, from counters a restart resets; the
slot recorded once whatever the number of workers; the charts drawing the rows' numbers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror import metrics
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.http import charts, history


def row(at: float, **values: float) -> history.Row:
    base = dict.fromkeys(history.FIELDS, 0.0)
    return {"at": at, **base, **values}


def test_deltas_take_a_restart_as_counting_from_zero() -> None:
    rows = [row(0, requests=10, hits=4, answered=8), row(60, requests=25, hits=10, answered=20),
            row(120, requests=3, hits=1, answered=2)]  # restarted in between
    d = history.deltas(rows)
    assert [x["requests"] for x in d] == [15, 3]
    assert [x["hits"] for x in d] == [6, 1]


def test_since_start_is_the_last_row_and_the_last_hour_its_deltas() -> None:
    now = 10_000.0
    rows = [row(now - 7200, hits=100, answered=100, bytes_cache=0, bytes_upstream=0),
            row(now - 3000, hits=100, answered=200, bytes_cache=10, bytes_upstream=30),
            row(now - 60, hits=150, answered=300, bytes_cache=50, bytes_upstream=30)]
    assert history.since_start(rows) == history.HitRatio(0.5, 50 / 80)
    hour = history.last_hour(rows, now)  # the two rows within the hour: their deltas
    assert hour.requests == pytest.approx(50 / 200) and hour.bytes == pytest.approx(50 / 80)
    assert history.last_hour([], now) == history.NO_RATIO == history.since_start([])


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[BlobStore, Index]]:
    store = BlobStore(tmp_path / "cache")
    index = Index(store.index_dir)
    yield store, index
    index.close()


def test_a_slot_is_recorded_once_and_kept_for_a_day(cache: tuple[BlobStore, Index]) -> None:
    store, index = cache
    snapshots = 0

    def snapshot() -> metrics.Samples:
        nonlocal snapshots
        snapshots += 1
        return {("mirror_http_requests_total", (("method", "GET"), ("route", "blob"),
                                                ("status", "503"))): 2.0,
                ("mirror_upstream_up", (("upstream", "a"),)): 1.0,
                ("mirror_upstream_up", (("upstream", "b"),)): 0.0}

    t = 1_000_000.0 * history.HISTORY_SECONDS
    assert history.record_due(store, index, snapshot, now=t)
    assert not history.record_due(store, index, snapshot, now=t + 1)  # another worker
    assert history.record_due(store, index, snapshot, now=t + history.HISTORY_SECONDS)
    assert snapshots == 2
    rows = index.history()
    assert rows[-1]["errors"] == 2 and rows[-1]["upstreams_up"] == 1
    assert rows[-1]["upstreams"] == 2
    for i in range(history.DAY_SLOTS + 5):
        index.append_history(10**9 + i, row(float(i)), history.DAY_SLOTS)
    assert len(index.history()) == history.DAY_SLOTS


def test_the_charts_draw_the_numbers_of_the_rows() -> None:
    now = 100_000.0
    rows = [row(now - 180 + 60 * i, requests=10 * i * i, errors=i, hits=i, answered=2 * i,
                bytes_cache=1000 * i, upstreams_up=1, upstreams=1) for i in range(4)]
    page = charts.render(rows, now)
    hour = page.split("<h3>Last day</h3>")[0]
    points = dict(re.findall(r'data-series="([a-z ]+)" data-points="([0-9.,e+-]*)"', hour))
    assert points["requests"] == "10,30,50"  # per-slot deltas of 0, 10, 40, 90
    assert points["errors"] == "1,1,1"
    assert points["hit ratio"] == "0.5,0.5,0.5"
    assert points["reachable"] == "1,1,1"
    assert points["cache"] == "1000,1000,1000" and points["upstream"] == "0,0,0"
    assert "<script" not in page and "http" not in page  # nothing loaded from elsewhere
    assert "appear once" in charts.render(rows[:1], now)
