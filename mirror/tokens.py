"""Upstream credentials: Bearer tokens from a challenge's realm, cached per scope, and Basic.

Tokens are cached (cachetools TLRUCache, per-entry lifetime) until shortly before they expire;
concurrent requests needing the same scope share one token fetch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

import aiohttp
from cachetools import TLRUCache

from mirror.challenge import Challenge

DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Token:
    value: str
    lifetime: float


def _token_expiry(_key: str, token: Token, now: float) -> float:
    # Refresh a little early so a token never expires between lookup and use.
    return now + max(1.0, token.lifetime - max(5.0, token.lifetime * 0.1))


class TokenError(Exception):
    pass


class Credentials:
    """What one upstream authenticates with, and the tokens obtained with it."""

    def __init__(self, username: str | None, password: str | None) -> None:
        self.username = username
        self.password = password
        self._tokens: TLRUCache[str, Token] = TLRUCache(maxsize=4096, ttu=_token_expiry,
                                                          timer=time.monotonic)
        self._pending: dict[str, asyncio.Future[Token]] = {}
        self.basic_required = False

    def basic_header(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def header_for(self, scope: str) -> str | None:
        """The Authorization header to try first for a request needing `scope`."""
        token = self._tokens.get(scope)
        if token is not None:
            return f"Bearer {token.value}"
        if self.basic_required:
            return self.basic_header()
        return None

    async def authorize(
        self, session: aiohttp.ClientSession, challenge: Challenge, scope: str
    ) -> str | None:
        """Answer a challenge: the header to retry with, or None when it can't be answered."""
        if challenge.scheme == "basic":
            self.basic_required = True
            return self.basic_header()
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        self._tokens.pop(scope, None)
        pending = self._pending.get(scope)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(session, challenge, scope))
            self._pending[scope] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(scope, None))
        token = await asyncio.shield(pending)
        return f"Bearer {token.value}"

    async def _fetch(
        self, session: aiohttp.ClientSession, challenge: Challenge, scope: str
    ) -> Token:
        params = [("service", challenge.params["service"])] if "service" in challenge.params else []
        wanted = challenge.params.get("scope") or scope
        params += [("scope", s) for s in wanted.split(" ") if s]
        headers = {}
        basic = self.basic_header()
        if basic:
            headers["Authorization"] = basic
        assert challenge.realm is not None
        async with session.get(challenge.realm, params=params, headers=headers,
                               allow_redirects=False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TokenError(f"token service {challenge.realm} answered {resp.status}")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise TokenError(f"token service {challenge.realm} sent no usable JSON") from None
        if not isinstance(value, str) or not value:
            raise TokenError(f"token service {challenge.realm} sent no token")
        token = Token(value, lifetime)
        self._tokens[scope] = token
        return token
