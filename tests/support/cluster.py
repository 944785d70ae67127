"""Mirror nodes of one cluster as real subprocesses on 127.0.0.1x addresses.

    nodes = start_cluster(tmp, upstreams, size=3)       # m1..m3 on 127.0.0.11..13
    nodes[0].signed_get("/_cluster/ring?digest=...")    # a request with the cluster's HMAC
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from mirror.cluster import auth

from .mirror import MirrorProcess, Upstream, to_toml
from .registry import free_port, wait_until

SECRET = b"cluster-test-secret-" + b"0123456789abcdef" * 2


class Node(MirrorProcess):
    def __init__(self, workdir: Path, upstreams: list[Upstream], *, address: str,
                 node_id: str, peers: list[str], secret_file: Path,
                 cluster_extra: dict[str, Any] | None = None, redis: str | None = None,
                 redis_timeout: str = "1s", **kwargs: Any) -> None:
        super().__init__(workdir, upstreams, port=kwargs.pop("port", None) or free_port(),
                         **kwargs)
        self.host = f"{address}:{self.port}"
        self.url = f"http://{self.host}"
        self.node_id = node_id
        self.cluster = {"node_id": node_id, "advertise_url": self.url, "peers": peers,
                        "secret_file": str(secret_file), "health_interval": "200ms",
                        **(cluster_extra or {})}
        # generous by default: on a busy 2-core machine a call can outlast 50 ms, and a Redis
        # call that times out makes the node fetch alone (a second upstream GET, by design)
        self.redis = {} if redis is None else {"url": redis, "timeout": redis_timeout}

    def config_text(self) -> str:
        sections = {"cluster": self.cluster, **({"redis": self.redis} if self.redis else {})}
        return super().config_text() + "\n" + to_toml(sections, {})

    def signed_get(self, path_qs: str, secret: bytes = SECRET, **kw: Any) -> httpx.Response:
        header = auth.sign(secret, "test", "GET", path_qs, time.time())
        return httpx.get(f"{self.url}{path_qs}", headers={auth.HEADER: header},
                         trust_env=False, timeout=30, **kw)

    def live(self) -> list[str]:
        r = self.signed_get("/_cluster/ring")
        return list(r.json()["live"]) if r.status_code == 200 else []


def plan(tmp: Path, upstreams: list[Upstream], size: int, extra_peers: tuple[str, ...] = (),
         **kwargs: Any) -> list[Node]:
    """`size` nodes that know each other (and `extra_peers`), not started."""
    secret_file = tmp / "cluster.key"
    secret_file.write_bytes(SECRET)
    addresses = [f"127.0.0.{11 + i}" for i in range(size)]
    ports = [free_port() for _ in addresses]
    urls = [f"http://{a}:{p}" for a, p in zip(addresses, ports, strict=True)]
    return [Node(tmp / f"m{i + 1}", upstreams, address=a, node_id=f"m{i + 1}",
                 peers=urls + list(extra_peers),
                 secret_file=secret_file, port=p, **kwargs)
            for i, (a, p) in enumerate(zip(addresses, ports, strict=True))]


def start_cluster(tmp: Path, upstreams: list[Upstream], size: int = 3,
                  **kwargs: Any) -> list[Node]:
    nodes = plan(tmp, upstreams, size, **kwargs)
    try:
        for n in nodes:
            n.start()
        wait_converged(nodes)
    except BaseException:  # the caller never gets them to stop
        for n in nodes:
            n.stop()
        raise
    return nodes


def wait_converged(nodes: list[Node], timeout: float = 20.0, also: tuple[str, ...] = ()
                   ) -> None:
    """Until every running node sees every running node (and the node ids `also`) up."""
    want = sorted([n.node_id for n in nodes if n.running] + list(also))
    wait_until(lambda: all(n.live() == want for n in nodes if n.running), timeout,
               interval=0.1, what=f"every node to see {want}")


def owner_of(nodes: list[Node], digest: str) -> Node:
    ranks = nodes[0].signed_get(f"/_cluster/ring?digest={digest}").json()["ranks"]
    return next(n for n in nodes if n.node_id == ranks[0]["node_id"])
