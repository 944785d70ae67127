"""The composition root: the only place that builds the pieces over one cache dir (store,
index, upstream clients, downloads, maintenance, proxy) and wires their callbacks. The server
(http/app.py, process/serve.py) and the operator commands share it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from mirror.cache.index import Index
from mirror.cache.maintenance import Maintenance, RateLimit
from mirror.cache.store import BlobStore, OnCommit
from mirror.cluster.peers import Membership
from mirror.cluster.source import ClusterSource, FillLocks
from mirror.config import (
    ClusterConfig,
    Config,
    ConfigError,
    SyncConfig,
    UpstreamConfig,
    load_config,
)
from mirror.events.bus import Events
from mirror.oci.reference import Digest
from mirror.pull.downloads import Downloads
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source
from mirror.pull.sync import RuleRun, Scheduler, new_run
from mirror.tiers.bounds import BucketKeeper
from mirror.tiers.source import TieredSource, WriteBehind
from mirror.upstream.client import Upstream

if TYPE_CHECKING:  # each imported only where its table is set: aiobotocore (~13 MiB resident a
    # worker) with [s3], cryptography with [[policy]], redis-py with [redis]
    from mirror.cluster.shared import SharedState
    from mirror.pull.trust import Trust
    from mirror.tiers.bucket import Bucket, BucketBlob

log = logging.getLogger("mirror")


@dataclass(frozen=True)
class ClusterNode:
    """This node's part in a cluster: who is up, and the sources `/_cluster/` answers with."""

    membership: Membership
    fill_sources: dict[str, Source]  # a peer's fill request: never relayed again
    local_sources: dict[str, Source]  # a stored-only probe, a lock holder's: the upstream

    def rewire(self, name: str, source: Source | None, fill_locks: FillLocks | None) -> None:
        """An upstream added, changed (its new source) or removed (None) by a reload."""
        self.fill_sources.pop(name, None)
        self.local_sources.pop(name, None)
        if source is not None:
            self.fill_sources[name] = ClusterSource(source, self.membership, relays=False,
                                                    fill_locks=fill_locks)
            self.local_sources[name] = source


Reloader = Callable[[Config, Config], Awaitable[None]]  # (running, new): apply the new one


@dataclass
class Mirror:
    """A running mirror: the proxy, and the pieces the HTTP edge and the commands read.
    `reload()` (SIGHUP) applies a new configuration to it in place; the mappings are
    updated, not replaced, so what holds them sees the change."""

    config: Config
    store: BlobStore
    index: Index
    downloads: Downloads
    proxy: Proxy
    # By name, in configuration order (the first answers names without a registry): the
    # clients, for their configuration and health, and the sources the proxy is handed
    # for each (the client itself on a single node).
    upstreams: dict[str, Upstream]
    sources: dict[str, Source]
    cluster: ClusterNode | None = None
    bucket: Bucket | None = None  # the second tier, with [s3]
    trust: Trust | None = None  # the signature policies, with [[policy]]
    events: Events | None = None  # what [[webhook]] receivers are told (events/bus.py)
    sync: Scheduler | None = None  # the [[sync]] rules on their interval (the server starts it)
    # What a reload applies, in order (runtime.py's own first; the HTTP edge adds its
    # authenticator and certificate): each is given the running and the new configuration.
    reloaders: list[Reloader] = field(default_factory=list)
    # One reload at a time, each reading the file when its turn comes: two SIGHUPs close
    # together end with the file's last state, never an earlier read applied after it.
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def offline(self) -> bool:
        return self.config.cache.offline

    async def reload(self) -> bool:
        """Read the configuration file again and apply it; a file with an error keeps the
        running configuration (False, the reason logged in one line)."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            new = await asyncio.to_thread(load_config, self.config.path)
        except ConfigError as exc:
            log.error("reload refused: the running configuration is kept", extra={
                "error": str(exc)})
            return False
        new, restart = restart_only(self.config, new)
        old = self.config
        for apply in self.reloaders:
            try:
                await apply(old, new)
            except Exception:  # one part that cannot follow must not stop the others
                log.exception("reload: a part kept its running configuration")
        self.config = new
        log.info("configuration reloaded", extra={"path": new.path,
                                                   "needs_restart": restart})
        if restart:
            log.warning("reload: changes that take effect only after a restart", extra={
                "keys": restart})
        return True


# [server] keys read per request or per connection's handshake: a reload applies them.
RELOADED_SERVER_KEYS = ("tls_cert", "tls_key", "catalog", "trusted_proxies")


def restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with what only a restart can change kept as it runs (the listening socket and
    its limits, the workers, the cache dir, the cluster, Redis and the bucket; the [server]
    certificate files, catalog and trusted proxies are reloaded), and the keys of it that
    differ."""
    changed = [f"server.{f.name}" for f in dataclasses.fields(running.server)
               if f.name not in RELOADED_SERVER_KEYS
               and getattr(running.server, f.name) != getattr(new.server, f.name)]
    if running.cache.dir != new.cache.dir:
        changed.append("cache.dir")
    changed += [f"[{name}]" for name in ("cluster", "redis", "s3")
                if getattr(running, name) != getattr(new, name)]
    reloaded = {key: getattr(new.server, key) for key in RELOADED_SERVER_KEYS}
    kept = dataclasses.replace(
        new, server=dataclasses.replace(running.server, **reloaded),
        cache=dataclasses.replace(new.cache, dir=running.cache.dir),
        cluster=running.cluster, redis=running.redis, s3=running.s3)
    return kept, changed


