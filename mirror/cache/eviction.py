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
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Entry, Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import TAG_MATCH_SECONDS, Config, SyncConfig
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import referenced_blobs
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.routing import parse_image

log = logging.getLogger("mirror.eviction")

LOW_SHARE = 0.9  # an upstream over its max_size share is evicted down to this part of it


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
        try:
            ref = parse_image(pin, upstreams)
        except RegistryError:  # e.g. recorded before its upstream was removed: pins nothing
            continue
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
    return _evict_lru(store, index, list(index.entries()), index.total_bytes(), target,
                      pinned, on_evict, in_use_since, "evicted")


def trim_copies(store: BlobStore, index: Index, budget: int, owns: Callable[[Digest], bool],
                pinned: set[Digest], on_evict: Callable[[Digest], None] | None,
                in_use_since: float) -> EvictionResult:
    """Delete least-recently-used relay copies (blobs relayed from the node owning them,
    Index.mark_copy) until they hold at most `budget` bytes, sparing pins, copies in use
    and blobs this node owns now (the ring changed: they are its own)."""
    index.flush()
    copies = [e for e in index.entries() if e.kind == "blob" and index.is_copy(e.digest)]
    for entry in [e for e in copies if owns(e.digest)]:
        index.unmark_copy(entry.digest)
        copies.remove(entry)
    return _evict_lru(store, index, copies, sum(e.size for e in copies), budget, pinned,
                      on_evict, in_use_since, "relay copies trimmed")


