"""Figures F5 and F6 of issue 12, in the `cluster` group (benchmarks/cluster.py runs them).

* **F5 partition**: three nodes, m3 cut off from m1 and m2 by dropped packets
  (tests/support/partition.py: each side a cgroup, iptables OUTPUT DROP to the other side's
  addresses) before 32 clients pull the ~256 MB image spread over all three (client i ->
  node i % 3); once without and once with `[redis]` (reachable from both sides). Upstream
  blob bytes / image, clients verified (size and CRC-32 of every blob), and the seconds from
  `heal()` until every node sees all three again, in health intervals.
* **F6 tiers**: four edge mirrors (plain, no `[cluster]`; site i's upstream is regional node
  i % 3) in front of a 3-node regional cluster on the rate-limited origin; 8 clients per
  site. Origin blob bytes / image, each site's bytes from the regional tier / image; then the
  regional nodes are stopped: a warm pull through every site, and the time a cold blob takes
  to fail.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from tests.support.partition import Partition

from .cluster import (
    GROUP,
    NODE_ADDRESSES,
    Redis,
    _answers,
    _cluster_dir,
    _get,
    _text,
    _wait,
    big_blob,
    cluster,
    cluster_image,
    measure,
)
from .harness import REPO_ROOT, Proc, log
from .report import Row
from .scenarios import Ctx
from .servers import READY_TIMEOUT, Server, free_port

HEALTH_INTERVAL = 0.2  # benchmarks/cluster.py's nodes
EDGE_ADDRESSES = ("127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34")


class Edge(Server):
    """A site's mirror: one worker, no cluster, whose upstream is a regional node."""

    def __init__(self, workdir: Path, name: str, regional: str, address: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        self.scratch = cache
        self.base = f"http://{address}:{free_port()}"
        cfg = workdir / "mirror.toml"
        cfg.write_text(f"""[server]
listen = "{self.base.removeprefix('http://')}"
workers = 1

[cache]
dir = "{cache}"
max_size = "100GiB"
prefetch = true

[[upstream]]
name = "{name}"
url = "{regional}"
""")
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy",
                                                                        "https_proxy")}
        self.proc = Proc(f"edge-{address}", [str(REPO_ROOT / ".venv" / "bin" / "python"),
                                            "-m", "mirror", "serve", "--config", str(cfg)],
                         log_path=workdir / "mirror.log", cwd=REPO_ROOT,
                         env={**env, "PYTHONPATH": str(REPO_ROOT)})

    def upstream_bytes(self) -> float:
        status, body = _get(self.base + "/metrics", timeout=10)
        if status != 200:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                   if line.startswith("mirror_upstream_bytes_total{"))


def f5(ctx: Ctx, res: dict[str, Any]) -> None:
    image = cluster_image(ctx)
    for key in ("partition", "partition-redis", "partition-redirect"):
        with_redis, redirect = key != "partition", key == "partition-redirect"
        redis = Redis(_cluster_dir(ctx, f"redis-{key}")) if with_redis else None
        split = Partition([NODE_ADDRESSES[2]], list(NODE_ADDRESSES[:2]))
        try:
            launchers = (split.launcher(1), split.launcher(1), split.launcher(0))
            with cluster(ctx, f"cl-{key}", None if redis is None else redis.url, launchers,
                         "holder_redirect = true\n" if redirect else "") as nodes:
                split.cut()
                _wait(lambda: [n.live() for n in nodes] == [["m1", "m2"], ["m1", "m2"],
                                                              ["m3"]], 20,
                      "each side to see only itself")
                res[key] = measure(ctx, [n.base for n in nodes], image, 32, 300, nodes)
                healing = time.monotonic()
                split.heal()  # three iptables calls: 0.05-0.2 s on this machine
                healed = time.monotonic()
                res[key]["heal_s"] = healed - healing
                _wait(lambda: all(n.live() == ["m1", "m2", "m3"] for n in nodes), 30,
                      "the ring to converge after healing", interval=0.02)
                res[key]["converged_s"] = time.monotonic() - healed
        finally:
            split.heal()
            if redis is not None:
                redis.stop()
            split.close()
        log(f"cluster F5 {key}: {_text(res[key])}; converged "
            f"{res[key]['converged_s']:.2f}s after healing")


