"""Which proxy, if any, a request to an upstream goes through (pure: no I/O).

An upstream's `proxy` key wins: a proxy URL, or "direct" for none whatever the environment
says. Without it the standard variables apply as curl and Go read them (`HTTPS_PROXY` for
https URLs, `HTTP_PROXY` for http, lower case first; `NO_PROXY` hosts, domains and `*` go
direct), read once at start (urllib's getproxies_environment). The choice is made per URL,
so an upstream's fallback URLs, its token service and a redirect's target host each get
their own. aiohttp's own `trust_env` is not used: it would also send ~/.netrc credentials.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import urlsplit

DIRECT = "direct"


def environment_proxies() -> dict[str, str]:
    """{scheme: proxy URL, "no": NO_PROXY} from this process's environment."""
    return urllib.request.getproxies_environment()


def proxy_for(url: str, configured: str | None, environment: Mapping[str, str]) -> str | None:
    if configured == DIRECT:
        return None
    if configured:
        return configured
    parts = urlsplit(url)
    proxy = environment.get(parts.scheme)
    if not proxy or not parts.hostname:
        return None
    no_proxy = {"no": environment.get("no", "")}
    if urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]  # not in typeshed
            parts.netloc, no_proxy):
        return None
    return proxy


class Egress:
    """`proxy_for` of one upstream, remembered per host."""

    def __init__(self, configured: str | None, environment: Mapping[str, str]) -> None:
        self.configured = configured
        self.environment = dict(environment)
        self.proxy = lru_cache(maxsize=64)(self._proxy)

    def _proxy(self, origin: str) -> str | None:
        return proxy_for(origin, self.configured, self.environment)

    def __call__(self, url: str) -> str | None:
        parts = urlsplit(url)
        return self.proxy(f"{parts.scheme}://{parts.netloc}")
