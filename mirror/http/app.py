"""The aiohttp application: routes `/v2/...` requests to the proxy layer and writes responses.

Request flow: middleware (errors, access log) → parse path (routes.py) → choose upstream
(routing.py) → access checks (access.py, only with [auth]) → proxy.py (cache lookup,
single-flight fetch) → response written here, blobs with zero-copy sendfile (zerocopy.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn
from urllib.parse import urlencode

from aiohttp import web, web_protocol

from mirror.config import Config
from mirror.http import access, activity
from mirror.http.clientauth import FailureLimiter
from mirror.http.keys import ACTIVITY, MIRROR
from mirror.http.notices import warn_unconfigured_registry
from mirror.http.ops import install as install_ops
from mirror.http.ranges import (
    ByteRange,
    Multipart,
    RangeNotSatisfiable,
    multipart_layout,
    parse_ranges,
)
from mirror.http.responses import API_VERSION, content_headers, etag, etag_matches
from mirror.http.wire import wire_error
from mirror.http.zerocopy import Sender
from mirror.logs import ACCESS_LOG
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.mediatypes import parse_accept
from mirror.oci.reference import (
    Digest,
    manifest_reference_for_read,
    parse_digest,
    parse_reference,
)
from mirror.oci.routes import Kind, Route, parse_v2_path
from mirror.oci.routing import select_upstream
from mirror.pull.body import BlobBody, Piece
from mirror.pull.downloads import ClientAbort
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source
from mirror.runtime import open_mirror

log = logging.getLogger("mirror.server")

# Per-request facts for the access log line.
CACHE = web.RequestKey("cache", str)
BYTES = web.RequestKey("bytes", int)
UPSTREAM = web.RequestKey("upstream", str)
ERROR = web.RequestKey("error", str)
ROUTE = web.RequestKey("route", str)  # a routes.Kind value or a page name, for metrics
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _eof_received(self: web_protocol.RequestHandler) -> bool | None:
    """A client may shut down its sending side once its request is out (`shutdown(SHUT_WR)`,
    `curl` over some proxies, health checkers). aiohttp's handler returns None here, so the
    event loop (asyncio and uvloop alike) closes the transport and the response is lost.
    Keep it open for writing while a request is queued or being handled, and close the
    connection after that response instead of keeping it alive."""
    waiting = self._waiter is not None and not self._waiter.done()
    if self._messages or (not waiting and self._request_count > 0):
        self._close = True
        return True
    return None


if all(hasattr(web_protocol.RequestHandler, a) for a in ("_waiter", "_messages", "_close",
                                                         "_request_count")):
    web_protocol.RequestHandler.eof_received = _eof_received  # type: ignore[method-assign,assignment]


def error_response(exc: RegistryError) -> web.Response:
    response = web.Response(status=exc.status, body=exc.body(),
                            headers={**API_VERSION, **exc.headers,
                                     "Content-Type": "application/json"})
    for challenge in exc.challenges:
        response.headers.add("WWW-Authenticate", challenge)
    return response


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request[CACHE] = "-"
    request[BYTES] = 0
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except ConnectionError as exc:  # the client went away before a response started
        status = 499
        request[ERROR] = f"client went away: {exc}"
        raise
    except Exception as exc:
        error = wire_error(exc)
        if error is None:
            log.exception("unhandled error", extra={"path": request.path})
            error = RegistryError(ErrorCode.UNKNOWN, "internal error; the mirror's log has "
                                  "the details")
        elif not isinstance(exc, web.HTTPException):
            request[ERROR] = error.message
        status = error.status
        response = error_response(error)
        return response
    finally:
        if not request[BYTES] and isinstance(response, web.Response) \
                and request.method != "HEAD" and isinstance(response.body, bytes):
            request[BYTES] = len(response.body)  # pages, probes and error bodies
        _access_log(request, status, started)


def _access_log(request: web.Request, status: int, started: float) -> None:
    seconds = time.perf_counter() - started
    fields: dict[str, object] = {
        "method": request.method, "path": request.path_qs, "status": status,
        "bytes": request[BYTES], "cache": request[CACHE],
        "duration_ms": round(seconds * 1000, 2),
        "client": request.remote or "-",
        "user_agent": request.headers.get("User-Agent", "-"),
    }
    if UPSTREAM in request:
        fields["upstream"] = request[UPSTREAM]
    if ERROR in request:
        fields["error"] = request[ERROR]
    ACCESS_LOG.emit(fields)
    activity.observe(request.get(ROUTE) or activity.ROUTE_NAMES.get(request.path, "other"),
                     request.method, status, request[CACHE], request[BYTES], seconds)


async def base(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise RegistryError(ErrorCode.UNSUPPORTED, "this mirror is read-only")
    await access.check_base(request)
    return web.Response(body=b"{}", headers={**API_VERSION, "Content-Type": "application/json"})


async def v2(request: web.Request) -> web.StreamResponse:
    request[ROUTE] = "invalid"
    route = parse_v2_path(request.match_info["tail"])
    request[ROUTE] = route.kind.value
    if request.method not in ("GET", "HEAD"):
        _refuse_write(request, route)
    if route.kind is Kind.BASE:
        return await base(request)
    if route.kind in (Kind.CATALOG, Kind.UPLOAD):
        # No catalog is a missing endpoint (404, as registries without one answer); an upload
        # is a write, refused as read-only.
        raise RegistryError(ErrorCode.UNSUPPORTED, "a pull-through mirror has no catalog or "
                            "uploads", status=404 if route.kind is Kind.CATALOG else None)
    mirror = request.app[MIRROR]
    upstream_name, repository = select_upstream(route.name, request.query.get("ns"),
                                                list(mirror.upstreams))
    warn_unconfigured_registry(route.name, request.query.get("ns"), mirror.upstreams)
    await access.check_upstream(request, mirror.upstreams[upstream_name].config, repository)
    request[UPSTREAM] = upstream_name
    proxy, source = mirror.proxy, mirror.sources[upstream_name]
    if route.kind is Kind.MANIFEST:
        return await manifest(request, proxy, source, repository, route)
    if route.kind is Kind.BLOB:
        return await blob(request, proxy, source, repository, parse_digest(route.reference))
    return await relay(request, proxy, source, repository, route)


def _refuse_write(request: web.Request, route: Route) -> NoReturn:
    """A mirror is read-only (405), but a malformed write is malformed first (400), as the
    spec's conformance tests expect: NAME_INVALID, DIGEST_INVALID, MANIFEST_INVALID."""
    if route.kind is not Kind.BASE and route.kind is not Kind.CATALOG:
        select_upstream(route.name, request.query.get("ns"), list(request.app[MIRROR].upstreams))
    if route.kind is Kind.MANIFEST:
        parse_reference(route.reference)
    elif route.kind in (Kind.BLOB, Kind.REFERRERS):
        parse_digest(route.reference)
    elif route.kind is Kind.UPLOAD and "digest" in request.query:
        parse_digest(request.query["digest"])
    raise RegistryError(ErrorCode.UNSUPPORTED, "this mirror is read-only: push to the upstream "
                        "registry instead")


