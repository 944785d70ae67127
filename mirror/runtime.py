"""The composition root: the only place that builds the pieces over one cache dir (store,
index, upstream clients, downloads, maintenance, proxy) and wires their callbacks. The server
(http/app.py, process/serve.py) and the operator commands share it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass

import aiohttp

from mirror.cache.index import Index
from mirror.cache.maintenance import Maintenance, RateLimit
from mirror.cache.store import BlobStore, OnCommit
from mirror.cluster.peers import Membership
from mirror.cluster.shared import RedisTags, SharedState
from mirror.cluster.source import ClusterSource, FillLocks
from mirror.config import ClusterConfig, Config, UpstreamConfig
from mirror.oci.reference import Digest
from mirror.pull.downloads import Downloads
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source
from mirror.pull.trust import Trust
from mirror.tiers.bounds import BucketKeeper
from mirror.tiers.bucket import Bucket, BucketBlob, open_bucket
from mirror.tiers.source import TieredSource, WriteBehind
from mirror.upstream.client import Upstream

log = logging.getLogger("mirror")


@dataclass(frozen=True)
class ClusterNode:
    """This node's part in a cluster: who is up, and the sources `/_cluster/` answers with."""

    membership: Membership
    fill_sources: Mapping[str, Source]  # a peer's fill request: never relayed again
    local_sources: Mapping[str, Source]  # a stored-only probe, a lock holder's: the upstream


@dataclass(frozen=True)
class Mirror:
    """A running mirror: the proxy, and the pieces the HTTP edge and the commands read."""

    config: Config
    store: BlobStore
    index: Index
    downloads: Downloads
    proxy: Proxy
    # By name, in configuration order (the first answers names without a registry): the
    # clients, for their configuration and health, and the sources the proxy is handed
    # for each (the client itself on a single node).
    upstreams: Mapping[str, Upstream]
    sources: Mapping[str, Source]
    cluster: ClusterNode | None = None
    bucket: Bucket | None = None  # the second tier, with [s3]
    trust: Trust | None = None  # the signature policies, with [[policy]]

    @property
    def offline(self) -> bool:
        return self.config.cache.offline


@asynccontextmanager
async def open_bucket_tier(config: Config, store: BlobStore, index: Index
                           ) -> AsyncIterator[BucketKeeper]:
    """For the commands: the bucket with its index kept (no write-behind)."""
    assert config.s3 is not None
    async with open_bucket(config.s3) as bucket:
        bucket.on_present, bucket.on_gone = index.bucket_add, index.bucket_remove
        yield BucketKeeper(config, store, index, bucket)


@contextmanager
def open_cache(config: Config) -> Iterator[tuple[BlobStore, Index]]:
    """The store and its index, with every commit recorded as an index entry."""
    with _store_and_index(config) as (store, index):
        store.on_commit = index.add_entry
        yield store, index


@asynccontextmanager
async def open_mirror(config: Config) -> AsyncIterator[Mirror]:
    """A Mirror with one HTTP session per upstream and the cache's maintenance running; all
    closed on exit."""
    async with AsyncExitStack() as stack:
        store, index = stack.enter_context(_store_and_index(config))
        upstreams = {uc.name: Upstream(uc, await stack.enter_async_context(_session(uc)))
                     for uc in config.upstreams}
        downloads = Downloads(store, config.cache.finish_abandoned)
        proxy = Proxy(config, store, index, downloads,
                      any_private=any(u.private for u in upstreams.values()))
        maintenance = Maintenance(config, store, index, lambda: _rate_limits(upstreams),
                                  on_evict=proxy.forget)
        # Every callback between the pieces, set once, here.
        bucket, tiered, write_behind = await _tiers(config, stack, store, index, upstreams)
        if bucket is not None and write_behind is not None:
            maintenance.extra.append(BucketKeeper(config, store, index, bucket,
                                                  write_behind.requeue).tick)
        store.on_commit = _in_turn(index.add_entry, maintenance.committed,
                                   *([write_behind.committed] if write_behind else []))
        downloads.on_disk_full = maintenance.request_eviction
        proxy.on_disk_full = maintenance.request_eviction
        maintenance.start()
        shared = None
        if config.redis is not None:
            shared = SharedState(config.redis.url, username=config.redis.username,
                                 password=config.redis.password, timeout=config.redis.timeout,
                                 key_prefix=config.redis.key_prefix)
            stack.push_async_callback(shared.close)
            proxy.shared_tags = RedisTags(shared)
        cluster = None if config.cluster is None else await stack.enter_async_context(
            _join_cluster(config.cluster, tiered, shared))
        sources: Mapping[str, Source] = dict(tiered) if cluster is None else {
            name: ClusterSource(u, cluster.membership, relays=True, fill_locks=shared,
                                on_copy=index.mark_copy)
            for name, u in tiered.items()}
        if cluster is not None:
            maintenance.owns = cluster.membership.owns
        try:
            trust = None if not config.policies else Trust(
                config.policies, [u.name for u in config.upstreams], proxy, index,
                config.cache.tag_ttl)
            proxy.prefetch_held = None if trust is None else trust.holds
            yield Mirror(config, store, index, downloads, proxy, upstreams, sources, cluster,
                         bucket, trust)
        finally:
            await maintenance.stop()
            await downloads.drain(0)


