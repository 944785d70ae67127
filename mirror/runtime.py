"""Assembling the pieces over one cache dir: for the server and for the operator commands."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.pull.downloads import Downloads
from mirror.pull.proxy import Proxy
from mirror.upstream.client import Upstream


@contextmanager
def open_cache(config: Config) -> Iterator[tuple[BlobStore, Index]]:
    """The store and its index, with every commit recorded as an index entry."""
    store = BlobStore(config.cache.dir)
    index = Index(store.index_dir)
    store.on_commit = lambda digest, size, kind: index.add_entry(digest, size, kind)
    try:
        yield store, index
    finally:
        index.close()


@asynccontextmanager
async def open_proxy(config: Config) -> AsyncIterator[Proxy]:
    """A running Proxy with one HTTP session per upstream; closed on exit."""
    with open_cache(config) as (store, index):
        sessions: list[aiohttp.ClientSession] = []
        upstreams: dict[str, Upstream] = {}
        for uc in config.upstreams:
            connector = aiohttp.TCPConnector(limit=uc.max_connections, ttl_dns_cache=60)
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                            headers={"User-Agent": "registry-mirror"})
            sessions.append(session)
            upstreams[uc.name] = Upstream(uc, session)
        downloads = Downloads(store, config.cache.finish_abandoned)
        proxy = Proxy(config, store, index, upstreams, downloads)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.stop()
            await downloads.drain(0)
            for session in sessions:
                await session.close()
