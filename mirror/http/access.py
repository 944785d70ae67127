"""Client access control in the HTTP layer: the `/token` endpoint and the checks that use
clientauth.py. Everything here is inert unless `[auth] htpasswd` is configured."""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from mirror.cache.cachedir import token_secret
from mirror.config import AuthConfig, Config, UpstreamConfig
from mirror.http.clientauth import (
    ANONYMOUS,
    SERVICE,
    Authenticator,
    FailureLimiter,
    Identity,
    bearer_challenge,
    load_htpasswd,
    parse_basic,
)
from mirror.http.keys import CLIENT, USER
from mirror.oci.errors import ErrorCode, RegistryError

AUTHENTICATOR: web.AppKey[Authenticator | None] = web.AppKey("authenticator")
LIMITER: web.AppKey[FailureLimiter] = web.AppKey("limiter", FailureLimiter)

log = logging.getLogger("mirror.access")


def build_authenticator(config: Config) -> Authenticator | None:
    """The token-signing key is shared by every worker through the cache dir."""
    if config.auth.htpasswd is None:
        return None
    return Authenticator(load_htpasswd(config.auth.htpasswd), token_secret(config.cache.dir),
                         config.auth.token_lifetime)


def _realm(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/token"


def unauthorized(request: web.Request, message: str, scope: str | None = None
                 ) -> RegistryError:
    return RegistryError(ErrorCode.UNAUTHORIZED, message, headers={
        "WWW-Authenticate": bearer_challenge(_realm(request), scope)})


def _client(request: web.Request) -> str:
    return request.get(CLIENT) or request.remote or "-"


async def identity(request: web.Request) -> Identity | None:
    """Who the request's Authorization proves, or None. Basic credentials count against the
    client address's failed-login budget: past it, 429 until its window ends."""
    auth = request.app[AUTHENTICATOR]
    header = request.headers.get("Authorization")
    if auth is None or not header:
        return None
    pair = parse_basic(header)
    if pair is None:
        return _known(request, await auth.identify(header))
    limiter, client = request.app[LIMITER], _client(request)
    wait = limiter.attempt(client)
    if wait is not None:
        raise RegistryError(ErrorCode.TOOMANYREQUESTS, f"too many failed logins from {client}: try "
                            f"again in {wait}s", headers={"Retry-After": str(wait)})
    who = await auth.identify(header)
    if who is None:
        log.info("failed login", extra={"client": client, "user": pair[0]})
    else:
        limiter.succeeded(client)
    return _known(request, who)


def _known(request: web.Request, who: Identity | None) -> Identity | None:
    """The user goes into the request's access log line."""
    if who is not None:
        request[USER] = who.user
    return who


async def check_base(request: web.Request) -> None:
    """`GET /v2/`: with access control on, clients without a token are challenged (an
    anonymous token is free), which is how docker and containerd learn where /token is."""
    if request.app[AUTHENTICATOR] is not None and await identity(request) is None:
        raise unauthorized(request, "authentication required: get a token from the realm")


async def check_status(request: web.Request, config: AuthConfig) -> None:
    """`/` and `/metrics` name repositories and upstreams: with `[auth] status =
    "authenticated"` (the default with [auth] on) they need a user, by Basic credentials (a
    browser asks for them) or a user's token."""
    if request.app[AUTHENTICATOR] is None or config.status == "public":
        return
    who = await identity(request)
    if who is None or who.anonymous:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "the status page and /metrics need a user from "
                            "[auth] htpasswd (or set [auth] status = \"public\")", challenges=(
                                f'Basic realm="{SERVICE}", charset="UTF-8"',
                                bearer_challenge(_realm(request))))


async def check_catalog(request: web.Request) -> None:
    """`/v2/_catalog` names every cached repository, those of `access = "authenticated"`
    upstreams too: with access control on, it needs a user (never the anonymous token)."""
    if request.app[AUTHENTICATOR] is None:
        return
    who = await identity(request)
    if who is None or who.anonymous:
        raise unauthorized(request, "the catalog is readable by authenticated users only",
                           "registry:catalog:*")


async def check_upstream(request: web.Request, upstream: UpstreamConfig, repository: str
                         ) -> None:
    if request.app[AUTHENTICATOR] is None or upstream.access == "public":
        return
    who = await identity(request)
    if who is None or who.anonymous:
        raise unauthorized(request, f"{upstream.name} is readable by authenticated users only",
                           f"repository:{repository}:pull")


async def token(request: web.Request) -> web.Response:
    """Docker's token endpoint: Basic credentials from htpasswd, or none for anonymous."""
    auth = request.app[AUTHENTICATOR]
    if auth is None:
        # 404: with access control off the token endpoint does not exist.
        raise RegistryError(ErrorCode.UNSUPPORTED, "access control is off: no token needed",
                            status=404)
    header = request.headers.get("Authorization")
    user = ANONYMOUS
    if header:
        who = await identity(request)
        if who is None:
            raise RegistryError(ErrorCode.UNAUTHORIZED, "wrong user name or password",
                                headers={"WWW-Authenticate": f'Basic realm="{SERVICE}"'})
        user = who.user
    value = auth.issue(user)
    body = {"token": value, "access_token": value, "expires_in": int(auth.token_lifetime),
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")
