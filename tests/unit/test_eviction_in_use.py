"""Eviction never removes what any worker served lately (issue 10, item 12; found by the
soak: with eviction running every pass, hot manifests were evicted 751 times in 2 minutes,
because another worker's last accesses were not yet in the index)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from mirror.cache.eviction import evict
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Index
from mirror.cache.store import BlobStore
from mirror.oci.reference import parse_digest


def _put(store: BlobStore, index: Index, data: bytes, last_access: float) -> str:
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    store.put_bytes(digest, data)
    index.add_entry(digest, len(data), "blob", last_access=last_access)
    return str(digest)


def test_entries_accessed_since_the_window_are_spared(tmp_path: Path) -> None:
    store, index = BlobStore(tmp_path), Index(tmp_path / "index")
    now = time.time()
    old = [_put(store, index, f"old {i}".encode() * 100, now - 3600 + i) for i in range(5)]
    recent = [_put(store, index, f"hot {i}".encode() * 100, now - 1) for i in range(5)]
    result = evict(store, index, 0, set(), in_use_since=now - 2 * ACCESS_FLUSH_SECONDS)
    assert result.evicted == len(old)
    assert all(store.size(parse_digest(d)) is None for d in old)
    assert all(store.size(parse_digest(d)) is not None for d in recent)
    # without a window (`mirror gc` to zero, the tests' helpers) everything goes
    evict(store, index, 0, set())
    assert all(store.size(parse_digest(d)) is None for d in recent)
    index.close()
