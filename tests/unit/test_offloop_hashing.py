"""No byte of a large chunk is hashed (or written) on the event loop (issue 13): the download
engine's fill (from the upstream or the bucket), the bucket's verify and copy, and the
bucket's uploads hash in a thread; tiny chunks stay on the loop (no thread hop for them).
A recording hasher stands in for hashlib's and says which thread each update ran in."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.store import BlobStore
from mirror.config import S3Config
from mirror.oci.reference import Digest, parse_digest
from mirror.pull.downloads import OFF_LOOP_BYTES, Downloads, State
from mirror.tiers.bucket import Bucket, open_bucket

MiB = 1024 * 1024
# large and tiny chunks, as a body's reads return them
CHUNKS = [MiB, 100, 3 * OFF_LOOP_BYTES, 10, OFF_LOOP_BYTES, OFF_LOOP_BYTES - 1, 2 * MiB, 7]


class RecordingHasher:
    """hashlib's hasher, noting (bytes, on the loop's thread?) of every update."""

    def __init__(self, inner: Any, log: list[tuple[int, bool]], loop_thread: int) -> None:
        self.inner, self.log, self.loop_thread = inner, log, loop_thread

    def update(self, data: bytes) -> None:
        self.log.append((len(data), threading.get_ident() == self.loop_thread))
        self.inner.update(data)

    def hexdigest(self) -> str:
        return str(self.inner.hexdigest())

    def copy(self) -> RecordingHasher:
        return RecordingHasher(self.inner.copy(), self.log, self.loop_thread)


@pytest.fixture
def updates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    log: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()  # the test's loop runs in this thread
    monkeypatch.setattr(Digest, "hasher", lambda self: RecordingHasher(
        hashlib.new(self.algorithm), log, loop_thread))
    return log


def assert_large_off_loop(log: list[tuple[int, bool]], total: int) -> None:
    assert sum(n for n, _ in log) >= total
    assert all(not on_loop for n, on_loop in log if n >= OFF_LOOP_BYTES), log
    assert all(on_loop for n, on_loop in log if n < OFF_LOOP_BYTES), log  # no hop for those


def blob(chunks: list[int]) -> tuple[list[bytes], bytes, Digest]:
    parts = [os.urandom(n) for n in chunks]
    data = b"".join(parts)
    return parts, data, parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


class ChunkStream:
    """A BlobStream (pull/source.py) returning the given chunks."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = list(parts)
        self.total: int | None = sum(len(p) for p in parts)
        self.rejected = False

    async def read(self) -> bytes:
        return self.parts.pop(0) if self.parts else b""

    def close(self) -> None:
        pass

    def reject(self) -> None:
        self.rejected = True


async def test_a_fill_writes_and_hashes_large_chunks_off_the_loop(
        tmp_path: Path, updates: list[tuple[int, bool]]) -> None:
    parts, data, digest = blob(CHUNKS)
    store = BlobStore(tmp_path)
    downloads = Downloads(store, finish_abandoned=True)

    async def fetch(offset: int) -> ChunkStream:
        assert offset == 0
        return ChunkStream(parts)

    download = downloads.start(digest, fetch, attempts=1)
    assert download is not None
    await download.wait_done()
    assert download.state is State.VERIFIED and download.written == len(data)
    assert store.read_bytes(digest) == data  # in order, whole
    assert_large_off_loop(updates, len(data))


class FakeBody:
    """aiobotocore's StreamingBody as BucketBlob reads it (raw_stream.content.readany)."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = list(parts)
        self.raw_stream = self
        self.content = self

    async def readany(self) -> bytes:
        return self.parts.pop(0) if self.parts else b""

    def close(self) -> None:
        pass


class FakeS3:
    """The S3 calls the bucket makes, recorded."""

    def __init__(self, parts: list[bytes] | None = None) -> None:
        self.parts = parts or []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def get_object(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("get_object", kw))
        return {"Body": FakeBody(self.parts), "ContentLength": sum(len(p) for p in self.parts)}

    async def put_object(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("put_object", kw))
        return {}

    async def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("create_multipart_upload", kw))
        return {"UploadId": "u1"}

    async def upload_part(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("upload_part", kw))
        return {"ETag": f'"{kw["PartNumber"]}"'}

    async def complete_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("complete_multipart_upload", kw))
        return {}

    async def delete_object(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("delete_object", kw))
        return {}


def bucket_with(client: FakeS3, part_size: int = 5 * MiB) -> Bucket:
    return Bucket(S3Config(endpoint="http://127.0.0.1:1", bucket="b", part_size=part_size),
                  client)


async def test_a_verify_and_a_copy_from_the_bucket_hash_large_chunks_off_the_loop(
        tmp_path: Path, updates: list[tuple[int, bool]]) -> None:
    parts, data, digest = blob(CHUNKS)
    assert await bucket_with(FakeS3(parts)).matches(digest) is True
    assert_large_off_loop(updates, len(data))
    updates.clear()
    store = BlobStore(tmp_path)
    assert await bucket_with(FakeS3(parts)).copy_to(store, digest) is True
    assert store.read_bytes(digest) == data
    assert_large_off_loop(updates, len(data))


def md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


@pytest.mark.parametrize("size", [3 * MiB, 12 * MiB + 5], ids=["put", "multipart"])
async def test_an_upload_hashes_off_the_loop_and_sends_each_body_with_its_content_md5(
        tmp_path: Path, updates: list[tuple[int, bool]], size: int) -> None:
    data = os.urandom(size)
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    path = tmp_path / "blob"
    path.write_bytes(data)
    client = FakeS3()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert await bucket_with(client).upload(digest, fd, size) is True
    finally:
        os.close(fd)
    bodies = [kw for op, kw in client.calls if op in ("put_object", "upload_part")]
    sent = [kw["Body"].getvalue() for kw in bodies]
    assert b"".join(sent) == data
    assert [kw["ContentMD5"] for kw in bodies] == [md5(b) for b in sent]  # the store checks it
    assert len(bodies) == (1 if size <= 5 * MiB else 3)
    assert updates and all(not on_loop for _n, on_loop in updates), updates


async def test_botocore_is_told_not_to_hash_request_bodies_in_the_loop() -> None:
    """No flexible checksum (CRC-32) unless required, no SigV4 payload SHA-256 (botocore
    computes both in the loop, for every part): the Content-MD5 above stands for them."""
    config = S3Config(endpoint="http://127.0.0.1:1", bucket="b", access_key="a",
                      secret_key="s")
    async with open_bucket(config) as bucket:
        client_config = bucket.client.meta.config
        assert client_config.request_checksum_calculation == "when_required"
        assert client_config.response_checksum_validation == "when_required"
        assert client_config.s3["payload_signing_enabled"] is False
