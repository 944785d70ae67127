"""The servers a benchmark runs: docker-registry (upstream and proxy mode), nginx, the
mirror, and a bandwidth-limited link to a network namespace."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .harness import REPO_ROOT, Proc, log, wait_http

READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    proc: Proc
    base: str
    scratch: Path | None = None  # removed when the server stops

    def stop(self) -> None:
        self.proc.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Registry(Server):
    """docker-registry (distribution 2.8) with filesystem storage; proxy mode when
    ``remoteurl`` is given. ``netns`` runs it inside a network namespace."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        storage: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        remoteurl: str | None = None,
        netns: str | None = None,
        notify_url: str | None = None,
    ) -> None:
        """`notify_url`: an endpoint of distribution's notifications (the webhooks group's
        anchor)."""
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        storage.mkdir(parents=True, exist_ok=True)
        cfg = workdir / f"{name}.yml"
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {storage}",
            "  cache:",
            "    blobdescriptor: inmemory",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {host}:{port}",
            "  secret: benchmark-secret",
        ]
        if remoteurl:
            lines += ["proxy:", f"  remoteurl: {remoteurl}"]
        if notify_url:
            lines += ["notifications:", "  endpoints:", "    - name: bench",
                      f"      url: {notify_url}", "      timeout: 1s", "      threshold: 5",
                      "      backoff: 1s"]
        cfg.write_text("\n".join(lines) + "\n")
        argv = ["docker-registry", "serve", str(cfg)]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.base = f"http://{host}:{port}"
        self.hostport = f"{host}:{port}"
        self.log_path = workdir / f"{name}.log"
        self.proc = Proc(name, argv, log_path=self.log_path)
        if remoteurl:
            self.scratch = storage
        wait_http(self.base + "/v2/", READY_TIMEOUT, self.proc)

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    _ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')

    def requests_since(self, since: int) -> list[str]:
        """The "METHOD target" of each request logged after ``since``."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [f"{m.group(1)} {m.group(2)}" for m in self._ACCESS.finditer(text)]

    def blob_get_bytes(self, since: int) -> tuple[int, int]:
        """(bytes sent in blob GET bodies, number of blob GETs) logged after ``since``."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        total = count = 0
        for m in self._ACCESS.finditer(text):
            if m.group(1) == "GET" and "/blobs/" in m.group(2):
                count += 1
                total += int(m.group(4)) if m.group(4) != "-" else 0
        return total, count


class Nginx(Server):
    """nginx with sendfile serving files from one directory under /blobs/."""

    def __init__(self, workdir: Path, files: dict[str, Path]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        root = workdir / "root"
        root.mkdir(exist_ok=True)
        for name, path in files.items():
            link = root / name
            if not link.exists():
                link.symlink_to(path)
        port = free_port()
        temp = workdir / "tmp"
        temp.mkdir(exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""user root;
worker_processes auto;
error_log {workdir}/error.log warn;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /v2/ {{ return 200 "{{}}"; }}
        location /blobs/ {{ alias {root}/; }}
    }}
}}
"""
        )
        self.base = f"http://127.0.0.1:{port}"
        self.proc = Proc(
            "nginx",
            ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
            log_path=workdir / "nginx.out",
        )
        wait_http(self.base + "/v2/", READY_TIMEOUT, self.proc)


class MirrorUnavailable(RuntimeError):
    pass


class Mirror(Server):
    """The project's mirror: ``python -m mirror serve --config PATH``."""

    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *,
        workers: int = 1,
        prefetch: bool = True,
        tag_ttl: str = "60s",
        name: str = "mirror",
        extra_config: str = "",
    ) -> None:
        """`extra_config`: more TOML appended to the configuration ([[policy]], ...)."""
        if not (REPO_ROOT / "mirror" / "cli.py").exists():
            raise MirrorUnavailable("mirror/cli.py does not exist yet")
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / f"{name}-cache"
        if cache.exists():
            shutil.rmtree(cache)
        port = free_port()
        hostport = upstream.split("://", 1)[1].rstrip("/")
        cfg = workdir / f"{name}.toml"
        cfg.write_text(
            f"""[server]
listen = "127.0.0.1:{port}"
workers = {workers}

[cache]
dir = "{cache}"
max_size = "100GiB"
tag_ttl = "{tag_ttl}"
prefetch = {"true" if prefetch else "false"}

[[upstream]]
name = "{hostport}"
url = "{upstream}"
{extra_config}"""
        )
        self.base = f"http://127.0.0.1:{port}"
        self.workers = workers
        self.cache = cache
        self.scratch = cache
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = Proc(
            name,
            [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "mirror", "serve",
             "--config", str(cfg)],
            log_path=workdir / f"{name}.log",
            cwd=REPO_ROOT,
            env=env,
        )
        try:
            wait_http(self.base + "/v2/", READY_TIMEOUT, self.proc)
            if workers > 1:  # else a load started now lands on the first worker alone
                self._wait_log("all workers listening", workdir / f"{name}.log")
        except RuntimeError as exc:
            self.proc.stop()
            raise MirrorUnavailable(str(exc)) from exc

    def _wait_log(self, text: str, path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while text not in path.read_text(errors="replace"):
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"mirror never logged {text!r}:\n{self.proc.tail()}")
            time.sleep(0.05)


