"""CSRF protection for the cache browser's admin forms. Pure: no I/O.

A form carries a token binding the admin's user name to a time window, an HMAC under a key
derived from the cache dir's shared secret (so every worker checks what any worker issued).
A token is good for the window it was issued in and the next (one to two hours). A POST is
accepted only with a valid token for the user it authenticated as, and only when the
browser says it comes from this host (Origin, or else Referer, naming the Host asked).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit

WINDOW_SECONDS = 3600


def _key(secret: bytes) -> bytes:
    return hmac.new(secret, b"mirror cache browser csrf", hashlib.sha256).digest()


def _mac(secret: bytes, user: str, window: int) -> str:
    message = f"{window}\0{user}".encode()
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def issue(secret: bytes, user: str, now: float) -> str:
    window = int(now // WINDOW_SECONDS)
    return f"{window}.{_mac(secret, user, window)}"


def valid(secret: bytes, user: str, token: str, now: float) -> bool:
    window_text, _, mac = token.partition(".")
    if not (token.isascii() and window_text.isdecimal()) or len(window_text) > 12:
        return False
    window = int(window_text)
    if not 0 <= int(now // WINDOW_SECONDS) - window <= 1:
        return False
    return hmac.compare_digest(mac, _mac(secret, user, window))


def same_origin(headers: Mapping[str, str], host: str) -> bool:
    """Whether Origin (or, without it, Referer) names the `host` the request was sent to.
    Only the host is compared: behind a TLS-terminating proxy the scheme seen here differs.
    Neither header: refused (browsers send one with a form POST; only other programs don't)."""
    seen = headers.get("Origin") or headers.get("Referer")
    if seen is None or seen == "null" or not (seen.isascii() and host.isascii()):
        return False
    try:
        netloc = urlsplit(seen).netloc
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        return False
    return hmac.compare_digest(netloc.lower().encode(), host.lower().encode())
