"""Figures F1, F3 and F4 of issue 12: three mirror nodes as one cache, over the benchmark's
rate-limited upstream (`ns_upstream`, the veth/tbf link of scenarios.py).

`python -m benchmarks cluster` (root: the link needs a network namespace). Nodes run as
subprocesses on 127.0.0.11-13 with a `[cluster]` table (`health_interval = "200ms"`, a
32+ byte secret file); the balancer is HAProxy running docs/haproxy-cluster.cfg with only
its example addresses replaced, on 127.0.0.20.

* **F1 cold fan-out**: 32 clients pull a ~256 MB image (6 layers) through fresh nodes,
  once through HAProxy (hash on the digest) and once spread by the benchmark itself
  (client i -> node i % 3, plain round robin). Upstream blob bytes / image bytes, upstream
  manifest GETs per digest, wall time / one client's cold pull through one node, relayed
  bytes (mirror_peer_bytes_total{direction="in"}) / bytes served; the anchor is three
  distribution proxies behind the same HAProxy configuration.
* **F3 owner killed**: 16 clients pull a ~256 MB blob through the two nodes that do not
  own it; the owner is killed (SIGKILL) when about half the blob has crossed the link.
  Clients finished with the right SHA-256, upstream bytes / blob.
* **F4 Redis stopped**: F1 (round robin) with `[redis]` on every node and the
  redis-server stopped once about a quarter of the image has crossed the link.

Every wait is bounded; every process is stopped in a `finally` (and by `stop_all`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mirror.cluster import auth, ring

from .harness import REPO_ROOT, Proc, log, run_clients
from .oci import Blob, Image
from .report import Row
from .scenarios import Ctx, pull_specs
from .servers import READY_TIMEOUT, Registry, Server, free_port

GROUP = "cluster"
NODE_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
LB_ADDRESS = "127.0.0.20"
SECRET = b"benchmark-cluster-secret-" + b"0123456789abcdef" * 2  # 57 bytes
HAPROXY_CONF = REPO_ROOT / "docs" / "haproxy-cluster.cfg"
DOC_NODES = ("10.0.0.11:5000", "10.0.0.12:5000", "10.0.0.13:5000")
HAPROXY_CHECK = "option httpchk GET /healthz"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
         ) -> tuple[int, bytes]:
    """(status, body) of a GET, never through an environment proxy; (0, b"") if it fails."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def _wait(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- servers -------------------------------------------------------------------------------
