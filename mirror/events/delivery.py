"""A webhook's Sender: in one worker at a time (a flock in the cache dir; the others wait to
take over if it dies), POSTs the queue's oldest events in one envelope and removes them once
the receiver answered 2xx. Anything else (an error status, a redirect, a refused connection,
no answer within `timeout`) leaves them queued and is tried again after a backoff that doubles
up to MAX_BACKOFF. Delivery is at least once: a worker killed between the receiver's answer and
the removal sends those events again, with the same ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time

import aiohttp
import diskcache

from mirror import metrics
from mirror.cache import locks
from mirror.config import WebhookConfig
from mirror.events.envelope import EVENTS_MEDIA_TYPE, SIGNATURE_HEADER, envelope, signature
from mirror.events.queue import EventQueue, Item

log = logging.getLogger("mirror.events")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 60.0
POLL_SECONDS = 0.1  # how often an idle sender looks for what other workers queued
TAKEOVER_SECONDS = 2.0  # how often a worker without the lock tries to take it


class Sender:
    def __init__(self, config: WebhookConfig, queue: EventQueue, lock_path: str,
                 session: aiohttp.ClientSession) -> None:
        self.config, self.queue, self.lock_path, self.session = config, queue, lock_path, session
        self.wake = asyncio.Event()  # set when this worker queued events
        self._stop = asyncio.Event()
        self.failures = 0

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            with locks.try_exclusive(self.lock_path) as held:
                if held:
                    await self._deliver()
                    return
            await self._pause(TAKEOVER_SECONDS)

    async def _deliver(self) -> None:
        while not self._stop.is_set():
            try:
                await self._deliver_one()
            except (OSError, sqlite3.Error, diskcache.Timeout) as exc:  # the disk, not the hook
                log.warning("webhook queue unreadable: tried again", extra={
                    "webhook": self.config.name, "error": str(exc)})
                await self._pause(TAKEOVER_SECONDS)

    async def _deliver_one(self) -> None:
        """One batch: peeked, POSTed, removed on a 2xx; or a wait."""
        chunks = await asyncio.to_thread(self.queue.peek, self.config.max_batch)
        metrics.WEBHOOK_QUEUE.labels(self.config.name).set(len(self.queue))
        if not chunks:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
            return
        batch = [item for chunk in chunks for item in chunk]
        if await self._post(batch):
            await asyncio.to_thread(self.queue.remove, len(chunks))
            self._delivered(batch)
        else:
            await self._pause(min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.failures - 1)))

    async def _post(self, batch: list[Item]) -> bool:
        body = envelope([encoded for _when, encoded in batch])
        headers = {**dict(self.config.headers), "Content-Type": EVENTS_MEDIA_TYPE}
        if self.config.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.config.secret, body)
        try:
            async with self.session.post(
                    self.config.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as resp:
                if 200 <= resp.status < 300:
                    return True
                problem = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.failures += 1
        metrics.WEBHOOK_EVENTS.labels(self.config.name, "failed").inc(len(batch))
        log.warning("webhook delivery failed: the events stay queued and are sent again", extra={
            "webhook": self.config.name, "url": self.config.url, "error": problem,
            "events": len(batch), "attempt": self.failures})
        return False

    def _delivered(self, batch: list[Item]) -> None:
        if self.failures:
            log.info("webhook delivering again", extra={
                "webhook": self.config.name, "after_failures": self.failures})
        self.failures = 0
        metrics.WEBHOOK_EVENTS.labels(self.config.name, "sent").inc(len(batch))
        now = time.time()
        delay = metrics.WEBHOOK_DELAY.labels(self.config.name)
        for when, _encoded in batch:
            delay.observe(max(0.0, now - when))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
