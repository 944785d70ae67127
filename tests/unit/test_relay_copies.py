"""Relay copies in a cluster (cache/eviction.py trim_copies, cache/index.py mark_copy): blobs a
node relayed from their owner are kept within `relay_cache` bytes, the least recently used go
first, and neither what the node owns nor what is in use is ever trimmed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from mirror.cache.eviction import trim_copies
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci.reference import Digest, parse_digest

SIZE = 1000


def put(store: BlobStore, index: Index, name: str, last_access: float, copy: bool) -> Digest:
    data = name.encode().ljust(SIZE, b".")
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    if copy:
        index.mark_copy(digest)  # as ClusterSource does, before the download commits
    store.put_bytes(digest, data)
    index.add_entry(digest, len(data), "blob", last_access=last_access)
    return digest


def test_copies_beyond_the_budget_go_oldest_first_and_own_content_stays(tmp_path: Path) -> None:
    store, index = BlobStore(tmp_path), Index(tmp_path / "index")
    now = time.time()
    own = [put(store, index, f"own {i}", now - 7200, copy=False) for i in range(3)]
    copies = [put(store, index, f"copy {i}", now - 3600 + i, copy=True) for i in range(4)]
    assert index.copy_bytes() == 4 * SIZE
    result = trim_copies(store, index, 2 * SIZE, lambda d: False, set(), None, now - 4)
    assert result.evicted == 2
    assert [store.size(d) for d in copies] == [None, None, SIZE, SIZE]  # the oldest went
    assert all(store.size(d) == SIZE for d in own)  # older, but not copies
    assert index.copy_bytes() == 2 * SIZE
    index.close()


def test_a_copy_in_use_is_kept_and_one_the_node_now_owns_becomes_its_own(tmp_path: Path) -> None:
    store, index = BlobStore(tmp_path), Index(tmp_path / "index")
    now = time.time()
    owned_now = put(store, index, "owned now", now - 3600, copy=True)
    hot = put(store, index, "hot", now, copy=True)
    result = trim_copies(store, index, 0, lambda d: d == owned_now, set(), None, now - 4)
    assert result.evicted == 0
    assert store.size(owned_now) == SIZE and store.size(hot) == SIZE
    assert not index.is_copy(owned_now) and index.copy_bytes() == SIZE  # only `hot` now
    index.close()


def test_pinned_copies_stay_and_a_removed_copy_leaves_the_total(tmp_path: Path) -> None:
    store, index = BlobStore(tmp_path), Index(tmp_path / "index")
    now = time.time()
    pinned = put(store, index, "pinned", now - 3600, copy=True)
    other = put(store, index, "other", now - 3600, copy=True)
    trim_copies(store, index, 0, lambda d: False, {pinned}, None, now - 4)
    assert store.size(pinned) == SIZE and store.size(other) is None
    assert index.copy_bytes() == SIZE
    index.remove_entry(pinned)
    assert index.copy_bytes() == 0
    index.close()
