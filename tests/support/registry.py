"""A real upstream: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.

The registry writes its access log (Apache combined format) to stdout; we capture it to a
file so a test can count requests, e.g. how many times each blob was GET from upstream.
Log lines are written after a response completes, so before counting call `barrier()`,
which sends a marker request and waits until its line is in the log.

Also here: `free_port()`, `ClosedPort` (a loopback port that refuses connections, for a
client's "primary" registry location so a broken mirror cannot be silently bypassed) and
`ThrottledProxy` (a TCP proxy that limits bandwidth, to make a cold pull slow enough to
interrupt at a chosen point).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REGISTRY_BIN = "docker-registry"
HOST = "127.0.0.1"

_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "[^"]*" "(?P<ua>[^"]*)"'
)
_BLOB_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_MANIFEST_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = ""
) -> None:
    """Poll `predicate` until it is true; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class ClosedPort:
    """A loopback port held by a bound, non-listening socket: connections are refused.

    Use its `host` as the registry name clients pull from, with the mirror as their
    mirror: if the mirror fails, the client's fallback to the primary fails too.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self.port = int(self._sock.getsockname()[1])
        self.host = f"{HOST}:{self.port}"

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class AccessEntry:
    method: str
    target: str
    status: int
    user_agent: str

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB_PATH_RE.match(self.path)
        return m.group("digest") if m else None

    @property
    def manifest_ref(self) -> str | None:
        m = _MANIFEST_PATH_RE.match(self.path)
        return m.group("ref") if m else None


class Registry:
    """A docker-registry process with its own storage, config and captured logs."""

    def __init__(
        self,
        workdir: Path,
        auth: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """`auth`: the config's `auth:` section (see tokenserver / htpasswd_auth).
        `extra_config`: more top-level sections, e.g. {"proxy": {"remoteurl": URL}} for
        distribution's own pull-through proxy mode."""
        if shutil.which(REGISTRY_BIN) is None:
            raise RuntimeError(f"{REGISTRY_BIN} not installed (apt-get install docker-registry)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.access_log_path = workdir / "access.log"
        self.stderr_path = workdir / "registry.stderr"
        self.auth = auth
        self.extra_config = dict(extra_config or {})
        self.port = free_port()
        self.host = f"{HOST}:{self.port}"
        self.url = f"http://{self.host}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.auth:
            cfg["auth"] = self.auth
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 20.0) -> Registry:
        # JSON is YAML: no YAML library needed.
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        with self.access_log_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(self.config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {self.proc.returncode}:\n{self.stderr()}"
                )
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=1.0)
            except httpx.TransportError:
                return False
            return r.status_code in (200, 401)

        wait_until(ready, timeout, interval=0.05, what="docker-registry /v2/")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes: overwrite it to make the
        registry serve corrupt or truncated content (it does not verify on read)."""
        algo, hexd = digest.split(":", 1)
        return (
            self.storage / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"
        )

    def restart(self, timeout: float = 20.0) -> Registry:
        """Stop and start again on the same port and storage (config re-read)."""
        self.stop()
        return self.start(timeout)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    # --- access log -------------------------------------------------------------------

    def access_entries(self) -> list[AccessEntry]:
        out: list[AccessEntry] = []
        try:
            text = self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            m = _ACCESS_RE.match(line)
            if m:
                out.append(
                    AccessEntry(m["method"], m["target"], int(m["status"]), m["ua"])
                )
        return out

    def barrier(self, timeout: float = 10.0) -> None:
        """Make sure every request completed so far is in the access log."""
        marker = uuid.uuid4().hex
        httpx.get(f"{self.url}/v2/?barrier={marker}", timeout=5.0)

        def seen() -> bool:
            with contextlib.suppress(FileNotFoundError):
                return marker in self.access_log_path.read_text(errors="replace")
            return False

        wait_until(seen, timeout, what="registry access-log barrier")

    def mark(self) -> int:
        """A position in the access log; pass it to `entries_since`."""
        self.barrier()
        return len(self.access_entries())

    def entries_since(self, mark: int = 0) -> list[AccessEntry]:
        """Requests logged since `mark`, without the barriers' own requests."""
        self.barrier()
        return [e for e in self.access_entries()[mark:] if "barrier=" not in e.target]

    def blob_gets(self, mark: int = 0, status: int | None = None) -> collections.Counter[str]:
        """GET /v2/<name>/blobs/<digest> requests since `mark`, counted per digest."""
        c: collections.Counter[str] = collections.Counter()
        for e in self.entries_since(mark):
            d = e.blob_digest
            if d and e.method == "GET" and (status is None or e.status == status):
                c[d] += 1
        return c

    def manifest_requests(self, mark: int = 0) -> list[AccessEntry]:
        return [e for e in self.entries_since(mark) if e.manifest_ref is not None]


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                     server: asyncio.AbstractServer | None) -> None:
    """Stop a relay running its own event loop in a thread: close its listener, cancel its
    connections, stop the loop, join the thread (each step bounded)."""

    async def _stop() -> None:
        if server is not None:
            server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if thread.is_alive():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class ThrottledProxy:
    """A TCP proxy on 127.0.0.1 limiting upstream→client bandwidth (shared by all
    connections) to `rate` bytes/s; `rate = None` means unlimited. Runs its own event
    loop in a thread; `set_rate` may be called at any time.
    """

    def __init__(self, target_port: int, rate: float | None = None) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = free_port()
        self.host = f"{HOST}:{self.port}"
        self.url = f"http://{self.host}"
        self.bytes_forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._lock: asyncio.Lock | None = None

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def start(self) -> ThrottledProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._lock = asyncio.Lock()
        self._server = await asyncio.start_server(self._handle, HOST, self.port)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttle: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(64 * 1024)
                if not data:
                    break
                if throttle and self.rate:
                    assert self._lock is not None
                    async with self._lock:
                        await asyncio.sleep(len(data) / self.rate)
                writer.write(data)
                self.bytes_forwarded += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(
            self._pipe(creader, uwriter, throttle=False),
            self._pipe(ureader, cwriter, throttle=True),
        )

    def stop(self) -> None:
        stop_loop_thread(self._loop, self._thread, self._server)


# A bcrypt hash of BASIC_PASSWORD (distribution's htpasswd accepts bcrypt only); made with
# crypt.crypt("basicpw", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)).
BASIC_USER = "basicuser"
BASIC_PASSWORD = "basicpw"
_BASIC_BCRYPT = "$2b$04$8OHYCSrPQ2bZ6ej/J941UOLvRZPd2FNyAmjt3yr9OR.JITzoWrq/."


def htpasswd_auth(workdir: Path) -> dict[str, Any]:
    """An `auth: htpasswd` section (Basic auth) with one user, BASIC_USER/BASIC_PASSWORD."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "htpasswd"
    path.write_text(f"{BASIC_USER}:{_BASIC_BCRYPT}\n")
    return {"htpasswd": {"realm": "mirror-tests-basic", "path": str(path)}}


def env_without_proxies() -> dict[str, str]:
    """The environment with HTTP(S)_PROXY removed: tests only ever talk to loopback."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
