"""The aiobotocore S3 client of the bucket tier (bucket.py): its configuration, and the one
session a supervisor loads before it forks (process/serve.py).

Kept apart from bucket.py so that the supervisor can load botocore without the mirror's own
modules (their metrics would give it prometheus files of its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from mirror.config import S3Config

_session: AioSession | None = None  # preload()'s, with botocore's S3 data parsed


def preload(config: S3Config) -> None:
    """Parses botocore's S3 data (service model, endpoint rules and partitions: ~14 MiB of
    Python objects a client) by creating and closing one client, in a process about to fork:
    the workers' clients then come from this session and share those pages copy-on-write
    instead of each parsing its own. Nothing is sent: a client connects on its first call."""
    global _session
    # Static keys: the AWS credential chain is left to each worker (the session would cache
    # what it found, with a refresh lock of this process's event loop).
    static = dataclasses.replace(config, access_key="preload", secret_key="preload")

    session = get_session()

    async def create_and_close() -> None:
        async with open_client(static, session):
            pass

    asyncio.run(create_and_close())
    _session = session  # only once it parsed everything: else each worker loads its own


@asynccontextmanager
async def open_client(config: S3Config, session: AioSession | None = None
                      ) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for `config` (from `session`, else the preloaded one, else a
    new one), closed on exit."""
    aio_config = AioConfig(
        connect_timeout=config.timeout, read_timeout=config.timeout,
        retries={"max_attempts": 1, "mode": "standard"},
        # Request bodies are not hashed by botocore in the event loop (bucket.py's docstring):
        # the mirror sends the Content-MD5 it computed in a thread.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path" if config.path_style else "auto",
            "payload_signing_enabled": False},
        max_pool_connections=32)
    session = session or _session or get_session()
    async with session.create_client(
            "s3", endpoint_url=config.endpoint, region_name=config.region,
            aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
            verify=config.ca_file if config.ca_file else None, config=aio_config) as client:
        yield client
