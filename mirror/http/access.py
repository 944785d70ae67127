"""Client access control in the HTTP layer: the `/token` endpoint and the checks that use
clientauth.py. Everything here is inert unless `[auth] htpasswd` is configured."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from mirror.cache.cachedir import token_secret
from mirror.cache.robots import Robots
from mirror.config import AuthConfig, Config
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
from mirror.http.grants import Grants
from mirror.http.keys import CLIENT, USER
from mirror.oci.errors import ErrorCode, RegistryError

AUTHENTICATOR: web.AppKey[Authenticator | None] = web.AppKey("authenticator")
GRANTS: web.AppKey[Grants] = web.AppKey("grants", Grants)
LIMITER: web.AppKey[FailureLimiter] = web.AppKey("limiter", FailureLimiter)

_IDENTITY = "mirror.identity"  # the request's, once identity() found it

log = logging.getLogger("mirror.access")


def build_authenticator(config: Config) -> Authenticator | None:
    """The token-signing key is shared by every worker through the cache dir."""
    if config.auth.htpasswd is None:
        return None
    return Authenticator(load_htpasswd(config.auth.htpasswd), token_secret(config.cache.dir),
                         config.auth.token_lifetime, Robots(robots_file(config)))


def build_grants(config: Config) -> Grants:
    return Grants(config.auth, config.upstreams)


def robots_file(config: Config) -> Path:
    return config.auth.robots_file or config.cache.dir / "robots.json"


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
    if _IDENTITY in request:  # asked twice (a page and its checks): one login attempt
        return request[_IDENTITY]  # type: ignore[no-any-return]
    who = await _identify(request)
    request[_IDENTITY] = who
    return who


async def _identify(request: web.Request) -> Identity | None:
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


async def check_catalog(request: web.Request) -> Callable[[str, str], bool]:
    """`/v2/_catalog` names cached repositories: with access control on, it needs a user
    (never the anonymous token), and lists only the repositories that user may pull.
    Answers the filter (upstream, repository) -> listed."""
    if request.app[AUTHENTICATOR] is None:
        return lambda upstream, repository: True
    who = await identity(request)
    if who is None or who.anonymous:
        raise unauthorized(request, "the catalog is readable by authenticated users only",
                           "registry:catalog:*")
    grants = request.app[GRANTS]
    return lambda upstream, repository: grants.decide(who, upstream, repository)  # a thread's


async def check_pull(request: web.Request, upstream: str, repository: str) -> None:
    """May the request's identity pull `upstream`'s `repository` (http/grants.py)? Without a
    user: 401 with a challenge for the repository's scope; with one: 403 DENIED."""
    if request.app[AUTHENTICATOR] is None:
        return
    who = await identity(request)
    if request.app[GRANTS].may_pull(who, upstream, repository):
        return
    if who is None or who.anonymous:
        raise unauthorized(request, f"{upstream}/{repository} needs a user: log in",
                           f"repository:{repository}:pull")
    why = ("no [[auth.rule]] allows it" if who.robot is None
           else f"the robot's token allows {', '.join(who.robot) or 'nothing'}")
    raise RegistryError(ErrorCode.DENIED, f"{who.user!r} may not pull {upstream}/{repository}: "
                        f"{why}")


async def check_admin(request: web.Request) -> Identity:
    """The admin role (an [[auth.rule]] with admin = true): a browser is asked for a user
    (Basic), a user without the role gets 403."""
    who = await identity(request) if request.app[AUTHENTICATOR] is not None else None
    if who is None or who.anonymous:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "admin actions need a user with the admin "
                            "role ([[auth.rule]] admin = true)", challenges=(
                                f'Basic realm="{SERVICE}", charset="UTF-8"',))
    if not request.app[GRANTS].is_admin(who):
        raise RegistryError(ErrorCode.DENIED, f"{who.user!r} is not an admin ([[auth.rule]] "
                            "admin = true)")
    return who


async def token(request: web.Request) -> web.Response:
    """Docker's token endpoint: Basic credentials from htpasswd, or none for anonymous."""
    auth = request.app[AUTHENTICATOR]
    if auth is None:
        # 404: with access control off the token endpoint does not exist.
        raise RegistryError(ErrorCode.UNSUPPORTED, "access control is off: no token needed",
                            status=404)
    header = request.headers.get("Authorization")
    user = Identity(ANONYMOUS)
    if header:
        who = await identity(request)
        if who is None:
            raise RegistryError(ErrorCode.UNAUTHORIZED, "wrong user name or password",
                                headers={"WWW-Authenticate": f'Basic realm="{SERVICE}"'})
        user = who
    value = auth.issue(user)
    body = {"token": value, "access_token": value, "expires_in": int(auth.token_lifetime),
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")
