"""The cache browser's pure parts with a real BlobStore and Index, no HTTP: what a repository
and an image row say (sizes counting each stored digest once, last pulled, what pins it), that
a pin made in the browser keeps an image from eviction like `[cache] pin`, the CSRF tokens,
and that the pages escape what they show and draw buttons only for admins."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.cache import browse
from mirror.cache.eviction import evict, pinned_digests, pins
from mirror.config import Config, parse_config
from mirror.http import cachepage, csrf
from mirror.http.cachepage import Admin
from tests.unit.test_purge import UP, UPSTREAMS, Cache


def config(tmp_path: Path, pin: list[str] | None = None) -> Config:
    return parse_config({
        "cache": {"dir": str(tmp_path / "c"), "max_size": "1GiB", "pin": pin or []},
        "upstream": [{"name": name, "url": "http://x.invalid"} for name in UPSTREAMS]})


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "c")
    yield c
    c.index.close()



def test_rows_count_each_stored_digest_once_and_name_their_pins(
        tmp_path: Path, cache: Cache) -> None:
    shared = b"shared layer" * 1000
    one = cache.image(shared, b"one" * 500)
    two = cache.image(shared, b"two" * 700)
    cache.tag("lib/app", "1.0", one)
    cache.tag("lib/app", "2.0", two)
    cache.tag("lib/other", "x", one)
    cache.index.add_pin(f"{UP}/lib/app:2.0", "alice")
    cfg = config(tmp_path, pin=[f"{UP}/lib/app:1.0"])

    page = browse.repositories(cfg, cache.store, cache.index, lambda u, r: True)
    rows = {r.repository: r for r in page.rows if isinstance(r, browse.RepositoryRow)}
    stored = {e.digest: e.size for e in cache.index.entries()}
    assert rows["lib/app"].size == sum(stored.values())  # the shared layer once
    assert rows["lib/app"].tags == 2 and rows["lib/app"].pinned == 2
    assert rows["lib/other"].pinned == 0
    assert rows["lib/other"].size < rows["lib/app"].size

    images = {r.reference: r for r in browse.images(cfg, cache.store, cache.index, UP,
                                                     "lib/app").rows
              if isinstance(r, browse.ImageRow)}
    assert images["1.0"].pinned_by == ("config",)
    assert images["2.0"].pinned_by == ("by alice",)
    assert images["2.0"].digest == str(two)
    assert images["1.0"].size + images["2.0"].size > rows["lib/app"].size
    last = max(e.last_access for e in cache.index.entries())
    assert rows["lib/app"].last_pulled == pytest.approx(last)

    hidden = browse.repositories(cfg, cache.store, cache.index,
                                 lambda u, r: r != "lib/other")
    assert [r.repository for r in hidden.rows if isinstance(r, browse.RepositoryRow)] == [
        "lib/app"]


def test_a_manifest_held_by_digest_only_is_a_row_and_pages_are_bounded(
        tmp_path: Path, cache: Cache) -> None:
    held = cache.image(b"layer")
    cache.index.hold(UP, "lib/bydigest", held)
    rows = browse.images(config(tmp_path), cache.store, cache.index, UP, "lib/bydigest").rows
    assert [r.reference for r in rows if isinstance(r, browse.ImageRow)] == [str(held)]
    for n in range(browse.PAGE + 5):
        cache.index.set_tag(UP, "lib/many", f"t{n:04}", held, "x")
    first = browse.images(config(tmp_path), cache.store, cache.index, UP, "lib/many")
    last = browse.images(config(tmp_path), cache.store, cache.index, UP, "lib/many", page=9)
    assert (len(first.rows), first.pages) == (browse.PAGE, 2)
    assert (len(last.rows), last.page) == (5, 2)


def test_a_pin_made_in_the_browser_keeps_the_image_from_eviction(
        tmp_path: Path, cache: Cache) -> None:
    kept = cache.image(b"kept layer" * 100)
    gone = cache.image(b"gone layer" * 100)
    cache.tag("lib/app", "kept", kept)
    cache.tag("lib/app", "gone", gone)
    cfg = config(tmp_path)
    cache.index.add_pin(f"{UP}/lib/app:kept", "alice")
    assert f"{UP}/lib/app:kept" in pins(cfg, cache.index)
    pinned = pinned_digests(pins(cfg, cache.index), UPSTREAMS, cache.store, cache.index)
    evict(cache.store, cache.index, 0, pinned)
    assert cache.store.has(kept) and not cache.store.has(gone)
    assert cache.index.remove_pin(f"{UP}/lib/app:kept")
    assert not cache.index.remove_pin(f"{UP}/lib/app:kept")
    evict(cache.store, cache.index, 0, pinned_digests(pins(cfg, cache.index), UPSTREAMS,
                                                      cache.store, cache.index))
    assert not cache.store.has(kept)


def test_csrf_tokens_bind_the_user_and_expire() -> None:
    secret, now = b"k" * 32, 1_000_000.0
    token = csrf.issue(secret, "ops", now)
    assert csrf.valid(secret, "ops", token, now)
    assert csrf.valid(secret, "ops", token, now + csrf.WINDOW_SECONDS)  # the next window
    assert not csrf.valid(secret, "ops", token, now + 2 * csrf.WINDOW_SECONDS + 1)
    assert not csrf.valid(secret, "ops", token, now - csrf.WINDOW_SECONDS)  # from the future
    assert not csrf.valid(secret, "other", token, now)
    assert not csrf.valid(b"x" * 32, "ops", token, now)
    window, _, mac = token.partition(".")
    for forged in ("", ".", f"{window}.", f"{int(window) + 1}.{mac}", f"-1.{mac}",
                   "9" * 40 + f".{mac}", token + "0", token.upper()):
        assert not csrf.valid(secret, "ops", forged, now), forged


@pytest.mark.parametrize(("headers", "ok"), [
    ({"Origin": "http://m.test:5000"}, True),
    ({"Origin": "https://M.TEST:5000"}, True),  # behind a TLS proxy: the host counts
    ({"Referer": "http://m.test:5000/cache/x"}, True),
    ({"Origin": "http://evil.test"}, False),
    ({"Origin": "http://m.test:5000.evil.test"}, False),
    ({"Origin": "null"}, False),
    ({"Referer": "http://evil.test/?http://m.test:5000"}, False),
    ({}, False),
])
def test_same_origin(headers: dict[str, str], ok: bool) -> None:
    assert csrf.same_origin(headers, "m.test:5000") is ok


def test_pages_escape_what_they_show_and_only_admins_get_forms() -> None:
    evil = '<script>alert(1)</script>"'
    page = browse.Page([browse.ImageRow(evil, "sha256:" + "a" * 64, 1, time.time(),
                                        (f"by {evil}",))], 1, 1)
    for admin in (None, Admin("tok")):
        text = cachepage.images(UP, f"lib/{evil}", page, admin)
        assert "<script>" not in text
        assert ("<form" in text) is (admin is not None)
    shown = cachepage.result("purged", [evil], True, f"/cache/{evil}")
    assert "<script>" not in shown and "&lt;script&gt;" in shown
