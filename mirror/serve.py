"""Running the server: event loop choice, start-up housekeeping, listening socket."""

from __future__ import annotations

import asyncio
import logging

import uvloop
from aiohttp import web

from mirror.config import Config
from mirror.logs import setup_logging
from mirror.server import build_app
from mirror.store import BlobStore

log = logging.getLogger("mirror")


def serve(config: Config) -> int:
    setup_logging()
    store = BlobStore(config.cache.dir)
    removed = store.clean_temporaries()
    log.info("starting", extra={
        "listen": f"{config.server.host}:{config.server.port}", "cache_dir": str(config.cache.dir),
        "upstreams": [u.name for u in config.upstreams], "temporaries_removed": removed})
    app = build_app(config)
    # uvloop parses HTTP faster; blob bodies bypass its copying sendfile (see zerocopy.py).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host=config.server.host, port=config.server.port, access_log=None,
                print=None, handle_signals=True)
    return 0
