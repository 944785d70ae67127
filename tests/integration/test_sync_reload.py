"""SIGHUP under the [[sync]] rules (issue 15 item 5), against the real upstream
(docker-registry) and a real `mirror serve` with one and two workers. The upstream is reached
through a gate (a small reverse proxy in this process) that holds one layer's body after its
first piece, so a run is deterministically in progress while the file changes:
- a rule removed while it runs: its run stops after the image it is fetching (the client's
  download of the layer it was fetching is not dropped), it is gone from the status page and
  `mirror status`, what it selected loses its pin at once (the cache browser's "pinned by"),
  and neither it nor a rule removed with it is started again;
- a rule whose tags regex changes: the next run selects the new set, the tags no longer
  selected lose their pin, the newly selected ones are fetched (only they) and pinned; changed
  while it runs, the run stops after the image it is caching and the new rule runs next;
- a file with an error mid-run: the running rule goes on, finishes and is still shown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from tests.support import oci
from tests.support.clients import UpstreamRegistry, push_direct
from tests.support.faultmatrix import LoopThread
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import (
    HOST,
    ClosedPort,
    Registry,
    env_without_proxies,
    free_port,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
KB = 1024
REPO, OTHER = "reload/app", "reload/other"
TAGS = [f"1.0.{i}" for i in range(5)]
HELD_TAG = "1.0.3"  # its layer's body is held at the gate
PIECE = 64 * KB
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


@dataclass
class Gate:
    """A reverse proxy to the registry holding the GET bodies of `held` digests after their
    first piece until `open()`; `reached` is set when one waits there."""

    target: str
    thread: LoopThread = field(default_factory=LoopThread)
    held: set[str] = field(default_factory=set)
    reached: threading.Event = field(default_factory=threading.Event)
    port: int = field(default_factory=free_port)
    _open: asyncio.Event | None = None
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Gate:
        self.thread.run(self._start())
        return self

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    def open(self) -> None:
        assert self._open is not None
        self.thread.call(self._open.set)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None and self._open is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self._session.request(
                request.method, self.target + request.path_qs, headers=headers,
                data=await request.read() or None, allow_redirects=False) as answer:
            out = web.StreamResponse(status=answer.status, headers={
                k: v for k, v in answer.headers.items() if k.lower() not in HOP})
            if answer.content_length is not None:
                out.content_length = answer.content_length
            await out.prepare(request)
            if request.method == "HEAD":
                return out
            hold = request.method == "GET" and any(d in request.path for d in self.held)
            sent = 0
            async for piece in answer.content.iter_chunked(PIECE):
                if hold and sent >= PIECE and not self._open.is_set():
                    self.reached.set()
                    await self._open.wait()
                await out.write(piece)
                sent += len(piece)
            await out.write_eof()
            return out

    def stop(self) -> None:
        async def _stop() -> None:
            assert self._open is not None
            self._open.set()
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            self.thread.run(_stop())
        self.thread.stop()


@dataclass
class Site:
    up: UpstreamRegistry
    gate: Gate
    images: dict[str, oci.Image]  # REPO's tag -> image
    held: oci.Blob  # HELD_TAG's big layer, the one the gate holds


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """An upstream with reload/app:1.0.0 … 1.0.4 (HELD_TAG's image with a 1 MiB layer) and
    reload/other:1.0.0, behind the gate."""
    blobs = tmp_path / "blobs"
    registry = Registry(tmp_path / "upstream").start()
    up = UpstreamRegistry(registry)
    gate: Gate | None = None
    try:
        images = {tag: oci.build_image(blobs, [1024 * KB if tag == HELD_TAG else 2 * KB],
                                       labels={"image": tag}) for tag in TAGS}
        for tag, image in images.items():
            push_direct(up.url, REPO, tag, image)
        push_direct(up.url, OTHER, "1.0.0", oci.build_image(blobs, [2 * KB],
                                                            labels={"image": "other"}))
        gate = Gate(up.url).start()
        held = max(images[HELD_TAG].layers, key=lambda b: b.size)
        gate.held.add(held.digest)
        yield Site(up, gate, images, held)
    finally:
        if gate is not None:
            gate.stop()
        registry.stop()


def _rule(host: str, name: str, repository: str, tags: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "upstream": host, "repositories": [repository], "tags": tags,
            "platforms": "all", "pin": True, **more}


def _mirror(tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int,
            rules: list[dict[str, Any]]) -> MirrorProcess:
    m = MirrorProcess(tmp_path / "m", [Upstream(name=blackhole.host, url=site.gate.url)])
    m.server_extra["workers"] = workers
    m.arrays["sync"] = rules
    m.env["MIRROR_SYNC_CHECK_SECONDS"] = "0.5"  # a rule due is run within half a second
    return m.start()


def _runs(m: MirrorProcess, rule: str) -> list[dict[str, Any]]:
    return [e for e in m.log_entries()
            if e.get("msg") == "sync: run finished" and e.get("rule") == rule]


def _wait_runs(m: MirrorProcess, rule: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    wait_until(lambda: len(_runs(m, rule)) >= n, timeout, interval=0.05,
               what=f"{n} finished runs of {rule}")
    return _runs(m, rule)


def _hup(m: MirrorProcess, workers: int, msg: str = "configuration reloaded") -> None:
    """SIGHUP; wait for every worker's answer (`msg`)."""
    before = sum(e.get("msg", "").startswith(msg) for e in m.log_entries())
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGHUP)
    wait_until(lambda: sum(e.get("msg", "").startswith(msg) for e in m.log_entries())
               >= before + workers, 20, interval=0.05, what=f"{workers} x {msg!r}")


