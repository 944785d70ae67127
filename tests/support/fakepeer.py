"""A cluster peer that misbehaves, for the faults a real node cannot produce: it passes its
health checks (answering with the node id it is given) and answers blob requests with wrong
bytes (as many as the blob has), the first half of the blob's bytes and then silence, or
nothing at all.

    with FakePeer("127.0.0.14", node_id, blob, mode="wrong") as peer:
        ... peer.url is in the nodes' `peers`; peer.blob_requests counts what they asked
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Literal

from aiohttp import web

from .registry import free_port

Mode = Literal["wrong", "stall", "silent"]
_FLIP = bytes(i ^ 0x5A for i in range(256))  # every byte changed, in C: blobs are 100 MB


class FakePeer:
    def __init__(self, address: str, node_id: str, data: bytes, mode: Mode) -> None:
        self.port = free_port()
        self.url = f"http://{address}:{self.port}"
        self.address, self.node_id, self.data, self.mode = address, node_id, data, mode
        self.blob_requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._never: asyncio.Event | None = None

    def __enter__(self) -> FakePeer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                 ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._never = asyncio.Event()
        app = web.Application()
        app.router.add_get("/_cluster/health", self._health)
        app.router.add_get("/_cluster/blobs/{tail:.*}", self._blob)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address, self.port).start()

    async def _stop(self) -> None:
        assert self._runner is not None and self._never is not None
        self._never.set()
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self.node_id, "status": "up"})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        assert self._never is not None
        self.blob_requests += 1
        if request.query.get("stored") == "1":
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if self.mode == "silent":
            await self._never.wait()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(self.data)
        await resp.prepare(request)
        if self.mode == "wrong":
            await resp.write(self.data.translate(_FLIP))
            return resp
        await resp.write(self.data[: len(self.data) // 2])
        await self._never.wait()
        return resp
