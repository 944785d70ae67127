"""The cluster's pure parts: the ring (rendezvous hashing), the request HMAC, `[cluster]`."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.cluster import auth, ring
from mirror.config import ConfigError, parse_config

DIGESTS = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(10_000)]


# the ring --------------------------------------------------------------------------------------
# growing and shrinking: tests/unit/test_ring_membership.py
def test_every_node_ranks_alike_whatever_order_it_lists_peers_in() -> None:
    for d in DIGESTS[:200]:
        assert ring.rank(["m3", "m1", "m2", "m1"], d) == ring.rank(["m1", "m2", "m3"], d)


def test_owners_spread_evenly() -> None:
    owners = [ring.owner(["a", "b", "c"], d) for d in DIGESTS]
    for node in "abc":
        assert 0.30 <= owners.count(node) / len(owners) <= 0.37


def test_no_nodes_no_owner() -> None:
    with pytest.raises(ValueError):
        ring.owner([], DIGESTS[0])


# the HMAC -------------------------------------------------------------------------------------
SECRET = b"k" * 32
PATH = "/_cluster/blobs/docker.io/library/nginx/sha256:ab?stored=1"


def test_a_signed_request_verifies_to_its_node() -> None:
    header = auth.sign(SECRET, "m2", "GET", PATH, now=1000.0)
    assert auth.verify(SECRET, header, "GET", PATH, now=1010.0) == "m2"


@pytest.mark.parametrize(("secret", "method", "path", "now", "why"), [
    (b"x" * 32, "GET", PATH, 1000.0, "secret files differ"),
    (SECRET, "HEAD", PATH, 1000.0, "does not match"),
    (SECRET, "GET", PATH.replace("stored=1", "stored=0"), 1000.0, "does not match"),
    (SECRET, "GET", "/_cluster/blobs/docker.io/other/sha256:ab?stored=1", 1000.0, "not match"),
    (SECRET, "GET", PATH, 1031.0, "window"),
    (SECRET, "GET", PATH, 969.0, "window"),
])
def test_a_request_altered_replayed_late_or_keyed_otherwise_is_refused(
        secret: bytes, method: str, path: str, now: float, why: str) -> None:
    header = auth.sign(SECRET, "m2", "GET", PATH, now=1000.0)
    with pytest.raises(auth.ClusterAuthError, match=why):
        auth.verify(secret, header, method, path, now=now)


@pytest.mark.parametrize("header", [None, "", "v1 m2 1000", "v2 m2 1000 00", "v1 m2 abc 00",
                                    "v1 m3 1000 " + "0" * 64, "v1 m2 1000 \xe9\xe9",
                                    "v1 \udce9 1000 00", "v1 m2 \xb2\xb2 00"])
def test_a_missing_or_forged_header_is_refused(header: str | None) -> None:
    with pytest.raises(auth.ClusterAuthError):
        auth.verify(SECRET, header, "GET", PATH, now=1000.0)


def test_another_node_id_in_a_valid_header_is_refused() -> None:
    header = auth.sign(SECRET, "m2", "GET", PATH, now=1000.0).replace(" m2 ", " m1 ")
    with pytest.raises(auth.ClusterAuthError):
        auth.verify(SECRET, header, "GET", PATH, now=1000.0)


# [cluster] ------------------------------------------------------------------------------------
UPSTREAM = [{"name": "docker.io", "url": "http://127.0.0.1:5001"}]


def cluster_config(tmp_path: Path, **cluster: Any) -> dict[str, Any]:
    key = tmp_path / "cluster.key"
    key.write_bytes(b"s" * 40 + b"\n")
    table = {"node_id": "m1", "advertise_url": "http://127.0.0.11:5000",
             "secret_file": str(key), **cluster}
    return {"upstream": UPSTREAM, "cluster": {k: v for k, v in table.items() if v is not None}}


def test_a_single_node_has_no_cluster() -> None:
    assert parse_config({"upstream": UPSTREAM}).cluster is None


def test_peers_are_normalised(tmp_path: Path) -> None:
    config = parse_config(cluster_config(tmp_path, peers=[
        "http://127.0.0.11:5000", "http://127.0.0.12:5000/", "http://127.0.0.12:5000",
        "http://127.0.0.13:5000"]))
    assert config.cluster is not None
    assert config.cluster.peers == ("http://127.0.0.12:5000", "http://127.0.0.13:5000")
    assert config.cluster.secret == b"s" * 40
    assert "s" * 40 not in repr(config.cluster)


@pytest.mark.parametrize(("change", "key"), [
    ({"node_id": None}, "cluster.node_id"),
    ({"advertise_url": None}, "cluster.advertise_url"),
    ({"secret_file": None}, "cluster.secret_file"),
    ({"secret_file": "/nonexistent/cluster.key"}, "cluster.secret_file"),
    ({"peers": ["ftp://x"]}, "cluster.peers"),
    ({"health_fails": 0}, "cluster.health_fails"),
    ({"gossip": True}, "cluster.gossip"),
])
def test_a_bad_cluster_table_names_its_key(tmp_path: Path, change: dict[str, Any],
                                            key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(cluster_config(tmp_path, **change), "my.toml")
    assert str(exc.value).startswith(f"my.toml: {key}: ")


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    data = cluster_config(tmp_path)
    Path(data["cluster"]["secret_file"]).write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 32"):
        parse_config(data)


def test_redis_credentials_never_in_the_url() -> None:
    with pytest.raises(ConfigError, match=r"redis\.url: credentials"):
        parse_config({"upstream": UPSTREAM, "redis": {"url": "redis://u:p@127.0.0.1:6379/0"}})
    config = parse_config({"upstream": UPSTREAM, "redis": {"url": "redis://127.0.0.1:6379/0"}})
    assert config.redis is not None and config.redis.timeout == 0.05


def test_a_cluster_without_node_id_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"s" * 32)
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[[upstream]]\nname = "a"\nurl = "http://a"\n[cluster]\n'
                   f'advertise_url = "http://127.0.0.1:5000"\nsecret_file = "{key}"\n')
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "cluster.node_id: missing" in proc.stderr
