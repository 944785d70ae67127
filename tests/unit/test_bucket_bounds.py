"""The bucket's bounds (issue 13): what a trim deletes, with the real index and store and a
fake bucket that counts its deletes (no HTTP); the real object store is in
tests/integration/test_object_store_bounds.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.cache.index import Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.config import CacheConfig, Config, ConfigError, S3Config, UpstreamConfig, load_config
from mirror.oci.reference import Digest, parse_digest
from mirror.tiers.bounds import LOW_WATERMARK, BucketKeeper, identity

UPSTREAM = "registry.test"
NOW = 1_000_000.0


class CountingBucket:
    """What BucketKeeper uses of a Bucket: deletes counted, a listing, on_gone."""

    def __init__(self, index: Index, listed: list[tuple[Digest, int, float]] | None = None,
                 down: bool = False) -> None:
        self.index, self.listed, self.down = index, listed or [], down
        self.deletes: list[Digest] = []
        self.busy: dict[Digest, int] = {}
        self.usable = True
        self.last_error: str | None = None

    async def delete(self, digest: Digest) -> bool:
        if self.down:
            self.last_error = "delete: connection refused"
            return False
        self.deletes.append(digest)
        self.index.bucket_remove(digest)
        return True

    async def listing(self) -> AsyncIterator[tuple[Digest, int, float]]:
        if self.down:
            raise OSError("connection refused")
        for item in self.listed:
            yield item


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def setup(tmp_path: Path, max_size: int | None = None, max_unused: float | None = None,
          pin: tuple[str, ...] = ()) -> tuple[Config, BlobStore, Index]:
    s3 = S3Config("http://127.0.0.1:1", "b", prefix="p/", max_size=max_size,
                  max_unused=max_unused)
    config = Config(cache=CacheConfig(dir=tmp_path, pin=pin),
                    upstreams=(UpstreamConfig(UPSTREAM, "http://127.0.0.1:2"),), s3=s3)
    store, index = BlobStore(tmp_path), Index(tmp_path / "index")
    index.rebuild_bucket(iter([]), identity(s3))
    return config, store, index


def keeper(config: Config, store: BlobStore, index: Index,
           bucket: CountingBucket) -> BucketKeeper:
    return BucketKeeper(config, store, index, bucket, clock=lambda: NOW)  # type: ignore[arg-type]


def objects(index: Index, n: int, size: int, first_use: float, tag: str = "o") -> list[Digest]:
    found = []
    for i in range(n):
        d = digest_of(f"{tag} {i}".encode())
        index.bucket_add(d, size, last_access=first_use + i)
        found.append(d)
    return found


async def test_over_max_size_the_least_recently_used_go_down_to_the_low_watermark(
        tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=1000)
    old = objects(index, 10, 100, NOW - 3600)  # 1000 B: at the bound, not over
    bucket = CountingBucket(index)
    assert (await keeper(config, store, index, bucket).trim()).deleted == []  # type: ignore[union-attr]
    new = objects(index, 2, 100, NOW - 60, "new")  # 1200 B
    result = await keeper(config, store, index, bucket).trim()
    assert result is not None
    assert bucket.deletes == old[:3]  # oldest first, to 900 B = 90 %
    assert index.bucket_total() == 900 == int(1000 * LOW_WATERMARK)
    assert all(index.bucket_has(d) for d in old[3:] + new)
    index.close()


async def test_a_local_hit_keeps_an_object_while_an_older_unused_one_goes(
        tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=250)
    used, unused = objects(index, 2, 100, NOW - 3600)
    objects(index, 1, 100, NOW - 1800, "mid")
    # a local hit serves `used` (proxy: index.touch), flushed as the access times are
    index._accessed[str(used)] = NOW - 10
    bucket = CountingBucket(index)
    await keeper(config, store, index, bucket).trim()
    assert bucket.deletes == [unused]
    assert index.bucket_has(used)
    index.close()


async def test_max_unused_removes_old_objects_even_under_max_size(tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=10**9, max_unused=86400)
    stale = objects(index, 3, 10, NOW - 2 * 86400)
    fresh = objects(index, 3, 10, NOW - 3600, "fresh")
    bucket = CountingBucket(index)
    result = await keeper(config, store, index, bucket).trim()
    assert result is not None and result.unused == 3
    assert bucket.deletes == stale
    assert all(index.bucket_has(d) for d in fresh)
    index.close()


async def test_a_pinned_image_over_the_bound_is_kept(tmp_path: Path) -> None:
    pin = f"{UPSTREAM}/lib/app:1"
    config, store, index = setup(tmp_path, max_size=100, max_unused=60, pin=(pin,))
    layer = digest_of(b"layer")
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": str(digest_of(b"cfg"))},
                           "layers": [{"digest": str(layer)}]}).encode()
    root = digest_of(manifest)
    store.put_bytes(root, manifest)
    index.set_tag(UPSTREAM, "lib/app", "1", root,
                  "application/vnd.oci.image.manifest.v1+json")
    index.bucket_add(layer, 10_000, last_access=NOW - 86400)  # over both bounds, oldest
    other = objects(index, 1, 10, NOW - 7200)
    bucket = CountingBucket(index)
    result = await keeper(config, store, index, bucket).trim()
    assert result is not None and result.pinned_kept == 1
    assert bucket.deletes == other
    assert index.bucket_has(layer)
    index.close()


async def test_objects_in_use_are_spared(tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=10)
    reading, recent, old = (objects(index, 1, 100, NOW - 3600, "r")[0],
                            objects(index, 1, 100, NOW - 1, "n")[0],
                            objects(index, 1, 100, NOW - 3000, "o")[0])
    bucket = CountingBucket(index)
    bucket.busy[reading] = 1  # this process streams it
    await keeper(config, store, index, bucket).trim()
    assert bucket.deletes == [old]  # `recent`: any worker may be reading it
    assert index.bucket_has(reading) and index.bucket_has(recent)
    index.close()


async def test_two_workers_trim_once(tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=100)
    objects(index, 5, 100, NOW - 3600)
    bucket = CountingBucket(index)
    with try_exclusive(str(store.lock_path("bucket"))) as mine:  # the other worker's trim
        assert mine
        # flock: another open file description, as another process would hold
        assert await keeper(config, store, index, bucket).trim() is None
    assert bucket.deletes == []
    first = await keeper(config, store, index, bucket).trim()
    second = await keeper(config, store, index, bucket).trim()
    assert first is not None and len(first.deleted) == 5
    assert second is not None and second.deleted == []
    assert len(bucket.deletes) == 5
    index.close()


async def test_a_trim_while_the_bucket_is_down_deletes_nothing_and_does_not_raise(
        tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=100)
    objects(index, 3, 100, NOW - 3600)
    bucket = CountingBucket(index, down=True)
    result = await keeper(config, store, index, bucket).trim()
    assert result is not None and result.failed == 1 and result.deleted == []
    assert index.bucket_count() == 3  # nothing forgotten that is still there
    # and an index to rebuild while it is down: no trim, no exception
    fresh = Index(tmp_path / "index2")
    assert await keeper(config, store, fresh, bucket).trim() is None
    assert not fresh.bucket_known(identity(config.s3))  # type: ignore[arg-type]
    fresh.close()
    index.close()


async def test_an_unknown_bucket_is_rebuilt_from_the_listing(tmp_path: Path) -> None:
    config = setup(tmp_path, max_unused=3600)[0]
    store, index = BlobStore(tmp_path), Index(tmp_path / "other-index")
    listed = [(digest_of(b"a"), 5, NOW - 7200), (digest_of(b"b"), 7, NOW - 60)]
    bucket = CountingBucket(index, listed)
    assert not index.bucket_known(identity(config.s3))  # type: ignore[arg-type]
    result = await keeper(config, store, index, bucket).trim()
    assert result is not None
    assert index.bucket_known(identity(config.s3))  # type: ignore[arg-type]
    assert bucket.deletes == [listed[0][0]]  # LastModified is the first access time
    assert index.bucket_total() == 7 and index.bucket_count() == 1
    index.close()


def test_local_blobs_the_bucket_lacks_are_queued_again(tmp_path: Path) -> None:
    config, store, index = setup(tmp_path)
    held, lacking = digest_of(b"held"), digest_of(b"lacking")
    for d in (held, lacking):
        index.add_entry(d, 4, "blob")
    index.add_entry(digest_of(b"manifest"), 4, "manifest")
    index.bucket_add(held, 4)
    queued: list[Digest] = []
    k = BucketKeeper(config, store, index, CountingBucket(index),  # type: ignore[arg-type]
                     enqueue=lambda d, _size: queued.append(d) is None)
    assert k.write_missing() == 1 and queued == [lacking]
    index.close()


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("max_size", "lots", "invalid size"), ("max_size", 0, "above 0"),
    ("max_unused", "30 days", "invalid duration"), ("max_unused", "0s", "above zero")])
def test_bad_bounds_name_the_file_key_and_problem(tmp_path: Path, key: str, value: object,
                                                  problem: str) -> None:
    path = tmp_path / "mirror.toml"
    shown = json.dumps(value)
    path.write_text(f'[[upstream]]\nname = "r"\nurl = "http://127.0.0.1:1"\n[s3]\n'
                    f'endpoint = "http://127.0.0.1:2"\nbucket = "b"\n{key} = {shown}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and f"s3.{key}" in str(err.value)
    assert problem in str(err.value)


def test_good_bounds_parse(tmp_path: Path) -> None:
    path = tmp_path / "mirror.toml"
    path.write_text('[[upstream]]\nname = "r"\nurl = "http://127.0.0.1:1"\n[s3]\n'
                    'endpoint = "http://127.0.0.1:2"\nbucket = "b"\nmax_size = "2TiB"\n'
                    'max_unused = "30d"\n')
    s3 = load_config(path).s3
    assert s3 is not None and s3.max_size == 2 * 1024**4 and s3.max_unused == 30 * 86400


async def test_a_large_index_is_read_again_only_when_an_object_can_be_stale(
        tmp_path: Path) -> None:
    config, store, index = setup(tmp_path, max_size=10**9, max_unused=3600)
    objects(index, 3, 10, NOW - 600)
    now = [NOW]
    k = BucketKeeper(config, store, index, CountingBucket(index),  # type: ignore[arg-type]
                     clock=lambda: now[0])
    assert k._due()
    result = await k.trim()
    assert result is not None and result.deleted == []
    assert not k._due()  # the oldest was used 600 s ago: nothing is stale for 3000 s
    now[0] = NOW + 3000 + 1
    assert k._due()
    index.close()
