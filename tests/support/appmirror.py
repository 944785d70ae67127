"""The mirror's aiohttp app served in the test's own event loop (tests/inprocess)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestServer

from mirror.config import Config, parse_config
from mirror.http.app import build_app

# start_mirror's start(cache=, upstream_extra=, upstreams=, auth=) -> the mirror's base URL
MirrorFactory = Callable[..., Awaitable[str]]


def app_config(cache_dir: Path, upstream_url: str,
               cache: dict[str, object] | None = None,
               upstream_extra: dict[str, object] | None = None,
               upstreams: list[dict[str, object]] | None = None,
               auth: dict[str, object] | None = None,
               server: dict[str, object] | None = None) -> Config:
    """A config whose default upstream is `up.test` -> `upstream_url` (1 s read timeout)."""
    return parse_config({
        "server": server or {},
        "cache": {"dir": str(cache_dir), **(cache or {})},
        "auth": auth or {},
        "upstream": upstreams or [{"name": "up.test", "url": upstream_url,
                                   "read_timeout": "1s", **(upstream_extra or {})}],
    })


async def serve_app(config: Config) -> tuple[TestServer, str]:
    """The mirror's app started on 127.0.0.1: (server, base URL)."""
    server = TestServer(build_app(config), host="127.0.0.1")
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")