@dataclass
class LimitedLink:
    """A network namespace joined to the host by a veth pair, with a tbf qdisc on the
    namespace side's egress: everything the namespace sends (the upstream's responses)
    is limited to ``rate``. Only the two addresses of this pair are ever used."""

    ns: str = "regbench"
    host_if: str = "rbh0"
    ns_if: str = "rbn0"
    host_addr: str = "10.203.0.1"
    ns_addr: str = "10.203.0.2"
    rate: str = "400mbit"
    created: bool = False

    def _run(self, *argv: str, check: bool = True) -> None:
        subprocess.run(argv, check=check, capture_output=True, timeout=20)

    def up(self) -> None:
        self.down()  # leftovers of an interrupted run
        self.created = True
        self._run("ip", "netns", "add", self.ns)
        self._run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._run("ip", "link", "set", self.ns_if, "netns", self.ns)
        self._run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        self._run("ip", "link", "set", self.host_if, "up")
        self._run("ip", "-n", self.ns, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        self._run("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        self._run("ip", "-n", self.ns, "link", "set", "lo", "up")
        self._run(
            "ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", self.ns_if, "root",
            "tbf", "rate", self.rate, "burst", "256kb", "latency", "50ms",
        )
        log(f"link up: {self.host_addr} <-> {self.ns_addr} (netns {self.ns}, tbf {self.rate})")

    def down(self) -> None:
        self._run("ip", "link", "del", self.host_if, check=False)
        self._run("ip", "netns", "del", self.ns, check=False)
        for _ in range(50):
            if not Path(f"/sys/class/net/{self.host_if}").exists():
                break
            time.sleep(0.1)
        self.created = False

    def rx_bytes(self) -> int:
        """Bytes the host side received from the namespace (all upstream traffic)."""
        with contextlib.suppress(OSError):
            return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())
        return 0

    def wait_idle(self, quiet: float = 1.0, timeout: float = 60.0) -> None:
        """Wait until no bytes cross the link for ``quiet`` seconds (bounded)."""
        deadline = time.monotonic() + timeout
        last, since = self.rx_bytes(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.rx_bytes()
            if now - last > 4096:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


class Relay(Server):
    """benchmarks.relay inside the namespace: ``delay_ms`` added to every request."""

    def __init__(self, workdir: Path, netns: str, listen: str, target: str,
                 delay_ms: float) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.base = f"http://{listen}"
        self.hostport = listen
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = Proc(
            "relay",
            ["ip", "netns", "exec", netns, str(REPO_ROOT / ".venv" / "bin" / "python"),
             "-m", "benchmarks.relay", listen, target, str(delay_ms)],
            log_path=workdir / "relay.log",
            cwd=REPO_ROOT,
            env=env,
        )
        wait_http(self.base + "/v2/", READY_TIMEOUT, self.proc)
