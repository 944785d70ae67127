"""The pull-through layer: answers manifests and blobs from the store, else from the upstream.

It sits between the HTTP handlers and the pieces below it (store, index, upstream client,
single-flight downloads) and owns the caching policy: digests are immutable and cached for
good; tags are trusted for `tag_ttl`, then revalidated with a HEAD; an unreachable, failing
or rate-limiting upstream is answered from cache where possible (stale-if-error).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiohttp
from cachetools import LRUCache, TLRUCache

from mirror import metrics
from mirror.cache.index import Index, TagEntry
from mirror.cache.locks import exclusive
from mirror.cache.store import BlobStore, DigestMismatch
from mirror.config import Config
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import (
    IMAGE_TYPES,
    SCHEMA1_TYPES,
    ManifestInvalid,
    checked_media_type,
    is_acceptable,
    referenced_blobs,
    upstream_accept,
)
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.pull.downloads import Download, Downloads, Fetch
from mirror.upstream.client import Upstream, error_from_response

log = logging.getLogger("mirror.proxy")

T = TypeVar("T")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's bound for manifests
MAX_RELAYED_BYTES = 8 * 1024 * 1024  # a tags list or referrers index (thousands of entries)
MEMORY_MANIFEST_BYTES = 64 * 1024 * 1024
PREFETCH_AHEAD = 2  # prefetched downloads running at once (beyond what clients asked for)
PREFETCH_QUEUE = 10_000
CONFIRMATIONS_IN_MEMORY = 65536  # provenance and access answers kept off SQLite
WORKER_LOCK_WAIT = 30.0  # seconds a worker waits for another's manifest fetch
# Answers from the upstream that stale-if-error covers (it is down, failing or rate limiting).
STALE_CODES = frozenset({"UPSTREAM_UNREACHABLE", "UPSTREAM_UNAVAILABLE", "UPSTREAM_TIMEOUT",
                         "TOOMANYREQUESTS"})


@dataclass(frozen=True)
class Manifest:
    digest: Digest
    media_type: str
    size: int
    data: bytes | None  # None: a HEAD answered from the upstream's headers alone
    cache: str  # hit | miss | revalidated | stale
    tag_max_age: float | None = None  # remaining trust in a tag, for Cache-Control


@dataclass(frozen=True)
class StoredBlob:
    fd: int
    size: int


@dataclass(frozen=True)
class UpstreamBlobHead:
    size: int | None


BlobSource = StoredBlob | Download | UpstreamBlobHead


class Proxy:
    def __init__(self, config: Config, store: BlobStore, index: Index,
                 upstreams: dict[str, Upstream], downloads: Downloads) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.upstreams = upstreams
        self.downloads = downloads
        self.offline = config.cache.offline
        # Hot manifests (bytes, media type, store path) and fresh tags, so hits read no file
        # and touch no SQLite (a memory hit costs one stat: see _cached_manifest).
        self._memory: LRUCache[Digest, tuple[bytes, str, str]] = LRUCache(
            MEMORY_MANIFEST_BYTES, getsizeof=lambda v: len(v[0]))
        self._restore_failure_logged = 0.0
        ttl = config.cache.tag_ttl
        self._tags: TLRUCache[tuple[str, str, str], TagEntry] = TLRUCache(
            maxsize=65536, ttu=lambda _k, e, now: now + ttl - e.age(), timer=time.monotonic)
        self._flights: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._prefetch_queue: collections.deque[tuple[Upstream, str, Digest]] = (
            collections.deque(maxlen=PREFETCH_QUEUE))
        self._prefetching: set[Digest] = set()
        self._any_private = any(self._private_upstream(u) for u in upstreams.values())
        self._public: LRUCache[Digest, bool] = LRUCache(CONFIRMATIONS_IN_MEMORY)
        self._confirmed: LRUCache[tuple[str, str, Digest], bool] = LRUCache(
            CONFIRMATIONS_IN_MEMORY)

    # the cache's maintenance, wired by runtime.py -----------------------------------------
    on_disk_full: Callable[[], None] | None = None  # asks for eviction

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
            data, media_type, path = hit
            # Any worker may have evicted it: what is answered from memory must stay on disk
            # (or a restart with the upstream down loses the hottest manifests). A stat per
            # hit is the cheapest check that needs no message between worker processes.
            if not os.path.exists(path):
                self._restore(digest, data, media_type)
            return data, media_type
        stored = self.store.read_bytes(digest)
        if stored is None:
            return None
        media_type = self.index.media_type(digest, stored)
        self._remember(digest, stored, media_type)
        return stored, media_type

    def _remember(self, digest: Digest, data: bytes, media_type: str) -> None:
        self._memory[digest] = (data, media_type, str(self.store.path(digest)))

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
        self.index.count("manifest_hit")
        return Manifest(digest, media_type, len(data), data, cache, max_age)

    def _get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        entry = self._tags.get((upstream, repository, tag))
        if entry is None:
            entry = self.index.get_tag(upstream, repository, tag)
            if entry is not None and entry.age() < self.config.cache.tag_ttl:
                self._tags[(upstream, repository, tag)] = entry
        return entry

    def _set_tag(self, upstream: str, repository: str, tag: str, digest: Digest,
                 media_type: str) -> None:
        entry = self.index.set_tag(upstream, repository, tag, digest, media_type)
        self._tags[(upstream, repository, tag)] = entry

    async def manifest(self, upstream: Upstream, repository: str, reference: Digest | str,
                       accept: tuple[str, ...], head: bool) -> Manifest:
        if isinstance(reference, Digest):
            cached = self._from_cache(reference, "hit")
            if cached is not None:
                await self._confirm_access(upstream, repository, reference, "manifests")
                return cached
            self._require_online("MANIFEST_UNKNOWN", f"manifest {reference}")
            if head:
                return await self._head_manifest(upstream, repository, str(reference), accept)
            return await self._fetch_manifest(upstream, repository, str(reference), accept)
        return await self._manifest_by_tag(upstream, repository, reference, accept, head)

    async def _manifest_by_tag(self, upstream: Upstream, repository: str, tag: str,
                               accept: tuple[str, ...], head: bool) -> Manifest:
        ttl = self.config.cache.tag_ttl
        entry = self._get_tag(upstream.name, repository, tag)
        usable = entry if entry and is_acceptable(entry.media_type, accept) else None
        if usable is not None:
            age = usable.age()
            if age < ttl or self.offline:
                cached = self._from_cache(parse_digest(usable.digest), "hit", max(0.0, ttl - age))
                if cached is not None:
                    return cached
            else:
                try:
                    return await self._revalidate(upstream, repository, tag, usable, accept, head)
                except RegistryError as exc:
                    stale = self._from_cache(parse_digest(usable.digest), "stale", 0.0)
                    if exc.code in STALE_CODES and stale is not None:
                        metrics.STALE_ANSWERS.labels("manifest").inc()
                        log.warning("upstream failing: serving a stale tag", extra={
                            "upstream": upstream.name, "repository": repository, "tag": tag,
                            "error": exc.message})
                        return stale
                    raise
        self._require_online("MANIFEST_UNKNOWN", f"manifest {repository}:{tag}")
        if head:
            return await self._head_manifest(upstream, repository, tag, accept, tag=tag)
        return await self._fetch_manifest(upstream, repository, tag, accept, tag=tag)

    async def _revalidate(self, upstream: Upstream, repository: str, tag: str, entry: TagEntry,
                          accept: tuple[str, ...], head: bool) -> Manifest:
        current = await self._head_manifest(upstream, repository, tag, accept, tag=tag)
        if str(current.digest) == entry.digest and current.data is not None:
            return Manifest(current.digest, current.media_type, current.size, current.data,
                            "revalidated", self.config.cache.tag_ttl)
        if current.data is not None or head:
            return current
        return await self._fetch_manifest(upstream, repository, tag, accept, tag=tag)

    async def _head_manifest(self, upstream: Upstream, repository: str, reference: str,
                             accept: tuple[str, ...], tag: str | None = None) -> Manifest:
        """Ask the upstream with HEAD (which Docker Hub does not count against pull limits)."""
        key = ("HEAD", upstream.name, repository, reference, *accept)
        resp_headers = await self._coalesce(
            key, lambda: self._upstream_manifest(upstream, repository, reference, accept, "HEAD"))
        headers, _ = resp_headers
        header_digest = headers.get("Docker-Content-Digest")
        if not header_digest:
            return await self._fetch_manifest(upstream, repository, reference, accept, tag=tag)
        digest = _upstream_digest(upstream, header_digest)
        media_type = headers.get("Content-Type", "").split(";")[0].strip()
        self._served_by(upstream, repository, digest)  # the upstream named it for this repo
        if tag is not None:
            # Remembered even before the manifest itself is fetched: containerd resolves a tag
            # with HEAD, then GETs the manifest by digest.
            stored = self._cached_manifest(digest)
            self._set_tag(upstream.name, repository, tag, digest,
                          stored[1] if stored else media_type)
        cached = self._from_cache(digest, "hit", self.config.cache.tag_ttl if tag else None)
        if cached is not None:
            return cached
        size = int(headers.get("Content-Length", "0") or 0)
        return Manifest(digest, media_type, size, None, "miss",
                        self.config.cache.tag_ttl if tag else None)

    async def _fetch_manifest(self, upstream: Upstream, repository: str, reference: str,
                              accept: tuple[str, ...], tag: str | None = None) -> Manifest:
        """GET a manifest upstream, once for all concurrent requests of every worker."""
        key = ("GET", upstream.name, repository, reference, *accept)
        return await self._coalesce(key, lambda: self._fetch_manifest_across_workers(
            key, upstream, repository, reference, accept, tag))

    async def _fetch_manifest_across_workers(
            self, key: tuple[str, ...], upstream: Upstream, repository: str, reference: str,
            accept: tuple[str, ...], tag: str | None) -> Manifest:
        name = hashlib.sha256("\0".join(key).encode()).hexdigest()[:40]
        # Held until the manifest is stored and its tag recorded, so the next worker finds it.
        async with exclusive(str(self.store.lock_path(f"manifest-{name}")), WORKER_LOCK_WAIT):
            fetched = self._fetched_by_another_worker(upstream, repository, reference, accept)
            if fetched is not None:
                await self._confirm_access(upstream, repository, fetched.digest, "manifests")
                return fetched
            return await self._fetch_and_store(upstream, repository, reference, accept, tag)

    async def _fetch_and_store(self, upstream: Upstream, repository: str, reference: str,
                               accept: tuple[str, ...], tag: str | None) -> Manifest:
        headers, data = await self._upstream_manifest(upstream, repository, reference, accept,
                                                      "GET")
        assert data is not None
        media_type = _checked_media_type(upstream, reference, headers, data)
        ttl = self.config.cache.tag_ttl if tag else None
        if media_type in SCHEMA1_TYPES:
            # Schema 1 (deprecated; registries convert to it for clients that accept nothing
            # newer): its digest covers the signed payload, not the body, so it cannot be
            # verified byte for byte. Relayed as it came, never cached.
            claimed = headers.get("Docker-Content-Digest")
            digest = _upstream_digest(upstream, claimed) if claimed else digest_of(data)
            return Manifest(digest, media_type, len(data), data, "miss", ttl)
        digest = self._verify_manifest(upstream, reference, headers, data)
        self._entering(upstream, digest)
        try:
            self.store.put_bytes(digest, data)
        except DigestMismatch as exc:  # pragma: no cover - verified just above
            raise RegistryError("DIGEST_INVALID", str(exc), status=502) from None
        except OSError as exc:  # a full or read-only disk: serve it anyway, uncached
            log.error("could not cache a manifest", extra={"digest": str(digest),
                                                           "error": str(exc)})
            if exc.errno == errno.ENOSPC:
                metrics.DISK_FULL.inc()
                self.request_eviction()
        self._remember(digest, data, media_type)
        self.index.set_media_type(digest, media_type)
        self.index.count("manifest_miss")
        self._served_by(upstream, repository, digest)
        if tag is not None:
            self._set_tag(upstream.name, repository, tag, digest, media_type)
        if self.config.cache.prefetch and media_type in IMAGE_TYPES:
            self._prefetch(upstream, repository, data)
        return Manifest(digest, media_type, len(data), data, "miss", ttl)

    def _fetched_by_another_worker(self, upstream: Upstream, repository: str, reference: str,
                                   accept: tuple[str, ...]) -> Manifest | None:
        """What a worker that held the fetch lock before us stored meanwhile."""
        if ":" in reference:
            return self._from_cache(parse_digest(reference), "hit")
        entry = self.index.get_tag(upstream.name, repository, reference)
        ttl = self.config.cache.tag_ttl
        if entry is None or entry.age() >= ttl or not is_acceptable(entry.media_type, accept):
            return None
        return self._from_cache(parse_digest(entry.digest), "hit", ttl - entry.age())

    def _verify_manifest(self, upstream: Upstream, reference: str, headers: dict[str, str],
                         data: bytes) -> Digest:
        claimed = reference if ":" in reference else headers.get("Docker-Content-Digest")
        digest = _upstream_digest(upstream, claimed) if claimed else digest_of(data)
        if not digest.matches(data):
            metrics.DIGEST_MISMATCHES.labels("manifest").inc()
            log.error("manifest digest mismatch", extra={
                "upstream": upstream.name, "reference": reference, "expected": str(digest)})
            raise RegistryError("DIGEST_INVALID",
                                f"upstream {upstream.name} sent a manifest that does not match "
                                f"{digest}; nothing was cached", status=502)
        return digest

    async def _upstream_manifest(self, upstream: Upstream, repository: str, reference: str,
                                 accept: tuple[str, ...], method: str
                                 ) -> tuple[dict[str, str], bytes | None]:
        resp = await upstream.request(method, repository, f"manifests/{reference}",
                                      headers={"Accept": upstream_accept(accept)})
        if resp.status != 200:
            raise await error_from_response(upstream, resp, "MANIFEST_UNKNOWN")
        headers = {k: resp.headers[k] for k in ("Docker-Content-Digest", "Content-Type",
                                                "Content-Length") if k in resp.headers}
        if method == "HEAD":
            resp.release()
            return headers, None
        try:
            data = await read_bounded(upstream, resp, MAX_MANIFEST_BYTES, "a manifest",
                                      "MANIFEST_INVALID", "pull it from the upstream directly")
        finally:
            resp.release()
        return headers, data

    # blobs --------------------------------------------------------------------------------
    def blob_fetch(self, upstream: Upstream, repository: str, digest: Digest) -> Fetch:
        async def fetch(offset: int) -> aiohttp.ClientResponse:
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            resp = await upstream.request("GET", repository, f"blobs/{digest}", headers=headers)
            if resp.status in (200, 206):
                return resp
            raise await error_from_response(upstream, resp, "BLOB_UNKNOWN")

        return fetch

    def _start_download(self, upstream: Upstream, repository: str, digest: Digest
                        ) -> Download | None:
        """Join the download of `digest` in this process, follow another worker's, or lead a
        new one fetching from (upstream, repository) — then `origin` says so."""
        self._entering(upstream, digest)
        existing = self.downloads.get(digest)
        download = self.downloads.start(digest, self.blob_fetch(upstream, repository, digest),
                                        upstream.config.resume_attempts, upstream.name)
        if download is not None and download is not existing and download.leader:
            download.origin = (upstream.name, repository)
        return download

    async def blob(self, upstream: Upstream, repository: str, digest: Digest,
                   head: bool) -> tuple[BlobSource, str]:
        """Where to serve a blob from, and how the cache answered: hit (stored), inflight
        (joined a download already running) or miss (this request started it)."""
        for _ in range(3):
            stored = self._open_stored(digest)
            if stored is not None:
                try:
                    await self._confirm_access(upstream, repository, digest, "blobs")
                except BaseException:
                    os.close(stored.fd)
                    raise
                self.index.touch(digest)
                self.index.count("blob_hit")
                return stored, "hit"
            download, cache = self.downloads.get(digest), "inflight"
            if download is None:
                self._require_online("BLOB_UNKNOWN", f"blob {digest}")
                if head:
                    return await self._head_blob(upstream, repository, digest), "miss"
                download, cache = self._start_download(upstream, repository, digest), "miss"
            if download is None:
                continue  # stored meanwhile
            ours = download.origin == (upstream.name, repository)
            if not ours:  # led for another name, or by another worker: not proof for this one
                await self._confirm_access(upstream, repository, digest, "blobs")
            self.index.count("blob_miss")
            size = await download.wait_headers()
            if ours:
                self._served_by(upstream, repository, digest)
            if size is not None:
                return download, cache
            await download.wait_done()  # no size from upstream: serve once stored
        raise RegistryError("BLOB_UNKNOWN", f"blob {digest} vanished while being opened")

    # private content ----------------------------------------------------------------------
    # Content that entered with credentials (an upstream with credentials, or one whose
    # clients must authenticate) is "private": it is served under an (upstream, repository)
    # only once that upstream, asked with its own credentials or anonymously, confirmed the
    # repository holds it. What an anonymous upstream served is "public" for every name.
    @staticmethod
    def _private_upstream(upstream: Upstream) -> bool:
        return upstream.credentials.configured or upstream.config.access == "authenticated"

    def _is_private(self, digest: Digest) -> bool:
        if digest in self._public:  # public is final: kept in memory, off the hot path
            return False
        provenance = self.index.provenance(digest)
        # Unknown (an index lost or older than provenance): private if anything can be.
        private = provenance == "private" or (provenance is None and self._any_private)
        if not private:
            self._public[digest] = True
        return private

    def _entering(self, upstream: Upstream, digest: Digest) -> None:
        """Before bytes from `upstream` can reach the store (or another worker)."""
        if self._private_upstream(upstream):
            self.index.mark_private(digest)

    def _served_by(self, upstream: Upstream, repository: str, digest: Digest) -> None:
        """The upstream answered for `digest` under `repository`."""
        if self._private_upstream(upstream):
            self.index.remember_access(upstream.name, repository, digest)
        else:
            self.index.mark_public(digest)

    async def _confirm_access(self, upstream: Upstream, repository: str, digest: Digest,
                              endpoint: str) -> None:
        """Nobody reads a private layer by asking for its digest under another name."""
        key = (upstream.name, repository, digest)
        if not self._is_private(digest) or key in self._confirmed:
            return
        if self.index.has_access(*key):
            self._confirmed[key] = True  # confirmations are never withdrawn
            return
        code = "BLOB_UNKNOWN" if endpoint == "blobs" else "MANIFEST_UNKNOWN"
        self._require_online(code, f"{repository}@{digest} (access not yet confirmed)")
        resp = await upstream.request("HEAD", repository, f"{endpoint}/{digest}",
                                      headers={"Accept": upstream_accept(())})
        if resp.status != 200:
            raise await error_from_response(upstream, resp, code)
        resp.release()
        self._served_by(upstream, repository, digest)

    def _open_stored(self, digest: Digest) -> StoredBlob | None:
        fd = self.store.open_fd(digest)
        if fd is None:
            return None
        return StoredBlob(fd, os.fstat(fd).st_size)

    async def _head_blob(self, upstream: Upstream, repository: str, digest: Digest
                         ) -> UpstreamBlobHead:
        resp = await upstream.request("HEAD", repository, f"blobs/{digest}")
        if resp.status != 200:
            raise await error_from_response(upstream, resp, "BLOB_UNKNOWN")
        length = resp.headers.get("Content-Length")
        resp.release()
        self._served_by(upstream, repository, digest)
        return UpstreamBlobHead(int(length) if length and length.isdigit() else None)

    def _prefetch(self, upstream: Upstream, repository: str, manifest: bytes) -> None:
        """Queue the image's config and layers, in order, so a client that fetches a few
        layers at a time finds the next ones in flight already."""
        for value in referenced_blobs(manifest)[0]:
            with contextlib.suppress(RegistryError):
                self._prefetch_queue.append((upstream, repository, parse_digest(value)))
        self._pump_prefetch()

    def _pump_prefetch(self) -> None:
        """Keep PREFETCH_AHEAD queued downloads running. Prefetch only fills the link's idle
        time: all at once, the layers a client asks for first would share the bandwidth with
        every other layer and arrive later than without prefetch."""
        while self._prefetch_queue and len(self._prefetching) < PREFETCH_AHEAD:
            upstream, repository, digest = self._prefetch_queue.popleft()
            if self.store.size(digest) is not None or self.downloads.get(digest) is not None:
                continue
            download = self._start_download(upstream, repository, digest)
            if download is None or download.task is None:
                continue
            self._prefetching.add(digest)
            download.task.add_done_callback(functools.partial(self._prefetched, digest))

    def _prefetched(self, digest: Digest, _task: object) -> None:
        self._prefetching.discard(digest)
        self._pump_prefetch()

    # tags ---------------------------------------------------------------------------------
    async def relay(self, upstream: Upstream, repository: str, suffix: str,
                    query: dict[str, str], unknown: str) -> tuple[int, bytes, dict[str, str]]:
        """Pass a small uncached GET through (tags lists, the referrers API)."""
        self._require_online(unknown, f"{suffix} of {repository}")
        resp = await upstream.request("GET", repository, suffix, params=query)
        if resp.status != 200:
            raise await error_from_response(upstream, resp, unknown)
        what = "a tags list" if suffix.startswith("tags/") else "a referrers index"
        try:
            body = await read_bounded(upstream, resp, MAX_RELAYED_BYTES, what,
                                      "UPSTREAM_UNAVAILABLE", "page through it with ?n=")
        finally:
            resp.release()
        headers = {k: resp.headers[k] for k in ("Content-Type", "Link", "OCI-Filters-Applied")
                   if k in resp.headers}
        return resp.status, body, headers

    def _require_online(self, code: str, what: str) -> None:
        if self.offline:
            raise RegistryError(code, f"{what} is not cached and the mirror is offline")


def _checked_media_type(upstream: Upstream, reference: str, headers: dict[str, str],
                        data: bytes) -> str:
    declared = headers.get("Content-Type", "").split(";")[0]
    try:
        return checked_media_type(data, declared)
    except ManifestInvalid as exc:
        log.error("upstream sent an invalid manifest", extra={
            "upstream": upstream.name, "reference": reference, "error": str(exc)})
        raise RegistryError("MANIFEST_INVALID", f"upstream {upstream.name} sent a manifest "
                            f"for {reference} that the mirror refuses: {exc}; nothing was "
                            "cached", status=502) from None


async def read_bounded(upstream: Upstream, resp: aiohttp.ClientResponse, limit: int,
                       what: str, code: str, advice: str) -> bytes:
    """The whole body, refused beyond `limit` bytes. (`content.read(n)` would return only
    what happens to be buffered: a large manifest arrived cut at a few tens of KB.)"""
    too_large = RegistryError(code, f"upstream {upstream.name} sent {what} larger than "
                              f"{limit} bytes, more than the mirror relays; {advice}",
                              status=502)
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RegistryError("UPSTREAM_UNAVAILABLE",
                            f"upstream {upstream.name} broke off {what}: {exc}",
                            status=502) from None
    if resp.content_length is not None and len(body) != resp.content_length:
        raise RegistryError("UPSTREAM_UNAVAILABLE", f"upstream {upstream.name} sent {what} of "
                            f"{len(body)} bytes, not the {resp.content_length} it announced",
                            status=502)
    return bytes(body)


def _upstream_digest(upstream: Upstream, value: str) -> Digest:
    try:
        return parse_digest(value)
    except RegistryError:
        raise RegistryError("DIGEST_INVALID", f"upstream {upstream.name} sent a malformed "
                            f"Docker-Content-Digest {value!r}", status=502) from None
