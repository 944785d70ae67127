"""Keeping the store under `max_size`: least-recently-used content goes first, down to the low
watermark; pinned images (their manifests and every blob they reference) never go.

Content being downloaded lives in tmp/ and is not in the index, so it is never a candidate.
A blob a client is streaming from the store may be unlinked: its open fd keeps the bytes.
One evictor runs at a time across worker processes (`locks.try_exclusive` on `evict.lock`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mirror import metrics
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import referenced_blobs
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.routing import parse_image

log = logging.getLogger("mirror.eviction")


@dataclass(frozen=True)
class EvictionResult:
    evicted: int
    freed: int
    total_after: int
    skipped_pinned: int


def image_digests(store: BlobStore, root: Digest) -> set[Digest]:
    """A manifest's digest with every manifest and blob it references that is stored."""
    found: set[Digest] = set()
    pending = [root]
    while pending:
        digest = pending.pop()
        if digest in found:
            continue
        found.add(digest)
        data = store.read_bytes(digest)
        if data is None:
            continue
        blobs, children = referenced_blobs(data)
        for value in blobs:
            with contextlib.suppress(RegistryError):
                found.add(parse_digest(value))
        for value in children:
            with contextlib.suppress(RegistryError):
                pending.append(parse_digest(value))
    return found


def pinned_digests(pins: Iterable[str], upstreams: list[str], store: BlobStore,
                   index: Index) -> set[Digest]:
    pinned: set[Digest] = set()
    for pin in pins:
        ref = parse_image(pin, upstreams)
        if isinstance(ref.reference, Digest):
            root: Digest | None = ref.reference
        else:
            entry = index.get_tag(ref.upstream, ref.repository, ref.reference)
            root = parse_digest(entry.digest) if entry else None
        if root is not None:
            pinned |= image_digests(store, root)
    return pinned


def evict(store: BlobStore, index: Index, target: int, pinned: set[Digest],
          on_evict: Callable[[Digest], None] | None = None,
          in_use_since: float | None = None) -> EvictionResult:
    """Delete least-recently-used entries until the store holds at most `target` bytes,
    sparing pins and whatever was accessed since `in_use_since` (wall-clock seconds)."""
    index.flush()
    total = index.total_bytes()
    evicted = freed = skipped = 0
    if total <= target:
        return EvictionResult(0, 0, total, 0)
    for entry in sorted(index.entries(), key=lambda e: e.last_access):
        if total <= target:
            break
        if in_use_since is not None and entry.last_access >= in_use_since:
            log.warning("eviction stopped short: everything left is in use", extra={
                "total": total, "target": target})
            break
        if entry.digest in pinned:
            skipped += 1
            continue
        try:
            size = store.delete(entry.digest)
        except OSError as exc:  # a read-only cache dir: nothing can be evicted now
            log.error("eviction stopped: cannot delete from the cache dir", extra={
                "digest": str(entry.digest), "error": str(exc)})
            break
        index.remove_entry(entry.digest)
        if on_evict is not None:
            on_evict(entry.digest)
        total -= entry.size
        freed += size
        evicted += 1
        metrics.EVICTIONS.labels(entry.kind).inc()
        metrics.EVICTED_BYTES.inc(size)
    log.info("evicted", extra={"entries": evicted, "bytes": freed, "total_after": total,
                               "target": target, "pinned_kept": skipped})
    return EvictionResult(evicted, freed, total, skipped)


def evict_to_watermark(config: Config, store: BlobStore, index: Index,
                       on_evict: Callable[[Digest], None] | None = None
                       ) -> EvictionResult | None:
    """Evict down to `[cache] low_watermark`, sparing pins; None when another process holds
    the evict lock (it is doing the same work)."""
    with try_exclusive(str(store.lock_path("evict"))) as mine:
        if not mine:
            return None
        pinned = pinned_digests(config.cache.pin, [u.name for u in config.upstreams], store,
                                index)
        # Every worker writes its access times to the index at least every ACCESS_FLUSH_SECONDS, so
        # an entry any worker served lately has a last access within twice that: in use.
        in_use_since = time.time() - 2 * ACCESS_FLUSH_SECONDS
        return evict(store, index, config.cache.low_watermark, pinned, on_evict, in_use_since)
