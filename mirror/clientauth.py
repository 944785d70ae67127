"""Client access control (off unless `[auth] htpasswd` is set): who may read through the mirror.

Pure apart from reading the htpasswd file. Clients authenticate the way they do with Docker
Hub: a 401 with a Bearer challenge sends them to `/token`, with Basic credentials from
htpasswd (bcrypt entries, as `htpasswd -B` writes them) or anonymously; the token is an
HMAC-signed claim set. Anonymous clients may read upstreams whose `access` is "public";
"authenticated" upstreams need a user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from cachetools import TTLCache

ANONYMOUS = ""
SERVICE = "registry-mirror"


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
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def bearer_challenge(realm: str, scope: str | None = None) -> str:
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    return value + (f',scope="{scope}"' if scope else "")


@dataclass(frozen=True)
class Identity:
    user: str  # ANONYMOUS for an anonymous token

    @property
    def anonymous(self) -> bool:
        return self.user == ANONYMOUS


class Authenticator:
    def __init__(self, users: dict[str, bytes], secret: bytes, token_lifetime: float) -> None:
        self.users = users
        self.secret = secret
        self.token_lifetime = token_lifetime
        # bcrypt is slow on purpose; remember good credentials briefly, keyed by their hash.
        self._verified: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=300)

    def check_password(self, user: str, password: str) -> bool:
        key = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        if self._verified.get(key) == user:
            return True
        hashed = self.users.get(user)
        if hashed is None or not bcrypt.checkpw(password.encode(), hashed):
            return False
        self._verified[key] = user
        return True

    def issue(self, user: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {"sub": user, "exp": int(now + self.token_lifetime)}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()

    def verify_token(self, token: str, now: float | None = None) -> Identity | None:
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            user, exp = str(claims["sub"]), float(claims["exp"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return Identity(user) if exp > (time.time() if now is None else now) else None

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity a request's Authorization header proves, or None."""
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.verify_token(value.strip())
        pair = parse_basic(authorization)
        if pair is not None and self.check_password(*pair):
            return Identity(pair[0])
        return None
