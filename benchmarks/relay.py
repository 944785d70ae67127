"""A TCP relay that adds a fixed delay to every chunk the client sends (in practice, to
every HTTP request), modelling an upstream with a high per-request latency (a distant
registry, a token round trip, a CDN redirect). Responses are relayed untouched.

Run as ``python -m benchmarks.relay LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS``; the
benchmark runs it inside its network namespace, in front of the upstream registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pump(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float, bufsize: int
) -> None:
    try:
        while data := await src.read(bufsize):
            if delay:
                await asyncio.sleep(delay)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass


async def _serve(listen: str, target: str, delay: float) -> None:
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                _pump(reader, up_w, delay, 65536), _pump(up_r, writer, 0.0, 1 << 20)
            )
        finally:
            for w in (writer, up_w):
                with contextlib.suppress(Exception):
                    w.close()

    server = await asyncio.start_server(handle, lhost, int(lport), backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen, target, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(listen, target, delay_ms / 1000))


if __name__ == "__main__":
    main()
