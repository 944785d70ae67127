"""In-process fixtures: the mirror's aiohttp app against a fault-injecting upstream
(tests/support/faultupstream.py).

  upstream       a started FaultUpstream
  other_origin   a second one on another port (another origin, like Docker Hub's blob CDN)
  start_mirror   start(cache=, upstream_extra=, upstreams=, auth=) -> the base URL of the
                 mirror's app in this loop (default upstream: up.test -> `upstream`)
  client         an aiohttp ClientSession (no auto-decompression)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.appmirror import MirrorFactory, app_config, serve_app
from tests.support.faultupstream import FaultUpstream, close_upstream, serve_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[FaultUpstream]:
    up = await serve_upstream(FaultUpstream())
    yield up
    await close_upstream(up)


@pytest.fixture
async def other_origin() -> AsyncIterator[FaultUpstream]:
    """A second server on another port: another origin, like Docker Hub's blob CDN."""
    up = await serve_upstream(FaultUpstream())
    yield up
    await close_upstream(up)


@pytest.fixture
async def start_mirror(tmp_path: Path, upstream: FaultUpstream
                       ) -> AsyncIterator[MirrorFactory]:
    servers: list[TestServer] = []

    async def start(cache: dict[str, object] | None = None,
                    upstream_extra: dict[str, object] | None = None,
                    upstreams: list[dict[str, object]] | None = None,
                    auth: dict[str, object] | None = None,
                    server: dict[str, object] | None = None) -> str:
        config = app_config(tmp_path / "cache", upstream.url, cache, upstream_extra,
                            upstreams, auth, server)
        server, url = await serve_app(config)
        servers.append(server)
        return url

    yield start
    for s in servers:
        await s.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
