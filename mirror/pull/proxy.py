"""The pull-through policy: answers manifests and blobs from the store, else from a source.

It sits between the HTTP handlers and the pieces below it (store, index, single-flight
downloads, and sources: pull/source.py, whose first implementation is the upstream client) and
owns the caching policy: digests are immutable and cached for good; tags are trusted for
`tag_ttl`, then revalidated with a HEAD (in a cluster with Redis, a tag another node looked up
within `tag_ttl` is taken from the shared tags instead); an unreachable, failing or
rate-limiting source is answered from cache where possible (stale-if-error); offline, nothing
is asked; concurrent manifest fetches are coalesced; private content is confirmed per
repository; a manifest is verified before it is cached; the rules (`[[upstream]] allow`,
`deny`, `[rules] deny_digests`: oci/rules.py) refuse a request before anything is asked of a
source, a tag by the digest it resolves to (with deny_digests set, a tag not known yet is
resolved with a HEAD before its manifest is fetched). It speaks no wire format: the source
does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from cachetools import LRUCache, TLRUCache, TTLCache

from mirror import metrics
from mirror.cache.index import Index, TagEntry
from mirror.cache.locks import exclusive
from mirror.cache.store import DigestMismatch
from mirror.config import Config
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError
from mirror.oci.mediatypes import (
    IMAGE_TYPES,
    OCI_INDEX,
    SCHEMA1_TYPES,
    ManifestInvalid,
    checked_media_type,
    is_acceptable,
)
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.oci.rules import REASONS, Denial
from mirror.pull.body import BlobBody, DownloadBody, HeadOnlyBody, StoredBody
from mirror.pull.content import ContentStore
from mirror.pull.downloads import Download, Downloads, Fetch
from mirror.pull.prefetch import Prefetcher
from mirror.pull.source import BlobStream, Kind, ManifestReply, Relayed, SharedTags, Source

log = logging.getLogger("mirror.proxy")

T = TypeVar("T")
MEMORY_MANIFEST_BYTES = 64 * 1024 * 1024
CONFIRMATIONS_IN_MEMORY = 65536  # provenance and access answers kept off SQLite
WORKER_LOCK_WAIT = 30.0  # seconds a worker waits for another's manifest fetch
HELD_SECONDS = 60.0  # a hit writes that its repository holds the manifest at most this often
# Answers from a source that stale-if-error covers (it is down, failing or rate limiting).
STALE_CODES = frozenset({ErrorCode.UPSTREAM_UNREACHABLE, ErrorCode.UPSTREAM_UNAVAILABLE,
                         ErrorCode.UPSTREAM_TIMEOUT, ErrorCode.TOOMANYREQUESTS})


class Denied(RegistryError):
    """403 DENIED by the rules; `denial` says which."""

    def __init__(self, denial: Denial, context: str = "") -> None:
        super().__init__(ErrorCode.DENIED, f"{denial}{context}")
        self.denial = denial


@dataclass(frozen=True)
class Manifest:
    digest: Digest
    media_type: str
    size: int
    data: bytes | None  # None: a HEAD answered from the upstream's headers alone
    cache: str  # hit | miss | revalidated | stale
    tag_max_age: float | None = None  # remaining trust in a tag, for Cache-Control


@dataclass(frozen=True)
class Referrers:
    """A referrers index (a Relayed answer), and where it came from."""
    status: int
    body: bytes
    headers: dict[str, str]
    cache: str  # hit | miss | stale | relayed (a paginated index, passed through)


class Proxy:
    def __init__(self, config: Config, store: ContentStore, index: Index, downloads: Downloads,
                 any_private: bool) -> None:
        """`any_private`: some source gives private content, so content of unknown provenance
        (an index lost) needs confirmation too."""
        self.config = config
        self.store = store
        self.index = index
        self.downloads = downloads
        self.offline = config.cache.offline
        self._tags = self._tag_memory(config.cache.tag_ttl)
        # Hot manifests (bytes, media type) and fresh tags, so hits read no file and touch no
        # SQLite (a memory hit costs one stat: see _cached_manifest).
        self._memory: LRUCache[Digest, tuple[bytes, str]] = LRUCache(
            MEMORY_MANIFEST_BYTES, getsizeof=lambda v: len(v[0]))
        self._restore_failure_logged = 0.0
        self._flights: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self.prefetcher = Prefetcher(store, downloads, self._start_download)
        # Names whose prefetch waits for a verdict (pull/trust.py starts it for an image it
        # allows): a refused image's layers are not fetched.
        self.prefetch_held: Callable[[str, str], bool] | None = None
        self._any_private = any_private
        # With access rules, who may read a digest depends on the repository it is asked
        # under: every digest is then confirmed per (upstream, repository), as private ones are.
        self._scoped = bool(config.auth.rules)
        self._public: LRUCache[Digest, bool] = LRUCache(CONFIRMATIONS_IN_MEMORY)
        self._confirmed: LRUCache[tuple[str, str, Digest], bool] = LRUCache(
            CONFIRMATIONS_IN_MEMORY)
        self._held: TTLCache[tuple[str, str, Digest], bool] = TTLCache(
            CONFIRMATIONS_IN_MEMORY, HELD_SECONDS, timer=time.monotonic)
        self.rules = config.rules
        self._name_denial_series(config)

    def reconfigure(self, config: Config) -> None:
        """A reload: the new [cache] policy (tag_ttl, offline, prefetch) and rules; tags
        remembered in memory are forgotten (the index still has them, with their age)."""
        self.config, self.offline, self.rules = config, config.cache.offline, config.rules
        self._scoped = bool(config.auth.rules)
        self._tags = self._tag_memory(config.cache.tag_ttl)
        self._name_denial_series(config)

    def set_any_private(self, any_private: bool) -> None:
        """After a reload: whether some source now gives private content."""
        self._any_private = any_private

    @staticmethod
    def _tag_memory(ttl: float) -> TLRUCache[tuple[str, str, str], TagEntry]:
        return TLRUCache(maxsize=65536, ttu=lambda _k, e, now: now + ttl - e.age(),
                         timer=time.monotonic)

    def _name_denial_series(self, config: Config) -> None:
        if self.rules:  # the series exist (at 0) before the first denial
            for upstream in config.upstreams:
                for reason in REASONS:
                    metrics.DENIED.labels(upstream.name, reason)

    # the cache's maintenance, wired by runtime.py -----------------------------------------
    on_disk_full: Callable[[], None] | None = None  # asks for eviction
    shared_tags: SharedTags | None = None  # a cluster's, with [redis]

    def request_eviction(self) -> None:
        if self.on_disk_full is not None:
            self.on_disk_full()

    def forget(self, digest: Digest) -> None:
        """Evicted: drop it from memory too."""
        self._memory.pop(digest, None)

    # single flight for small requests -----------------------------------------------------
    async def _coalesce(self, key: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(make())
            self._flights[key] = flight
            flight.add_done_callback(lambda _f: self._flights.pop(key, None))
        return cast(T, await asyncio.shield(flight))

    # manifests ----------------------------------------------------------------------------
    def _cached_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        hit = self._memory.get(digest)
        if hit is not None:
            data, media_type = hit
            # Any worker may have evicted it: what is answered from memory must stay on disk
            # (or a restart with the upstream down loses the hottest manifests). A stat per
            # hit is the cheapest check that needs no message between worker processes.
            if not self.store.has(digest):
                if self.index.was_purged(digest):  # `mirror purge` removed it: not again
                    self._memory.pop(digest, None)
                    return None
                self._restore(digest, data, media_type)
            return hit
        stored = self.store.read_bytes(digest)
        if stored is None:
            return None
        media_type = self.index.media_type(digest, stored)
        self._remember(digest, stored, media_type)
        return stored, media_type

    def _remember(self, digest: Digest, data: bytes, media_type: str) -> None:
        self._memory[digest] = (data, media_type)

    def _restore(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store a manifest again that was evicted while still served (it is the most
        recently used entry now); a full or read-only disk leaves it answered from memory."""
        try:
            self.store.put_bytes(digest, data)
        except OSError as exc:
            now = time.monotonic()
            if now - self._restore_failure_logged >= 10.0:  # not once per hit
                self._restore_failure_logged = now
                log.error("could not store again a manifest served from memory", extra={
                    "digest": str(digest), "error": str(exc)})
            return
        self.index.set_media_type(digest, media_type)
        log.info("manifest evicted while in use: stored again", extra={"digest": str(digest)})

    def _from_cache(self, digest: Digest, cache: str, max_age: float | None = None
                    ) -> Manifest | None:
        hit = self._cached_manifest(digest)
        if hit is None:
            return None
        data, media_type = hit
        self.index.touch(digest)
        return Manifest(digest, media_type, len(data), data, cache, max_age)

    def _get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        entry = self._tags.get((upstream, repository, tag))
        if entry is None:
            entry = self.index.get_tag(upstream, repository, tag)
            if entry is not None and entry.age() < self.config.cache.tag_ttl:
                self._tags[(upstream, repository, tag)] = entry
        return entry

    def _set_tag(self, upstream: str, repository: str, tag: str, digest: Digest,
                 media_type: str, fetched_at: float | None = None) -> TagEntry:
        entry = self.index.set_tag(upstream, repository, tag, digest, media_type, fetched_at)
        self._tags[(upstream, repository, tag)] = entry
        return entry

    async def _learn_tag(self, source: Source, repository: str, tag: str, digest: Digest,
                         media_type: str, fresh_for: float | None = None) -> TagEntry:
        """The source's answer for a tag: recorded here (as old as the source says it is),
        and shared with the cluster."""
        ttl = self.config.cache.tag_ttl
        aged = None if fresh_for is None else time.time() - max(0.0, ttl - fresh_for)
        entry = self._set_tag(source.name, repository, tag, digest, media_type, aged)
        if self.shared_tags is not None and not source.private:
            await self.shared_tags.put(source.name, repository, tag, entry, ttl)
        return entry

    def _trust_left(self, entry: TagEntry) -> float:
        """Seconds a tag answer may still be served without asking the source again."""
        return max(0.0, self.config.cache.tag_ttl - entry.age())

    async def _shared_tag(self, source: Source, repository: str, tag: str
                          ) -> TagEntry | None:
        """A fresh answer another node of the cluster got for the tag, recorded here with
        its own age (so the cluster as a whole asks again after tag_ttl)."""
        if self.shared_tags is None or source.private or self.offline:
            return None
        shared = await self.shared_tags.get(source.name, repository, tag)
        if shared is None or shared.age() >= self.config.cache.tag_ttl:
            return None
        try:
            digest = parse_digest(shared.digest)
        except RegistryError:
            return None  # not ours to trust: ask the source
        metrics.SHARED_TAG_HITS.inc()
        return self._set_tag(source.name, repository, tag, digest, shared.media_type,
                             shared.fetched_at)

    # the rules ------------------------------------------------------------------------------
    def admit(self, source: Source, repository: str, digest: Digest | None = None,
              reference: str | None = None) -> None:
        """Refuse what the rules deny (403 DENIED, logged and counted): blobs and relays here,
        and an edge answering without the proxy (http/app.py's redirect to the bucket)."""
        try:
            self._check(source, repository, digest)
        except Denied as exc:
            self._record(source, repository, reference or str(digest or ""), exc)
            raise

    def _check(self, source: Source, repository: str, digest: Digest | None = None) -> None:
        """Before anything is asked of the source or read from the cache."""
        if not self.rules:
            return
        denial = self.rules.repository(source.name, repository)
        if denial is not None:
            raise Denied(denial)
        if digest is not None and (denial := self.rules.digest(digest)) is not None:
            raise Denied(denial, f" (asked as {source.name}/{repository})")

    def _check_resolved(self, source: Source, repository: str, tag: str,
                        digest: Digest) -> None:
        """A tag is denied when the digest it resolves to is."""
        if self.rules.deny_digests and (denial := self.rules.digest(digest)) is not None:
            raise Denied(denial, f" ({source.name}/{repository}:{tag} resolves to it)")

    def _record(self, source: Source, repository: str, reference: str, exc: Denied) -> None:
        """One log line and one count per request denied."""
        metrics.DENIED.labels(source.name, exc.denial.reason).inc()
        log.warning("denied by the rules", extra={
            "upstream": source.name, "repository": repository, "reference": reference,
            "reason": exc.denial.reason, "rule": exc.denial.rule, "error": exc.message})

    # manifests, the entry ------------------------------------------------------------------
    async def manifest(self, source: Source, repository: str, reference: Digest | str,
                       accept: tuple[str, ...], head: bool) -> Manifest:
        try:
            self._check(source, repository,
                        reference if isinstance(reference, Digest) else None)
            found = await self._manifest(source, repository, reference, accept, head)
            if not isinstance(reference, Digest):  # a hit may be older than the rule
                self._check_resolved(source, repository, reference, found.digest)
        except Denied as exc:
            self._record(source, repository, str(reference), exc)
            raise
        if found.data is not None and found.media_type not in SCHEMA1_TYPES:
            self._holds(source.name, repository, found)
        return found

    async def resolve_tag(self, source: Source, repository: str, tag: str,
                          accept: tuple[str, ...]) -> Manifest:
        """What `tag` names at the source now, asked with a HEAD whatever `tag_ttl` says (a
        sync rule revalidates every run) and recorded as a client's lookup is; the manifest
        is fetched only when the source's HEAD names no digest."""
        try:
            self._check(source, repository)
            self._require_online(ErrorCode.MANIFEST_UNKNOWN, f"manifest {repository}:{tag}")
            return await self._head_manifest(source, repository, tag, accept)
        except Denied as exc:
            self._record(source, repository, tag, exc)
            raise

    def _holds(self, upstream: str, repository: str, answer: Manifest) -> None:
        """The repository holds the manifest (for the catalog and `mirror purge`): written
        to the index at a miss, and for hits at most once a minute per process (a purge
        may have dropped it meanwhile)."""
        key = (upstream, repository, answer.digest)
        if answer.cache == "miss" or key not in self._held:
            self._held[key] = True
            self.index.hold(upstream, repository, answer.digest)

    async def _manifest(self, source: Source, repository: str, reference: Digest | str,
                        accept: tuple[str, ...], head: bool) -> Manifest:
        if isinstance(reference, Digest):
            cached = self._from_cache(reference, "hit")
            if cached is not None:
                await self._confirm_access(source, repository, reference, "manifests")
                return cached
            self._require_online(ErrorCode.MANIFEST_UNKNOWN, f"manifest {reference}")
            if head:
                return await self._head_manifest(source, repository, reference, accept)
            return await self._fetch_manifest(source, repository, reference, accept)
        return await self._manifest_by_tag(source, repository, reference, accept, head)

    async def _manifest_by_tag(self, source: Source, repository: str, tag: str,
                               accept: tuple[str, ...], head: bool) -> Manifest:
        ttl = self.config.cache.tag_ttl
        entry = self._get_tag(source.name, repository, tag)
        if entry is None or entry.age() >= ttl:
            entry = await self._shared_tag(source, repository, tag) or entry
        usable = entry if entry and is_acceptable(entry.media_type, accept) else None
        if usable is not None:
            age = usable.age()
            if age < ttl or self.offline:
                digest = parse_digest(usable.digest)
                self._check_resolved(source, repository, tag, digest)
                cached = self._from_cache(digest, "hit", max(0.0, ttl - age))
                if cached is not None:
                    return cached
                if self.shared_tags is not None and not self.offline:
                    # known to the cluster: GET it (no lookup first), by tag, which a cluster
                    # routes to the tag's owner, holding it (by digest, the digest's owner
                    # would fetch it again)
                    fetched = await self._fetch_manifest(source, repository, tag, accept)
                    return dataclasses.replace(fetched, tag_max_age=max(0.0, ttl - age))
            else:
                try:
                    return await self._revalidate(source, repository, tag, usable, accept, head)
                except RegistryError as exc:
                    stale = self._from_cache(parse_digest(usable.digest), "stale", 0.0)
                    if exc.code in STALE_CODES and stale is not None:
                        metrics.STALE_ANSWERS.labels("manifest").inc()
                        log.warning("upstream failing: serving a stale tag", extra={
                            "upstream": source.name, "repository": repository, "tag": tag,
                            "error": exc.message})
                        return stale
                    raise
        self._require_online(ErrorCode.MANIFEST_UNKNOWN, f"manifest {repository}:{tag}")
        if head:
            return await self._head_manifest(source, repository, tag, accept)
        if self.rules.deny_digests:
            # The digest is judged before the manifest (and, by the prefetch, its layers) is
            # fetched: the tag is resolved with a HEAD first (Docker Hub does not count it).
            resolved = await self._head_manifest(source, repository, tag, accept)
            if resolved.data is not None:
                return resolved
        return await self._fetch_manifest(source, repository, tag, accept)

    async def _revalidate(self, source: Source, repository: str, tag: str, entry: TagEntry,
                          accept: tuple[str, ...], head: bool) -> Manifest:
        current = await self._head_manifest(source, repository, tag, accept)
        if str(current.digest) == entry.digest and current.data is not None:
            return Manifest(current.digest, current.media_type, current.size, current.data,
                            "revalidated", current.tag_max_age)
        if current.data is not None or head:
            return current
        return await self._fetch_manifest(source, repository, tag, accept)

    async def _head_manifest(self, source: Source, repository: str, reference: Digest | str,
                             accept: tuple[str, ...]) -> Manifest:
        """Ask the source with HEAD (which Docker Hub does not count against pull limits)."""
        tag = None if isinstance(reference, Digest) else reference
        key = ("HEAD", source.name, repository, str(reference), *accept)
        reply = await self._coalesce(
            key, lambda: source.head_manifest(repository, str(reference), accept))
        if not reply.digest:
            return await self._fetch_manifest(source, repository, reference, accept)
        digest = _claimed_digest(source, reply.digest)
        self._served_by(source, repository, digest)  # the source named it for this repo
        max_age = None
        if tag is not None:
            # Remembered even before the manifest itself is fetched: containerd resolves a tag
            # with HEAD, then GETs the manifest by digest.
            stored = self._cached_manifest(digest)
            entry = await self._learn_tag(source, repository, tag, digest,
                                          stored[1] if stored else reply.media_type,
                                          reply.fresh_for)
            max_age = self._trust_left(entry)
            self._check_resolved(source, repository, tag, digest)
        cached = self._from_cache(digest, "hit", max_age)
        if cached is not None:
            return cached
        return Manifest(digest, reply.media_type, reply.size or 0, None, "miss", max_age)

    async def _fetch_manifest(self, source: Source, repository: str, reference: Digest | str,
                              accept: tuple[str, ...]) -> Manifest:
        """GET a manifest from the source, once for all concurrent requests of every worker."""
        key = ("GET", source.name, repository, str(reference), *accept)
        return await self._coalesce(key, lambda: self._fetch_manifest_across_workers(
            key, source, repository, reference, accept))

    async def _fetch_manifest_across_workers(
            self, key: tuple[str, ...], source: Source, repository: str,
            reference: Digest | str, accept: tuple[str, ...]) -> Manifest:
        name = hashlib.sha256("\0".join(key).encode()).hexdigest()[:40]
        # Held until the manifest is stored and its tag recorded, so the next worker finds it.
        async with exclusive(str(self.store.lock_path(f"manifest-{name}")), WORKER_LOCK_WAIT):
            fetched = self._fetched_by_another_worker(source, repository, reference, accept)
            if fetched is not None:
                await self._confirm_access(source, repository, fetched.digest, "manifests")
                return fetched
            return await self._fetch_and_store(source, repository, reference, accept)

    async def _fetch_and_store(self, source: Source, repository: str, reference: Digest | str,
                               accept: tuple[str, ...]) -> Manifest:
        reply = await source.get_manifest(repository, str(reference), accept)
        data = reply.data
        assert data is not None
        media_type = _checked_media_type(source, reference, reply.media_type, data)
        tag = None if isinstance(reference, Digest) else reference
        ttl = self.config.cache.tag_ttl if tag else None
        if media_type in SCHEMA1_TYPES:
            # Schema 1 (deprecated; registries convert to it for clients that accept nothing
            # newer): its digest covers the signed payload, not the body, so it cannot be
            # verified byte for byte. Relayed as it came, never cached.
            claimed = reply.digest
            digest = _claimed_digest(source, claimed) if claimed else digest_of(data)
            if tag is not None:
                self._check_resolved(source, repository, tag, digest)
            return Manifest(digest, media_type, len(data), data, "miss", ttl)
        digest = self._verify_manifest(source, reference, reply, data)
        if tag is not None:  # the tag moved since its HEAD, or no HEAD was needed
            self._check_resolved(source, repository, tag, digest)
        self._entering(source, digest)
        self._store_manifest(digest, data)
        self._remember(digest, data, media_type)
        self.index.set_media_type(digest, media_type)
        self._served_by(source, repository, digest)
        if tag is not None:
            entry = await self._learn_tag(source, repository, tag, digest, media_type,
                                          reply.fresh_for)
            ttl = self._trust_left(entry)
        if self.prefetch_held is None or not self.prefetch_held(source.name, repository):
            self.prefetch(source, repository, media_type, data)
        return Manifest(digest, media_type, len(data), data, "miss", ttl)

    def prefetch(self, source: Source, repository: str, media_type: str, data: bytes) -> None:
        """After a manifest miss: the image's blobs, downloaded ahead."""
        if self.config.cache.prefetch and media_type in IMAGE_TYPES and source.prefetches:
            self.prefetcher.image(source, repository, data)

    def _store_manifest(self, digest: Digest, data: bytes) -> None:
        """Verified already; a full or read-only disk serves it anyway, uncached."""
        try:
            self.store.put_bytes(digest, data)
        except DigestMismatch as exc:  # pragma: no cover - verified before
            raise UpstreamError(ErrorCode.DIGEST_INVALID, str(exc)) from None
        except OSError as exc:
            log.error("could not cache a manifest", extra={"digest": str(digest),
                                                           "error": str(exc)})
            if exc.errno == errno.ENOSPC:
                metrics.DISK_FULL.inc()
                self.request_eviction()

    def _fetched_by_another_worker(self, source: Source, repository: str,
                                   reference: Digest | str, accept: tuple[str, ...]
                                   ) -> Manifest | None:
        """What a worker that held the fetch lock before us stored meanwhile."""
        if isinstance(reference, Digest):
            return self._from_cache(reference, "hit")
        entry = self.index.get_tag(source.name, repository, reference)
        ttl = self.config.cache.tag_ttl
        if entry is None or entry.age() >= ttl or not is_acceptable(entry.media_type, accept):
            return None
        return self._from_cache(parse_digest(entry.digest), "hit", self._trust_left(entry))

    def _verify_manifest(self, source: Source, reference: Digest | str, reply: ManifestReply,
                         data: bytes) -> Digest:
        if isinstance(reference, Digest):
            digest = reference
        else:
            digest = _claimed_digest(source, reply.digest) if reply.digest else digest_of(data)
        if not digest.matches(data):
            metrics.DIGEST_MISMATCHES.labels("manifest").inc()
            log.error("manifest digest mismatch", extra={
                "upstream": source.name, "reference": str(reference), "expected": str(digest)})
            raise UpstreamError(ErrorCode.DIGEST_INVALID,
                                f"upstream {source.name} sent a manifest that does not match "
                                f"{digest}; nothing was cached")
        return digest

    # blobs --------------------------------------------------------------------------------
    @staticmethod
    def blob_fetch(source: Source, repository: str, digest: Digest) -> Fetch:
        """What the download engine reads the blob with (from an offset, to resume)."""
        async def fetch(offset: int) -> BlobStream:
            return await source.open_blob(repository, digest, offset)

        return fetch

    def _start_download(self, source: Source, repository: str, digest: Digest
                        ) -> Download | None:
        """Join the download of `digest` in this process, follow another worker's, or lead a
        new one fetching from (source, repository) — then `origin` says so. None for a denied
        digest (the prefetch skips it; a client's request was refused before)."""
        if self.rules.deny_digests and self.rules.digest(digest) is not None:
            return None
        self._entering(source, digest)
        existing = self.downloads.get(digest)
        download = self.downloads.start(digest, self.blob_fetch(source, repository, digest),
                                        source.resume_attempts, source.name)
        if download is not None and download is not existing and download.leader:
            download.origin = (source.name, repository)
        return download

    async def blob(self, source: Source, repository: str, digest: Digest,
                   head: bool) -> tuple[BlobBody, str]:
        """The body to answer with, and how the cache answered: hit (stored), inflight
        (joined a download already running) or miss (this request started it)."""
        self.admit(source, repository, digest)
        for _ in range(3):
            stored = self._open_stored(digest)
            if stored is not None:
                try:
                    await self._confirm_access(source, repository, digest, "blobs")
                except BaseException:
                    stored.close()
                    raise
                self.index.touch(digest)
                return stored, "hit"
            download, cache = self.downloads.get(digest), "inflight"
            if download is None:
                self._require_online(ErrorCode.BLOB_UNKNOWN, f"blob {digest}")
                if head:
                    return await self._head_blob(source, repository, digest), "miss"
                download, cache = self._start_download(source, repository, digest), "miss"
            if download is None:
                continue  # stored meanwhile
            ours = download.origin == (source.name, repository)
            if not ours:  # led for another name, or by another worker: not proof for this one
                await self._confirm_access(source, repository, digest, "blobs")
                download.vouch(self.blob_fetch(source, repository, digest))
            try:
                size = await download.wait_headers()
            except RegistryError:
                if ours:
                    raise
                continue  # refused under the name it was led for: fetch under ours
            if ours:
                self._served_by(source, repository, digest)
            if size is not None:
                return DownloadBody(download), cache
            await download.wait_done()  # no size from the source: serve once stored
        raise RegistryError(ErrorCode.BLOB_UNKNOWN, f"blob {digest} vanished while being opened")

    # private content ----------------------------------------------------------------------
    # Content that entered with credentials (an upstream with credentials, or one whose
    # clients must authenticate) is "private": it is served under an (upstream, repository)
    # only once that upstream, asked with its own credentials or anonymously, confirmed the
    # repository holds it. What an anonymous upstream served is "public" for every name,
    # unless access rules are in force: then a digest cached under a repository one caller
    # may pull is not served to another under a name the upstream has not confirmed.
    def _is_private(self, digest: Digest) -> bool:
        if self._scoped:
            return True
        if digest in self._public:  # public is final: kept in memory, off the hot path
            return False
        provenance = self.index.provenance(digest)
        # Unknown (an index lost or older than provenance): private if anything can be.
        private = provenance == "private" or (provenance is None and self._any_private)
        if not private:
            self._public[digest] = True
        return private

    def _entering(self, source: Source, digest: Digest) -> None:
        """Before bytes from `source` can reach the store (or another worker)."""
        self.index.attribute(digest, source.name)  # counted in its upstream's share
        if source.private:
            self.index.mark_private(digest)

    def _served_by(self, source: Source, repository: str, digest: Digest) -> None:
        """The source answered for `digest` under `repository`."""
        if source.private or self._scoped:
            self.index.remember_access(source.name, repository, digest)
        if not source.private:
            self.index.mark_public(digest)

    async def _confirm_access(self, source: Source, repository: str, digest: Digest,
                              kind: Kind) -> None:
        """Nobody reads a private layer by asking for its digest under another name."""
        key = (source.name, repository, digest)
        if not self._is_private(digest) or key in self._confirmed:
            return
        if self.index.has_access(*key):
            self._confirmed[key] = True  # confirmations are never withdrawn
            return
        code = ErrorCode.BLOB_UNKNOWN if kind == "blobs" else ErrorCode.MANIFEST_UNKNOWN
        self._require_online(code, f"{repository}@{digest} (access not yet confirmed)")
        await source.confirm(repository, digest, kind)
        self._served_by(source, repository, digest)

    def _open_stored(self, digest: Digest) -> StoredBody | None:
        fd = self.store.open_fd(digest)
        return None if fd is None else StoredBody(fd)

    async def _head_blob(self, source: Source, repository: str, digest: Digest
                         ) -> HeadOnlyBody:
        size = await source.head_blob(repository, digest)
        self._served_by(source, repository, digest)
        return HeadOnlyBody(size)

    # tags lists, referrers ----------------------------------------------------------------
    async def relay(self, source: Source, repository: str, suffix: str,
                    query: dict[str, str], unknown: ErrorCode) -> Relayed:
        """Pass a small uncached GET through (tags lists). The repository rules apply."""
        self.admit(source, repository, reference=suffix)
        self._require_online(unknown, f"{suffix} of {repository}")
        return await source.relay(repository, suffix, query, unknown)

    async def referrers(self, source: Source, repository: str, subject: Digest,
                        artifact_type: str) -> Referrers:
        """The referrers of `subject` (signatures, SBOMs, attestations), cached like a tag:
        trusted for tag_ttl, then asked again; the last answer served when the source fails
        or the mirror is offline. Only a one-page index is kept (a Link header: relayed).
        The repository rules apply; deny_digests does not (a referrers list is not the
        subject's content)."""
        self.admit(source, repository, reference=f"referrers/{subject}")
        kept = self.index.get_referrers(source.name, repository, subject, artifact_type)
        stored = None if kept is None else self._stored_referrers(*kept)
        if stored is not None and kept is not None and (
                kept[0].age() < self.config.cache.tag_ttl or self.offline):
            return dataclasses.replace(stored, cache="hit")
        self._require_online(ErrorCode.MANIFEST_UNKNOWN, f"the referrers of {subject}")
        query = {"artifactType": artifact_type} if artifact_type else {}
        key = ("referrers", source.name, repository, str(subject), artifact_type)
        try:
            relayed = await self._coalesce(key, lambda: source.relay(
                repository, f"referrers/{subject}", query, ErrorCode.MANIFEST_UNKNOWN))
        except RegistryError as exc:
            if exc.code not in STALE_CODES or stored is None:
                raise
            metrics.STALE_ANSWERS.labels("referrers").inc()
            log.warning("upstream failing: serving stale referrers", extra={
                "upstream": source.name, "repository": repository, "subject": str(subject),
                "error": exc.message})
            return dataclasses.replace(stored, cache="stale")
        headers = dict(relayed.headers)
        if "Link" in headers or not _is_index(relayed.body):
            return Referrers(relayed.status, relayed.body, headers, "relayed")
        self._keep_referrers(source, repository, subject, artifact_type, relayed.body,
                             headers)
        return Referrers(relayed.status, relayed.body, headers, "miss")

    def _stored_referrers(self, entry: TagEntry, filters_applied: str) -> Referrers | None:
        data = self.store.read_bytes(parse_digest(entry.digest))
        if data is None:
            return None
        headers = {"Content-Type": entry.media_type}
        if filters_applied:
            headers["OCI-Filters-Applied"] = filters_applied
        return Referrers(200, data, headers, "hit")

    def _keep_referrers(self, source: Source, repository: str, subject: Digest,
                        artifact_type: str, data: bytes, headers: dict[str, str]) -> None:
        """Stored under its own digest (verified by construction), as a manifest would be:
        private provenance and per-repository access apply to it alike."""
        digest = digest_of(data)
        self._entering(source, digest)
        self._store_manifest(digest, data)
        if not self.store.has(digest):
            return  # a full disk: answered, not kept
        content_type = headers.get("Content-Type", OCI_INDEX)
        self.index.set_media_type(digest, content_type)
        self._served_by(source, repository, digest)
        self.index.set_referrers(source.name, repository, subject, artifact_type, digest,
                                 content_type, headers.get("OCI-Filters-Applied", ""))

    def _require_online(self, code: ErrorCode, what: str) -> None:
        if self.offline:
            raise RegistryError(code, f"{what} is not cached and the mirror is offline")


def _checked_media_type(source: Source, reference: Digest | str, declared: str,
                        data: bytes) -> str:
    try:
        return checked_media_type(data, declared)
    except ManifestInvalid as exc:
        log.error("upstream sent an invalid manifest", extra={
            "upstream": source.name, "reference": str(reference), "error": str(exc)})
        raise UpstreamError(ErrorCode.MANIFEST_INVALID, f"upstream {source.name} sent a "
                            f"manifest for {reference} that the mirror refuses: {exc}; "
                            "nothing was cached") from None


def _is_index(data: bytes) -> bool:
    """An image index, as the referrers API answers (anything else is relayed, not kept)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("manifests"), list)


def _claimed_digest(source: Source, value: str) -> Digest:
    try:
        return parse_digest(value)
    except RegistryError:
        raise UpstreamError(ErrorCode.DIGEST_INVALID, f"upstream {source.name} sent a "
                            f"malformed Docker-Content-Digest {value!r}") from None
