"""A Source (pull/source.py) for one upstream as seen from a cluster node: blobs come from
the node that owns their digest, and the owner looks on its next-ranked peers before it asks
the upstream; so do manifests asked for by digest (without the peer fill: they are small).
Tags, tags lists and referrers come from the upstream as on one node (with [redis], a tag
another node looked up is shared: pull/proxy.py).

    a client's request, on any node      ClusterSource(relays=True)
        owner elsewhere ──▶ GET owner/_cluster/blobs/...  (the owner serves or fills it)
                            GET owner/_cluster/manifests/<upstream>/<repository>/<digest>
        owner down      ──▶ the next rank, then this node itself
        this node owns  ──▶ the next peer_fill_ranks peers, stored only; then the upstream
    /_cluster/blobs/... from a peer      ClusterSource(relays=False): never relays again
    /_cluster/blobs/...?stored=1         the plain upstream Source, and only what is stored

So a relayed request takes at most one hop and a peer-fill probe none. The relaying node's
download engine verifies every byte against the digest as it would the upstream's, so
nodes that disagree about who owns what cost a duplicate fetch, never wrong bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from mirror import metrics
from mirror.cluster import ring
from mirror.cluster.peers import Membership, PeerBlob, PeerMiss, PeerUnavailable
from mirror.oci.errors import ErrorCode
from mirror.oci.mediatypes import upstream_accept
from mirror.oci.reference import Digest, is_digest_reference, parse_digest
from mirror.pull.source import BlobStream, Kind, ManifestReply, Relayed, Source

log = logging.getLogger("mirror.cluster")


class ClusterSource:
    def __init__(self, local: Source, membership: Membership, relays: bool) -> None:
        self.local = local
        self.membership = membership
        self.relays = relays

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def private(self) -> bool:
        return self.local.private

    @property
    def resume_attempts(self) -> int:
        return self.local.resume_attempts

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
                body = await self._try(url, repository, digest, offset, False)
                if body is not None:
                    metrics.PEER_RELAYS.labels("owner").inc()
                    return body
        if offset == 0:  # a resume comes from where the download started, the upstream
            for url in below[:self.membership.config.peer_fill_ranks]:
                body = await self._try(url, repository, digest, 0, True)
                if body is not None:
                    metrics.PEER_RELAYS.labels("fill").inc()
                    return body
        return await self.local.open_blob(repository, digest, offset)

    async def _try(self, url: str, repository: str, digest: Digest, offset: int,
                   stored_only: bool) -> PeerBlob | None:
        try:
            return await self.membership.open_blob(url, self.name, repository, digest, offset,
                                                   stored_only)
        except PeerMiss:
            return None
        except PeerUnavailable as exc:
            self._unavailable(url, digest, exc)
            return None

    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> ManifestReply:
        if self.relays and is_digest_reference(reference):
            digest = parse_digest(reference)
            for url in self._ranks(digest)[0]:
                try:
                    reply = await self.membership.get_manifest(
                        url, self.name, repository, digest, upstream_accept(accept))
                except PeerUnavailable as exc:
                    self._unavailable(url, digest, exc)
                    continue
                if reply.data is None or not digest.matches(reply.data):
                    self.membership.quarantine(url)
                    continue
                metrics.PEER_RELAYS.labels("manifest").inc()
                return reply
        return await self.local.get_manifest(repository, reference, accept)

    def _unavailable(self, url: str, digest: Digest, exc: PeerUnavailable) -> None:
        log.warning("peer did not answer: asking the next", extra={
            "peer": url, "digest": str(digest), "error": str(exc)})
        self.membership.mark_down(url, str(exc))

    # the rest is the upstream's, as on a single node ------------------------------------
    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> ManifestReply:
        return await self.local.head_manifest(repository, reference, accept)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        return await self.local.head_blob(repository, digest)

    async def confirm(self, repository: str, digest: Digest, kind: Kind) -> None:
        await self.local.confirm(repository, digest, kind)

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        return await self.local.relay(repository, suffix, query, unknown)
