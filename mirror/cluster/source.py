"""A Source (pull/source.py) for one upstream as seen from a cluster node: blobs come from
the node that owns their digest, and the owner looks on its next-ranked peers before it asks
the upstream; so do manifests asked for by digest (without the peer fill: they are small).
Tags, tags lists and referrers come from the upstream as on one node (with [redis], a tag
another node looked up is shared: pull/proxy.py).

    a client's request, on any node      ClusterSource(relays=True)
        owner elsewhere ──▶ GET owner/_cluster/blobs/...  (the owner serves or fills it)
                            GET owner/_cluster/manifests/<upstream>/<repository>/<digest>
        owner down      ──▶ the next rank, then this node itself
        this node owns  ──▶ the next peer_fill_ranks peers, stored only; then the upstream,
                            once this node holds the digest's fill lock (with [redis])
        another holds it ─▶ GET holder/_cluster/blobs/...?holder=1 (joins the holder's fill)
        ... cut off from it ─▶ with holder_redirect, 307 to that URL with a grant (auth.py),
                            passed on by a relaying node: the client joins the holder's
                            fill; without it, this node fetches the blob too
    /_cluster/blobs/... from a peer      ClusterSource(relays=False): never to the owner
    /_cluster/blobs/...?stored=1         the plain upstream Source, and only what is stored
    /_cluster/blobs/...?holder=1         the plain upstream Source: no lock, no peer

So a relayed request takes at most two hops (to the owner, and from it to the fill lock's
holder when the two disagree about who owns the digest) and a peer-fill probe none. The
relaying node's download engine verifies every byte against the digest as it would the
upstream's, so nodes that disagree about who owns what cost a duplicate fetch, never wrong
bytes; the fill lock makes even that rare while Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from mirror import metrics
from mirror.cluster import auth, ring
from mirror.cluster.peers import (
    Ask,
    HolderRedirect,
    Membership,
    PeerBlob,
    PeerMiss,
    PeerUnavailable,
)
from mirror.oci.mediatypes import upstream_accept
from mirror.oci.reference import Digest, is_digest_reference, parse_digest
from mirror.pull.source import BlobStream, ManifestReply, Source, SourceWrapper

log = logging.getLogger("mirror.cluster")

GRANT_TTL = 60.0  # a redirect to the fill lock's holder is good this long
FILL_TTL = 30.0  # a fill lock lives this long unless renewed (every third of it, as bytes pass)
DONE_TTL = 60.0  # after a fill that completed, the holder answers for the digest this long
_ENDING: set[asyncio.Task[object]] = set()  # lock renewals and releases under way at close


class FillLocks(Protocol):
    """One node at a time downloads a digest from the upstream (cluster/shared.py, over
    Redis). Never raises: Redis unusable answers "yours" (each node goes on alone)."""

    # used by: ClusterSource, before the upstream: None if `holder` holds it now, else the
    # holder's string (`holder` itself if it held it already)
    async def acquire_fill(self, digest: str, holder: str, ttl: float) -> str | None: ...

    # used by: FillHeld, as bytes pass, and at the end of a fill that completed
    async def renew_fill(self, digest: str, holder: str, ttl: float) -> bool: ...

    # used by: FillHeld, when a fill stopped short (another node may take it over)
    async def release_fill(self, digest: str, holder: str) -> None: ...


class ClusterSource(SourceWrapper):
    def __init__(self, local: Source, membership: Membership, relays: bool,
                 fill_locks: FillLocks | None = None,
                 on_copy: Callable[[Digest], None] | None = None) -> None:
        super().__init__(local)
        self.membership = membership
        self.relays = relays
        self.fill_locks = fill_locks
        self.on_copy = on_copy  # a blob relayed from its owner: once stored, a relay copy

    @property
    def prefetches(self) -> bool:
        """A peer's request (relays=False) does not: the peer prefetches through the owners,
        and this node's prefetch would fill every blob from the upstream itself."""
        return self.relays and self.local.prefetches

    def _ranks(self, digest: Digest) -> tuple[list[str], list[str]]:
        """The URLs of the live nodes ranked above this one for `digest`, and below."""
        nodes = self.membership.live()
        ranked = ring.rank(nodes, str(digest))
        me = ranked.index(self.membership.config.node_id)
        return [nodes[n] for n in ranked[:me]], [nodes[n] for n in ranked[me + 1:]]

    async def open_blob(self, repository: str, digest: Digest, offset: int) -> BlobStream:
        above, below = self._ranks(digest)
        if self.relays:
            for url in above:  # the owner first; a rank down when it does not answer
                body = await self._try(url, repository, digest, offset, "fill")
                if body is not None:
                    metrics.PEER_RELAYS.labels("owner").inc()
                    if self.on_copy is not None:
                        self.on_copy(digest)
                    return body
        if offset == 0:  # a resume comes from where the download started, the upstream
            for url in below[:self.membership.config.peer_fill_ranks]:
                body = await self._try(url, repository, digest, 0, "stored")
                if body is not None:
                    metrics.PEER_RELAYS.labels("fill").inc()
                    return body
        return await self._fill(repository, digest, offset)

    async def _fill(self, repository: str, digest: Digest, offset: int) -> BlobStream:
        """From the upstream, unless another node holds the digest's fill lock: then from
        that node, which is downloading it (or did, a moment ago). Only a peer of ours that
        is up is asked: a holder string from Redis never sends a signed request elsewhere."""
        if self.fill_locks is None:
            return await self.local.open_blob(repository, digest, offset)
        me = self.membership.config.advertise_url
        holder = await self.fill_locks.acquire_fill(str(digest), me, FILL_TTL)
        if holder is not None and holder != me and self._up(holder):
            relayed = await self._try(holder, repository, digest, offset, "holder")
            if relayed is not None:
                metrics.PEER_RELAYS.labels("holder").inc()
                return relayed
            holder = await self.fill_locks.acquire_fill(str(digest), me, FILL_TTL)
        elif holder is not None and holder != me:  # seen down: cut off from us, not failing
            self._redirect(holder, repository, digest, offset)
        body = await self.local.open_blob(repository, digest, offset)
        if holder is None or holder == me:
            return FillHeld(body, self.fill_locks, str(digest), me)
        return body  # the holder did not answer and still holds it: a duplicate fetch

    def _redirect(self, holder: str, repository: str, digest: Digest, offset: int) -> None:
        """With holder_redirect, a client's request for public content that the lock's holder
        (a peer this node cannot reach) is fetching is sent there rather than fetched again:
        HolderRedirect, answered 307 by the handler (a node relaying from this one passes it
        on to its client). Only from the start of a blob (a resume is this node's own
        download, under way to its clients) and never private content, which the grant
        would serve to anyone holding the URL."""
        config = self.membership.config
        if not (config.holder_redirect and offset == 0 and not self.private
                and holder in self.membership.peers):
            return
        path = self.membership.blob_path(self.name, repository, digest)
        token = auth.grant(config.secret, config.node_id, path, time.time() + GRANT_TTL)
        metrics.PEER_RELAYS.labels("redirect").inc()
        raise HolderRedirect(f"{holder}{path}?holder=1&grant={token}", digest)

    def _up(self, url: str) -> bool:
        """A holder is followed only while this node sees it up: asking one it cannot reach
        (a partition) would hold this fill for peer_timeout, long enough for the nodes
        relaying from this one to give up on it too."""
        peer = self.membership.peers.get(url)
        return peer is not None and peer.up

    async def _try(self, url: str, repository: str, digest: Digest, offset: int,
                   ask: Ask) -> PeerBlob | None:
        try:
            return await self.membership.open_blob(url, self.name, repository, digest, offset,
                                                   ask)
        except PeerMiss:
            return None
        except PeerUnavailable as exc:
            self._unavailable(url, str(digest), exc)
            return None

    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> ManifestReply:
        if self.relays and is_digest_reference(reference):
            digest = parse_digest(reference)
            for url in self._ranks(digest)[0]:
                try:
                    reply = await self.membership.get_manifest(
                        url, self.name, repository, str(digest), upstream_accept(accept))
                except PeerUnavailable as exc:
                    self._unavailable(url, str(digest), exc)
                    continue
                if reply.data is None or not digest.matches(reply.data):
                    self.membership.quarantine(url)
                    continue
                metrics.PEER_RELAYS.labels("manifest").inc()
                return reply
        elif (owner := self._tag_owner(repository, reference)) is not None:
            answered = await self._tag_from(owner, repository, reference, accept, "GET")
            if answered is not None:
                return answered
        return await self.local.get_manifest(repository, reference, accept)

    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> ManifestReply:
        if not is_digest_reference(reference) and (
                owner := self._tag_owner(repository, reference)) is not None:
            reply = await self._tag_from(owner, repository, reference, accept, "HEAD")
            if reply is not None:
                return reply
        return await self.local.head_manifest(repository, reference, accept)

    def _tag_owner(self, repository: str, tag: str) -> str | None:
        """The URL of the node that looks `tag` up upstream for the cluster (its key ranked
        like a digest), unless it is this node; never for a private upstream, whose tags are
        looked up with each node's own access."""
        if not self.relays or self.private:
            return None
        nodes = self.membership.live()
        owner = ring.owner(nodes, f"tag:{self.name}/{repository}:{tag}")
        return None if owner == self.membership.config.node_id else nodes[owner]

    async def _tag_from(self, url: str, repository: str, tag: str, accept: tuple[str, ...],
                        method: str) -> ManifestReply | None:
        """The tag's owner's answer (it serves from its index while fresh, else asks the
        upstream once for every node), or None when it does not answer: then this node asks
        the upstream itself."""
        try:
            reply = await self.membership.get_manifest(url, self.name, repository, tag,
                                                       upstream_accept(accept), method)
        except PeerUnavailable as exc:
            self._unavailable(url, f"{repository}:{tag}", exc)
            return None
        metrics.PEER_RELAYS.labels("tag").inc()
        return reply

    def _unavailable(self, url: str, what: str, exc: PeerUnavailable) -> None:
        log.warning("peer did not answer: asking the next", extra={
            "peer": url, "content": what, "error": str(exc)})
        self.membership.mark_down(url, str(exc))


class FillHeld:
    """The upstream's body while this node holds the digest's fill lock: renewed as bytes
    pass; at the end kept for DONE_TTL (late askers stream it from here), released if the
    fill stopped short."""

    def __init__(self, body: BlobStream, locks: FillLocks, digest: str, holder: str) -> None:
        self.body, self.locks, self.digest, self.holder = body, locks, digest, holder
        self.renewed = time.monotonic()
        self.ended = False

    @property
    def total(self) -> int | None:
        return self.body.total

    async def read(self) -> bytes:
        chunk = await self.body.read()
        self.ended = not chunk
        if time.monotonic() - self.renewed > FILL_TTL / 3:
            self.renewed = time.monotonic()
            await self.locks.renew_fill(self.digest, self.holder, FILL_TTL)
        return chunk

    def close(self) -> None:
        self.body.close()
        end = (self.locks.renew_fill(self.digest, self.holder, DONE_TTL) if self.ended
               else self.locks.release_fill(self.digest, self.holder))
        task: asyncio.Task[object] = asyncio.ensure_future(end)
        _ENDING.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(_ENDING.discard)

    def reject(self) -> None:
        self.body.reject()
        self.ended = False  # wrong bytes: nobody should be sent here for them
