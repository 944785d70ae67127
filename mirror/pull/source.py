"""Where manifests and blobs come from when the cache lacks them.

The pull-through policy (proxy.py) and the download engine (downloads.py) see a source only
through these Protocols, as distribution's registry/proxy sees its remote `BlobService`. The
upstream registry client (upstream/client.py) is the first implementation and keeps every
wire detail to itself (paths, Range, Accept, error mapping); a peer node is meant to be the
next. Every method raises `RegistryError` for an answer that is not the content asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from mirror.cache.index import TagEntry
from mirror.oci.errors import ErrorCode
from mirror.oci.reference import Digest

Kind = Literal["manifests", "blobs"]


class ManifestReply(Protocol):
    """A source's answer for a manifest, unverified: the proxy checks it before caching."""

    @property
    def digest(self) -> str | None: ...  # used by: proxy (the digest the source claims)

    @property
    def media_type(self) -> str: ...  # used by: proxy (declared type, without parameters)

    @property
    def size(self) -> int | None: ...  # used by: proxy (a HEAD's answer to a HEAD)

    @property
    def data(self) -> bytes | None: ...  # used by: proxy (None for a HEAD)

    # used by: proxy (a tag answered by a peer that has trusted it a while is trusted here
    # only for what is left, so the cluster asks the upstream again tag_ttl after it last
    # did; None: fresh from the upstream)
    @property
    def fresh_for(self) -> float | None: ...


class Relayed(Protocol):
    """A small uncached answer passed through (a tags list, a referrers index)."""

    @property
    def status(self) -> int: ...  # used by: http/app.py relay

    @property
    def body(self) -> bytes: ...  # used by: http/app.py relay

    @property
    def headers(self) -> Mapping[str, str]: ...  # used by: http/app.py relay (Link, types)


class BlobStream(Protocol):
    """An open blob body, starting at the offset asked for."""

    @property
    def total(self) -> int | None: ...  # used by: downloads (the whole blob's size, if said)

    # used by: downloads (leader, resume, direct relay); b"" at the end; a body that breaks
    # off raises ConnectionError or TimeoutError (worth resuming from where it stopped)
    async def read(self) -> bytes: ...

    def close(self) -> None: ...  # used by: downloads

    # used by: downloads, when the bytes of a download this body was part of did not match
    # the digest (a peer that sent them is taken out; the upstream's lie is counted already)
    def reject(self) -> None: ...


class Source(Protocol):
    @property
    def name(self) -> str: ...  # used by: proxy (cache keys, tags, logs), downloads (metrics)

    @property
    def private(self) -> bool: ...  # used by: proxy (content it gives needs confirmation)

    @property
    def resume_attempts(self) -> int: ...  # used by: proxy, for the downloads it starts

    # used by: proxy, whether an image manifest fetched through this source starts the
    # prefetch of its blobs (not when answering another cluster node: that node prefetches)
    @property
    def prefetches(self) -> bool: ...

    # used by: proxy, a manifest miss (the body bounded by the source)
    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> ManifestReply: ...

    # used by: proxy, tag revalidation and HEAD misses (Docker Hub does not count HEADs)
    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> ManifestReply: ...

    # used by: downloads, through Proxy.blob_fetch (offset > 0: a resume)
    async def open_blob(self, repository: str, digest: Digest, offset: int) -> BlobStream: ...

    # used by: proxy, HEAD of a blob not cached: its size if the source says it
    async def head_blob(self, repository: str, digest: Digest) -> int | None: ...

    # used by: proxy, private content: returns when `repository` holds `digest`, else raises
    async def confirm(self, repository: str, digest: Digest, kind: Kind) -> None: ...

    # used by: proxy, tags lists and the referrers API (`suffix` as in /v2/<name>/<suffix>);
    # pull/sync, the catalog (`repository` "", `suffix` "_catalog")
    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed: ...


class SharedTags(Protocol):
    """Tag answers the nodes of a cluster share (cluster/shared.py, over Redis), so one
    upstream lookup per tag per `tag_ttl` serves the whole cluster. Never raises: Redis down
    or slow is a miss, within its timeout. Not used for private upstreams."""

    # used by: proxy, a tag not fresh in this node's index (None: ask the source)
    async def get(self, upstream: str, repository: str, tag: str) -> TagEntry | None: ...

    # used by: proxy, after the source answered for a tag; expires `ttl` after fetched_at
    async def put(self, upstream: str, repository: str, tag: str, entry: TagEntry,
                  ttl: float) -> None: ...


class SourceWrapper:
    """A Source that passes every call to `local`, the source it wraps: a tier in front of
    an upstream (the cluster's ClusterSource, the bucket's TieredSource) subclasses it and
    overrides what it routes elsewhere."""

    def __init__(self, local: Source) -> None:
        self.local = local

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def private(self) -> bool:
        return self.local.private

    @property
    def prefetches(self) -> bool:
        return self.local.prefetches

    @property
    def resume_attempts(self) -> int:
        return self.local.resume_attempts

    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> ManifestReply:
        return await self.local.get_manifest(repository, reference, accept)

    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> ManifestReply:
        return await self.local.head_manifest(repository, reference, accept)

    async def open_blob(self, repository: str, digest: Digest, offset: int) -> BlobStream:
        return await self.local.open_blob(repository, digest, offset)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        return await self.local.head_blob(repository, digest)

    async def confirm(self, repository: str, digest: Digest, kind: Kind) -> None:
        await self.local.confirm(repository, digest, kind)

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        return await self.local.relay(repository, suffix, query, unknown)
