"""The mirror as a real process: `[server] workers = 2` on one port (single flight across
processes, a crashed worker restarted, metrics added up over workers), the systemd notify
protocol, and SIGTERM in the middle of downloads leaving only verified content in the store.

The upstream is an aiohttp app run in a thread of the test process, so a blob can be held
half-sent until the test lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class GatedUpstream:
    """A registry serving blobs; a gated blob sends half its body, then waits for its gate
    (forever if never opened)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.gates: dict[str, threading.Event] = {}
        self.reached: dict[str, threading.Event] = {}
        self.gets: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, data: bytes, gated: bool = False) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        if gated:
            self.gates[digest] = threading.Event()
            self.reached[digest] = threading.Event()
        return digest

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        self.gets[digest] += 1
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        gate = self.gates.get(digest)
        if gate is None:
            await resp.write(data)
            return resp
        await resp.write(data[: len(data) // 2])
        self.reached[digest].set()
        await asyncio.to_thread(gate.wait)  # stop() opens every gate
        await resp.write(data[len(data) // 2:])
        return resp

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        self.runner = web.AppRunner(app, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def start(self) -> GatedUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        for gate in self.gates.values():
            gate.set()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def gated() -> Iterator[GatedUpstream]:
    up = GatedUpstream().start()
    yield up
    up.stop()


@pytest.fixture
def make_mirror(tmp_path: Path, gated: GatedUpstream,
                request: pytest.FixtureRequest) -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for m in started:
        m.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- mirror stderr ---\n{m.stderr_tail()}")


def start(started: list[MirrorProcess], tmp_path: Path, gated: GatedUpstream,
          workers: int) -> MirrorProcess:
    m = MirrorProcess(tmp_path / f"m{len(started)}",
                      [Upstream(name="up.test", url=gated.url, extra={"read_timeout": "30s"})],
                      server_extra={"workers": workers}, cache_extra={"prefetch": False})
    started.append(m)
    return m.start()


def fetch(url: str, timeout: float = 60.0) -> bytes:
    with httpx.Client(timeout=timeout, trust_env=False) as c:
        resp = c.get(url)
        resp.raise_for_status()
        return resp.content


def worker_pids(m: MirrorProcess, tries: int = 60) -> set[int]:
    """Which processes answer: one new connection per request, spread by SO_REUSEPORT."""
    pids = set()
    for _ in range(tries):
        pids.add(int(httpx.get(f"{m.url}/healthz", trust_env=False).json()["pid"]))
    return pids


def scrape(m: MirrorProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{m.url}/metrics", trust_env=False).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_two_workers_one_upstream_get(tmp_path: Path, gated: GatedUpstream,
                                      make_mirror: list[MirrorProcess]) -> None:
    data = os.urandom(8 * MB)
    digest = gated.add(data, gated=True)
    m = start(make_mirror, tmp_path, gated, workers=2)
    pids = worker_pids(m)
    assert len(pids) == 2, "both workers should accept connections on the shared port"
    assert m.proc is not None and m.proc.pid not in pids  # the supervisor does not serve

    url = f"{m.url}/v2/team/app/blobs/{digest}"
    with ThreadPoolExecutor(16) as pool:
        futures: list[Future[bytes]] = [pool.submit(fetch, url) for _ in range(16)]
        assert gated.reached[digest].wait(20)
        time.sleep(1.0)  # every client attached to the download, in one worker or the other
        gated.gates[digest].set()
        bodies = [f.result() for f in futures]
    assert all(b == data for b in bodies)
    assert gated.gets[digest] == 1, gated.gets
    m.wait_cached([digest])
    assert m.verify_cache() == {digest}
    served = {e["cache"] for e in m.requests_for(f"/blobs/{digest}")}
    assert "miss" in served and served <= {"miss", "inflight", "hit"}
    # The metrics add both workers up.
    metrics = scrape(m)
    blob_gets = sum(v for (n, ls), v in metrics.items()
                    if n == "mirror_http_requests_total" and ("route", "blob") in ls)
    assert blob_gets == 16
    health = sum(v for (n, ls), v in metrics.items()
                 if n == "mirror_http_requests_total" and ("route", "health") in ls)
    assert health == 60


def test_a_crashed_worker_is_replaced(tmp_path: Path, gated: GatedUpstream,
                                      make_mirror: list[MirrorProcess]) -> None:
    m = start(make_mirror, tmp_path, gated, workers=2)
    before = worker_pids(m)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel queued on the victim's socket die with it (reset, or hang
    # while it is still exiting): a probe may fail until the replacement is alone there.
    wait_until(lambda: not Path(f"/proc/{victim}").exists(), 20, what="the victim reaped")

    def replaced() -> bool:
        try:
            return len(worker_pids(m, 20) - {victim}) == 2
        except httpx.TransportError:
            return False

    wait_until(replaced, 20, what="a new worker replacing the killed one")
    assert m.running
    digest = gated.add(os.urandom(MB))
    assert fetch(f"{m.url}/v2/app/blobs/{digest}") == gated.blobs[digest]


@pytest.mark.parametrize("workers", [1, 2])
def test_notify_ready_and_stopping(tmp_path: Path, gated: GatedUpstream,
                                   make_mirror: list[MirrorProcess],
                                   monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        m = start(make_mirror, tmp_path, gated, workers=workers)
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving on ")
        assert m.proc is not None
        os.kill(m.proc.pid, signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert m.proc.wait(20) == 0
    finally:
        sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_mid_download_leaves_a_clean_store(
        tmp_path: Path, gated: GatedUpstream, make_mirror: list[MirrorProcess],
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setenv("MIRROR_SHUTDOWN_TIMEOUT", "3")
    finishing = gated.add(os.urandom(6 * MB), gated=True)  # released after SIGTERM
    stuck = gated.add(os.urandom(6 * MB), gated=True)  # never released
    m = start(make_mirror, tmp_path, gated, workers=workers)
    assert m.proc is not None
    with ThreadPoolExecutor(2) as pool:
        got_finishing = pool.submit(fetch, f"{m.url}/v2/app/blobs/{finishing}")
        got_stuck = pool.submit(fetch, f"{m.url}/v2/app/blobs/{stuck}")
        assert gated.reached[finishing].wait(20) and gated.reached[stuck].wait(20)
        wait_until(lambda: len(m.tmp_files()) >= 2, 10, what="partial files in tmp/")

        stopped_at = time.monotonic()
        os.kill(m.proc.pid, signal.SIGTERM)
        # New connections are refused at once.
        wait_until(lambda: _refused(m), 5, what="the listening socket to close")
        gated.gates[finishing].set()
        assert got_finishing.result(30) == gated.blobs[finishing]
        with pytest.raises((httpx.HTTPError, httpx.StreamError)):
            got_stuck.result(30)
        assert m.proc.wait(30) == 0
    took = time.monotonic() - stopped_at
    assert took < 3 * 2 + 5, f"stopping took {took:.1f}s"
    # Only verified content in blobs/, nothing left in tmp/.
    assert m.verify_cache() == {finishing}
    assert m.tmp_files() == []
    assert gated.gets == {finishing: 1, stuck: 1}
    logs = [e.get("msg") for e in m.log_entries()]
    assert "shutting down: cancelling unfinished downloads" in logs
    # The next start finds a clean cache and serves what was verified.
    m.start()
    assert fetch(f"{m.url}/v2/app/blobs/{finishing}") == gated.blobs[finishing]


def _refused(m: MirrorProcess) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", m.port), timeout=1):
            return False
    except OSError:
        return True
