"""runtime.restart_only: what a reload applies, and what it keeps until a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror.config import Config, parse_config
from mirror.runtime import restart_only


def config(tmp_path: Path, server: dict[str, Any] | None = None, **cache: Any) -> Config:
    return parse_config({
        "server": {"listen": "127.0.0.1:5000", "workers": 2, **(server or {})},
        "cache": {"dir": str(tmp_path / "cache"), "tag_ttl": "60s", **cache},
        "upstream": [{"name": "a.test", "url": "http://a.invalid"}]})


def test_the_cache_policy_is_applied_the_socket_and_workers_kept(tmp_path: Path) -> None:
    running = config(tmp_path)
    new = config(tmp_path / "elsewhere", {"listen": "0.0.0.0:6000", "workers": 4,
                                          "tls_cert": "c.pem", "tls_key": "k.pem",
                                          "catalog": True, "trusted_proxies": ["10.0.0.1"]},
                 tag_ttl="5m")
    kept, restart = restart_only(running, new)
    assert kept.cache.tag_ttl == 300  # applied
    assert (kept.server.host, kept.server.port, kept.server.workers) == ("127.0.0.1", 5000, 2)
    assert (kept.server.tls_cert, kept.server.tls_key) == ("c.pem", "k.pem")  # reloaded
    assert kept.server.catalog and kept.server.trusted_proxies == new.server.trusted_proxies
    assert kept.cache.dir == running.cache.dir
    assert set(restart) == {"server.host", "server.port", "server.workers", "cache.dir"}


def test_nothing_to_restart_for_an_unchanged_file(tmp_path: Path) -> None:
    running = config(tmp_path)
    kept, restart = restart_only(running, config(tmp_path))
    assert restart == [] and kept.server == running.server and kept.cache == running.cache