def _evict_lru(store: BlobStore, index: Index, entries: list[Entry], total: int, target: int,
               pinned: set[Digest], on_evict: Callable[[Digest], None] | None,
               in_use_since: float | None, what: str) -> EvictionResult:
    evicted = freed = skipped = 0
    if total <= target:
        return EvictionResult(0, 0, total, 0)
    for entry in sorted(entries, key=lambda e: e.last_access):
        if total <= target:
            break
        if in_use_since is not None and entry.last_access >= in_use_since:
            # a copy in use is a hot one, kept on purpose; the store in use is a problem
            (log.debug if what != "evicted" else log.warning)(
                f"{what}: stopped short, everything left is in use", extra={
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
    if evicted or what == "evicted":  # hot copies kept is the normal case, not news
        log.info(what, extra={"entries": evicted, "bytes": freed, "total_after": total,
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
        return evict(store, index, config.cache.low_watermark, _pinned(config, store, index),
                     on_evict, _in_use_since())


def trim_relay_copies(config: Config, store: BlobStore, index: Index, budget: int,
                      owns: Callable[[Digest], bool],
                      on_evict: Callable[[Digest], None] | None = None
                      ) -> EvictionResult | None:
    """Relay copies down to `budget` bytes (trim_copies); None as evict_to_watermark."""
    with try_exclusive(str(store.lock_path("evict"))) as mine:
        if not mine:
            return None
        return trim_copies(store, index, budget, owns, _pinned(config, store, index),
                           on_evict, _in_use_since())


def enforce_shares(config: Config, store: BlobStore, index: Index,
                   on_evict: Callable[[Digest], None] | None = None, now: float | None = None
                   ) -> list[EvictionResult] | None:
    """Each upstream's own bounds: its content beyond its `max_size` share goes, least
    recently used first, down to LOW_SHARE of it; its content unpulled for `max_unused` goes
    even under every size bound. Pins and content in use stay. None when another process
    holds the evict lock."""
    bounded = [u for u in config.upstreams if u.max_size is not None or u.max_unused]
    if not bounded:
        return []
    with try_exclusive(str(store.lock_path("evict"))) as mine:
        if not mine:
            return None
        index.flush()
        pinned = _pinned(config, store, index)
        in_use = _in_use_since()
        now = time.time() if now is None else now
        results = []
        for u in bounded:
            total = index.upstream_total(u.name)
            stale = [] if u.max_unused is None else [
                e for e in _entries_of(index, u.name) if e.last_access < now - u.max_unused]
            if stale:
                results.append(_evict_lru(store, index, stale, sum(e.size for e in stale), 0,
                                          pinned, on_evict, in_use,
                                          f"unused past {u.name}'s max_unused: evicted"))
                total = index.upstream_total(u.name)
            if u.max_size is not None and total > u.max_size:
                results.append(_evict_lru(store, index, list(_entries_of(index, u.name)),
                                          total, int(u.max_size * LOW_SHARE), pinned,
                                          on_evict, in_use, f"over {u.name}'s max_size: "
                                          "evicted"))
        return results


def pins_over_bounds(config: Config, store: BlobStore, index: Index) -> list[str]:
    """What the pins alone hold beyond a bound (they cannot be evicted: say so)."""
    pinned = _pinned(config, store, index)
    sizes = {d: store.size(d) or 0 for d in pinned}
    found = []
    if (total := sum(sizes.values())) > config.cache.max_size:
        found.append(f"pinned images hold {total} bytes, more than [cache] max_size "
                     f"({config.cache.max_size}): the cache cannot get under it")
    for u in config.upstreams:
        share = sum(n for d, n in sizes.items() if index.upstream_of(d) == u.name)
        if u.max_size is not None and share > u.max_size:
            found.append(f"pinned images of {u.name} hold {share} bytes, more than its "
                         f"max_size ({u.max_size})")
    return found


def _entries_of(index: Index, upstream: str) -> Iterable[Entry]:
    return (e for e in index.entries() if index.upstream_of(e.digest) == upstream)


def shares_due(config: Config, index: Index) -> bool:
    """Whether an upstream is over its share (cheap: kept totals)."""
    return any(u.max_size is not None and index.upstream_total(u.name) > u.max_size
               for u in config.upstreams)


def _pinned(config: Config, store: BlobStore, index: Index) -> set[Digest]:
    return pinned_digests(pins(config, index), [u.name for u in config.upstreams], store, index)


def pins(config: Config, index: Index) -> list[str]:
    """`[cache] pin`, the pins admins made in the cache browser, and the tags the `pin = true`
    sync rules select, each also by the digest the rule last cached whole for it (kept while
    the tag moves on and the new image downloads)."""
    synced = [pin for rule in config.syncs
              for image, digest in rule_pins(rule, index).items()
              for pin in (image, f"{image.rpartition(':')[0]}@{digest}")]
    return [*config.cache.pin, *index.runtime_pins(), *synced]


def rule_pins(rule: SyncConfig, index: Index) -> dict[str, str]:
    """What a sync rule pins: of the images its runs recorded (`upstream/repository:tag` →
    digest), those the rule as configured now still selects. A reload narrowing it unpins
    at once, not at its next run (which may be an interval away, or fail); pin = false pins
    nothing."""
    if not rule.pin:
        return {}
    return {image: digest for image, digest in index.synced(rule.name).items()
            if selects(rule, image)}


def selects(rule: SyncConfig, image: str) -> bool:
    """Whether `rule` selects `upstream/repository:tag` (its upstream, a repository pattern
    and the tags regex). A regex too slow to say (pull/sync.py fails such a run) keeps it:
    eviction is not undone."""
    if not image.startswith(f"{rule.upstream}/"):
        return False
    repository, _, tag = image[len(rule.upstream) + 1:].rpartition(":")
    if not any(p.matches(repository) for p in rule.repositories):
        return False
    try:
        return rule.tags.search(tag, timeout=TAG_MATCH_SECONDS) is not None
    except TimeoutError:
        return True


def _in_use_since() -> float:
    # Every worker writes its access times to the index at least every ACCESS_FLUSH_SECONDS, so
    # an entry any worker served lately has a last access within twice that: in use.
    return time.time() - 2 * ACCESS_FLUSH_SECONDS
