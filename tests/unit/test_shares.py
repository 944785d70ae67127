"""Per-upstream bounds (cache/eviction.py enforce_shares, the index's attribution): an
upstream's content beyond its `max_size` share goes LRU first, its content unpulled for
`max_unused` goes even under every size bound; other upstreams' content and pins stay. A real
store and index in tmp_path, no HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.eviction import enforce_shares, pins_over_bounds, shares_due
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import Config, ConfigError, parse_config
from mirror.oci.reference import Digest, digest_of

HOUR = 3600.0


def config(tmp_path: Path, a: dict[str, Any], pin: list[str] | None = None) -> Config:
    return parse_config({
        "cache": {"dir": str(tmp_path / "cache"), "max_size": "1GiB",
                  "pin": pin or []},
        "upstream": [{"name": "a.test", "url": "http://a.invalid", **a},
                     {"name": "b.test", "url": "http://b.invalid"}]})


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[BlobStore, Index]]:
    store = BlobStore(tmp_path / "cache")
    index = Index(store.index_dir)
    store.on_commit = index.add_entry
    yield store, index
    index.close()


def add(store: BlobStore, index: Index, upstream: str, data: bytes, age: float) -> Digest:
    digest = digest_of(data)
    index.attribute(digest, upstream)
    store.put_bytes(digest, data)
    index.add_entry(digest, len(data), "blob", last_access=time.time() - age)
    return digest


def test_an_upstream_over_its_share_loses_its_oldest_content_only(
        tmp_path: Path, cache: tuple[BlobStore, Index]) -> None:
    store, index = cache
    cfg = config(tmp_path, {"max_size": "1000B"})
    a = [add(store, index, "a.test", bytes([i]) * 300, age=HOUR * (10 - i)) for i in range(5)]
    b = [add(store, index, "b.test", bytes([100 + i]) * 300, age=HOUR * 20) for i in range(3)]
    assert index.upstream_total("a.test") == 1500 and index.upstream_total("b.test") == 900
    assert shares_due(cfg, index)
    assert enforce_shares(cfg, store, index) is not None
    assert [store.has(d) for d in a] == [False, False, True, True, True]  # down to 90 %
    assert all(store.has(d) for d in b)  # older, but b has no share
    assert index.upstream_total("a.test") == 900 and not shares_due(cfg, index)
    assert index.total_bytes() == 900 + 900


def test_content_unpulled_for_max_unused_goes_under_every_size_bound_pins_stay(
        tmp_path: Path, cache: tuple[BlobStore, Index]) -> None:
    store, index = cache
    old = add(store, index, "a.test", b"old" * 10, age=40 * 86400)
    fresh = add(store, index, "a.test", b"fresh" * 10, age=HOUR)
    pinned_layer = add(store, index, "a.test", b"pinned layer", age=40 * 86400)
    manifest = (b'{"schemaVersion":2,"layers":[{"digest":"%s","size":12}]}'
                % str(pinned_layer).encode())
    mdigest = digest_of(manifest)
    index.attribute(mdigest, "a.test")
    store.put_bytes(mdigest, manifest)
    index.set_media_type(mdigest, "application/vnd.oci.image.manifest.v1+json")
    index.set_tag("a.test", "app", "v1", mdigest, "application/vnd.oci.image.manifest.v1+json")
    b_old = add(store, index, "b.test", b"b old", age=40 * 86400)
    cfg = config(tmp_path, {"max_unused": "30d"}, pin=["a.test/app:v1"])
    enforce_shares(cfg, store, index)
    assert not store.has(old) and store.has(fresh) and store.has(pinned_layer)
    assert store.has(b_old)  # another upstream's content is not a's to evict


def test_attribution_is_the_first_upstream_and_survives_an_index_rebuild(
        tmp_path: Path, cache: tuple[BlobStore, Index]) -> None:
    store, index = cache
    digest = add(store, index, "a.test", b"shared layer", age=0)
    index.attribute(digest, "b.test")  # the same blob through another upstream later
    assert index.upstream_of(digest) == "a.test"
    index.rebuild_entries(store.iter_stored())
    assert index.upstream_total("a.test") == len(b"shared layer")
    assert index.upstream_total("b.test") == 0
    index.remove_entry(digest)
    assert index.upstream_total("a.test") == 0 and index.upstream_of(digest) is None


def test_pins_beyond_a_share_are_said(tmp_path: Path, cache: tuple[BlobStore, Index]) -> None:
    store, index = cache
    layer = add(store, index, "a.test", b"x" * 2000, age=0)
    manifest = b'{"schemaVersion":2,"layers":[{"digest":"%s","size":2000}]}' % str(
        layer).encode()
    index.attribute(digest_of(manifest), "a.test")
    store.put_bytes(digest_of(manifest), manifest)
    index.set_tag("a.test", "app", "v1", digest_of(manifest), "x")
    cfg = config(tmp_path, {"max_size": "1000B"}, pin=["a.test/app:v1"])
    warnings = pins_over_bounds(cfg, store, index)
    assert len(warnings) == 1 and "pinned images of a.test hold" in warnings[0]
    enforce_shares(cfg, store, index)
    assert store.has(layer)  # pinned: kept over the share


def test_a_share_above_the_cache_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.max_size: .* more than \[cache\]"):
        config(tmp_path, {"max_size": "2GiB"})
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.max_unused"):
        config(tmp_path, {"max_unused": "soon"})