@asynccontextmanager
async def open_bucket_tier(config: Config, store: BlobStore, index: Index
                           ) -> AsyncIterator[BucketKeeper]:
    """For the commands: the bucket with its index kept (no write-behind)."""
    assert config.s3 is not None
    from mirror.tiers.bucket import open_bucket
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
        events = Events(store.root / "events", config.server.port)
        maintenance = Maintenance(config, store, index, lambda: _rate_limits(upstreams),
                                  on_evict=lambda digest: _evicted(proxy, events, digest))
        # Every callback between the pieces, set once, here.
        bucket, tier, write_behind = await _tiers(config, stack, store, index)
        tiered = {name: tier(u) for name, u in upstreams.items()}
        if bucket is not None and write_behind is not None:
            maintenance.extra.append(BucketKeeper(config, store, index, bucket,
                                                  write_behind.requeue).tick)
        store.on_commit = _in_turn(index.add_entry, maintenance.committed,
                                   *([write_behind.committed] if write_behind else []),
                                   lambda digest, size, kind: events.emit(
                                       "fill", target=_target(digest, size, kind)))
        for u in upstreams.values():
            u.on_health = events.upstream_health
        downloads.on_disk_full = maintenance.request_eviction
        proxy.on_disk_full = maintenance.request_eviction
        maintenance.start()
        shared: SharedState | None = None
        if config.redis is not None:
            from mirror.cluster.shared import RedisTags, SharedState  # redis-py: only with [redis]

            shared = SharedState(config.redis.url, username=config.redis.username,
                                 password=config.redis.password, timeout=config.redis.timeout,
                                 key_prefix=config.redis.key_prefix)
            stack.push_async_callback(shared.close)
            proxy.shared_tags = RedisTags(shared)
        cluster = None if config.cluster is None else await stack.enter_async_context(
            _join_cluster(config.cluster, tiered, shared))

        def client_source(source: Source) -> Source:
            """What the proxy is handed for a client's request to one upstream."""
            if cluster is None:
                return source
            return ClusterSource(source, cluster.membership, relays=True, fill_locks=shared,
                                 on_copy=index.mark_copy)

        sources = {name: client_source(u) for name, u in tiered.items()}
        if cluster is not None:
            maintenance.owns = cluster.membership.owns
        mirror = Mirror(config, store, index, downloads, proxy, upstreams, sources, cluster,
                        bucket, events=events)
        await events.start(config.webhooks)
        stack.push_async_callback(events.close)
        def make_run(rule: SyncConfig) -> RuleRun | None:
            """A run for the scheduler or the cache browser's "sync now": stopped between
            images when a reload removes or changes its rule."""
            run = new_run(rule, proxy, sources, store, index)
            if run is not None and mirror.sync is not None:
                run.current = functools.partial(mirror.sync.current, rule.name)
            return run

        mirror.sync = Scheduler(lambda: mirror.config.syncs, make_run, index, store.lock_path)

        async def reload_upstreams(old: Config, new: Config) -> None:
            """New or changed [[upstream]] tables get a client of their own (the old one
            stays open for the downloads using it, until the server stops); removed ones
            are no longer routed to."""
            kept = {u.name: mirror.upstreams[u.name] for u in new.upstreams
                    if u.name in mirror.upstreams and old.upstream(u.name) == u}
            fresh = {u.name: Upstream(u, await stack.enter_async_context(_session(u)))
                     for u in new.upstreams if u.name not in kept}
            for u in fresh.values():
                u.on_health = events.upstream_health
            ordered = {u.name: kept.get(u.name) or fresh[u.name] for u in new.upstreams}
            for name in ordered.keys() - kept.keys():
                wrapped = tier(ordered[name])
                sources[name] = client_source(wrapped)
                if cluster is not None:
                    cluster.rewire(name, wrapped, shared)
            for name in set(sources) - set(ordered):
                del sources[name]
                if cluster is not None:
                    cluster.rewire(name, None, shared)
            upstreams.clear()
            upstreams.update(ordered)
            proxy.set_any_private(any(u.private for u in upstreams.values()))

        async def reload_pull(old: Config, new: Config) -> None:
            proxy.reconfigure(new)
            maintenance.config = new
            downloads.finish_abandoned = new.cache.finish_abandoned  # read as one is left
            mirror.trust = _trust(new, proxy, index)
            proxy.prefetch_held = None if mirror.trust is None else mirror.trust.holds

        async def reload_events(old: Config, new: Config) -> None:
            await events.configure(new.webhooks)

        mirror.reloaders += [reload_upstreams, reload_pull, reload_events]
        try:
            mirror.trust = _trust(config, proxy, index)
            proxy.prefetch_held = None if mirror.trust is None else mirror.trust.holds
            yield mirror
        finally:
            await mirror.sync.stop()  # a run stopped between steps: tried again at start
            await maintenance.stop()
            await downloads.drain(0)


def _trust(config: Config, proxy: Proxy, index: Index) -> Trust | None:
    if not config.policies:
        return None
    from mirror.pull.trust import Trust  # cryptography: only a [[policy]] pays for it

    return Trust(config.policies, [u.name for u in config.upstreams], proxy, index,
                 config.cache.tag_ttl)


async def _tiers(config: Config, stack: AsyncExitStack, store: BlobStore, index: Index
                 ) -> tuple[Bucket | None, Callable[[Upstream], Source], WriteBehind | None]:
    """With [s3]: the bucket, what puts an upstream's Source behind it, and the write-behind
    (its uploads a kill -9 interrupted aborted first). Without: the upstreams themselves."""
    if config.s3 is None:
        return None, lambda u: u, None
    from mirror.tiers.bucket import open_bucket
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
    return bucket, lambda u: TieredSource(u, bucket, from_bucket), write_behind


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


def _evicted(proxy: Proxy, events: Events, digest: Digest) -> None:
    proxy.forget(digest)
    events.emit("evict", target={"digest": str(digest)})


def _target(digest: Digest, size: int, kind: str) -> dict[str, object]:
    return {"digest": str(digest), "size": size, "length": size, "kind": kind}


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
