"""The bucket tier does not block the event loop (issue 13) against the real object store
(SeaweedFS, tests/support/seaweed.py): a 64 MiB blob uploaded (one PUT, and a multipart
upload of 16 MiB parts), verified and copied into the local dir with the loop in asyncio's
debug mode, which reports every callback that ran longer than `slow_callback_duration`.

Before the hashing moved off the loop, the one PUT held the loop for well over 100 ms
(the mirror's SHA-256 of the body, then botocore's SigV4 payload SHA-256 and CRC-32, then
aiohttp unsharing the body's buffer) and each 16 MiB part for 22-35 ms. A callback's wall
time includes the process being descheduled on a loaded machine, hence the margin."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.cache.store import BlobStore
from mirror.config import S3Config
from mirror.oci.reference import Digest, parse_digest
from mirror.tiers.bucket import open_bucket
from tests.support.seaweed import SeaweedS3, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
BUCKET = "offloop"
MiB = 1024 * 1024
SIZE = 64 * MiB
SLOW = 0.05  # seconds: a callback this long is the loop blocked
ATTEMPTS = 3


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with running(tmp_path_factory.mktemp("seaweed"), BUCKET) as store:
        yield store


@pytest.mark.parametrize("part_size", [SIZE, 16 * MiB], ids=["put", "multipart"])
async def test_uploading_verifying_and_copying_a_large_blob_never_blocks_the_loop(
        tmp_path: Path, seaweed: SeaweedS3, caplog: pytest.LogCaptureFixture,
        part_size: int) -> None:
    data = os.urandom(SIZE)
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    (tmp_path / "blob").write_bytes(data)
    store = BlobStore(tmp_path / "cache")
    warm = os.urandom(MiB)  # the client's first requests build its caches: not measured
    (tmp_path / "warm").write_bytes(warm)
    warm_digest = parse_digest("sha256:" + hashlib.sha256(warm).hexdigest())
    # A step stretched by another process on these shared cores is noise; a step that blocks
    # (hashing 64 MiB on the loop) is there every time: it fails only if every try saw one.
    seen: list[list[str]] = []
    for _ in range(ATTEMPTS):
        caplog.clear()
        config = S3Config(endpoint=seaweed.endpoint, bucket=BUCKET,
                          prefix=f"t-{uuid.uuid4().hex[:10]}/", access_key=seaweed.access_key,
                          secret_key=seaweed.secret_key, part_size=part_size, timeout=60.0)
        await _measured(tmp_path, config, store, digest, warm_digest, caplog)
        assert store.read_bytes(digest) == data
        store.delete(digest)
        slow = [r.getMessage()[:300] for r in caplog.records
                if r.name == "asyncio" and r.getMessage().startswith("Executing")]
        if not slow:
            return
        seen.append(slow)
    raise AssertionError(f"the loop was blocked in each of {ATTEMPTS} tries: {seen}")


async def _measured(tmp_path: Path, config: S3Config, store: BlobStore, digest: Digest,
                    warm_digest: Digest, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    warm_fd = os.open(tmp_path / "warm", os.O_RDONLY)
    try:
        async with open_bucket(config) as bucket:
            assert await bucket.upload(warm_digest, warm_fd, MiB)
            assert await bucket.matches(warm_digest) is True
            caplog.set_level(logging.WARNING, logger="asyncio")
            loop.slow_callback_duration = SLOW
            loop.set_debug(True)
            try:
                assert await bucket.upload(digest, fd, SIZE)
                assert await bucket.matches(digest) is True
                assert await bucket.copy_to(store, digest)
            finally:
                loop.set_debug(False)
    finally:
        os.close(fd)
        os.close(warm_fd)