def _pinned(m: MirrorProcess, host: str, repository: str = REPO) -> dict[str, str]:
    """The cache browser's view of the running server: tag -> what pins it."""
    page = httpx.get(f"{m.url}/cache/{host}/{repository}", timeout=10, trust_env=False)
    assert page.status_code == 200, page.text
    return {ref: by for ref, by in re.findall(
        r'<tr class="image" data-reference="([^"]+)" data-digest="[^"]*" data-pinned="([^"]*)"',
        page.text) if not ref.startswith("sha256:")}


def _status_rules(m: MirrorProcess) -> tuple[list[str], list[str]]:
    """The rules the status page and `mirror status` show."""
    page = httpx.get(f"{m.url}/", timeout=10, trust_env=False).text
    shown = re.findall(r'<tr class="sync-rule" data-name="([^"]+)"', page)
    done = subprocess.run([sys.executable, "-m", "mirror", "status", "--config",
                           str(m.config_path)], capture_output=True, text=True, timeout=60,
                          env=env_without_proxies(), cwd=m.workdir)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[2].rstrip(":") for line in done.stdout.splitlines()
              if line.startswith("sync rule:")]
    return shown, listed


class Download:
    """A client's GET of a blob through the mirror, in a thread: bytes counted as they
    arrive, hashed."""

    def __init__(self, m: MirrorProcess, blob: oci.Blob) -> None:
        self.url = f"{m.url}/v2/{REPO}/blobs/{blob.digest}"
        self.received = 0
        self.status: int | None = None
        self.sha256 = hashlib.sha256()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._get, daemon=True)
        self.thread.start()

    def _get(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=60, trust_env=False) as r:
                self.status = r.status_code
                for chunk in r.iter_bytes():
                    self.sha256.update(chunk)
                    self.received += len(chunk)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def result(self) -> str:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the client's download never ended"
        assert self.error is None, f"the client's download failed: {self.error!r}"
        assert self.status == 200
        return "sha256:" + self.sha256.hexdigest()