def f6(ctx: Ctx, res: dict[str, Any]) -> None:
    image = cluster_image(ctx)
    name = ctx.ns_upstream.base.split("://", 1)[1].rstrip("/")
    cold = big_blob(ctx)
    edges: list[Edge] = []
    with cluster(ctx, "cl-regional") as nodes:
        try:
            for i, address in enumerate(EDGE_ADDRESSES):
                edges.append(Edge(_cluster_dir(ctx, f"edge{i + 1}"), name,
                                  nodes[i % len(nodes)].base, address))
            for e in edges:
                _wait(_answers(e), READY_TIMEOUT, f"{e.proc.name} to answer /v2/")
            r = measure(ctx, [e.base for e in edges], image, 32, 300, nodes)
            image_bytes = sum(b.size for b in image.blobs)
            r["site_copies"] = [round(e.upstream_bytes() / image_bytes, 3) for e in edges]
            for n in nodes:
                n.stop()
            warm = measure(ctx, [e.base for e in edges], image, len(edges), 120)
            r["warm_ok"], r["warm_failed"] = warm["ok"], warm["failed"]
            t0 = time.monotonic()
            status, _ = _get(f"{edges[0].base}/v2/bench/cbig/blobs/{cold.digest}",
                             timeout=60)
            r["cold_status"], r["cold_fail_s"] = status, time.monotonic() - t0
            res["tiers"] = r
        finally:
            for e in edges:
                e.stop()
    log(f"cluster F6 tiers: {_text(res['tiers'])}; per site {res['tiers']['site_copies']}x "
        f"image from the regional tier; regional stopped: warm {r['warm_ok']} ok / "
        f"{r['warm_failed']} failed, a cold blob {r['cold_status']} in {r['cold_fail_s']:.2f}s")


def rows(res: dict[str, Any]) -> list[Row]:
    """The anchor of every byte ratio is F1 round robin of the same run (no partition, no
    tier: one upstream fetch per blob)."""
    out: list[Row] = []
    rr = res.get("rr")
    anchor = rr["upstream_x"] if rr else None
    for key, label, most, note in (
            ("partition", "F5 partition", 2.0, "once per side"),
            ("partition-redis", "F5 partition, redis up", 2.0,
             "the cut-off node cannot reach the lock's holder and fetches the blob itself"),
            ("partition-redirect", "F5 partition, redis up, holder_redirect", 1.0,
             "issue 12's 1.00x with Redis: the cut-off node sends its clients to the holder")):
        r = res.get(key)
        if r is None:
            continue
        out += [
            Row(GROUP, f"{label}: upstream blob bytes", "x image", r["upstream_x"],
                "F1 round robin", anchor, 1, ("mirror<=", most), note, {"mirror": r}),
            Row(GROUP, f"{label}: clients failed", "clients", r["failed"], "F1 round robin",
                rr["failed"] if rr else None, 1, ("mirror<=", 0)),
            Row(GROUP, f"{label}: converged after healing", "health intervals",
                r["converged_s"] / HEALTH_INTERVAL, "", None, 1, ("mirror<=", 2),
                f"{r['converged_s']:.2f}s from the partition's last rule removed (removing "
                f"the rules took {r.get('heal_s', 0):.2f}s), health_interval {HEALTH_INTERVAL}s"),
        ]
    t = res.get("tiers")
    if t is not None:
        out += [
            Row(GROUP, "F6 tiers, 4 sites x 8 clients: origin blob bytes", "x image",
                t["upstream_x"], "F1 round robin", anchor, 1, ("mirror<=", 1.0), "",
                {"mirror": t}),
            Row(GROUP, "F6 tiers: regional -> edge, worst site", "x image",
                max(t["site_copies"]), "", None, 1, ("mirror<=", 1.0),
                f"per site {t['site_copies']}"),
            Row(GROUP, "F6 tiers: clients failed", "clients", t["failed"], "F1 round robin",
                rr["failed"] if rr else None, 1, ("mirror<=", 0)),
            Row(GROUP, "F6 regional stopped: warm pulls failed", "clients", t["warm_failed"],
                "", None, 1, ("mirror<=", 0), f"{t['warm_ok']} ok"),
            Row(GROUP, "F6 regional stopped: a cold blob fails after", "s", t["cold_fail_s"],
                "", None, 1, ("mirror<=", 5.0), f"HTTP {t['cold_status']}"),
        ]
    return out
