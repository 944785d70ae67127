"""The other nodes: who is up (active health checks on `/_cluster/health`), and fetching a
blob from one of them (`/_cluster/blobs/...`), every request signed (auth.py).

Membership is each node's own view, with no agreement protocol: a peer is up after
`health_passes` checks in a row answered with its node id (the first answer is enough for a
peer never seen), down after `health_fails` failures in a row, or at once when a relay from it
breaks; while its checks move it towards the other state, they come four times as often. A
peer whose bytes did not match their digest is held down for QUARANTINE seconds whatever its
health checks say: it answers them, it just cannot be trusted to serve. With
`peers_dns`, the name is resolved again before every round of checks, so nodes a
headless Service adds or removes come and go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

import aiohttp

from mirror import metrics
from mirror.cluster import auth, ring
from mirror.config import ClusterConfig
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest
from mirror.upstream.client import (
    MAX_MANIFEST_BYTES,
    UpstreamBlob,
    UpstreamManifest,
    range_starts_at,
    total_size,
)

log = logging.getLogger("mirror.cluster")

QUARANTINE = 60.0  # seconds a peer that sent wrong bytes stays down
FAST = 0.25  # of health_interval: the next check of a peer between states comes this soon
MAX_CHECKS_IN_FLIGHT = 8  # per peer: checks into a partition pile up to peer_timeout / interval


class PeerUnavailable(ConnectionError):
    """The peer did not answer usefully (refused, broken, silent, 5xx, 401): ask another."""


class PeerMiss(Exception):
    """A stored-only probe: the peer does not hold the blob."""


class HolderRedirect(RegistryError):
    """The client is to fetch the blob from the node holding its fill lock, which this node
    (or the peer it relayed from) cannot reach: 307 to a URL with a grant (auth.py)."""

    def __init__(self, location: str, digest: Digest) -> None:
        super().__init__(ErrorCode.BLOB_UNKNOWN, f"{digest} is being fetched by another node "
                         "of the cluster: follow Location", status=307,
                         headers={"Location": location})


# What a node asks a peer for a blob: "fill" (serve it, filling it as the peer's own client
# would be served, but never relayed further), "stored" (only what it holds, asking nobody),
# "holder" (it holds the blob's fill lock: join its download or fill from its upstream).
Ask = Literal["fill", "stored", "holder"]


@dataclass
class Peer:
    url: str
    node_id: str | None = None
    up: bool = False
    seen: bool = False  # ever answered: the first answer alone brings a new peer up
    fails: int = 0
    passes: int = 0
    held_until: float = 0.0  # quarantined (wrong bytes) until then
    launched: int = 0  # health checks started; each one's answer counts only if no later one's
    applied: int = 0   # answer was counted first (a check into a partition answers late)
    in_flight: int = 0


class Membership:
    def __init__(self, config: ClusterConfig, session: aiohttp.ClientSession,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.session = session
        self.clock = clock
        self.peers: dict[str, Peer] = {url: Peer(url) for url in config.peers}

    # the view ---------------------------------------------------------------------------
    def live(self) -> dict[str, str]:
        """node_id -> URL of every node up, this one included."""
        nodes = {p.node_id: p.url for p in self.peers.values() if p.up and p.node_id}
        nodes[self.config.node_id] = self.config.advertise_url
        return nodes

    def owns(self, digest: Digest) -> bool:
        """Whether this node is the digest's owner among the nodes up now."""
        return ring.owner(self.live(), str(digest)) == self.config.node_id

    def mark_down(self, url: str, why: str) -> None:
        peer = self.peers.get(url)
        if peer is None or not peer.up:
            return
        peer.up, peer.passes = False, 0
        metrics.PEER_FAILURES.labels(url).inc()
        self._changed(peer, why)

    def quarantine(self, url: str) -> None:
        """The peer sent bytes that did not match their digest: down, and not brought back
        up by its health checks for QUARANTINE seconds."""
        metrics.PEER_WRONG_BYTES.labels(url).inc()
        if (peer := self.peers.get(url)) is not None:
            peer.held_until = self.clock() + QUARANTINE
        self.mark_down(url, f"sent bytes that do not match their digest: held down for "
                            f"{QUARANTINE:.0f} s")

    def _changed(self, peer: Peer, why: str) -> None:
        metrics.PEER_UP.labels(peer.url).set(1 if peer.up else 0)
        metrics.RING_CHANGES.inc()
        (log.info if peer.up else log.warning)(
            "peer up" if peer.up else "peer down",
            extra={"peer": peer.url, "node_id": peer.node_id, "why": why})

    # health checks ----------------------------------------------------------------------
    async def run(self) -> None:
        """Start a round of checks every health_interval, on a fixed cadence; the caller made
        the first round before serving. A round does not wait for the checks of the one
        before: a check sent into a partition waits out peer_timeout, and a healed peer must
        not wait for it (it is up health_passes intervals after healing)."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as checks:
            tick = loop.time()
            while True:
                tick += self.config.health_interval
                await asyncio.sleep(max(0.0, tick - loop.time()))
                tick = max(tick, loop.time() - self.config.health_interval)  # a stall: no burst
                if self.config.peers_dns:
                    await self._resolve()
                for peer in list(self.peers.values()):
                    if peer.in_flight < MAX_CHECKS_IN_FLIGHT:
                        checks.create_task(self._check(peer))

    async def check_once(self) -> None:
        if self.config.peers_dns:
            await self._resolve()
        await asyncio.gather(*(self._check(p) for p in list(self.peers.values())))

    async def _check(self, peer: Peer) -> None:
        """One check, then more at health_interval * FAST while its answers move the peer
        towards the other state (HAProxy's fastinter): a healed peer is up about one
        interval after healing, not health_passes of them."""
        for _ in range(max(self.config.health_passes, self.config.health_fails)):
            if not await self._check_one(peer):
                return
            await asyncio.sleep(self.config.health_interval * FAST)

    async def _check_one(self, peer: Peer) -> bool:
        """Whether the peer is now between states (passing while down, failing while up)."""
        peer.launched += 1
        sequence, peer.in_flight = peer.launched, peer.in_flight + 1
        try:
            node_id = await self._health(peer.url)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            if not self._latest(peer, sequence):
                return False
            self._failed(peer, f"health check: {exc!r}")
            return peer.up
        finally:
            peer.in_flight -= 1
        if not self._latest(peer, sequence):
            return False
        if node_id == self.config.node_id:  # ourselves, under another address (DNS)
            self.peers.pop(peer.url, None)
            return False
        peer.node_id, peer.fails = node_id, 0
        peer.passes += 1
        if peer.held_until > self.clock():
            return False
        if not peer.up and (not peer.seen or peer.passes >= self.config.health_passes):
            peer.up = True
            self._changed(peer, "health checks pass")
        peer.seen = True
        return not peer.up

    @staticmethod
    def _latest(peer: Peer, sequence: int) -> bool:
        """Whether a check's answer is newer than every answer counted so far (and count it)."""
        if sequence < peer.applied:
            return False
        peer.applied = sequence
        return True

    def _failed(self, peer: Peer, why: str) -> None:
        peer.passes = 0
        peer.fails += 1
        if peer.up and peer.fails >= self.config.health_fails:
            peer.up = False
            self._changed(peer, why)
        elif not peer.seen:
            metrics.PEER_UP.labels(peer.url).set(0)

    async def _health(self, url: str) -> str:
        path = "/_cluster/health"
        timeout = aiohttp.ClientTimeout(total=self.config.peer_timeout)
        async with self.session.get(url + path, headers=self.sign("GET", path),
                                    timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            return str((await resp.json())["node_id"])

    async def _resolve(self) -> None:
        assert self.config.peers_dns is not None
        own = urlsplit(self.config.advertise_url)
        port = own.port or (443 if own.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.config.peers_dns, port, type=0, proto=6)
        except OSError as exc:
            log.warning("peers_dns did not resolve: keeping the last peers",
                        extra={"name": self.config.peers_dns, "error": str(exc)})
            return
        hosts = {str(info[4][0]) for info in infos}
        urls = {f"{own.scheme}://{f'[{h}]' if ':' in h else h}:{port}" for h in hosts}
        urls.discard(self.config.advertise_url)
        for url in urls - set(self.peers):
            self.peers[url] = Peer(url)
        for url in set(self.peers) - urls - set(self.config.peers):
            del self.peers[url]

    # fetching ---------------------------------------------------------------------------
    def sign(self, method: str, path_qs: str) -> dict[str, str]:
        return {auth.HEADER: auth.sign(self.config.secret, self.config.node_id, method,
                                       path_qs, self.clock())}

    async def get_manifest(self, url: str, upstream: str, repository: str, reference: str,
                           accept: str, method: str = "GET") -> UpstreamManifest:
        """The manifest (a digest or a tag) from the peer at `url`, which answers it as it
        would its own client; unverified (the proxy verifies it as any source's). HEAD: no
        body. PeerUnavailable, or the refusal."""
        path = f"/_cluster/manifests/{quote(upstream, safe=':')}/{quote(repository)}/{reference}"
        timeout = aiohttp.ClientTimeout(total=self.config.peer_timeout * 4,
                                        sock_connect=self.config.peer_timeout,
                                        sock_read=self.config.peer_timeout)
        try:
            async with self.session.request(method, url + path, timeout=timeout,
                                            allow_redirects=False, headers={
                    **self.sign(method, path), "Accept": accept}) as resp:
                if resp.status != 200:
                    raise await _refusal(resp, url, reference, repository, False)
                data = None if method == "HEAD" else await _bounded(resp,
                                                                    MAX_MANIFEST_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerUnavailable(f"{url}: {exc!r}") from exc
        if data is not None and len(data) > MAX_MANIFEST_BYTES:
            raise PeerUnavailable(f"{url}: a manifest over {MAX_MANIFEST_BYTES} bytes")
        size = len(data) if data is not None else resp.content_length
        return UpstreamManifest(resp.headers.get("Docker-Content-Digest") or None,
                                resp.headers.get("Content-Type", "").split(";")[0].strip(),
                                size, data, max_age(resp.headers.get("Cache-Control", "")))

    @staticmethod
    def blob_path(upstream: str, repository: str, digest: Digest) -> str:
        """A blob's path under /_cluster/ on any node (no query)."""
        return f"/_cluster/blobs/{quote(upstream, safe=':')}/{quote(repository)}/{digest}"

    async def open_blob(self, url: str, upstream: str, repository: str, digest: Digest,
                        offset: int, ask: Ask) -> PeerBlob:
        """The blob from the peer at `url`, as `ask` says; PeerUnavailable, PeerMiss (a
        "stored" probe that missed), or the peer's refusal as RegistryError."""
        path = self.blob_path(upstream, repository, digest)
        if ask != "fill":
            path += f"?{ask}=1"
        headers = {**self.sign("GET", path), "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = aiohttp.ClientTimeout(sock_connect=self.config.peer_timeout,
                                        sock_read=self.config.peer_timeout)
        try:
            # a 307 (holder_redirect) is for our client to follow: this node may not reach
            # the holder any better than the peer that sent it
            resp = await self.session.get(url + path, headers=headers, timeout=timeout,
                                          allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerUnavailable(f"{url}: {exc!r}") from exc
        if resp.status in (200, 206) and (resp.status == 200) == (offset == 0) and (
                offset == 0 or range_starts_at(resp, offset)):
            return PeerBlob(self, url, resp, total_size(resp))
        if resp.status == 307 and offset == 0 and (location := resp.headers.get("Location")):
            resp.release()  # the peer sends our client to the fill lock's holder
            raise HolderRedirect(location, digest)
        raise await _refusal(resp, url, digest, repository, True, ask == "stored")


async def _refusal(resp: aiohttp.ClientResponse, url: str, digest: Digest | str,
                   repository: str, blob: bool, stored_only: bool = False) -> Exception:
    """What a peer's answer other than the content means: a miss, the peer's (that is, the
    upstream's) refusal, or a peer not to ask again."""
    body = await _error_message(resp)
    if resp.status == 404 and stored_only:
        return PeerMiss(url)
    if resp.status in (403, 404):
        unknown = ErrorCode.BLOB_UNKNOWN if blob else ErrorCode.MANIFEST_UNKNOWN
        code = ErrorCode.DENIED if resp.status == 403 else unknown
        return RegistryError(code, f"{digest} under {repository}: {body}")
    return PeerUnavailable(f"{url}: HTTP {resp.status} {body}")


async def _bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in resp.content.iter_any():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data)


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(Exception):
        errors = (await resp.json(content_type=None)).get("errors") or [{}]
        resp.release()
        return str(errors[0].get("message", ""))
    resp.close()
    return ""


class PeerBlob(UpstreamBlob):
    """A blob body from a peer; a break or a stall marks the peer down (so the download
    engine's resume goes to the next rank) before it reaches the engine."""

    def __init__(self, membership: Membership, url: str, resp: aiohttp.ClientResponse,
                 total: int | None) -> None:
        super().__init__(resp, total, 0, None)
        self.membership, self.url = membership, url

    async def read(self) -> bytes:
        try:
            chunk = await super().read()
        except (ConnectionError, TimeoutError) as exc:
            self.membership.mark_down(self.url, f"relay broke: {exc!r}")
            raise PeerUnavailable(f"{self.url}: {exc!r}") from exc
        metrics.PEER_BYTES.labels("in").inc(len(chunk))
        return chunk

    def reject(self) -> None:
        self.membership.quarantine(self.url)


def max_age(cache_control: str) -> float | None:
    """A peer's `Cache-Control: max-age=N` (what is left of its trust in a tag), else None."""
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() == "max-age" and value.isdigit():
            return float(value)
    return None
