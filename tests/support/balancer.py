"""Real load balancers in front of cluster nodes, run from the shipped configurations
(docs/haproxy-cluster.cfg, docs/nginx-cluster.conf): only their example addresses are
replaced, each replacement checked to hit exactly once, so the file a reader copies is the one
the tests ran.

    lb = HAProxy(tmp / "haproxy", [n.host for n in nodes]).start()   # 127.0.0.20
    lb.server_states()            # {"m1": "UP", ...} from its stats page
    lb = NginxBalancer(tmp / "nginx", [n.host for n in nodes]).start()  # 127.0.0.21
    relay_counters(node)          # that node's mirror_peer_* counters from its /metrics
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from .mirror import MirrorProcess
from .registry import env_without_proxies, free_port, wait_until

DOCS = Path(__file__).resolve().parents[2] / "docs"
HAPROXY_CONF = DOCS / "haproxy-cluster.cfg"
NGINX_CONF = DOCS / "nginx-cluster.conf"
# The nodes' addresses in the shipped files, in order.
DOC_NODES = ("10.0.0.11:5000", "10.0.0.12:5000", "10.0.0.13:5000")
HAPROXY_HASH = "balance hash var(txn.mirror_key)"
NGINX_HASH = "hash $mirror_cluster_key consistent;"


def binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)


def render(template: Path, replacements: Mapping[str, str]) -> str:
    """The template with each key replaced by its value; every key must occur exactly once
    (a config that drifted from what the tests replace fails here, not silently)."""
    text = template.read_text()
    for old, new in replacements.items():
        count = text.count(old)
        assert count == 1, f"{template.name}: {old!r} occurs {count} times, not once"
        text = text.replace(old, new)
    return text


def _node_replacements(nodes: list[str], template: str) -> dict[str, str]:
    assert len(nodes) == len(DOC_NODES), f"the shipped files list {len(DOC_NODES)} nodes"
    return {f"{template.format(doc)}": template.format(node)
            for doc, node in zip(DOC_NODES, nodes, strict=True)}


class _Process:
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(self, args: list[str]) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env_without_proxies(),
                                         start_new_session=True)

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-6000:]
        return ""

    def alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        return True

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class HAProxy(_Process):
    """docs/haproxy-cluster.cfg on 127.0.0.20, its stats page on another port of the same
    address, the runtime socket in `workdir`. `balance` replaces the hashing line (for the
    round-robin comparison)."""

    def __init__(self, workdir: Path, nodes: list[str], balance: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.host = f"127.0.0.20:{free_port()}"
        self.url = f"http://{self.host}"
        self.stats_url = f"http://127.0.0.20:{free_port()}"
        self.log_path = workdir / "haproxy.log"
        replacements = {
            "bind :80\n": f"bind {self.host}\n",
            "bind 127.0.0.1:8404\n": f"bind {self.stats_url.removeprefix('http://')}\n",
            "/run/haproxy/admin.sock": str(workdir / "admin.sock"),
            **_node_replacements(nodes, " {} check\n"),
        }
        if balance is not None:
            replacements[HAPROXY_HASH] = balance
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(render(HAPROXY_CONF, replacements))

    def start(self, timeout: float = 20.0) -> HAProxy:
        haproxy = binary("haproxy")
        assert haproxy is not None, "haproxy is not installed (tests/install-system-deps.sh)"
        check = subprocess.run([haproxy, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True, env=env_without_proxies())
        assert check.returncode == 0, check.stdout + check.stderr
        self._spawn([haproxy, "-db", "-f", str(self.config_path)])
        wait_until(lambda: self.alive() and set(self._states().values()) == {"UP"}, timeout,
                   interval=0.05, what="haproxy with every node UP")
        return self

    def _states(self) -> dict[str, str]:
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"{self.stats_url}/stats;csv", trust_env=False, timeout=5)
            if r.status_code == 200:
                rows = csv.DictReader(io.StringIO(r.text.removeprefix("# ")))
                return {row["svname"]: row["status"] for row in rows
                        if row["pxname"] == "mirror_nodes"
                        and row["svname"] not in ("BACKEND", "FRONTEND")}
        return {}

    def server_states(self) -> dict[str, str]:
        """Each node's state as HAProxy's health checks see it: UP, DOWN, "UP 1/2" ..."""
        self.alive()
        return self._states()

    def stop(self, sig: signal.Signals = signal.SIGUSR1) -> None:  # a soft stop
        super().stop(sig)


class NginxBalancer(_Process):
    """docs/nginx-cluster.conf included in a minimal nginx.conf, on 127.0.0.21."""

    def __init__(self, workdir: Path, nodes: list[str], hash_line: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.host = f"127.0.0.21:{free_port()}"
        self.url = f"http://{self.host}"
        self.log_path = workdir / "nginx.out"
        replacements = {"listen 80;": f"listen {self.host};",
                        **_node_replacements(nodes, "server {} ")}
        if hash_line is not None:
            replacements[NGINX_HASH] = hash_line
        (workdir / "cluster.conf").write_text(render(NGINX_CONF, replacements))
        for d in ("logs", "tmp"):
            (workdir / d).mkdir(exist_ok=True)
        tmp = workdir / "tmp"
        self.config_path = workdir / "nginx.conf"
        self.config_path.write_text(f"""