def _tags_lists_since(site: Site, mark: int, repository: str) -> int:
    site.up.registry.barrier()
    return sum(1 for e in site.up.registry.entries_since(mark)
               if e.path.startswith(f"/v2/{repository}/tags/list"))


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_rule_removed_while_it_runs_stops_unpins_and_never_runs_again(
        tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int) -> None:
    host = blackhole.host
    app = _rule(host, "app", REPO, r"^1\.0\.[01]$", interval="1s")
    m = _mirror(tmp_path, site, blackhole, workers, [app])
    _wait_runs(m, "app", 1)
    assert _pinned(m, host) == {"1.0.0": "sync app", "1.0.1": "sync app"}

    # the rule widens: its next run reaches HELD_TAG's layer and waits at the gate; a rule
    # `gone` comes, after `app` in the file: one worker reaches it only after app's run
    app["tags"] = r"^1\.0\.\d$"
    m.arrays["sync"] = [app, _rule(host, "gone", OTHER, r"^1\.0\.0$")]
    m.write_config()
    _hup(m, workers)
    assert site.gate.reached.wait(30), "the run never reached the held layer"
    before = len(_runs(m, "app"))  # the held run is not among them (nor can one start)
    if workers == 2:  # the worker not held runs `gone` meanwhile
        _wait_runs(m, "gone", 1)
    client = Download(m, site.held)
    wait_until(lambda: client.received > 0 or not client.thread.is_alive(), 20,
               what="the client's first bytes")

    # both removed while app runs (another rule added, so that the scheduler is seen going on)
    m.arrays["sync"] = [_rule(host, "other", OTHER, r"^1\.0\.0$", interval="1s")]
    m.write_config()
    removal = site.up.registry.mark()
    _hup(m, workers)
    assert _status_rules(m) == (["other"], ["other"])
    pins = _pinned(m, host)
    assert set(pins) >= {"1.0.0", "1.0.1"} and not any(pins.values()), pins

    site.gate.open()
    assert client.result() == site.held.digest  # the download in flight was not dropped
    stopped = _wait_runs(m, "app", before + 1)[-1]
    assert "removed" in str(stopped.get("stopped")), stopped  # said so in its log line
    site.up.registry.barrier()
    after = [e.path for e in site.up.registry.entries_since(removal)
             if e.path.startswith(f"/v2/{REPO}/manifests/")]
    assert after == [], after  # the held image's manifests were fetched before; no other
    # `other` (interval 1 s) runs on; the removed `app`, due every second too, never again
    ended = len(_runs(m, "other"))
    mark = site.up.registry.mark()
    _wait_runs(m, "other", ended + 2)
    assert len(_runs(m, "app")) == before + 1
    assert len(_runs(m, "gone")) == workers - 1  # the removed rule was not started after
    assert _tags_lists_since(site, mark, REPO) == 0
    assert _status_rules(m) == (["other"], ["other"])
    assert not any(_pinned(m, host).values())
    assert _pinned(m, host, OTHER) == {"1.0.0": "sync other"}


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_changed_tags_regex_selects_the_new_set_and_moves_the_pins(
        tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int) -> None:
    host = blackhole.host
    site.gate.held.clear()
    app = _rule(host, "app", REPO, r"^1\.0\.[01]$")
    m = _mirror(tmp_path, site, blackhole, workers, [app])
    first = _wait_runs(m, "app", 1)[0]
    assert first["ok"] is True and first["cached"] == 2, first
    assert _pinned(m, host) == {"1.0.0": "sync app", "1.0.1": "sync app"}

    mark = site.up.registry.mark()
    app["tags"] = r"^1\.0\.[12]$"
    m.write_config()
    _hup(m, workers)
    runs = _wait_runs(m, "app", 2)
    assert len(runs) == 2, runs  # once for all workers
    second = runs[1]
    assert second["ok"] is True and second["selected"] == 2, second
    assert second["cached"] == 1 and second["dropped"] == 1, second
    assert _pinned(m, host) == {"1.0.0": "", "1.0.1": "sync app", "1.0.2": "sync app"}
    new = site.images["1.0.2"]
    assert {new.manifest.digest, *(b.digest for b in new.blobs)} <= m.cached_digests()
    site.up.registry.barrier()
    since = site.up.registry.entries_since(mark)
    manifests = [(e.method, e.path.rpartition("/")[2]) for e in since if "/manifests/" in e.path]
    assert sorted(ref for method, ref in manifests if method == "HEAD") == ["1.0.1", "1.0.2"]
    gets = [ref for method, ref in manifests if method == "GET"]
    assert len(gets) == 1 and gets[0] in ("1.0.2", new.manifest.digest), manifests
    assert site.up.registry.blob_gets(mark) == {b.digest: 1 for b in new.blobs}
    assert _status_rules(m) == (["app"], ["app"])


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_rule_changed_while_it_runs_stops_and_the_new_rule_runs_next(
        tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int) -> None:
    host = blackhole.host
    app = _rule(host, "app", REPO, r"^1\.0\.\d$")
    m = _mirror(tmp_path, site, blackhole, workers, [app])
    assert site.gate.reached.wait(30), "the run never reached the held layer"
    app["tags"] = r"^1\.0\.[01]$"
    m.write_config()
    change = site.up.registry.mark()
    _hup(m, workers)
    site.gate.open()
    old, new = _wait_runs(m, "app", 2)[:2]
    assert "changed" in str(old.get("stopped")), old
    assert new["ok"] is True and new["selected"] == 2 and "stopped" not in new, new
    assert len(_runs(m, "app")) == 2
    site.up.registry.barrier()
    by_tag = {ref for e in site.up.registry.entries_since(change)
              if e.path.startswith(f"/v2/{REPO}/manifests/")
              and not (ref := e.path.rpartition("/")[2]).startswith(("sha256:", "sha256-"))}
    assert by_tag <= {"1.0.0", "1.0.1"}, by_tag  # nothing more of the old selection
    pinned = {tag for tag, by in _pinned(m, host).items() if by}
    assert pinned == {"1.0.0", "1.0.1"}
    assert HELD_TAG in _pinned(m, host)  # the image it was caching was finished, unpinned


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_broken_file_mid_run_keeps_the_running_rule(
        tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int) -> None:
    host = blackhole.host
    m = _mirror(tmp_path, site, blackhole, workers, [_rule(host, "app", REPO, r"^1\.0\.\d$")])
    assert site.gate.reached.wait(30), "the run never reached the held layer"
    good = m.config_path.read_text()
    m.config_path.write_text(good.replace(r'"^1\\.0\\.\\d$"', '"(unclosed"'))
    assert m.config_path.read_text() != good
    _hup(m, workers, "reload refused")
    site.gate.open()
    run = _wait_runs(m, "app", 1)[0]
    assert run["ok"] is True and run["cached"] == len(TAGS), run
    assert _pinned(m, host) == dict.fromkeys(TAGS, "sync app")
    page = httpx.get(f"{m.url}/", timeout=10, trust_env=False).text
    assert re.findall(r'<tr class="sync-rule" data-name="([^"]+)"', page) == ["app"]


