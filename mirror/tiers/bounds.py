"""The bucket's bounds (`[s3] max_size`, `max_unused`), kept by the mirror with access times
it records itself (S3 keeps none), and the writing behind again of what a restart left out.

The index (cache/index.py) holds each bucket object's size and last access as this node saw
it: added when an upload completes or the object is found there, touched (batched, as the
local entries are) when it is read from the bucket and when a local hit serves it. A node
whose index does not hold this bucket's listing (a new node sharing a bucket, a lost index,
another prefix) lists the prefix (ListObjectsV2) and starts from LastModified.

A trim, in one worker at a time (`bucket.lock`), deletes what no one used for `max_unused`,
then least recently used objects down to LOW_WATERMARK of `max_size`; never a pinned image's
blob, one this process is reading or uploading, nor one used in the last moments by any
worker. Nodes sharing a bucket each keep their own times, so a node may delete an object
another node still uses: that costs the other a refetch from its upstream, never wrong
bytes (every read from the bucket is verified).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mirror import metrics
from mirror.cache.eviction import pinned_digests, pins
from mirror.cache.index import ACCESS_FLUSH_SECONDS, Entry, Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import Config, S3Config
from mirror.oci.reference import Digest

if TYPE_CHECKING:  # aiobotocore is imported only with [s3] (runtime.py opens the bucket)
    from mirror.tiers.bucket import Bucket

log = logging.getLogger("mirror.bucket")

LOW_WATERMARK = 0.9  # a trim over max_size goes down to this share of it
TRIM_SECONDS = 5.0  # the bounds are looked at at most this often
RESCAN_SECONDS = 300.0  # local blobs the bucket lacks are looked for this often
RESCAN_BATCH = 200  # at most this many queued per look (the queue holds 1000)


def identity(config: S3Config) -> str:
    return f"{config.endpoint} {config.bucket} {config.prefix}"


@dataclass
class TrimResult:
    deleted: list[Digest] = field(default_factory=list)
    freed: int = 0
    unused: int = 0  # of `deleted`, for max_unused
    pinned_kept: int = 0
    failed: int = 0
    total_after: int = 0


def plan_trim(objects: Iterable[Entry], total: int, max_size: int | None,
              max_unused: float | None, spared: Container[Digest], pinned: Container[Digest],
              now: float, in_use_since: float) -> tuple[list[Entry], int, int]:
    """What a trim deletes, oldest use first: every object unused for `max_unused`, then
    least recently used ones until the rest fit LOW_WATERMARK of `max_size`. Pins, `spared`
    and objects used since `in_use_since` stay. Returns (to delete, of them unused, pinned
    kept)."""
    target = None if max_size is None else int(max_size * LOW_WATERMARK)
    over = max_size is not None and total > max_size
    chosen: list[Entry] = []
    unused = kept = 0
    for entry in sorted(objects, key=lambda e: e.last_access):
        stale = max_unused is not None and entry.last_access < now - max_unused
        if not stale and not (over and target is not None and total > target):
            break  # sorted: everything after is newer and the size fits
        if entry.last_access >= in_use_since or entry.digest in spared:
            continue
        if entry.digest in pinned:
            kept += 1
            continue
        chosen.append(entry)
        unused += stale
        total -= entry.size
    return chosen, unused, kept


class BucketKeeper:
    """The bucket's part of the maintenance (Maintenance.extra calls `tick`): the index of
    its objects rebuilt when unknown, its bounds, and local blobs it lacks queued again."""

    def __init__(self, config: Config, store: BlobStore, index: Index, bucket: Bucket,
                 enqueue: Callable[[Digest, int], bool] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        assert config.s3 is not None
        self.config, self.s3 = config, config.s3
        self.store, self.index, self.bucket = store, index, bucket
        self.enqueue = enqueue  # WriteBehind.requeue: False when its queue is full
        self.clock = clock
        self._trimmed_at = float("-inf")
        self._scanned_at = float("-inf")
        # No object can be unused for max_unused before this (wall clock): until then a trim
        # is only due over max_size, so a large bucket's index is not read every few seconds.
        self._stale_from = float("-inf")

    async def tick(self) -> None:
        if not self.bucket.usable:
            return
        now = time.monotonic()
        if now - self._trimmed_at >= TRIM_SECONDS and self._due():
            self._trimmed_at = now
            await self.trim()
        if self.enqueue is not None and now - self._scanned_at >= RESCAN_SECONDS \
                and self.index.bucket_known(identity(self.s3)) \
                and self.index.entries_complete():
            self._scanned_at = now
            if self.write_missing() >= RESCAN_BATCH:  # more to come: look again soon
                self._scanned_at -= RESCAN_SECONDS - 10 * TRIM_SECONDS

    def _due(self) -> bool:
        if not self.index.bucket_known(identity(self.s3)):
            return True
        if self.s3.max_size is not None and self.index.bucket_total() > self.s3.max_size:
            return True
        return self.s3.max_unused is not None and self.clock() >= self._stale_from

    async def ensure_index(self) -> bool:
        """The index holds this bucket's objects (listed now if it did not); False if the
        listing failed."""
        if self.index.bucket_known(identity(self.s3)):
            return True
        from mirror.tiers.bucket import FAILURES  # loaded already: self.bucket exists
        listed = []
        try:
            async for item in self.bucket.listing():
                listed.append(item)
        except FAILURES as exc:
            log.warning("bucket listing failed: its bounds are kept once it answers",
                        extra={"bucket": self.s3.bucket, "error": str(exc)})
            return False
        await asyncio.to_thread(self.index.rebuild_bucket, iter(listed), identity(self.s3))
        return True

    async def trim(self) -> TrimResult | None:
        """Delete down to the bounds; None when another worker holds the lock or the bucket
        cannot be listed."""
        with try_exclusive(str(self.store.lock_path("bucket"))) as mine:
            if not mine:
                return None
            if not await self.ensure_index():
                return None
            if self.s3.max_size is None and self.s3.max_unused is None:
                return TrimResult(total_after=self.index.bucket_total())
            self.index.flush()
            now = self.clock()
            objects = list(self.index.bucket_objects())
            total = self.index.bucket_total()
            pinned = await asyncio.to_thread(self._pinned) if objects else set()
            chosen, unused, kept = plan_trim(
                objects, total, self.s3.max_size, self.s3.max_unused, self.bucket.busy,
                pinned, now, now - 2 * ACCESS_FLUSH_SECONDS)
            result = TrimResult(pinned_kept=kept)
            for entry in chosen:
                if entry.digest in self.bucket.busy:  # a read or upload began meanwhile
                    continue
                if await self.bucket.delete(entry.digest):
                    self.index.bucket_remove(entry.digest, trimmed=True)
                    metrics.BUCKET_DELETED.inc()
                    result.deleted.append(entry.digest)
                    result.freed += entry.size
                else:
                    result.failed += 1
                    break  # the bucket is unusable now: the next tick goes on
            result.unused = min(unused, len(result.deleted))
            gone = set(result.deleted)
            # Accesses only move later, new objects come in new: the oldest left that may go
            # says when the next can be stale (a delete failed: as soon as the bucket answers).
            left = [e.last_access for e in objects if e.digest not in gone
                    and e.digest not in pinned] if not result.failed else []
            self._stale_from = (min(left, default=now) + self.s3.max_unused
                                if self.s3.max_unused is not None and not result.failed
                                else float("-inf"))
            result.total_after = self.index.bucket_total()
            if result.deleted or result.failed:
                log.info("bucket trimmed", extra={
                    "objects": len(result.deleted), "bytes": result.freed,
                    "unused": result.unused, "pinned_kept": kept, "failed": result.failed,
                    "total_after": result.total_after, "max_size": self.s3.max_size})
            return result

    def _pinned(self) -> set[Digest]:
        names = [u.name for u in self.config.upstreams]
        return pinned_digests(pins(self.config, self.index), names, self.store, self.index)

    def write_missing(self) -> int:
        """Queue local blobs the bucket index lacks (a kill -9 lost the write-behind queue,
        or it was full), but not those a trim deleted (they would go up and be deleted again
        and again); the write-behind HEADs each first. One worker at a time."""
        assert self.enqueue is not None
        queued = 0
        with try_exclusive(str(self.store.lock_path("bucket-rescan"))) as mine:
            if not mine:
                return 0
            for entry in self.index.entries():
                if queued >= RESCAN_BATCH:
                    break
                if entry.kind != "blob" or self.index.bucket_has(entry.digest) \
                        or self.index.bucket_trimmed(entry.digest) \
                        or entry.digest in self.bucket.busy:
                    continue
                if not self.enqueue(entry.digest, entry.size):
                    break
                queued += 1
        if queued:
            log.info("local blobs the bucket lacks queued for writing behind", extra={
                "blobs": queued})
        return queued


@dataclass
class BucketVerifyReport:
    checked: int = 0
    bytes: int = 0
    bad: list[Digest] = field(default_factory=list)
    unreadable: int = 0


async def verify_bucket(bucket: Bucket) -> BucketVerifyReport:
    """Rehash every blob object under the prefix, streamed; delete those whose bytes do not
    match their key (the index forgets them through Bucket.on_gone). Raises FAILURES when the
    bucket cannot be listed."""
    report = BucketVerifyReport()
    listed = [item async for item in bucket.listing()]
    for digest, size, _ in listed:
        ok = await bucket.matches(digest)
        if ok is None:
            report.unreadable += 1
            continue
        if not ok:
            report.bad.append(digest)
            await bucket.delete(digest)
        report.checked += 1
        report.bytes += size
    return report
