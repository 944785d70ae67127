"""A real webhook receiver in a process of its own (aiohttp), for the [[webhook]] tests and
the webhooks benchmark: it checks each POST's signature, and in mode "ok" answers 200 and
appends every event to a JSON lines file (with the time it arrived, `received_at`); in mode
"fail" it answers 500, in mode "hang" it never answers. Every POST is counted in a second
file, whatever the mode, with its number of events and its `X-Custom-*` headers. Stopped and
started again on the same port, it plays a receiver that goes away and comes back.

    python -m tests.support.webhookreceiver PORT EVENTS_FILE ATTEMPTS_FILE SECRET MODE
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.registry import HOST, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
UNSIGNED = "-"  # the secret that accepts unsigned bodies (distribution's, in the benchmark)


def main(port: int, events_file: str, attempts_file: str, secret: str, mode: str) -> None:
    from aiohttp import web

    from mirror.events.envelope import EVENTS_MEDIA_TYPE, SIGNATURE_HEADER, verify

    async def receive(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = time.time()
        good = secret == UNSIGNED or verify(secret.encode(), body,
                                            request.headers.get(SIGNATURE_HEADER, ""))
        typed = request.content_type == EVENTS_MEDIA_TYPE
        count = len(json.loads(body)["events"]) if good else None
        custom = {k: v for k, v in request.headers.items() if k.lower().startswith("x-custom-")}
        with open(attempts_file, "a") as f:
            f.write(json.dumps({"good": good, "typed": typed, "mode": mode, "events": count,
                                "headers": custom}) + "\n")
        if not good:
            return web.Response(status=401)
        if mode == "fail":
            return web.Response(status=500)
        if mode == "hang":
            await asyncio.Event().wait()
        with open(events_file, "a") as f:
            for event in json.loads(body)["events"]:
                f.write(json.dumps({**event, "received_at": received}) + "\n")
        return web.Response(status=200)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    app.router.add_get("/health", health)
    web.run_app(app, host=HOST, port=port, print=None, handle_signals=True)


class Receiver:
    def __init__(self, directory: Path, secret: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/hook"
        self.events_file = directory / "events.jsonl"
        self.attempts_file = directory / "attempts.jsonl"
        self.secret = secret
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, mode: str = "ok") -> Receiver:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.webhookreceiver", str(self.port),
             str(self.events_file), str(self.attempts_file), self.secret, mode],
            env=env, stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "receiver exited"
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://{HOST}:{self.port}/health", trust_env=False,
                                 timeout=1).status_code == 200
            return False

        wait_until(up, 20, interval=0.05, what="the webhook receiver")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def events(self) -> list[dict[str, Any]]:
        return _lines(self.events_file)

    def attempts(self) -> list[dict[str, Any]]:
        return _lines(self.attempts_file)

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["action"] == action]


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