def test_a_run_cut_short_by_a_kill_is_run_again_at_start(
        tmp_path: Path, site: Site, blackhole: ClosedPort) -> None:
    """Not an interval later (an hour by default): the rule holds less than it selects."""
    host = blackhole.host
    m = _mirror(tmp_path, site, blackhole, 1, [_rule(host, "app", REPO, r"^1\.0\.\d$")])
    assert site.gate.reached.wait(30), "the run never reached the held layer"
    m.kill9()
    site.gate.open()
    assert _runs(m, "app") == []
    m.start()
    run = _wait_runs(m, "app", 1, timeout=30)[-1]
    assert run["ok"] is True and run["selected"] == len(TAGS), run
    assert _pinned(m, host) == dict.fromkeys(TAGS, "sync app")


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_narrowed_rule_unpins_at_once_even_when_its_next_run_fails(
        tmp_path: Path, site: Site, blackhole: ClosedPort, workers: int) -> None:
    """Pins follow the rule as configured now, not its last run: the upstream gone, the
    narrowed rule's run fails (and so keeps what it held), yet the tag it no longer selects
    is unpinned and its share's eviction takes it; the tag still selected stays."""
    host = blackhole.host
    site.gate.held.clear()
    app = _rule(host, "app", REPO, r"^1\.0\.[01]$")
    m = _mirror(tmp_path, site, blackhole, workers, [app])
    assert _wait_runs(m, "app", 1)[0]["ok"] is True
    assert _pinned(m, host) == {"1.0.0": "sync app", "1.0.1": "sync app"}
    kept, unpinned = site.images["1.0.0"], site.images["1.0.1"]
    assert {kept.manifest.digest, unpinned.manifest.digest} <= m.cached_digests()

    site.up.registry.stop()  # the next run cannot list the tags: it fails
    app["tags"] = r"^1\.0\.0$"
    m.upstreams[0].extra["max_size"] = "1KiB"  # everything unpinned of the upstream goes
    m.write_config()
    _hup(m, workers)
    failed = _wait_runs(m, "app", 2)[1]
    assert failed["ok"] is False, failed
    gone = {unpinned.manifest.digest, *(b.digest for b in unpinned.blobs)}
    wait_until(lambda: not gone & m.cached_digests(), 30, interval=0.1,
               what="the unpinned image evicted, manifest and blobs")
    pins = _pinned(m, host)
    assert pins["1.0.0"] == "sync app" and not pins.get("1.0.1"), pins
    assert {kept.manifest.digest, *(b.digest for b in kept.blobs)} <= m.cached_digests()


