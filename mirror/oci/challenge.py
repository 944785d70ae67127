"""Pure parsing of `WWW-Authenticate` headers (RFC 7235) and token-scope helpers.

Handles quoted strings with escapes, commas inside quotes, and several challenges in one header.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)  # lowercased names

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def _skip(s: str, i: int, chars: str) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _token(s: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] in _TOKEN_CHARS:
        j += 1
    return s[i:j], j


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Read a quoted-string starting at the opening quote; returns (value, index after)."""
    out: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), i  # unterminated: take the rest


def _param(s: str, i: int) -> tuple[str, str, int] | None:
    """An `name=value` pair at i (after separators), or None when a new challenge starts."""
    name, j = _token(s, i)
    k = _skip(s, j, " \t")
    if not name or k >= len(s) or s[k] != "=":
        return None
    k = _skip(s, k + 1, " \t")
    if k < len(s) and s[k] == '"':
        value, end = _quoted(s, k)
    else:
        value, end = _token(s, k)
    return name.lower(), value, end


def parse_www_authenticate(header: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    i = 0
    while i < len(header):
        i = _skip(header, i, " \t,")
        scheme, i = _token(header, i)
        if not scheme:
            i += 1  # stray character: skip it rather than loop forever
            continue
        params: dict[str, str] = {}
        while True:
            start = _skip(header, i, " \t,")
            parsed = _param(header, start)
            if parsed is None:
                break
            name, value, i = parsed
            params[name] = value
        challenges.append(Challenge(scheme.lower(), params))
    return challenges


def parse_all(headers: list[str]) -> list[Challenge]:
    return [c for h in headers for c in parse_www_authenticate(h)]


CATALOG_SCOPE = "registry:catalog:*"  # a token for /v2/_catalog (distribution's token spec)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"
