"""Events: what the rest of the mirror tells (`emit`, `upstream_health`), never blocking the
request that caused it: an event is encoded and kept in this worker's buffer; every
FLUSH_SECONDS a thread appends the buffer to the queue of each webhook that wants the action
(events/queue.py), and the senders (events/delivery.py) drain the queues. A graceful stop
flushes the buffer; a kill -9 loses at most the last FLUSH_SECONDS of events.

Upstreams going down or up are told once per change for all the workers: each worker reports
its own view's changes, and the flush compares them with the state the workers share (kept
beside the queues) before an event is made."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import diskcache

from mirror import metrics
from mirror.config import WebhookConfig
from mirror.events.delivery import Sender
from mirror.events.envelope import encode, event
from mirror.events.queue import EventQueue, Item

log = logging.getLogger("mirror.events")

FLUSH_SECONDS = 0.05
GAUGE_TICKS = 20  # the queue-length gauge is refreshed every GAUGE_TICKS flushes
MAX_BUFFER = 50_000  # events one worker holds between flushes (a burst beyond is dropped)
QUEUE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)  # a full, read-only or locked disk


class Events:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.source = {"addr": f"{socket.gethostname()}:{port}",
                       "instanceID": uuid.uuid4().hex}
        self.hooks: tuple[WebhookConfig, ...] = ()
        self.wanted: frozenset[str] = frozenset()
        self._buffer: list[tuple[str, Item]] = []
        self._health: list[tuple[str, bool, str]] = []
        self._queues: dict[str, EventQueue] = {}
        self._senders: dict[str, tuple[Sender, asyncio.Task[None]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._state: diskcache.Cache | None = None
        self._flusher: asyncio.Task[None] | None = None

    # --- what the mirror calls ------------------------------------------------------------
    def emit(self, action: str, **fields: Any) -> None:
        """An event for the webhooks that want `action` (see envelope.event for fields)."""
        if action not in self.wanted:
            return
        if len(self._buffer) >= MAX_BUFFER:
            self._count_dropped(action, 1)
            return
        now = time.time()
        self._buffer.append((action, (now, encode(event(action, now, source=self.source,
                                                         **fields)))))

    def upstream_health(self, upstream: str, up: bool, error: str) -> None:
        """This worker's view of an upstream changed (upstream/client.py calls it)."""
        if {"upstream_up", "upstream_down"} & self.wanted:
            self._health.append((upstream, up, error))

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self, hooks: Sequence[WebhookConfig]) -> None:
        await self.configure(hooks)
        self._flusher = asyncio.ensure_future(self._flush_loop())

    async def configure(self, hooks: Sequence[WebhookConfig]) -> None:
        """Applies [[webhook]] tables (at start and on reload): a webhook whose table changed
        gets a new sender; one removed stops sending (its queue stays on disk, and is sent
        if it comes back under the same name)."""
        await self.flush()
        keep = {h.name for h in hooks if h in self.hooks}
        for name in list(self._senders):
            if name not in keep:
                await self._stop_sender(name)
        self.hooks = tuple(hooks)
        self.wanted = frozenset(a for h in hooks for a in h.events)
        await self._open_queues()

    async def _open_queues(self) -> None:
        """A queue (and its sender) for each webhook; one that cannot be opened (a full or
        read-only cache dir) is tried again later, its events dropped and counted meanwhile:
        the mirror serves on without it."""
        for hook in self.hooks:
            queue = self._queues.get(hook.name)
            if queue is None:
                try:
                    queue = self._queues[hook.name] = await asyncio.to_thread(
                        EventQueue, self.directory / hook.name, hook.max_queue, hook.max_batch)
                except QUEUE_ERRORS as exc:
                    log.error("webhook queue cannot be opened: its events are dropped until "
                              "it can (free space in the cache dir)", extra={
                                  "webhook": hook.name, "error": str(exc)})
                    continue
            queue.bound, queue.chunk = hook.max_queue, hook.max_batch
            if hook.name not in self._senders:
                self._start_sender(hook)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        for name in list(self._senders):
            await self._stop_sender(name)
        for queue in self._queues.values():
            queue.close()
        if self._state is not None:
            self._state.close()
        if self._session is not None:
            await self._session.close()

    # --- the flush --------------------------------------------------------------------------
    async def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        health, self._health = self._health, []
        if not buffer and not health:
            return
        await asyncio.to_thread(self._write, buffer, health)
        for sender, _task in self._senders.values():
            sender.wake.set()

    async def _flush_loop(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
                if tick % GAUGE_TICKS == 0:
                    await asyncio.to_thread(self._measure)
                    if len(self._queues) < len(self.hooks):
                        await self._open_queues()
            except Exception:  # a full disk, a damaged queue: logged, the requests go on
                log.exception("events could not be queued")

    def _measure(self) -> None:
        """Every worker says how long the queues are (the one sending may be backing off)."""
        for hook in self.hooks:
            if hook.name in self._queues:
                metrics.WEBHOOK_QUEUE.labels(hook.name).set(len(self._queues[hook.name]))

    def _write(self, buffer: list[tuple[str, Item]], health: list[tuple[str, bool, str]]
               ) -> None:
        buffer += self._health_events(health)
        for hook in self.hooks:
            items = [item for action, item in buffer if action in hook.events]
            if not items:
                continue
            queue = self._queues.get(hook.name)
            try:
                if queue is None:
                    raise OSError("the queue could not be opened")
                dropped = queue.put(items)
            except QUEUE_ERRORS as exc:
                log.error("webhook queue unwritable: events dropped", extra={
                    "webhook": hook.name, "events": len(items), "error": str(exc)})
                dropped = len(items)
            if dropped:
                metrics.WEBHOOK_EVENTS.labels(hook.name, "dropped").inc(dropped)
                log.warning("webhook queue full: newest events dropped", extra={
                    "webhook": hook.name, "dropped": dropped, "max_queue": hook.max_queue})
            if queue is not None:
                metrics.WEBHOOK_QUEUE.labels(hook.name).set(len(queue))

    def _health_events(self, health: list[tuple[str, bool, str]]) -> list[tuple[str, Item]]:
        """The changes of this worker's views that change the shared state: down is told
        unless it is known down; up only after a down."""
        if not health:
            return []
        out: list[tuple[str, Item]] = []
        for upstream, up, error in health:
            try:
                state = self._shared_state()
                with state.transact():
                    was = state.get(f"up:{upstream}")
                    state.set(f"up:{upstream}", up)
            except QUEUE_ERRORS:  # unshared: told as this worker saw it
                was = not up
            if (up and was is False) or (not up and was is not False):
                action = "upstream_up" if up else "upstream_down"
                now = time.time()
                out.append((action, (now, encode(event(
                    action, now, source=self.source, upstream=upstream,
                    error=None if up else error)))))
        return out

    # --- the pieces -------------------------------------------------------------------------
    def _shared_state(self) -> diskcache.Cache:
        if self._state is None:
            self._state = diskcache.Cache(str(self.directory / "state"))
        return self._state

    def _start_sender(self, hook: WebhookConfig) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "registry-mirror-webhook"}, auto_decompress=False)
        sender = Sender(hook, self._queues[hook.name], str(self.directory / f"{hook.name}.lock"),
                        self._session)
        self._senders[hook.name] = (sender, asyncio.ensure_future(sender.run()))

    async def _stop_sender(self, name: str) -> None:
        """Lets a POST in progress finish (and its events leave the queue) first; one that
        outlasts its timeout is cancelled, and its events are sent again by the next sender."""
        sender, task = self._senders.pop(name)
        sender.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, sender.config.timeout + 1)

    def _count_dropped(self, action: str, count: int) -> None:
        for hook in self.hooks:
            if action in hook.events:
                metrics.WEBHOOK_EVENTS.labels(hook.name, "dropped").inc(count)



