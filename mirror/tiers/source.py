"""The bucket as a tier of a Source (pull/source.py): a blob the local dir lacks is read from
the bucket when it is there, else from the upstream; a blob committed to the local dir is
written behind into the bucket.

    proxy ─ miss ─▶ Downloads (single-flight) ─▶ TieredSource.open_blob
                        bucket has it ──▶ GET <prefix>blobs/... (verified by the engine;
                                          wrong bytes: BucketBlob.reject deletes the object)
                        else          ──▶ the upstream's Source
    store.on_commit ─▶ WriteBehind.committed ─▶ a bounded queue ─▶ Bucket.upload

The download engine hashes the bucket's bytes exactly as the upstream's, so a corrupted
object is never served whole: the client's body is cut short, the object deleted, and the
retry refetches. Content of a private upstream is served from the bucket only once that
upstream confirmed the repository holds it, as for every other source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from mirror import metrics
from mirror.oci.reference import Digest
from mirror.pull.content import ContentStore
from mirror.pull.source import BlobStream, Source, SourceWrapper

if TYPE_CHECKING:  # aiobotocore is imported only with [s3] (runtime.py opens the bucket)
    from mirror.tiers.bucket import Bucket, BucketBlob

log = logging.getLogger("mirror.bucket")

QUEUE = 1000  # blobs waiting to be written behind; beyond that they are skipped (counted)
ATTEMPTS = 6  # a failed upload is tried again after RETRY_SECONDS * 2**n, then given up
RETRY_SECONDS = 2.0
UPLOADERS = 2  # concurrent uploads per worker (each holds one part in memory)


class TieredSource(SourceWrapper):
    def __init__(self, local: Source, bucket: Bucket,
                 from_bucket: dict[Digest, BucketBlob]) -> None:
        super().__init__(local)
        self.bucket = bucket
        # filled from the bucket (unless its bytes were rejected): nothing to write behind
        self.from_bucket = from_bucket

    async def open_blob(self, repository: str, digest: Digest, offset: int) -> BlobStream:
        body = await self.bucket.open_blob(digest, offset)
        if body is None:
            return await self.local.open_blob(repository, digest, offset)
        if self.local.private:
            try:
                await self.local.confirm(repository, digest, "blobs")
            except BaseException:
                body.close()
                raise
        metrics.BUCKET_HITS.inc()
        self.from_bucket[digest] = body
        return body

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        if not self.local.private and (size := await self.bucket.size(digest)) is not None:
            return size
        return await self.local.head_blob(repository, digest)


class WriteBehind:
    """Uploads blobs committed to the local dir, a few at a time, off the request path."""

    def __init__(self, bucket: Bucket, store: ContentStore, from_bucket: dict[Digest, BucketBlob],
                 record: Callable[[str, bool], None]) -> None:
        self.bucket, self.store, self.from_bucket = bucket, store, from_bucket
        self.record = record  # (upload id, started or ended): multipart uploads in progress
        self.queue: asyncio.Queue[tuple[Digest, int, int]] = asyncio.Queue(QUEUE)
        self._workers: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._workers = [asyncio.ensure_future(self._run()) for _ in range(UPLOADERS)]

    async def stop(self) -> None:
        for task in [*self._workers, *self._retries]:
            task.cancel()
        for task in [*self._workers, *self._retries]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def committed(self, digest: Digest, size: int, kind: str) -> None:
        """store.on_commit: a blob that did not come from the bucket is queued for it."""
        read = self.from_bucket.pop(digest, None)
        if kind != "blob" or (read is not None and not read.rejected):
            return
        self._enqueue(digest, size, 0)

    def requeue(self, digest: Digest, size: int) -> bool:
        """A local blob the bucket may lack (BucketKeeper.write_missing); False, and not
        counted as skipped, when the queue is full (it is looked for again later)."""
        try:
            self.queue.put_nowait((digest, size, 0))
        except asyncio.QueueFull:
            return False
        metrics.BUCKET_QUEUE.inc()
        return True

    def _enqueue(self, digest: Digest, size: int, attempt: int) -> None:
        try:
            self.queue.put_nowait((digest, size, attempt))
            metrics.BUCKET_QUEUE.inc()
        except asyncio.QueueFull:
            metrics.BUCKET_SKIPPED.inc()
            log.warning("write-behind queue full: blob not copied to the bucket", extra={
                "digest": str(digest), "queued": self.queue.qsize()})

    async def _run(self) -> None:
        while True:
            digest, size, attempt = await self.queue.get()
            metrics.BUCKET_QUEUE.dec()
            try:
                done = await self._upload(digest, size)
            except Exception:
                log.exception("write-behind failed", extra={"digest": str(digest)})
                done = False
            finally:
                self.queue.task_done()
            if not done:
                self._retry_later(digest, size, attempt + 1)

    def _retry_later(self, digest: Digest, size: int, attempt: int) -> None:
        if attempt >= ATTEMPTS:
            metrics.BUCKET_SKIPPED.inc()
            log.warning("write-behind given up: blob not copied to the bucket", extra={
                "digest": str(digest), "attempts": attempt})
            return

        async def later() -> None:
            await asyncio.sleep(RETRY_SECONDS * 2 ** (attempt - 1))
            self._enqueue(digest, size, attempt)
        task = asyncio.ensure_future(later())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _upload(self, digest: Digest, size: int) -> bool:
        """True when the bucket holds the blob now (or it is gone from the local dir)."""
        if await self.bucket.size(digest) == size:
            return True  # another node or worker wrote it
        fd = self.store.open_fd(digest)
        if fd is None:
            return True  # evicted meanwhile
        try:
            uploaded = await self.bucket.upload(digest, fd, size, self.record)
        finally:
            os.close(fd)
        if uploaded:
            metrics.BUCKET_UPLOADS.inc()
            log.info("written behind to the bucket", extra={
                "digest": str(digest), "bytes": size})
        return uploaded