class Node(Server):
    """One mirror node: `python -m mirror serve` with `[cluster]` (and `[redis]`)."""

    def __init__(self, workdir: Path, upstream: str, *, node_id: str, address: str,
                 port: int, peers: list[str], secret_file: Path,
                 redis_url: str | None = None, launcher: tuple[str, ...] = (),
                 cluster_extra: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        self.node_id = node_id
        self.base = f"http://{address}:{port}"
        self.scratch = cache
        hostport = upstream.split("://", 1)[1].rstrip("/")
        peer_list = ", ".join(f'"{p}"' for p in peers)
        text = f"""[server]
listen = "{address}:{port}"
workers = 1

[cache]
dir = "{cache}"
max_size = "100GiB"
tag_ttl = "60s"
prefetch = true

[[upstream]]
name = "{hostport}"
url = "{upstream}"

[cluster]
node_id = "{node_id}"
advertise_url = "{self.base}"
peers = [{peer_list}]
secret_file = "{secret_file}"
health_interval = "200ms"
{cluster_extra}"""
        if redis_url:
            text += f'\n[redis]\nurl = "{redis_url}"\ntimeout = "50ms"\n'
        cfg = workdir / "mirror.toml"
        cfg.write_text(text)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(k, None)
        self.proc = Proc(
            f"node-{node_id}",
            [*launcher, str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "mirror", "serve",
             "--config", str(cfg)],
            log_path=workdir / "mirror.log", cwd=REPO_ROOT, env=env,
        )

    def signed(self, path_qs: str) -> dict[str, Any] | None:
        header = auth.sign(SECRET, "bench", "GET", path_qs, time.time())
        status, body = _get(self.base + path_qs, {auth.HEADER: header})
        return json.loads(body) if status == 200 else None

    def live(self) -> list[str]:
        view = self.signed("/_cluster/ring")
        return list(view["live"]) if view else []

    def peer_counters(self) -> dict[str, float]:
        """mirror_peer_bytes_total{direction="in"} and mirror_peer_relays_total (by reason)
        from the node's /metrics."""
        status, body = _get(self.base + "/metrics", timeout=10)
        out: dict[str, float] = {"bytes_in": 0.0, "relays": 0.0}
        if status != 200:
            return out
        for line in body.decode(errors="replace").splitlines():
            m = re.match(r'^(mirror_peer_[a-z_]+)(?:\{([^}]*)\})? (\S+)$', line)
            if m is None:
                continue
            if m[1] == "mirror_peer_bytes_total" and 'direction="in"' in (m[2] or ""):
                out["bytes_in"] += float(m[3])
            elif m[1] == "mirror_peer_relays_total":
                out["relays"] += float(m[3])
                reason = re.search(r'reason="([a-z]+)"', m[2] or "")
                if reason:
                    key = f"relays_{reason[1]}"
                    out[key] = out.get(key, 0.0) + float(m[3])
        return out

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.popen.wait(10)


def _cluster_dir(ctx: Ctx, name: str) -> Path:
    return ctx.root / f"{name}-{time.monotonic_ns()}"


@contextlib.contextmanager
def cluster(ctx: Ctx, name: str, redis_url: str | None = None,
            launchers: tuple[tuple[str, ...], ...] = ((), (), ()),
            cluster_extra: str = "") -> Iterator[list[Node]]:
    """Three fresh nodes (empty caches) that see each other up; stopped on leaving. Node i
    is started through `launchers[i]` (a command prefix: a partition's cgroup);
    `cluster_extra`: lines added to each node's [cluster] table."""
    d = _cluster_dir(ctx, name)
    d.mkdir(parents=True)
    secret_file = d / "cluster.key"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    ports = [free_port() for _ in NODE_ADDRESSES]
    urls = [f"http://{a}:{p}" for a, p in zip(NODE_ADDRESSES, ports, strict=True)]
    upstream = ctx.ns_upstream.base
    nodes: list[Node] = []
    try:
        for i, (a, p) in enumerate(zip(NODE_ADDRESSES, ports, strict=True)):
            nodes.append(Node(d / f"m{i + 1}", upstream, node_id=f"m{i + 1}", address=a,
                              port=p, peers=urls, secret_file=secret_file,
                              redis_url=redis_url, launcher=launchers[i],
                              cluster_extra=cluster_extra))
        for n in nodes:
            _wait(_answers(n), READY_TIMEOUT, f"{n.proc.name} to answer /v2/")
        want = [n.node_id for n in nodes]
        _wait(lambda: all(n.live() == want for n in nodes), 20, f"every node to see {want}")
        yield nodes
    finally:
        for n in nodes:
            if not n.proc.alive() and n.proc.popen.returncode not in (None, -9, -15):
                ctx.problem(f"{n.proc.name} exited {n.proc.popen.returncode}:\n"
                            f"{n.proc.tail(8)}")
            n.stop()


def _answers(srv: Server) -> Callable[[], bool]:
    return lambda: _alive_or_raise(srv) and _get(srv.base + "/v2/")[0] == 200


def _alive_or_raise(srv: Server) -> bool:
    if not srv.proc.alive():
        raise RuntimeError(f"{srv.proc.name} exited ({srv.proc.popen.returncode}):\n"
                           f"{srv.proc.tail()}")
    return True


def _started(srv: Server, cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a server just started; stop it if it never gets ready."""
    try:
        _wait(cond, timeout, what, 0.05)
    except BaseException:
        srv.stop()
        raise


def render(template: Path, replacements: dict[str, str]) -> str:
    """The template with each key replaced; each must occur exactly once (as
    tests/support/balancer.py checks), so the file measured is the file shipped."""
    text = template.read_text()
    for old, new in replacements.items():
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"{template.name}: {old!r} occurs {count} times, not once")
        text = text.replace(old, new)
    return text


_HAPROXY_LINE = re.compile(r" mirror_nodes/(\S+) \S+ \d{3} (\d+) ")


class HAProxy(Server):
    """docs/haproxy-cluster.cfg on 127.0.0.20 in front of three `host:port` backends.
    ``check_path`` replaces the health check's /healthz (distribution has none)."""

    def __init__(self, workdir: Path, backends: list[str], check_path: str | None = None
                 ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        hostport = f"{LB_ADDRESS}:{free_port()}"
        self.base = f"http://{hostport}"
        self.stats = f"http://{LB_ADDRESS}:{free_port()}"
        replacements = {
            "bind :80\n": f"bind {hostport}\n",
            "bind 127.0.0.1:8404\n": f"bind {self.stats.removeprefix('http://')}\n",
            "/run/haproxy/admin.sock": str(workdir / "admin.sock"),
            **{f" {doc} check\n": f" {b} check\n"
               for doc, b in zip(DOC_NODES, backends, strict=True)},
        }
        if check_path is not None:
            replacements[HAPROXY_CHECK] = f"option httpchk GET {check_path}"
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(render(HAPROXY_CONF, replacements))
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        self.proc = Proc("haproxy", [binary, "-db", "-f", str(cfg)],
                         log_path=workdir / "haproxy.log")
        _started(self, lambda: _alive_or_raise(self) and set(self.states().values()) == {"UP"},
                 20, "haproxy with every backend UP")

    def served(self, since: int = 0) -> dict[str, float]:
        """Blob body bytes each backend served through HAProxy (its httplog lines after
        byte offset `since`), in MB."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError), open(self.proc.log_path, "rb") as f:
            f.seek(since)
            for line in f.read().decode(errors="replace").splitlines():
                m = _HAPROXY_LINE.search(line)
                if m and "/blobs/" in line:
                    out[m[1]] = out.get(m[1], 0.0) + int(m[2]) / 1e6
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def log_offset(self) -> int:
        try:
            return self.proc.log_path.stat().st_size
        except OSError:
            return 0

    def states(self) -> dict[str, str]:
        status, body = _get(f"{self.stats}/stats;csv")
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.decode().removeprefix("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "mirror_nodes"
                and r["svname"] not in ("BACKEND", "FRONTEND")}


class Redis(Server):
    """redis-server on 127.0.0.1, nothing saved."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.base = f"http://127.0.0.1:{port}"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = Proc("redis", [binary, "--bind", "127.0.0.1", "--port", str(port),
                                   "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                         log_path=workdir / "redis.log")
        _started(self, lambda: _alive_or_raise(self) and "Ready to accept" in self.proc.tail(50),
                 READY_TIMEOUT, "redis-server")


# --- content and measurements ---------------------------------------------------------------
def cluster_image(ctx: Ctx) -> Image:
    """~256 MB in 6 layers (48 MB with --quick)."""
    mb = [96, 64, 48, 24, 16, 8] if not ctx.opts.quick else [16, 12, 8, 6, 4, 2]
    return ctx.image("cluster-app", "bench/cluster", "v1", [m * 1_000_000 for m in mb])


def big_blob(ctx: Ctx) -> Blob:
    size = (256 if not ctx.opts.quick else 64) * 1_000_000
    return ctx.blob(f"cluster-big-{size}", size, "bench/cbig")


_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def manifest_requests(up: Registry, since: int, image: Image) -> dict[str, int]:
    """Upstream manifest requests of the image after `since`: GET and HEAD, by tag and by
    digest."""
    with open(up.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    out = {"GET tag": 0, "GET digest": 0, "HEAD tag": 0, "HEAD digest": 0}
    prefix = f"/v2/{image.repo}/manifests/"
    for m in _ACCESS.finditer(text):
        path = m[2].split("?", 1)[0]
        if not path.startswith(prefix):
            continue
        ref = path.removeprefix(prefix)
        kind = "tag" if ref == image.tag else "digest" if ref == image.digest else None
        if kind:
            out[f"{m[1]} {kind}"] += 1
    return out


def measure(ctx: Ctx, bases: list[str], image: Image, n: int, deadline: float,
            nodes: list[Node] | None = None,
            during: Callable[[], None] | None = None) -> dict[str, Any]:
    """n cold pulls, client i through bases[i % len(bases)]; what the upstream sent."""
    up = ctx.ns_upstream
    ctx.link.wait_idle(quiet=0.5, timeout=10)
    off, rx0 = up.log_offset(), ctx.link.rx_bytes()
    before = [nd.peer_counters() for nd in nodes or []]
    specs = [pull_specs(bases[i % len(bases)], image, 1, deadline)[0] for i in range(n)]
    res, t_go = run_clients(specs, timeout=deadline + 30, during=during)
    ctx.link.wait_idle(quiet=1.0, timeout=120)  # downloads that outlive the clients
    time.sleep(0.3)
    ok = [r for r in res if r.get("ok")]
    blob_bytes, blob_gets = up.blob_get_bytes(off)
    image_blobs = sum(b.size for b in image.blobs)
    r: dict[str, Any] = {
        "wall": max((c.get("t_end", t_go) for c in res), default=t_go) - t_go,
        "ok": len(ok), "failed": n - len(ok),
        "errors": [str(c.get("errors") or c.get("error"))[:300]
                   for c in res if not c.get("ok")][:5],
        "served_bytes": sum(c.get("nbytes", 0) for c in res),
        "upstream_blob_bytes": blob_bytes, "upstream_blob_gets": blob_gets,
        "upstream_x": blob_bytes / image_blobs,
        "link_rx_bytes": ctx.link.rx_bytes() - rx0,
        "manifests": manifest_requests(up, off, image),
    }
    r["manifest_gets"] = r["manifests"]["GET tag"] + r["manifests"]["GET digest"]
    if nodes:
        after = [nd.peer_counters() for nd in nodes]
        per_node = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}
                    for a, b in zip(after, before, strict=True)]
        r["peer"] = per_node
        r["relayed_bytes"] = sum(p["bytes_in"] for p in per_node)
        r["relays"] = sum(p["relays"] for p in per_node)
        r["relayed_fraction"] = r["relayed_bytes"] / max(r["served_bytes"], 1)
    return r


def _text(r: dict[str, Any], single: float | None = None) -> str:
    wall = f"wall {r['wall']:.1f}s" + (f" = {r['wall'] / single:.2f}x single" if single else "")
    rel = f", relayed {r['relayed_fraction']:.3f} of served" if "relayed_fraction" in r else ""
    return (f"upstream {r['upstream_x']:.2f}x image ({r['upstream_blob_gets']} blob GETs, "
            f"{r['manifest_gets']} manifest GETs), {wall}{rel}, "
            f"{r['ok']} ok / {r['failed']} failed {r['errors'][:2]}")


def _when_link_reaches(ctx: Ctx, rx0: int, nbytes: int, action: Callable[[], None],
                       timeout: float) -> Callable[[], None]:
    """A `during` callback: run `action` once `nbytes` more have crossed the link (or after
    `timeout` seconds at the latest)."""

    def during() -> None:
        deadline = time.monotonic() + timeout
        while ctx.link.rx_bytes() - rx0 < nbytes and time.monotonic() < deadline:
            time.sleep(0.02)
        action()

    return during


# --- figures -------------------------------------------------------------------------------
def f1(ctx: Ctx, res: dict[str, Any]) -> None:
    image = cluster_image(ctx)
    n = 32
    with cluster(ctx, "cl-single") as nodes:
        single = measure(ctx, [nodes[0].base], image, 1, 300, nodes)
    if single["failed"]:
        raise RuntimeError(f"single cold pull through one node failed: {single['errors']}")
    t1 = single["wall"]
    res["single"] = single
    log(f"cluster single pull through m1: {_text(single)}")
    deadline = max(120.0, t1 * 60)
    with cluster(ctx, "cl-hash") as nodes:
        lb = HAProxy(_cluster_dir(ctx, "haproxy"), [nd.base.removeprefix("http://")
                                                    for nd in nodes])
        try:
            res["hash"] = measure(ctx, [lb.base], image, n, deadline, nodes)
            res["hash"]["served_mb_by_node"] = lb.served()
            # Warm: what HAProxy and this machine cost 32 pulls once nothing is cold.
            off = lb.log_offset()
            res["hash-warm"] = measure(ctx, [lb.base], image, n, deadline, nodes)
            res["hash-warm"]["served_mb_by_node"] = lb.served(off)
        finally:
            lb.stop()
    log(f"cluster F1 haproxy hash: {_text(res['hash'], t1)}")
    with cluster(ctx, "cl-rr") as nodes:
        res["rr"] = measure(ctx, [nd.base for nd in nodes], image, n, deadline, nodes)
        res["rr-warm"] = measure(ctx, [nd.base for nd in nodes], image, n, deadline, nodes)
    log(f"cluster F1 round robin: {_text(res['rr'], t1)}")
    log(f"cluster F1 warm 2nd rounds: hash {_text(res['hash-warm'], t1)}; "
        f"round robin {_text(res['rr-warm'], t1)}")
    redis = Redis(_cluster_dir(ctx, "redis-up"))
    try:
        with cluster(ctx, "cl-rr-redis", redis_url=redis.url) as nodes:
            res["rr-redis"] = measure(ctx, [nd.base for nd in nodes], image, n, deadline,
                                      nodes)
    finally:
        redis.stop()
    log(f"cluster F1 round robin, redis up: {_text(res['rr-redis'], t1)}")
    # The anchor: three distribution proxies, empty storage, behind the same HAProxy file.
    proxies: list[Registry] = []
    try:
        for i, a in enumerate(NODE_ADDRESSES):
            d = _cluster_dir(ctx, f"dist-cl{i + 1}")
            proxies.append(Registry(f"dist-cl{i + 1}", d, d / "store", host=a,
                                    remoteurl=ctx.ns_upstream.base))
        lb = HAProxy(_cluster_dir(ctx, "haproxy-dist"), [p.hostport for p in proxies],
                     check_path="/v2/")
        try:
            res["dist"] = measure(ctx, [lb.base], image, n, deadline)
            res["dist"]["served_mb_by_node"] = lb.served()
        finally:
            lb.stop()
    finally:
        for p in proxies:
            p.stop()
    log(f"cluster F1 distribution x3 behind haproxy: {_text(res['dist'], t1)}")


def f3(ctx: Ctx, res: dict[str, Any]) -> None:
    blob = big_blob(ctx)
    n = 16
    up = ctx.ns_upstream
    with cluster(ctx, "cl-kill") as nodes:
        owner_id = ring.owner([nd.node_id for nd in nodes], blob.digest)
        view = nodes[0].signed(f"/_cluster/ring?digest={blob.digest}")
        if view and view["ranks"][0]["node_id"] != owner_id:
            raise RuntimeError(f"ring disagrees: {view['ranks']} vs {owner_id}")
        owner = next(nd for nd in nodes if nd.node_id == owner_id)
        others = [nd for nd in nodes if nd is not owner]
        urls = [f"{nd.base}/v2/bench/cbig/blobs/{blob.digest}" for nd in others]
        specs = [{"mode": "get", "url": urls[i % 2], "hash": True, "timeout": 60,
                  "deadline": 600} for i in range(n)]
        ctx.link.wait_idle(quiet=0.5, timeout=10)
        off, rx0 = up.log_offset(), ctx.link.rx_bytes()
        killed: dict[str, float] = {}

        def kill() -> None:
            killed["at_link_bytes"] = ctx.link.rx_bytes() - rx0
            killed["t"] = time.monotonic()
            owner.kill9()
            log(f"cluster F3: killed owner {owner_id} at "
                f"{killed['at_link_bytes'] / blob.size:.0%} of the blob over the link")

        out, t_go = run_clients(specs, timeout=630,
                                during=_when_link_reaches(ctx, rx0, blob.size // 2, kill, 120))
        ctx.link.wait_idle(quiet=1.0, timeout=120)
        time.sleep(0.3)
        got = [c["results"][-1] for c in out if c.get("results")]
        good = [g for g in got if not g["error"] and g["digest"] == blob.digest
                and g["nbytes"] == blob.size]
        errors = [g["error"] or f"{g['nbytes']} bytes, {g['digest'][:19]}"
                  for g in got if g not in good] + [c["error"] for c in out if "error" in c]
        blob_bytes, gets = up.blob_get_bytes(off)
        res["kill"] = {
            "owner": owner_id, "clients": n, "ok": len(good), "errors": errors[:5],
            "killed_at_fraction": killed.get("at_link_bytes", 0) / blob.size,
            "killed_after_s": killed.get("t", t_go) - t_go,
            "wall": max((g["t_end"] for g in got), default=t_go) - t_go,
            "upstream_blob_bytes": blob_bytes, "upstream_blob_gets": gets,
            "upstream_x": blob_bytes / blob.size,
            "link_rx_bytes": ctx.link.rx_bytes() - rx0,
            "link_x": (ctx.link.rx_bytes() - rx0) / blob.size,
            "peer": [nd.peer_counters() for nd in others],
        }
    k = res["kill"]
    log(f"cluster F3: {k['ok']}/{n} verified, upstream {k['upstream_x']:.2f}x blob "
        f"({gets} GETs; link {k['link_x']:.2f}x), wall {k['wall']:.1f}s {errors[:2]}")


def f4(ctx: Ctx, res: dict[str, Any]) -> None:
    image = cluster_image(ctx)
    n = 32
    t1 = res["single"]["wall"] if "single" in res else 10.0
    redis = Redis(_cluster_dir(ctx, "redis"))
    try:
        with cluster(ctx, "cl-redis", redis_url=redis.url) as nodes:
            rx0 = ctx.link.rx_bytes()
            stopped: dict[str, float] = {}

            def stop_redis() -> None:
                stopped["at_link_bytes"] = ctx.link.rx_bytes() - rx0
                redis.stop()
                log(f"cluster F4: redis stopped at "
                    f"{stopped['at_link_bytes'] / image.size:.0%} of the image over the link")

            during = _when_link_reaches(ctx, rx0, image.size // 4, stop_redis, 60)
            r = measure(ctx, [nd.base for nd in nodes], image, n, max(120.0, t1 * 60), nodes,
                        during=during)
            r["redis_stopped_at_fraction"] = stopped.get("at_link_bytes", 0) / image.size
            res["redis"] = r
    finally:
        redis.stop()
    log(f"cluster F4 redis stopped, round robin: {_text(res['redis'], t1)}")


def bench_cluster(ctx: Ctx) -> None:
    """The `cluster` group of `python -m benchmarks`: F1, F3, F4, and F5, F6
    (cluster_tiers.py; imported here, as it imports this module); rows for what ran."""
    res: dict[str, Any] = {}
    errors: list[str] = []
    from .cluster_tiers import f5, f6, rows

    for fig in (f1, f3, f4, f5, f6):
        try:
            fig(ctx, res)
        except Exception as exc:  # the other figures still run; the group fails at the end
            errors.append(f"{fig.__name__}: {type(exc).__name__}: {exc}")
            log(f"cluster {fig.__name__} failed: {exc}")
    ctx.rows.extend([*cluster_rows(ctx, res), *rows(res)])
    for key, r in res.items():
        if r.get("failed") or (key == "kill" and r["ok"] < r["clients"]):
            ctx.problem(f"cluster {key}: clients failed: {r.get('errors')}")
    if errors:
        raise RuntimeError("; ".join(errors))


def cluster_rows(ctx: Ctx, res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    single, dist = res.get("single"), res.get("dist")
    t1 = single["wall"] if single else None
    mb = sum(b.size for b in cluster_image(ctx).blobs) / 1e6
    for key, label in (("hash", "haproxy hash"), ("rr", "round robin")):
        r = res.get(key)
        if r is None:
            continue
        name = f"F1 32 clients, {mb:.0f} MB, {label}"
        served = r.get("served_mb_by_node")
        wall_note = f"MB served per node: {served}" if served else ""
        rows += [
            Row(GROUP, f"{name}: upstream blob bytes", "x image", r["upstream_x"],
                "3 distribution (haproxy)", dist["upstream_x"] if dist else None, 1,
                ("mirror<=", 1.0), "", {"mirror": r, "anchor": dist}),
            Row(GROUP, f"{name}: manifest GETs per digest", "GETs", r["manifest_gets"],
                "3 distribution (haproxy)", dist["manifest_gets"] if dist else None, 1,
                ("mirror<=", 1), "", {"mirror": r["manifests"],
                                      "anchor": dist["manifests"] if dist else None}),
            Row(GROUP, f"{name}: wall", "x single", r["wall"] / t1 if t1 else None,
                "3 distribution (haproxy)", dist["wall"] / t1 if dist and t1 else None, 1,
                ("mirror<=", 1.3), wall_note, {"single_pull_s": t1}),
            Row(GROUP, f"{name}: warm 2nd round wall", "x single",
                res[f"{key}-warm"]["wall"] / t1 if t1 and f"{key}-warm" in res else None,
                "cold round", r["wall"] / t1 if t1 else None, 1, None,
                f"upstream {res[f'{key}-warm']['upstream_x']:.2f}x image"
                if f"{key}-warm" in res else "", {"warm": res.get(f"{key}-warm")}),
            Row(GROUP, f"{name}: relayed / served", "fraction", r["relayed_fraction"],
                "round robin" if key == "hash" else "haproxy hash",
                res[("rr" if key == "hash" else "hash")]["relayed_fraction"]
                if ("rr" if key == "hash" else "hash") in res else None, 1, None,
                f"{r['relays']:.0f} relays", {"peer": r["peer"]}),
            Row(GROUP, f"{name}: clients failed", "clients", r["failed"],
                "3 distribution (haproxy)", dist["failed"] if dist else None, 1,
                ("mirror<=", 0), ""),
        ]
    rr = res.get("rr-redis")
    if rr is not None:
        name = f"F1 32 clients, {mb:.0f} MB, round robin, redis up"
        anchor = res.get("rr")
        rows += [
            Row(GROUP, f"{name}: upstream blob bytes", "x image", rr["upstream_x"],
                "round robin, no redis", anchor["upstream_x"] if anchor else None, 1,
                ("mirror<=", 1.0), "", {"mirror": rr}),
            Row(GROUP, f"{name}: manifest GETs per digest", "GETs", rr["manifest_gets"],
                "round robin, no redis", anchor["manifest_gets"] if anchor else None, 1,
                ("mirror<=", 1), "", {"mirror": rr["manifests"]}),
            Row(GROUP, f"{name}: clients failed", "clients", rr["failed"],
                "round robin, no redis", anchor["failed"] if anchor else None, 1,
                ("mirror<=", 0), ""),
        ]
    k = res.get("kill")
    if k is not None:
        mb_blob = big_blob(ctx).size / 1e6
        note = (f"owner {k['owner']} killed at {k['killed_at_fraction']:.0%} of the blob "
                f"({k['killed_after_s']:.1f}s)")
        rows += [
            Row(GROUP, f"F3 owner killed, {mb_blob:.0f} MB blob: verified", "clients",
                k["ok"], "clients", k["clients"], 1, ("ratio>=", 1.0), note, {"kill": k}),
            Row(GROUP, f"F3 owner killed, {mb_blob:.0f} MB blob: upstream bytes", "x blob",
                k["upstream_x"], "ideal", 1.0, 1, ("mirror<=", 1.5),
                f"link {k['link_x']:.2f}x"),
        ]
    rd = res.get("redis")
    if rd is not None:
        hashr = res.get("rr")
        name = f"F4 redis stopped, 32 clients, {mb:.0f} MB, round robin"
        note = f"stopped at {rd['redis_stopped_at_fraction']:.0%} of the image"
        rows += [
            Row(GROUP, f"{name}: clients failed", "clients", rd["failed"],
                "F1 round robin, no redis", hashr["failed"] if hashr else None, 1,
                ("mirror<=", 0), note, {"redis": rd}),
            Row(GROUP, f"{name}: upstream blob bytes", "x image", rd["upstream_x"],
                "F1 round robin, no redis", hashr["upstream_x"] if hashr else None, 1,
                ("mirror<=", 1.0), ""),
            Row(GROUP, f"{name}: manifest GETs per digest", "GETs", rd["manifest_gets"],
                "F1 round robin, no redis", hashr["manifest_gets"] if hashr else None, 1,
                ("mirror<=", 1), "", {"mirror": rd["manifests"]}),
        ]
    return rows

