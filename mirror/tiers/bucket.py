"""The bucket of an S3-compatible object store as the second storage tier (aiobotocore: the
S3 client on aiohttp, the mirror's own HTTP stack, with the AWS credential chain).

Objects are verified blobs only, under `<prefix>blobs/sha256/<2 hex>/<hex>`. A blob is
written whole or not at all: small ones with one PUT, large ones with a multipart upload
completed only after the bytes sent hashed to the digest; an upload that fails is aborted.
Uploads this cache dir started and never finished (a kill -9) are recorded in the index and
aborted when the mirror starts again; others' are aborted once STALE_UPLOAD old.

Nothing here raises for the object store being unreachable, slow or refusing: `open_blob`
and `size` answer None (a miss) and `upload` False, the failure is logged once per change of
state and counted (`mirror_bucket_errors_total{op}`), and for `HOLD` seconds after a failure
the bucket is not asked at all, so a dead endpoint costs a request nothing.

No byte is hashed on the event loop: the mirror hashes what it reads from the bucket and
what it uploads in a thread (mirror/pull/downloads.py `off_loop`), and botocore is told not
to hash request bodies itself (no flexible checksum unless an operation requires one, no
SigV4 payload SHA-256, which it computes in the loop on an http:// endpoint: 22-35 ms of a
16 MiB part). The body's integrity is the Content-MD5 the mirror computes in the same thread
pass and the store checks; the signature covers that header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from mirror import metrics
from mirror.cache.store import BlobStore
from mirror.config import S3Config
from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.pull.downloads import OFF_LOOP_BYTES, hash_update, off_loop
from mirror.tiers.s3client import open_client

log = logging.getLogger("mirror.bucket")

HOLD = 10.0  # seconds the bucket is left alone after a failure
REDIRECT_SECONDS = 300  # a presigned URL's life (clients follow it at once)
STALE_UPLOAD = 3600.0  # another process's multipart upload this old is abandoned
CHUNK = 1 << 20
_MISSING = ("404", "NoSuchKey", "NotFound")
FAILURES = (BotoCoreError, ClientError, OSError, asyncio.TimeoutError)


class BucketBlob:
    """A blob body read from the bucket (a BlobStream, pull/source.py)."""

    def __init__(self, bucket: Bucket, digest: Digest, response: dict[str, Any],
                 offset: int) -> None:
        self.bucket, self.digest = bucket, digest
        self._body: Any = response["Body"]
        self.total: int | None = offset + int(response["ContentLength"])
        self.rejected = False

    async def read(self) -> bytes:
        try:
            assert self._body is not None, "read after close"
            chunk: bytes = await self._body.raw_stream.content.readany()
        except FAILURES as exc:
            raise ConnectionError(f"bucket {self.bucket.config.bucket}: {exc}") from exc
        metrics.BUCKET_BYTES.labels("in").inc(len(chunk))
        return chunk

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
            self.bucket._busy(self.digest, -1)

    def reject(self) -> None:
        """The bytes did not match the digest: the object goes (the next fill refetches)."""
        self.rejected = True
        metrics.BUCKET_CORRUPT.inc()
        log.error("bucket object does not match its digest: deleting it", extra={
            "digest": str(self.digest), "key": self.bucket.key(self.digest)})
        self.bucket.spawn(self.bucket.delete(self.digest))


class Bucket:
    def __init__(self, config: S3Config, client: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.client = client  # an aiobotocore S3 client
        self.clock = clock
        self._held_until = 0.0
        self._healthy = True
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        # What this process learns of the bucket's contents, for its index (runtime.py):
        # an object there (size; read, uploaded or found: a use) and an object gone.
        self.on_present: Callable[[Digest, int], None] = lambda _digest, _size: None
        self.on_gone: Callable[[Digest], None] = lambda _digest: None
        # Digests this process is reading from or writing to the bucket: a trim spares them.
        self.busy: dict[Digest, int] = {}

    def _busy(self, digest: Digest, n: int) -> None:
        count = self.busy.get(digest, 0) + n
        if count > 0:
            self.busy[digest] = count
        else:
            self.busy.pop(digest, None)

    def key(self, digest: Digest) -> str:
        return f"{self.config.prefix}blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    @property
    def usable(self) -> bool:
        return self.clock() >= self._held_until

    # reads -------------------------------------------------------------------------------
    async def open_blob(self, digest: Digest, offset: int, use: bool = True
                        ) -> BucketBlob | None:
        """The object's bytes from `offset`, or None (absent, or the bucket unusable); `use`:
        a read that counts as a use of the object (not a verify's)."""
        if not self.usable:
            return None
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = await self.client.get_object(Bucket=self.config.bucket,
                                                    Key=self.key(digest), **extra)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                self._ok()
                self.on_gone(digest)
                return None
            self._failed("get", exc)
            return None
        except FAILURES as exc:
            self._failed("get", exc)
            return None
        self._ok()
        blob = BucketBlob(self, digest, response, offset)
        if blob.total is not None and use:
            self.on_present(digest, blob.total)
        self._busy(digest, 1)
        return blob

    async def size(self, digest: Digest) -> int | None:
        if not self.usable:
            return None
        try:
            head = await self.client.head_object(Bucket=self.config.bucket,
                                                 Key=self.key(digest))
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                self._failed("head", exc)
            else:
                self.on_gone(digest)
            return None
        except FAILURES as exc:
            self._failed("head", exc)
            return None
        self._ok()
        size = int(head["ContentLength"])
        self.on_present(digest, size)
        return size

    async def presigned(self, digest: Digest) -> str | None:
        """A URL the object can be fetched from without credentials for REDIRECT_SECONDS,
        if the bucket holds it; else None."""
        if await self.size(digest) is None:
            return None
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": self.key(digest)},
            ExpiresIn=REDIRECT_SECONDS)
        return url

    async def check(self) -> str | None:
        """None if the bucket answers, else what is wrong (for /readyz and the start line)."""
        try:
            await self.client.head_bucket(Bucket=self.config.bucket)
        except FAILURES as exc:
            self._failed("head_bucket", exc)
            return self.last_error
        self._ok()
        return None

    # writes ------------------------------------------------------------------------------
    async def upload(self, digest: Digest, fd: int, size: int,
                     record: Callable[[str, bool], None] = lambda _id, _active: None) -> bool:
        """Write the stored blob open at `fd` under its key; True once it is there. `record`
        is told a multipart upload's id when it starts (True) and ends (False), so a kill -9
        leaves a trace for the next start."""
        if not self.usable:
            return False
        self._busy(digest, 1)
        try:
            if size <= self.config.part_size:
                hasher = digest.hasher()
                data, md5 = await off_loop(_read_hashed, fd, size, 0, hasher)
                if hasher.hexdigest() != digest.hex:
                    raise ValueError("the stored file does not match its digest")
                await self.client.put_object(Bucket=self.config.bucket, Key=self.key(digest),
                                             Body=data, ContentLength=size, ContentMD5=md5)
            else:
                await self._multipart(digest, fd, size, record)
        except ValueError as exc:
            log.error("not uploaded", extra={"digest": str(digest), "error": str(exc)})
            return False
        except FAILURES as exc:
            self._failed("put", exc)
            return False
        finally:
            self._busy(digest, -1)
        self._ok()
        self.on_present(digest, size)
        metrics.BUCKET_BYTES.labels("out").inc(size)
        return True

    async def _multipart(self, digest: Digest, fd: int, size: int,
                         record: Callable[[str, bool], None]) -> None:
        key = self.key(digest)
        started = await self.client.create_multipart_upload(Bucket=self.config.bucket, Key=key)
        upload_id = started["UploadId"]
        record(upload_id, True)
        try:
            parts, hasher = [], digest.hasher()
            for number, offset in enumerate(range(0, size, self.config.part_size), start=1):
                length = min(self.config.part_size, size - offset)
                data, md5 = await off_loop(_read_hashed, fd, length, offset, hasher)
                part = await self.client.upload_part(
                    Bucket=self.config.bucket, Key=key, UploadId=upload_id,
                    PartNumber=number, Body=data, ContentLength=length, ContentMD5=md5)
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            if hasher.hexdigest() != digest.hex:
                raise ValueError("the stored file does not match its digest")
            await self.client.complete_multipart_upload(
                Bucket=self.config.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(*FAILURES):
                await self.client.abort_multipart_upload(Bucket=self.config.bucket, Key=key,
                                                         UploadId=upload_id)
            raise
        finally:
            record(upload_id, False)

    async def delete(self, digest: Digest) -> bool:
        """True once the object is gone (it may have been gone already)."""
        try:
            await self.client.delete_object(Bucket=self.config.bucket, Key=self.key(digest))
        except FAILURES as exc:
            self._failed("delete", exc)
            return False
        self._ok()
        self.on_gone(digest)
        return True

    async def listing(self) -> AsyncIterator[tuple[Digest, int, float]]:
        """Every blob object under the prefix as (digest, size, LastModified in wall-clock
        seconds), ListObjectsV2 a page at a time; other keys are skipped. Raises FAILURES."""
        start = f"{self.config.prefix}blobs/"
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.config.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    digest = _digest_of(item["Key"][len(start):])
                    if digest is not None:
                        yield digest, int(item["Size"]), item["LastModified"].timestamp()
        except FAILURES as exc:
            self._failed("list", exc)
            raise
        self._ok()

    async def copy_to(self, store: BlobStore, digest: Digest) -> bool:
        """Store the object in the local dir, verified as it streams (`mirror export` of a
        blob only the bucket holds); False when it is absent, unreadable or wrong (deleted)."""
        body = await self.open_blob(digest, 0)
        if body is None:
            return False
        tmp = store.tmp_dir / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.bucket"
        hasher = digest.hasher()
        try:
            with open(tmp, "wb") as f:  # noqa: ASYNC230 (opening is cheap; the bytes go off the loop)
                while chunk := await body.read():
                    if len(chunk) >= OFF_LOOP_BYTES:
                        await off_loop(_hash_write, hasher, f, chunk)
                    else:
                        _hash_write(hasher, f, chunk)
                await off_loop(_flush_sync, f)
            if hasher.hexdigest() != digest.hex:
                body.reject()
                return False
            store.commit(tmp, digest)
        except ConnectionError:
            return False
        finally:
            body.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return True

    async def matches(self, digest: Digest) -> bool | None:
        """Whether the object's bytes hash to its digest, read a chunk at a time (flat
        memory); None when it is absent or cannot be read."""
        body = await self.open_blob(digest, 0, use=False)
        if body is None:
            return None
        hasher = digest.hasher()
        try:
            while chunk := await body.read():
                await hash_update(hasher, chunk)
        except ConnectionError:
            return None
        finally:
            body.close()
        return hasher.hexdigest() == digest.hex

    async def abort_stale_uploads(self, ours: set[str]) -> int:
        """Abort the multipart uploads under the prefix that this cache dir left (`ours`,
        from the index) or that are STALE_UPLOAD old; the number aborted."""
        aborted = 0
        try:
            listing = await self.client.list_multipart_uploads(
                Bucket=self.config.bucket, Prefix=self.config.prefix)
            now = datetime.now(UTC)
            for upload in listing.get("Uploads", []):
                initiated = upload.get("Initiated") or now
                stale = (now - initiated).total_seconds() >= STALE_UPLOAD
                if upload["UploadId"] in ours or stale:
                    await self.client.abort_multipart_upload(
                        Bucket=self.config.bucket, Key=upload["Key"],
                        UploadId=upload["UploadId"])
                    aborted += 1
        except FAILURES as exc:
            self._failed("abort_uploads", exc)
        return aborted

    # state -------------------------------------------------------------------------------
    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _failed(self, op: str, exc: BaseException) -> None:
        metrics.BUCKET_ERRORS.labels(op).inc()
        metrics.BUCKET_UP.set(0)
        self.last_error = f"{op}: {exc}" if str(exc) else f"{op}: {type(exc).__name__}"
        self._held_until = self.clock() + HOLD
        if self._healthy:
            log.warning("object store unusable: serving from the local tier and the upstream",
                        extra={"bucket": self.config.bucket, "endpoint": self.config.endpoint,
                               "error": self.last_error, "retry_in_s": HOLD})
        self._healthy = False

    def _ok(self) -> None:
        if not self._healthy:
            log.info("object store usable again", extra={"bucket": self.config.bucket})
        self._healthy, self.last_error = True, None
        metrics.BUCKET_UP.set(1)


def _read_hashed(fd: int, length: int, offset: int, hasher: Any) -> tuple[io.BytesIO, str]:
    """`length` bytes of `fd` from `offset`, added to `hasher`, as a request body, and their
    Content-MD5 (run in a thread: it hashes every byte twice). The body is a BytesIO holding
    the only reference to the bytes: botocore would wrap bytes in one whose buffer (shared
    with the bytes) aiohttp's payload copies whole in the loop (`getbuffer`: 37 ms for
    64 MiB); unshared, nothing is copied."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ValueError("the stored file is shorter than its size")
    hasher.update(data)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
    body = io.BytesIO(data)
    del data  # the BytesIO's buffer is the bytes object itself, now referenced only there
    return body, md5


def _hash_write(hasher: Any, f: IO[bytes], chunk: bytes) -> None:
    hasher.update(chunk)
    f.write(chunk)


def _flush_sync(f: IO[bytes]) -> None:
    f.flush()
    os.fdatasync(f.fileno())


def _digest_of(rest: str) -> Digest | None:
    """`sha256/ab/abcd…` (a key past `<prefix>blobs/`) as a digest, or None."""
    parts = rest.split("/")
    if len(parts) != 3 or parts[1] != parts[2][:2]:
        return None
    try:
        return parse_digest(f"{parts[0]}:{parts[2]}")
    except RegistryError:
        return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@asynccontextmanager
async def open_bucket(config: S3Config) -> AsyncIterator[Bucket]:
    """A Bucket with its client, closed on exit."""
    async with open_client(config) as client:
        yield Bucket(config, client)