async def _tiers(config: Config, stack: AsyncExitStack, store: BlobStore, index: Index,
                 upstreams: Mapping[str, Upstream]
                 ) -> tuple[Bucket | None, Mapping[str, Source], WriteBehind | None]:
    """With [s3]: the bucket, each upstream's Source behind it, and the write-behind (its
    uploads a kill -9 interrupted aborted first). Without: the upstreams themselves."""
    if config.s3 is None:
        return None, dict(upstreams), None
    bucket = await stack.enter_async_context(open_bucket(config.s3))
    bucket.on_present, bucket.on_gone = index.bucket_add, index.bucket_remove
    if (problem := await bucket.check()) is not None:
        log.warning("object store unusable at start: serving from the local tier and the "
                    "upstream until it answers", extra={
                        "endpoint": config.s3.endpoint, "bucket": config.s3.bucket,
                        "error": problem})
    left = {u for u, pid in index.uploads().items() if not _alive(pid)}
    await bucket.abort_stale_uploads(left)
    if bucket.last_error is None:  # aborted (or gone already); else tried again next start
        for upload_id in left:
            index.record_upload(upload_id, None)
    from_bucket: dict[Digest, BucketBlob] = {}
    write_behind = WriteBehind(bucket, store, from_bucket, lambda upload_id, active: (
        index.record_upload(upload_id, os.getpid() if active else None)))
    write_behind.start()
    stack.push_async_callback(write_behind.stop)
    return bucket, {name: TieredSource(u, bucket, from_bucket)
                    for name, u in upstreams.items()}, write_behind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@asynccontextmanager
async def _join_cluster(config: ClusterConfig, upstreams: Mapping[str, Source],
                        fill_locks: FillLocks | None) -> AsyncIterator[ClusterNode]:
    """Health checks of the peers run for as long as the node serves."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=10)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     headers={"User-Agent": "registry-mirror-peer"}) as session:
        membership = Membership(config, session)
        await membership.check_once()  # a node starts knowing who is up
        checks = asyncio.ensure_future(membership.run())
        try:
            yield ClusterNode(
                membership,
                {n: ClusterSource(u, membership, relays=False, fill_locks=fill_locks)
                 for n, u in upstreams.items()},
                dict(upstreams))
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks


@contextmanager
def _store_and_index(config: Config) -> Iterator[tuple[BlobStore, Index]]:
    store = BlobStore(config.cache.dir)
    index = Index(store.index_dir)
    try:
        yield store, index
    finally:
        index.close()


@asynccontextmanager
async def _session(uc: UpstreamConfig) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=uc.max_connections, ttl_dns_cache=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     headers={"User-Agent": "registry-mirror"}) as session:
        yield session


def _in_turn(*listeners: OnCommit) -> OnCommit:
    """One commit callback calling each listener in order (the index entry first, so the
    maintenance sees the new total)."""
    def committed(digest: Digest, size: int, kind: str) -> None:
        for listener in listeners:
            listener(digest, size, kind)
    return committed


def _rate_limits(upstreams: Mapping[str, Upstream]) -> list[RateLimit]:
    """The upstreams' last seen rate limits, for the maintenance to publish to `status`."""
    return [(u.name, u.ratelimit_limit, u.ratelimit_remaining) for u in upstreams.values()
            if u.ratelimit_remaining is not None]
