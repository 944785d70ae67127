"""Issue 10, items 3, 9 and 21 at the configuration and routing level: credentials refused in
upstream URLs, the connection limits of `[server]`, and names whose first component looks like
a registry host that is not configured."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mirror.config import ConfigError, parse_config
from mirror.oci.errors import RegistryError
from mirror.oci.routing import looks_like_host, parse_image, unconfigured_registry

UP = {"upstream": [{"name": "docker.io", "url": "https://registry-1.docker.io"}]}
UPSTREAMS = ["docker.io", "ghcr.io", "127.0.0.1:5000"]


# --- item 3: credentials in an upstream URL ---------------------------------------------


@pytest.mark.parametrize("url", [
    "http://user:s3cr3t-pw@registry.example",
    "https://user:s3cr3t-pw@registry.example:5000/",
    "https://s3cr3t-pw@registry.example",
    "https://user:s3cr3t-pw@registry.example:99999",  # a bad port must not echo it either
])
def test_credentials_in_upstream_url_are_refused(url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"upstream": [{"name": "r.example", "url": url}]}, "m.toml")
    message = str(exc.value)
    assert message.startswith("m.toml: upstream[0].url: ")
    assert "s3cr3t-pw" not in message
    for key in ("username", "password", "password_file", "credential_helper"):
        assert key in message


def test_credentials_in_url_exit_2_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n'
                   '[[upstream]]\nname = "a"\nurl = "http://bob:s3cr3t-pw@127.0.0.1:1"\n')
    proc = subprocess.run([sys.executable, "-m", "mirror", "status", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "upstream[0].url" in proc.stderr and "s3cr3t-pw" not in proc.stderr


# --- item 9: connection limits -----------------------------------------------------------


def test_connection_limit_defaults() -> None:
    server = parse_config(dict(UP)).server
    assert server.header_timeout == 10.0
    assert server.keepalive_timeout == 75.0
    assert server.max_connections == 10_000
    assert server.max_connections_per_client == 256


def test_connection_limits_parse() -> None:
    server = parse_config({"server": {"header_timeout": "2s", "keepalive_timeout": "1m",
                                      "max_connections": 50,
                                      "max_connections_per_client": 5}, **UP}).server
    assert (server.header_timeout, server.keepalive_timeout) == (2.0, 60.0)
    assert (server.max_connections, server.max_connections_per_client) == (50, 5)


@pytest.mark.parametrize(("key", "value"), [
    ("header_timeout", "0s"),
    ("header_timeout", "soon"),
    ("keepalive_timeout", "0s"),
    ("max_connections", 0),
    ("max_connections", "many"),
    ("max_connections_per_client", -1),
])
def test_connection_limits_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"server": {key: value}, **UP}, "m.toml")
    assert str(exc.value).startswith(f"m.toml: server.{key}: ")


def test_per_client_bound_above_the_worker_limit_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"server": {"max_connections": 10, "max_connections_per_client": 20},
                      **UP}, "m.toml")
    assert str(exc.value).startswith("m.toml: server.max_connections_per_client: ")


# --- item 21: names whose first component looks like an unconfigured registry -----------


@pytest.mark.parametrize(("component", "expected"), [
    ("quay.io", True), ("localhost", True), ("localhost:5000", True), ("10.0.0.1:443", True),
    ("library", False), ("my-org", False), ("a_b", False),
])
def test_looks_like_host(component: str, expected: bool) -> None:
    assert looks_like_host(component) is expected


@pytest.mark.parametrize(("name", "ns", "expected"), [
    ("quay.io/foo/bar", None, "quay.io"),
    ("localhost/foo", None, "localhost"),
    ("registry.local:5000/x", None, "registry.local:5000"),
    ("ghcr.io/o/r", None, None),  # configured
    ("index.docker.io/library/nginx", None, None),  # an alias of a configured one
    ("library/nginx", None, None),
    ("nginx", None, None),
    ("foo.bar", None, None),  # one component: a repository name, not a host
    ("quay.io/foo", "ghcr.io", None),  # ns chose the upstream
])
def test_unconfigured_registry(name: str, ns: str | None, expected: str | None) -> None:
    assert unconfigured_registry(name, ns, UPSTREAMS) == expected


def test_image_naming_an_unconfigured_registry_is_refused_when_strict() -> None:
    with pytest.raises(RegistryError) as exc:
        parse_image("quay.io/foo:1", UPSTREAMS, strict=True)
    assert exc.value.status == 400
    assert "quay.io is not a configured upstream" in exc.value.message
    assert "configured: docker.io, ghcr.io, 127.0.0.1:5000" in exc.value.message
    assert "\n" not in exc.value.message
    ref = parse_image("ghcr.io/o/r:1", UPSTREAMS, strict=True)
    assert (ref.upstream, ref.repository) == ("ghcr.io", "o/r")
    ref = parse_image("nginx", UPSTREAMS, strict=True)
    assert (ref.upstream, ref.repository) == ("docker.io", "library/nginx")


def test_warm_refuses_an_unconfigured_registry_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n'
                   '[[upstream]]\nname = "docker.io"\nurl = "http://127.0.0.1:1"\n')
    proc = subprocess.run([sys.executable, "-m", "mirror", "warm", "--config", str(cfg),
                           "quay.io/foo:1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "quay.io" in proc.stderr and "not a configured upstream" in proc.stderr
    assert "configured: docker.io" in proc.stderr


def test_documented_connection_keys_parse() -> None:
    """The commented [server] keys of the shipped mirror.toml, uncommented, are valid."""
    text = (Path(__file__).parents[2] / "mirror.toml").read_text()
    keys = ("header_timeout", "keepalive_timeout", "max_connections")
    lines = [line[2:] if line.startswith(tuple(f"# {k}" for k in keys)) else line
             for line in text.splitlines()]
    server = parse_config(tomllib.loads("\n".join(lines))).server
    assert (server.header_timeout, server.keepalive_timeout) == (10.0, 75.0)
    assert (server.max_connections, server.max_connections_per_client) == (10_000, 256)


def test_connection_limit_fits_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirror.http import connections

    def refuse(*_args: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(connections.resource, "getrlimit", lambda _which: (1024, 1024))
    monkeypatch.setattr(connections.resource, "setrlimit", refuse)
    limits = connections.fit_file_limit(connections.Limits(10, 75, 10_000, 256))
    assert limits.max_connections == 1024 - connections.FD_RESERVE
    assert limits.max_connections_per_client == 256
    small = connections.Limits(10, 75, 100, 50)
    assert connections.fit_file_limit(small) == small
