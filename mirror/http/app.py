"""The aiohttp application: routes `/v2/...` requests to the proxy layer.

Request flow: middleware (errors, access log) → parse path (routes.py) → choose upstream
(routing.py) → access checks (access.py, only with [auth]) → proxy.py (the allow / deny
rules, cache lookup, single-flight fetch) → the response (content.py: blobs with zero-copy
sendfile).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn
from urllib.parse import urlencode

from aiohttp import web, web_protocol

from mirror.config import Config
from mirror.http import access, activity, browser
from mirror.http.catalog import catalog
from mirror.http.clientaddr import client_address
from mirror.http.clientauth import FailureLimiter, load_htpasswd
from mirror.http.cluster import cluster
from mirror.http.content import blob, manifest
from mirror.http.keys import (
    BYTES,
    CACHE,
    CLIENT,
    CODE,
    ERROR,
    MIRROR,
    ROUTE,
    TARGET,
    UPSTREAM,
    USER,
)
from mirror.http.notices import warn_unconfigured_registry
from mirror.http.ops import install as install_ops
from mirror.http.responses import API_VERSION, content_headers
from mirror.http.wire import wire_error
from mirror.logs import ACCESS_LOG
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import (
    Digest,
    parse_digest,
    parse_reference,
)
from mirror.oci.routes import Kind, Route, parse_v2_path
from mirror.oci.routing import select_upstream
from mirror.pull.proxy import Proxy
from mirror.pull.source import Relayed, Source
from mirror.runtime import Mirror, open_mirror

log = logging.getLogger("mirror.server")

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
    request[CLIENT] = client_address(request.remote, request.headers.getall(
        "X-Forwarded-For", ()), request.app[MIRROR].config.server.trusted_proxies)
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
    except asyncio.CancelledError:  # its connection was lost, or the server is stopping
        status = 499
        transport = request.transport
        request[ERROR] = ("client went away (its request was cancelled)"
                          if transport is None or transport.is_closing()
                          else "cancelled: the server is stopping")
        raise
    except Exception as exc:
        error = wire_error(exc)
        if error is None:
            log.exception("unhandled error", extra={"path": request.path})
            error = RegistryError(ErrorCode.UNKNOWN, "internal error; the mirror's log has "
                                  "the details")
        elif not isinstance(exc, web.HTTPException):
            request[ERROR] = error.message
        request[CODE] = error.code.value
        status = error.status
        response = error_response(error)
        return response
    finally:
        if not request[BYTES] and isinstance(response, web.Response) \
                and request.method != "HEAD" and isinstance(response.body, bytes):
            request[BYTES] = len(response.body)  # pages, probes and error bodies
        _access_log(request, status, started)
        if TARGET in request:
            _notify(request, status, response)


def _access_log(request: web.Request, status: int, started: float) -> None:
    seconds = time.perf_counter() - started
    fields: dict[str, object] = {
        "method": request.method, "path": request.path_qs, "status": status,
        "bytes": request[BYTES], "cache": request[CACHE],
        "duration_ms": round(seconds * 1000, 2),
        "client": request[CLIENT],
        "user_agent": request.headers.get("User-Agent", "-"),
        "user": request.get(USER, "-"),
    }
    if UPSTREAM in request:
        fields["upstream"] = request[UPSTREAM]
    if ERROR in request:
        fields["error"] = request[ERROR]
    ACCESS_LOG.emit(fields)
    activity.observe(request.get(ROUTE) or activity.ROUTE_NAMES.get(request.path, "other"),
                     request.method, status, request[CACHE], request[BYTES], seconds)


PULLED = (Kind.MANIFEST.value, Kind.BLOB.value)


def _notify(request: web.Request, status: int, response: web.StreamResponse | None) -> None:
    """The events of a request for content: `pull` for content sent, `denied` for a 403
    DENIED (a rule, a signature policy, an access rule)."""
    events = request.app[MIRROR].events
    if events is None or not events.wanted:
        return
    upstream, repository, reference = request[TARGET]
    target: dict[str, object] = {"repository": repository, "url": str(request.url)}
    if reference.startswith("sha256:") or reference.startswith("sha512:"):
        target["digest"] = reference
    else:
        target["tag"] = reference
    if 200 <= status < 300 and request.method == "GET" and response is not None \
            and request[ROUTE] in PULLED:
        target["digest"] = response.headers.get("Docker-Content-Digest", target.get("digest"))
        target["mediaType"] = response.headers.get("Content-Type")
        target["length"] = request[BYTES]
        events.emit("pull", target=target, request=_request_record(request),
                    actor=request.get(USER), upstream=upstream)
    elif status == 403 and request.get(CODE) == ErrorCode.DENIED.value:
        events.emit("denied", target=target, request=_request_record(request),
                    actor=request.get(USER), upstream=upstream, reason=request.get(ERROR))


def _request_record(request: web.Request) -> dict[str, object]:
    return {"addr": request[CLIENT], "host": request.host, "method": request.method,
            "useragent": request.headers.get("User-Agent", "")}


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
    mirror = request.app[MIRROR]
    if route.kind is Kind.CATALOG and mirror.config.server.catalog:
        listed = await access.check_catalog(request)
        return await catalog(request, mirror, listed)
    if route.kind is Kind.CATALOG:  # off: a missing endpoint, as registries without one
        raise RegistryError(ErrorCode.UNSUPPORTED, "this mirror lists no catalog ([server] "
                            "catalog is off)", status=404)
    if route.kind is Kind.UPLOAD:  # a write, refused as read-only
        raise RegistryError(ErrorCode.UNSUPPORTED, "a pull-through mirror takes no uploads")
    upstream_name, repository = select_upstream(route.name, request.query.get("ns"),
                                                list(mirror.upstreams))
    warn_unconfigured_registry(route.name, request.query.get("ns"), mirror.upstreams)
    request[TARGET] = (upstream_name, repository, route.reference)
    await access.check_pull(request, upstream_name, repository)
    request[UPSTREAM] = upstream_name
    proxy, source = mirror.proxy, mirror.sources[upstream_name]
    if route.kind is Kind.MANIFEST:
        return await manifest(request, proxy, source, repository, route, mirror.trust)
    if route.kind is Kind.BLOB:
        digest = parse_digest(route.reference)
        if mirror.trust is not None:
            proxy.admit(source, repository, digest)  # a rule's denial names the rule
            mirror.trust.check_blob(source, repository, digest)
        if (location := await _bucket_redirect(request, mirror, source, repository, digest)
                ) is not None:
            request[CACHE] = "redirect"
            return web.Response(status=307, headers={
                **content_headers(digest, "application/octet-stream", None),
                "Location": location})
        return await blob(request, proxy, source, repository, digest)
    return await relay(request, proxy, source, repository, route)


async def _bucket_redirect(request: web.Request, mirror: Mirror, source: Source,
                           repository: str, digest: Digest) -> str | None:
    """With `[s3] redirect`, a GET of a public blob that only the bucket holds is sent there
    (the CDN-origin case: the bytes go from the bucket, or the CDN before it, to the client).
    Private content never is: a presigned URL would serve it to anyone holding the URL."""
    bucket = mirror.bucket
    if bucket is None or not bucket.config.redirect or request.method != "GET" \
            or source.private or mirror.store.has(digest):
        return None
    mirror.proxy.admit(source, repository, digest)  # the rules, before the bucket answers
    return await bucket.presigned(digest)


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


RELAYED = {  # route kind -> (upstream path, query parameters passed on, code when unknown)
    Kind.TAGS: ("tags/list", ("n", "last"), ErrorCode.NAME_UNKNOWN),
    Kind.REFERRERS: ("", ("artifactType",), ErrorCode.MANIFEST_UNKNOWN),  # pull/proxy.py
}


async def relay(request: web.Request, proxy: Proxy, source: Source, repository: str,
                route: Route) -> web.Response:
    """Tags lists, passed through uncached, and the referrers API, cached by the proxy. An
    upstream without the referrers API answers 404, and clients fall back to the
    sha256-<hex> tag schema (tags, cached as any tag is)."""
    suffix, params, unknown = RELAYED[route.kind]
    query = {k: v for k, v in request.query.items() if k in params}
    relayed: Relayed
    if route.kind is Kind.REFERRERS:
        relayed = await proxy.referrers(source, repository, parse_digest(route.reference),
                                        query.get("artifactType", ""))
        request[CACHE] = relayed.cache
    else:
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


async def _reload_edge(app: web.Application, old: Config, new: Config) -> None:
    """A reload, for the HTTP edge: the htpasswd users and the access rules (turning [auth]
    on or off needs a restart: the challenge every client has seen would change under it)."""
    app[access.GRANTS] = access.build_grants(new)
    authenticator = app[access.AUTHENTICATOR]
    if (authenticator is None) != (new.auth.htpasswd is None):
        log.warning("reload: [auth] htpasswd turned on or off takes effect after a restart")
    elif authenticator is not None and new.auth.htpasswd is not None:
        users = await asyncio.to_thread(load_htpasswd, new.auth.htpasswd)
        authenticator.replace(users, new.auth.token_lifetime)


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer is the type it says (a blob is octet-stream, a page HTML): a browser
    that sniffs would run a layer that looks like HTML as a page of this origin."""
    response.headers["X-Content-Type-Options"] = "nosniff"


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[errors_and_access_log], client_max_size=1024**2)
    app.on_response_prepare.append(_nosniff)
    app.router.add_route("*", "/v2", base)
    app.router.add_route("*", "/v2/{tail:.*}", v2)
    app[access.AUTHENTICATOR] = access.build_authenticator(config)
    app[access.GRANTS] = access.build_grants(config)
    app.router.add_get("/token", access.token)
    install_ops(app, config)  # the operator's pages: /, /metrics, /healthz, /readyz
    browser.install(app)  # the cache browser: /cache…
    app.router.add_route("*", "/_cluster/{tail:.*}", cluster)  # the nodes' own API
    app.router.add_route("*", "/{tail:.*}", not_found)
    app.cleanup_ctx.append(lambda a: _lifecycle(a, config))
    return app


async def _lifecycle(app: web.Application, config: Config):  # type: ignore[no-untyped-def]
    async with open_mirror(config) as mirror:
        app[MIRROR] = mirror
        app[access.LIMITER] = FailureLimiter(counters=mirror.index)  # shared by the workers
        mirror.reloaders.append(functools.partial(_reload_edge, app))
        if mirror.sync is not None:
            mirror.sync.start()  # the server's alone: the commands run rules themselves
        yield