def _next_run(m: MirrorProcess, rule: str) -> tuple[float, str]:
    """The status page's next run of `rule`: (its data-value, its text)."""
    page = httpx.get(f"{m.url}/", timeout=10, trust_env=False).text
    row = re.search(rf'<tr class="sync-rule" data-name="{rule}">(.*?)</tr>', page)
    assert row is not None, page
    cells = re.findall(r'<td data-value="([^"]*)">([^<]*)</td>', row.group(1))
    return float(cells[1][0]), cells[1][1]


def test_the_status_page_next_run_follows_a_reloaded_rule(
        tmp_path: Path, site: Site, blackhole: ClosedPort) -> None:
    """A changed interval moves the next run; a changed rule is due at once (is_due), and
    the page says so while another rule's run holds the scheduler (one worker)."""
    host = blackhole.host
    app = _rule(host, "app", OTHER, r"^1\.0\.0$", interval="1h")
    m = _mirror(tmp_path, site, blackhole, 1, [app])
    _wait_runs(m, "app", 1)
    at, _ = _next_run(m, "app")
    started = at - 3600
    app["interval"] = "2h"
    m.write_config()
    _hup(m, 1)
    assert _next_run(m, "app")[0] == pytest.approx(started + 7200)

    # a rule before it waits at the gate: the scheduler cannot reach app meanwhile
    m.arrays["sync"] = [_rule(host, "block", REPO, rf"^{re.escape(HELD_TAG)}$"), app]
    m.write_config()
    _hup(m, 1)
    assert site.gate.reached.wait(30), "the blocking run never reached the held layer"
    app["tags"] = r"^1\.0\.\d$"
    m.write_config()
    _hup(m, 1)
    at, text = _next_run(m, "app")
    assert text == "due now" and at <= time.time(), (at, text)
    site.gate.open()
    _wait_runs(m, "app", 2)
    at, text = _next_run(m, "app")
    assert at > time.time() + 7000 and text != "due now", (at, text)
