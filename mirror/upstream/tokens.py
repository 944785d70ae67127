"""Upstream credentials: Bearer tokens from a challenge's realm, cached per scope, and Basic.

Tokens are cached (cachetools TLRUCache, per-entry lifetime) until shortly before they expire;
concurrent requests needing the same scope share one token fetch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from cachetools import TLRUCache, TTLCache

from mirror.oci.challenge import Challenge

DEFAULT_TOKEN_LIFETIME = 60.0
HELPER_TIMEOUT = 30.0
# Credential helpers hand out short-lived secrets (ECR: 12 hours); ask again well before.
HELPER_REFRESH_SECONDS = 600.0


@dataclass(frozen=True)
class Token:
    value: str
    lifetime: float


def _token_expiry(_key: str, token: Token, now: float) -> float:
    # Refresh a little early so a token never expires between lookup and use.
    return now + max(1.0, token.lifetime - max(5.0, token.lifetime * 0.1))


class TokenError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the token service's HTTP status, when it answered


async def run_credential_helper(name: str, server: str) -> tuple[str, str]:
    """`docker-credential-<name> get` with the server on stdin → (username, secret)."""
    program = f"docker-credential-{name}"
    try:
        proc = await asyncio.create_subprocess_exec(
            program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise TokenError(f"credential helper {program} is not on PATH") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(server.encode()), HELPER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise TokenError(f"credential helper {program} did not answer in "
                         f"{HELPER_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip()[:200]
        raise TokenError(f"credential helper {program} failed: {detail}")
    try:
        doc = json.loads(out)
        return str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise TokenError(f"credential helper {program} printed no Username/Secret JSON") from None


class Credentials:
    """What one upstream authenticates with, and the tokens obtained with it."""

    def __init__(self, username: str | None, password: str | None,
                 helper: str | None = None, server: str = "",
                 proxy: Callable[[str], str | None] = lambda _url: None) -> None:
        """`proxy`: the proxy a token service's URL is reached through (egress.py)."""
        self.proxy = proxy
        self.username = username
        self.password = password
        self.helper = helper
        self.server = server
        self._tokens: TLRUCache[str, Token] = TLRUCache(maxsize=4096, ttu=_token_expiry,
                                                          timer=time.monotonic)
        self._helper_answer: TTLCache[str, tuple[str, str]] = TTLCache(
            maxsize=1, ttl=HELPER_REFRESH_SECONDS, timer=time.monotonic)
        self._pending: dict[str, asyncio.Future[Token]] = {}
        self._basic: str | None = None  # set once the upstream asked for Basic

    @property
    def configured(self) -> bool:
        return self.helper is not None or self.username is not None

    async def basic_header(self) -> str | None:
        pair = await self._pair()
        if pair is None:
            return None
        return "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()

    async def _pair(self) -> tuple[str, str] | None:
        if self.helper is None:
            if self.username is None or self.password is None:
                return None
            return self.username, self.password
        pair = self._helper_answer.get("pair")
        if pair is None:
            pair = await run_credential_helper(self.helper, self.server)
            self._helper_answer["pair"] = pair
        return pair

    def rejected(self) -> None:
        """The upstream refused what we sent: ask the credential helper again next time."""
        self._helper_answer.clear()
        self._basic = None

    def header_for(self, scope: str) -> str | None:
        """The Authorization header to try first for a request needing `scope`."""
        token = self._tokens.get(scope)
        if token is not None:
            return f"Bearer {token.value}"
        return self._basic

    async def authorize(
        self, session: aiohttp.ClientSession, challenge: Challenge, scope: str
    ) -> str | None:
        """Answer a challenge: the header to retry with, or None when it can't be answered."""
        if challenge.scheme == "basic":
            self._basic = await self.basic_header()
            return self._basic
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
        basic = await self.basic_header()
        if basic:
            headers["Authorization"] = basic
        assert challenge.realm is not None
        async with session.get(challenge.realm, params=params, headers=headers,
                               allow_redirects=False,
                               proxy=self.proxy(challenge.realm)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TokenError(f"token service {challenge.realm} answered {resp.status}",
                                 resp.status)
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
