"""Client connections: admission and timeouts, on aiohttp's own request handler.

aiohttp closes a connection that sits idle between requests after `keepalive_timeout` (passed
through as is). What it lacks, added here by subclassing its RequestHandler:

- a bound on the time to receive a request's headers: from the accept for a new connection,
  from the first byte of the next request on a keep-alive one. A client trickling its headers
  would otherwise hold its connection (and a file descriptor) for as long as it likes. A
  request being answered is never timed: a blob body may take minutes to send;
- a bound on the connections of one worker process, and on those of one client address. A
  connection beyond either gets a one-line 503/429 and is closed at once, before any request
  is read, and a warning is logged (at most one line per kind every few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mirror.config import Network, ServerConfig
from mirror.http.keys import MIRROR
from mirror.http.notices import Throttle
from mirror.oci.errors import ErrorCode

log = logging.getLogger("mirror.connections")

FD_RESERVE = 256  # descriptors kept for the cache, the index and upstream connections


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_connections_per_client: int

    @classmethod
    def of(cls, server: ServerConfig) -> Limits:
        return cls(server.header_timeout, server.keepalive_timeout, server.max_connections,
                   server.max_connections_per_client)


def _refusal(status: int, reason: str, message: str) -> bytes:
    error = {"code": ErrorCode.TOOMANYREQUESTS, "message": message}
    body = json.dumps({"errors": [error]}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode() + body


WORKER_FULL = _refusal(503, "Service Unavailable",
                       "this mirror is at its connection limit; retry shortly")
CLIENT_FULL = _refusal(429, "Too Many Requests",
                       "too many connections from your address; reuse connections or retry")


class Admission:
    """Open connections of one worker process, in total and per client address."""

    def __init__(self, limits: Limits,
                 trusted_proxies: Callable[[], Sequence[Network]] = tuple) -> None:
        """`trusted_proxies`: the reverse proxies ([server] trusted_proxies, as reloaded),
        whose connections carry many clients: the per-client bound does not apply to them."""
        self.limits = limits
        self.trusted_proxies = trusted_proxies
        self.open = 0
        self.by_client: dict[str, int] = {}
        self._worker_full = Throttle()
        self._client_full = Throttle()
        self._slow = Throttle()

    def admit(self, client: str) -> bytes | None:
        """None: admitted (release it later). Otherwise the response refusing it."""
        if self.open >= self.limits.max_connections:
            if (held := self._worker_full.allow()) is not None:
                log.warning("connection limit reached: refusing new connections", extra={
                    "max_connections": self.limits.max_connections, "open": self.open,
                    "refused_before_unlogged": held})
            return WORKER_FULL
        count = self.by_client.get(client, 0)
        if count >= self.limits.max_connections_per_client and not self._proxy(client):
            if (held := self._client_full.allow()) is not None:
                log.warning("a client reached its connection limit: refusing its new "
                            "connections", extra={
                                "client": client, "open": count,
                                "max_connections_per_client":
                                    self.limits.max_connections_per_client,
                                "refused_before_unlogged": held})
            return CLIENT_FULL
        self.open += 1
        self.by_client[client] = count + 1
        return None

    def _proxy(self, client: str) -> bool:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(client)
            return any(address in network for network in self.trusted_proxies())
        return False

    def release(self, client: str) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def note_slow_headers(self, client: str) -> None:
        if (held := self._slow.allow()) is not None:
            log.info("closed a connection that did not send a request's headers in time",
                     extra={"client": client, "header_timeout": self.limits.header_timeout,
                            "closed_before_unlogged": held})


def _client_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"  # a Unix socket: one shared bound


class GuardedHandler(RequestHandler):
    """aiohttp's request handler with admission and a header-read deadline."""

    def __init__(self, manager: web.Server, admission: Admission, *,
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._admission = admission
        self._client: str | None = None  # set while admitted
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = _client_address(transport)
        refusal = self._admission.admit(client)
        if refusal is not None:
            # uvloop's TCP transport is no asyncio.WriteTransport subclass; both can write.
            cast(asyncio.WriteTransport, transport).write(refusal)
            transport.close()
            return
        self._client = client
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._client is None:
            return  # refused; its close is under way
        if self._header_timer is None and self._waiting_for_request():
            self._start_header_timer()  # the first byte of the next request
        super().data_received(data)
        if self._messages and self._header_timer is not None:
            self._header_timer.cancel()  # a request's headers are complete
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:
            return  # refused: nothing was set up
        self._admission.release(self._client)
        self._client = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """Between requests (not while one is being answered)."""
        return self._waiter is not None and not self._waiter.done()

    def _start_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._admission.limits.header_timeout,
                                                   self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._client is not None and self._waiting_for_request():
            self._admission.note_slow_headers(self._client)
            self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making GuardedHandlers as its protocol factory."""

    def __init__(self, admission: Admission, plain: web.Server, *,
                 loop: asyncio.AbstractEventLoop, **handler_kwargs: Any) -> None:
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=loop,
                         **handler_kwargs)
        self.admission = admission
        self._handler_loop = loop
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, self.admission, loop=self._handler_loop,
                              **self._handler_kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server admits and times connections per `Limits`. `handler_kwargs`
    are RequestHandler keywords (aiohttp's own `keepalive_timeout` is set from the limits)."""

    def __init__(self, app: web.Application, limits: Limits, *,
                 shutdown_timeout: float = 60.0, **handler_kwargs: Any) -> None:
        self._limits = limits
        self._handler_kwargs = {**handler_kwargs, "keepalive_timeout": limits.keepalive_timeout}
        super().__init__(app, handle_signals=False, shutdown_timeout=shutdown_timeout,
                         **self._handler_kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup
        mirror = self.app[MIRROR]  # set by the startup: the configuration as reloaded
        admission = Admission(self._limits, lambda: mirror.config.server.trusted_proxies)
        return GuardedServer(admission, plain, loop=asyncio.get_running_loop(),
                             **self._handler_kwargs)


def fit_file_limit(limits: Limits) -> Limits:
    """Raise this process's soft limit on open files to what `max_connections` needs (up to
    the hard limit); when it cannot be reached, lower max_connections to fit and say so: a
    worker out of descriptors fails every accept, legitimate clients included."""
    needed = limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return limits
    fitted = max(1, soft - FD_RESERVE)
    log.warning("the open-files limit is too low for [server] max_connections: using less",
                extra={"max_connections": limits.max_connections, "using": fitted,
                       "open_files_limit": soft, "hint": "raise LimitNOFILE= / ulimit -n"})
    return Limits(limits.header_timeout, limits.keepalive_timeout, fitted,
                  min(limits.max_connections_per_client, fitted))