user root;
worker_processes 2;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$request_method $uri $upstream_addr $status';
    access_log {workdir}/logs/access.log upstream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {workdir}/cluster.conf;
}}
""")

    def start(self, timeout: float = 15.0) -> NginxBalancer:
        nginx = binary("nginx")
        assert nginx is not None, "nginx is not installed (tests/install-system-deps.sh)"
        args = [nginx, "-p", str(self.workdir), "-c", str(self.config_path)]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self._spawn(args)

        def up() -> bool:
            self.alive()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{self.url}/v2/", trust_env=False, timeout=5).status_code \
                    == 200
            return False

        wait_until(up, timeout, interval=0.05, what="nginx in front of the nodes")
        return self

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / "logs" / "error.log").read_text()[-6000:]
        return super().log()

    def stop(self, sig: signal.Signals = signal.SIGQUIT) -> None:  # a graceful stop
        super().stop(sig)


# --- what the nodes did --------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


@dataclass(frozen=True)
class Relays:
    """A node's relay counters: blob fetches a peer answered (by reason), blob bytes in."""

    owner: float = 0.0
    fill: float = 0.0
    manifest: float = 0.0
    bytes_in: float = 0.0

    def __sub__(self, other: Relays) -> Relays:
        return Relays(self.owner - other.owner, self.fill - other.fill,
                      self.manifest - other.manifest, self.bytes_in - other.bytes_in)


def relay_counters(node: MirrorProcess) -> Relays:
    """mirror_peer_relays_total{reason} and mirror_peer_bytes_total{direction="in"} from the
    node's own /metrics."""
    r = httpx.get(f"{node.url}/metrics", trust_env=False, timeout=10)
    r.raise_for_status()
    values = {"owner": 0.0, "fill": 0.0, "manifest": 0.0, "bytes_in": 0.0}
    for line in r.text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = m["labels"] or ""
        if m["name"] == "mirror_peer_relays_total":
            reason = re.search(r'reason="([a-z]+)"', labels)
            if reason and reason[1] in values:
                values[reason[1]] += float(m["value"])
        elif m["name"] == "mirror_peer_bytes_total" and 'direction="in"' in labels:
            values["bytes_in"] += float(m["value"])
    return Relays(**values)


def total(relays: Iterable[Relays]) -> Relays:
    out = Relays()
    for r in relays:
        out = Relays(out.owner + r.owner, out.fill + r.fill, out.manifest + r.manifest,
                     out.bytes_in + r.bytes_in)
    return out


def client_gets(node: MirrorProcess, kind: str, refs: Iterable[str]) -> dict[str, int]:
    """How many client GETs of /v2/<name>/<kind>/<ref> (kind: blobs or manifests; not
    /_cluster/) the node answered, per ref (a digest or a tag)."""
    want = set(refs)
    counts = dict.fromkeys(want, 0)
    for e in node.request_log():
        path = str(e["path"]).split("?", 1)[0]
        ref = path.rsplit("/", 1)[-1]
        if (e["method"] == "GET" and path.startswith("/v2/") and f"/{kind}/" in path
                and ref in want):
            counts[ref] += 1
    return counts
