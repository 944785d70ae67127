"""Client access control (off unless `[auth] htpasswd` is set): who may read through the mirror.

Pure apart from reading the htpasswd and robots files. Clients authenticate the way they do
with Docker Hub: a 401 with a Bearer challenge sends them to `/token`, with Basic credentials
from htpasswd (bcrypt entries, as `htpasswd -B` writes them), a robot's name and token
(cache/robots.py), or anonymously; the token is an HMAC-signed claim set. What an identity may
pull is http/grants.py's to say.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import bcrypt
from cachetools import TTLCache

from mirror.cache.robots import PREFIX as ROBOT_PREFIX
from mirror.cache.robots import Robots

ANONYMOUS = ""
SERVICE = "registry-mirror"
VERDICT_SECONDS = 60.0  # how long a password check's result is reused
BCRYPT_THREADS = 2
MAX_TOKEN = 4096  # characters: ours are about 150
FAILED_LOGINS_PER_WINDOW = 10  # per client address, then 429 until the window ends
FAILURE_WINDOW = 60.0


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash. Lines that are blank, comments or not bcrypt are rejected loudly."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ValueError(f"{path}:{number}: not a bcrypt entry (create it with htpasswd -B)")
        users[user] = hashed.encode()
    return users


def parse_basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except ValueError:  # not base64 (or not ASCII at all), or not UTF-8 inside
        return None
    return (user, password) if sep else None


def bearer_challenge(realm: str, scope: str | None = None) -> str:
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    return value + (f',scope="{scope}"' if scope else "")


@dataclass(frozen=True)
class Identity:
    user: str  # ANONYMOUS for an anonymous token; a robot's name for a robot
    robot: tuple[str, ...] | None = None  # a robot's allow patterns (cache/robots.py)

    @property
    def anonymous(self) -> bool:
        return self.user == ANONYMOUS


class Counters(Protocol):
    """Counters that expire, shared by every process that checks logins (cache/index.py's
    Index.add_count with workers; MemoryCounters alone). Used by FailureLimiter.attempt and
    .succeeded: add `delta` to `key` and answer the new count."""

    def add_count(self, key: str, delta: int, ttl: float) -> int: ...


class MemoryCounters:
    """One process's counters (the unit tests', or a limiter without an index)."""

    def __init__(self, maxsize: int = 65536, ttl: float = 2 * FAILURE_WINDOW,
                 timer: Callable[[], float] = time.time) -> None:
        self._counts: TTLCache[str, int] = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)

    def add_count(self, key: str, delta: int, ttl: float) -> int:
        self._counts[key] = self._counts.get(key, 0) + delta
        return self._counts[key]


class FailureLimiter:
    """Failed logins per client address in fixed windows of wall-clock time (the same for
    every worker: the counts are shared): after `limit` failures (attempts in progress
    included) an address is refused until its window ends."""

    def __init__(self, limit: int = FAILED_LOGINS_PER_WINDOW, window: float = FAILURE_WINDOW,
                 timer: Callable[[], float] = time.time, counters: Counters | None = None
                 ) -> None:
        self.limit = limit
        self.window = window
        self.timer = timer
        self.counters: Counters = counters or MemoryCounters(timer=timer)

    def _key(self, address: str) -> tuple[str, float]:
        """The address's counter in this window, and when the window ends."""
        number = math.floor(self.timer() / self.window)
        return f"login-failures\0{address}\0{number}", (number + 1) * self.window

    def attempt(self, address: str) -> int | None:
        """Count an attempt before checking it (so that concurrent attempts count too):
        None when it may go ahead, else the seconds until the address may try again."""
        key, ends = self._key(address)
        if self.counters.add_count(key, 1, 2 * self.window) <= self.limit:
            return None
        return max(1, math.ceil(ends - self.timer()))

    def succeeded(self, address: str) -> None:
        """A good password does not count against its address."""
        key, _ = self._key(address)
        self.counters.add_count(key, -1, 2 * self.window)


class Authenticator:
    def __init__(self, users: dict[str, bytes], secret: bytes, token_lifetime: float,
                 robots: Robots | None = None) -> None:
        self.users = users
        self.robots = robots
        self.secret = secret
        self.token_lifetime = token_lifetime
        # bcrypt is slow on purpose (tens of ms): it runs in a small thread pool, equal
        # concurrent attempts share one check, and verdicts are remembered briefly, keyed by
        # an HMAC of user and password (never the password itself).
        self._verdicts: TTLCache[str, bool] = TTLCache(maxsize=4096, ttl=VERDICT_SECONDS)
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._pool = ThreadPoolExecutor(max_workers=BCRYPT_THREADS,
                                        thread_name_prefix="bcrypt")

    def replace(self, users: dict[str, bytes], token_lifetime: float) -> None:
        """A reload: the users now in the htpasswd file (verdicts about the old ones go)."""
        self.users, self.token_lifetime = users, token_lifetime
        self._verdicts.clear()

    async def check_password(self, user: str, password: str) -> bool:
        key = hmac.new(self.secret, f"{user}\0{password}".encode(), hashlib.sha256).hexdigest()
        verdict = self._verdicts.get(key)
        if verdict is not None:
            return verdict
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._pool, self._bcrypt, user, password)
            self._pending[key] = pending
            pending.add_done_callback(lambda f: self._settle(key, f))
        return await asyncio.shield(pending)

    def _bcrypt(self, user: str, password: str) -> bool:
        hashed = self.users.get(user)
        return hashed is not None and bcrypt.checkpw(password.encode(), hashed)

    def _settle(self, key: str, future: asyncio.Future[bool]) -> None:
        self._pending.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self._verdicts[key] = future.result()

    def issue(self, who: Identity, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims: dict[str, object] = {"sub": who.user, "aud": SERVICE,
                                     "exp": int(now + self.token_lifetime)}
        if who.robot is not None:
            claims["robot"] = True  # looked up again at each use: revoking it ends the token
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()

    def verify_token(self, token: str, now: float | None = None) -> Identity | None:
        if not token.isascii() or len(token) > MAX_TOKEN:  # not one of ours, whatever it is
            return None
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            user, exp, audience = str(claims["sub"]), float(claims["exp"]), claims["aud"]
            robot = claims.get("robot") is True
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return None
        if audience != SERVICE or exp <= (time.time() if now is None else now):
            return None
        return self._robot(user) if robot else Identity(user)

    def _robot(self, name: str, token: str | None = None) -> Identity | None:
        """A robot that exists and has not expired (with its token right, when given)."""
        if self.robots is None:
            return None
        robot = self.robots.get(name) if token is None else self.robots.verify(name, token)
        return None if robot is None else Identity(name, robot.allow)

    async def identify(self, authorization: str | None) -> Identity | None:
        """The identity a request's Authorization header proves, or None."""
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.verify_token(value.strip())
        pair = parse_basic(authorization)
        if pair is None:
            return None
        if pair[1].startswith(ROBOT_PREFIX):  # a robot token is never an htpasswd password
            return self._robot(*pair)
        if await self.check_password(*pair):
            return Identity(pair[0])
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