async def manifest(request: web.Request, proxy: Proxy, source: Source, repository: str,
                   route: Route) -> web.StreamResponse:
    reference = manifest_reference_for_read(route.reference)
    accept = parse_accept(request.headers.getall("Accept", []))
    head = request.method == "HEAD"
    m = await proxy.manifest(source, repository, reference, accept, head)
    request[CACHE] = m.cache
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


RELAYED = {  # route kind -> (upstream path, query parameters passed on, code when unknown)
    Kind.TAGS: ("tags/list", ("n", "last"), ErrorCode.NAME_UNKNOWN),
    Kind.REFERRERS: ("referrers/{reference}", ("artifactType",), ErrorCode.MANIFEST_UNKNOWN),
}


async def relay(request: web.Request, proxy: Proxy, source: Source, repository: str,
                route: Route) -> web.Response:
    """Tags lists and the referrers API, passed through uncached. An upstream without the
    referrers API answers 404, and clients fall back to the sha256-<hex> tag schema."""
    suffix, params, unknown = RELAYED[route.kind]
    if route.kind is Kind.REFERRERS:
        suffix = suffix.format(reference=parse_digest(route.reference))
    query = {k: v for k, v in request.query.items() if k in params}
    relayed = await proxy.relay(source, repository, suffix, query, unknown)
    status, body, headers = relayed.status, relayed.body, dict(relayed.headers)
    link = headers.get("Link")
    if link:
        # Keep pagination on the mirror, under the name the client used.
        link = link.replace(f"/v2/{repository}/", f"/v2/{route.name}/")
        if "ns" in request.query:
            link = link.replace(">", ("&" if "?" in link else "?")
                                + urlencode({"ns": request.query["ns"]}) + ">", 1)
        headers["Link"] = link
    request[BYTES] = len(body)
    response = web.Response(status=status, body=body)
    response.headers.update({**API_VERSION, **headers})
    return response


async def not_found(request: web.Request) -> web.Response:
    raise RegistryError(ErrorCode.NAME_UNKNOWN, f"nothing at {request.path}: this is a "
                        "registry mirror; the API is under /v2/")


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[errors_and_access_log], client_max_size=1024**2)
    app.router.add_route("*", "/v2", base)
    app.router.add_route("*", "/v2/{tail:.*}", v2)
    app[access.AUTHENTICATOR] = access.build_authenticator(config)
    app[access.LIMITER] = FailureLimiter()
    app.router.add_get("/token", access.token)
    install_ops(app, config)  # the operator's pages: /, /metrics, /healthz, /readyz
    app.router.add_route("*", "/{tail:.*}", not_found)
    app.cleanup_ctx.append(lambda a: _lifecycle(a, config))
    return app


async def _lifecycle(app: web.Application, config: Config):  # type: ignore[no-untyped-def]
    async with open_mirror(config) as mirror:
        app[MIRROR] = mirror
        yield
