"""Issue 10, item 9: slow and idle clients. Connections that do not complete a request's
headers within header_timeout are closed (new ones and keep-alive ones), connections per
worker and per client address are bounded (refused at once, one log line), and none of it
cuts a long blob body sent to a slow reader.

The mirror runs in-process behind the runner `serve` uses (connections.GuardedRunner), on
real loopback sockets; clients are raw sockets, so a test controls every byte and its timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from mirror.config import parse_config
from mirror.http.app import build_app
from mirror.http.connections import GuardedRunner, Limits
from tests.support.faultupstream import FaultUpstream, random_bytes
from tests.support.oci import sha256_digest

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
MB = 1 << 20
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Start = Callable[..., Awaitable[int]]


@pytest.fixture
async def guarded(tmp_path: Path, upstream: FaultUpstream) -> AsyncIterator[Start]:
    """start(**server keys) -> the port of a mirror behind the GuardedRunner."""
    runners: list[web.AppRunner] = []

    async def start(**server: object) -> int:
        config = parse_config({
            "server": {"header_timeout": "1s", **server},
            "cache": {"dir": str(tmp_path / "cache")},
            "upstream": [{"name": "up.test", "url": upstream.url, "read_timeout": "5s"}],
        })
        runner = GuardedRunner(build_app(config), Limits.of(config.server), access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        return site.port

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(port: int, source: str = HOST, rcvbuf: int | None = None) -> Conn:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return await asyncio.open_connection(sock=sock)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    except TimeoutError:
        return None


def request(path: str = "/v2/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers of one response (the body is left to the caller)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}


async def get_ok(port: int, path: str = "/v2/", source: str = HOST) -> None:
    reader, writer = await connect(port, source)
    writer.write(request(path))
    status, headers = await response(reader)
    await reader.readexactly(int(headers["content-length"]))
    writer.close()
    assert status == 200


async def trickle(writers: list[asyncio.StreamWriter], rounds: int = 50) -> None:
    """One header byte per connection every 0.1 s: a slow-loris client, bounded."""
    for _ in range(rounds):
        for w in writers:
            if not w.is_closing():
                w.write(b"X")
        await asyncio.sleep(0.1)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_idle_and_slow_header_connections_are_closed(guarded: Start) -> None:
    port = await guarded(header_timeout="1s", keepalive_timeout="30s")
    idle = [await connect(port) for _ in range(60)]
    slow = [await connect(port) for _ in range(30)]
    for _, w in slow:
        w.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Slow: ")
    started = time.monotonic()
    writers = [w for _, w in slow]
    slow_loris = asyncio.create_task(trickle(writers))
    await get_ok(port)  # a legitimate client is served meanwhile
    results = await asyncio.gather(*(closed_within(r, 6) for r, _ in idle + slow))
    elapsed = time.monotonic() - started
    await stop(slow_loris)
    assert all(r is not None for r in results), f"{results.count(None)} still open"
    assert 0.8 < elapsed < 5, elapsed
    await get_ok(port)
    for _, w in idle + slow:
        w.close()


async def test_keep_alive_connection_gets_header_timeout_not_keepalive(guarded: Start) -> None:
    port = await guarded(header_timeout="1s", keepalive_timeout="30s")
    (r1, w1), (r2, w2) = await connect(port), await connect(port)
    for reader, writer in ((r1, w1), (r2, w2)):
        writer.write(request())
        status, headers = await response(reader)
        await reader.readexactly(int(headers["content-length"]))
        assert status == 200
    w2.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")  # the next request, never finished
    slow_loris = asyncio.create_task(trickle([w2]))
    started = time.monotonic()
    assert await closed_within(r2, 5) is not None
    assert time.monotonic() - started < 4
    await stop(slow_loris)
    # the idle keep-alive connection next to it is still usable
    w1.write(request())
    status, _ = await response(r1)
    assert status == 200
    w1.close()


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
        guarded: Start) -> None:
    port = await guarded(header_timeout="5s", keepalive_timeout="1s")
    reader, writer = await connect(port)
    writer.write(request())
    status, headers = await response(reader)
    await reader.readexactly(int(headers["content-length"]))
    assert status == 200
    assert await closed_within(reader, 4) == b""


async def test_connection_limits_per_client_and_per_worker(
        guarded: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mirror.connections")
    port = await guarded(header_timeout="10s", max_connections=4, max_connections_per_client=2)
    a = [await connect(port, "127.0.0.1") for _ in range(2)]
    over_client = await connect(port, "127.0.0.1")
    refused = await closed_within(over_client[0], 3)
    assert refused is not None and (refused == b"" or refused.startswith(b"HTTP/1.1 429"))
    b = [await connect(port, "127.0.0.2") for _ in range(2)]
    for _ in range(10):  # the worker is full: refused at once, logged once
        reader, _w = await connect(port, "127.0.0.3")
        refused = await closed_within(reader, 3)
        assert refused is not None and (refused == b"" or refused.startswith(b"HTTP/1.1 503"))
    full = [r for r in caplog.records if "connection limit reached" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    assert [r for r in caplog.records if r.__dict__.get("client") == "127.0.0.1"]
    for reader, writer in a[:1] + b:  # the admitted ones are served
        writer.write(request())
        status, _ = await response(reader)
        assert status == 200
    a[1][1].close()  # one slot frees up: a new client gets in (bounded retries)
    for _attempt in range(50):
        reader, writer = await connect(port, "127.0.0.3")
        writer.write(request())
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
            if (await response(reader))[0] == 200:
                break
        writer.close()
        await asyncio.sleep(0.05)  # the server has yet to see the close: poll again
    else:
        pytest.fail("no slot freed after a connection closed")
    for _, w in a + b:
        w.close()


async def read_slowly(reader: asyncio.StreamReader, length: int, chunk: int,
                      pause: float) -> bytes:
    parts = []
    while length:
        part = await asyncio.wait_for(reader.read(min(chunk, length)), 10)
        assert part, "the body was cut"
        parts.append(part)
        length -= len(part)
        await asyncio.sleep(pause)  # a slow reader, not a synchronisation
    return b"".join(parts)


async def test_long_blob_to_a_slow_reader_is_not_cut(guarded: Start,
                                                     upstream: FaultUpstream) -> None:
    port = await guarded(header_timeout="1s", keepalive_timeout="1s")
    data = random_bytes(20 * MB)
    digest = upstream.add_blob(data)
    for attempt in ("cold", "cached"):
        reader, writer = await connect(port, rcvbuf=64 * 1024)
        started = time.monotonic()
        writer.write(request(f"/v2/test/big/blobs/{digest}"))
        status, headers = await response(reader)
        assert status == 200, attempt
        body = await read_slowly(reader, int(headers["content-length"]), 256 * 1024, 0.02)
        elapsed = time.monotonic() - started
        assert len(body) == len(data) and sha256_digest(body) == digest, attempt
        assert elapsed > 1.5, f"{attempt}: too fast ({elapsed:.1f}s) to test the timeouts"
        writer.close()
    assert hashlib.sha256(data).hexdigest() in digest


async def test_a_trusted_proxy_is_not_held_to_the_per_client_bound(guarded: Start) -> None:
    port = await guarded(header_timeout="10s", max_connections=8, max_connections_per_client=2,
                         trusted_proxies=["127.0.0.9"])
    proxy = [await connect(port, "127.0.0.9") for _ in range(5)]  # many clients behind it
    for reader, writer in proxy:
        writer.write(request())
        status, _ = await response(reader)
        assert status == 200
    held = [await connect(port, "127.0.0.1") for _ in range(2)]
    over = await connect(port, "127.0.0.1")  # anyone else still is
    refused = await closed_within(over[0], 3)
    assert refused is not None and (refused == b"" or refused.startswith(b"HTTP/1.1 429"))
    for _, w in proxy + held:
        w.close()
