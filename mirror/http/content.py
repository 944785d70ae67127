"""Answers that carry content, for `/v2/` (http/app.py) and for other nodes of a cluster
(http/cluster.py): a manifest as its exact bytes, a blob as one BlobBody sent with zero-copy
sendfile (http/zerocopy.py), single ranges and multipart/byteranges (http/ranges.py)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from aiohttp import web

from mirror.http.keys import ACTIVITY, BYTES, CACHE, ERROR
from mirror.http.ranges import (
    ByteRange,
    Multipart,
    RangeNotSatisfiable,
    multipart_layout,
    parse_ranges,
)
from mirror.http.responses import content_headers, etag, etag_matches
from mirror.http.zerocopy import Sender
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import parse_accept
from mirror.oci.reference import Digest, manifest_reference_for_read
from mirror.oci.routes import Route
from mirror.pull.body import BlobBody, Piece
from mirror.pull.downloads import ClientAbort
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source

if TYPE_CHECKING:  # cryptography is imported only with a [[policy]]
    from mirror.pull.trust import Trust


async def manifest(request: web.Request, proxy: Proxy, source: Source, repository: str,
                   route: Route, trust: Trust | None) -> web.StreamResponse:
    reference = manifest_reference_for_read(route.reference)
    return await manifest_of(request, proxy, source, repository, reference, trust)


async def manifest_of(request: web.Request, proxy: Proxy, source: Source, repository: str,
                      reference: Digest | str, trust: Trust | None = None
                      ) -> web.StreamResponse:
    """The answer to GET or HEAD of a manifest, from `source` on a miss; with `trust`, only
    what its signature policies allow (a client's request; a peer's is checked where its
    client asked)."""
    accept = parse_accept(request.headers.getall("Accept", []))
    head = request.method == "HEAD"
    m = await proxy.manifest(source, repository, reference, accept, head)
    request[CACHE] = m.cache
    if trust is not None and not trust.settled(source, repository, m):
        await trust.check_manifest(source, repository, m)
    if not isinstance(reference, Digest):  # a pull resolves a tag once
        request.app[ACTIVITY].top.add(f"{source.name}/{repository}")
    headers = content_headers(m.digest, m.media_type,
                              None if isinstance(reference, Digest) else m.tag_max_age)
    headers["X-Mirror-Cache"] = m.cache
    if etag_matches(request.headers.get("If-None-Match"), m.digest):
        return web.Response(status=304, headers=headers)
    headers["Content-Length"] = str(m.size)
    if head:
        return await _head(request, headers)
    assert m.data is not None
    request[BYTES] = m.size
    response = web.Response(status=200, body=m.data)
    response.headers.update(headers)
    return response


async def _head(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=headers)
    response.content_length = int(headers["Content-Length"])
    await response.prepare(request)
    await response.write_eof()
    return response


async def blob(request: web.Request, proxy: Proxy, source: Source, repository: str,
               digest: Digest) -> web.StreamResponse:
    proxy.admit(source, repository, digest)  # the rules first, even for a 304
    if etag_matches(request.headers.get("If-None-Match"), digest):
        # Content named by its digest never changes: a client holding that ETag holds the
        # blob, whether or not it is cached here.
        headers = content_headers(digest, "application/octet-stream", None)
        return web.Response(status=304, headers={**headers, "Accept-Ranges": "bytes"})
    body, request[CACHE] = await proxy.blob(source, repository, digest,
                                            request.method == "HEAD")
    try:
        if body.sendable:
            return await _send_blob(request, digest, body)
        headers = content_headers(digest, "application/octet-stream", None)
        headers["Accept-Ranges"] = "bytes"
        headers["X-Mirror-Cache"] = request[CACHE]
        if body.size is None:
            return web.Response(status=200, headers=headers)
        headers["Content-Length"] = str(body.size)
        return await _head(request, headers)
    finally:
        body.close()


def _ranges(request: web.Request, digest: Digest, size: int | None) -> list[ByteRange] | None:
    if size is None:
        return None
    if_range = request.headers.get("If-Range")
    if if_range and if_range.strip() not in (etag(digest), str(digest)):
        return None
    try:
        return parse_ranges(request.headers.get("Range"), size)
    except RangeNotSatisfiable:
        raise RegistryError(ErrorCode.RANGE_INVALID, f"range not satisfiable for a {size}-byte "
                            "blob", headers={"Content-Range": f"bytes */{size}"}) from None


async def _send_blob(request: web.Request, digest: Digest, body: BlobBody
                     ) -> web.StreamResponse:
    size = body.size
    ranges = _ranges(request, digest, size)
    if ranges is not None and len(ranges) > 1 and not body.seekable:
        ranges = None  # several ranges of a blob still downloading: the whole body
    response = web.StreamResponse(status=206 if ranges else 200)
    response.headers.update(content_headers(digest, "application/octet-stream", None))
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["X-Mirror-Cache"] = request[CACHE]
    if etag_matches(request.headers.get("If-None-Match"), digest):
        response.set_status(304)
        return response
    multipart = None
    start, length = 0, size
    if ranges is not None and size is not None:
        if len(ranges) == 1:
            start, length = ranges[0].start, ranges[0].length
            response.headers["Content-Range"] = ranges[0].content_range(size)
        else:  # podman's partial pulls ask for many chunks of a layer at once
            multipart = multipart_layout(ranges, size, secrets.token_hex(16))
            response.headers["Content-Type"] = multipart.content_type
            length = multipart.length
    if length is not None:
        response.content_length = length
    writer = await response.prepare(request)
    if request.method == "HEAD" or writer is None:
        await response.write_eof()
        return response
    sender = Sender(request, response, writer)
    try:
        assert length is not None
        await body.send(sender, [(start, length)] if multipart is None
                        else _multipart_pieces(multipart))
    except (ClientAbort, OSError) as exc:
        # The headers are gone already: the only honest signal left is to cut the
        # connection, so the client sees a broken body rather than a short one.
        request[ERROR] = (f"client went away: {exc}" if isinstance(exc, ConnectionError)
                          else f"aborted: {exc}")
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        request[BYTES] = sender.sent
        sender.close()
    await response.write_eof()
    return response


def _multipart_pieces(multipart: Multipart) -> list[Piece]:
    pieces: list[Piece] = []
    for head, part in multipart.parts:
        pieces += [head, (part.start, part.length), b"\r\n"]
    return [*pieces, multipart.closing]
