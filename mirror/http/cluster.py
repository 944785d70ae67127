"""`/_cluster/*`: what the nodes of a cluster ask each other, and what an operator reads.

    GET /_cluster/health                     {"node_id", "status"} (the peers' health check)
    GET /_cluster/ring[?digest=D]            the peers this node sees and, for D, their ranks
    GET /_cluster/blobs/<upstream>/<repository>/<digest>[?stored=1|?holder=1]
    GET /_cluster/manifests/<upstream>/<repository>/<digest or tag>   (HEAD too)

Every request carries the HMAC of auth.py over its method and raw path (401 without it), or,
for a blob, a grant in the query (`&grant=`: a client sent here by a node that cannot reach
this one while this one holds the blob's fill lock; that node checked the client's access). A
blob or manifest request is answered as a client's `/v2/<repository>/blobs/<digest>` (or
`manifests/<digest>`) would be, private content confirmed for `repository` included, but with
a source that never relays further;
`stored=1` answers only what this node holds (404 otherwise) and asks nothing of anyone;
`holder=1` (the asker found this node holding the blob's fill lock) joins this node's download
or fills from its upstream, and asks no peer.
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from mirror import metrics
from mirror.cluster import auth, ring
from mirror.http.content import blob, manifest_of
from mirror.http.keys import BYTES, MIRROR, ROUTE, UPSTREAM
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import is_digest_reference, parse_digest, validate_name, validate_tag
from mirror.runtime import ClusterNode, Mirror


async def cluster(request: web.Request) -> web.StreamResponse:
    request[ROUTE] = "cluster"
    mirror = request.app[MIRROR]
    node = _node(mirror)
    config = node.membership.config
    tail = request.match_info["tail"]
    try:
        if "grant" in request.query and tail.startswith("blobs/"):
            auth.verify_grant(config.secret, request.query["grant"], request.method,
                              request.raw_path.split("?", 1)[0], time.time())
        else:
            auth.verify(config.secret, request.headers.get(auth.HEADER), request.method,
                        request.raw_path, time.time())
    except auth.ClusterAuthError as exc:
        raise RegistryError(ErrorCode.UNAUTHORIZED, str(exc)) from None
    if tail == "health":
        return _json({"node_id": config.node_id, "status": "up"})
    if tail == "ring":
        return _json(_ring(node, request.query.get("digest")))
    kind, _, rest = tail.partition("/")
    if kind in ("blobs", "manifests") and request.method in ("GET", "HEAD"):
        return await _content(request, mirror, node, kind, rest)
    raise RegistryError(ErrorCode.UNSUPPORTED, f"nothing at {request.path}", status=404)


def _node(mirror: Mirror) -> ClusterNode:
    if mirror.cluster is None:
        raise RegistryError(ErrorCode.UNSUPPORTED, "this mirror is not in a cluster "
                            "([cluster] is not configured)", status=404)
    return mirror.cluster


async def _content(request: web.Request, mirror: Mirror, node: ClusterNode, kind: str,
                   rest: str) -> web.StreamResponse:
    upstream, _, rest = rest.partition("/")
    repository, _, reference = rest.rpartition("/")
    # 400 before anything else; a tag's owner answers it for the cluster
    ref = validate_tag(reference) if kind == "manifests" and not is_digest_reference(
        reference) else parse_digest(reference)
    validate_name(repository)
    if upstream not in mirror.upstreams:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, f"no upstream {upstream!r} here: the "
                            "nodes' [[upstream]] tables differ", status=404)
    request[UPSTREAM] = upstream
    if kind == "manifests":
        return await manifest_of(request, mirror.proxy, node.fill_sources[upstream],
                                 repository, ref)
    digest = parse_digest(reference)
    if request.query.get("stored") == "1":
        if not mirror.store.has(digest):
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, f"{digest} is not stored here")
        source = node.local_sources[upstream]
    elif request.query.get("holder") == "1" or "grant" in request.query:
        source = node.local_sources[upstream]
    else:
        source = node.fill_sources[upstream]
    try:
        return await blob(request, mirror.proxy, source, repository, digest)
    finally:
        metrics.PEER_BYTES.labels("out").inc(request[BYTES])


def _ring(node: ClusterNode, digest: str | None) -> dict[str, object]:
    live = node.membership.live()
    view: dict[str, object] = {
        "node_id": node.membership.config.node_id,
        "peers": [{"url": p.url, "node_id": p.node_id, "up": p.up, "fails": p.fails}
                  for p in node.membership.peers.values()],
        "live": sorted(live),
    }
    if digest:
        view["digest"] = str(parse_digest(digest))
        view["ranks"] = [{"node_id": n, "url": live[n]} for n in ring.rank(live, digest)]
    return view


def _json(data: object) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
