"""upstream/egress.py: the proxy each upstream URL is reached through."""

from __future__ import annotations

import pytest

from mirror.config import ConfigError, parse_config
from mirror.upstream.egress import Egress, proxy_for

ENV = {"https": "http://proxy.corp:3128", "http": "http://plain.corp:8080",
       "no": "localhost,127.0.0.1,.internal,registry.site:5000"}


@pytest.mark.parametrize(("url", "configured", "expected"), [
    ("https://registry-1.docker.io/v2/", None, "http://proxy.corp:3128"),
    ("http://registry.example/v2/", None, "http://plain.corp:8080"),
    ("https://regional.internal/v2/", None, None),  # NO_PROXY domain
    ("http://127.0.0.1:5000/v2/", None, None),
    ("http://registry.site:5000/v2/", None, None),  # host:port in NO_PROXY
    ("https://regional.internal/v2/", "http://explicit:3128", "http://explicit:3128"),
    ("https://registry-1.docker.io/v2/", "direct", None),
])
def test_proxy_for(url: str, configured: str | None, expected: str | None) -> None:
    assert proxy_for(url, configured, ENV) == expected


def test_no_environment_no_proxy_and_a_star_bypasses_all() -> None:
    assert proxy_for("https://ghcr.io/v2/", None, {}) is None
    assert proxy_for("https://ghcr.io/v2/", None, {**ENV, "no": "*"}) is None


def test_egress_chooses_per_host() -> None:
    egress = Egress(None, ENV)
    assert egress("https://auth.docker.io/token?scope=x") == "http://proxy.corp:3128"
    assert egress("https://cdn.internal/blob") is None


UPSTREAM = {"name": "a.test", "url": "http://a.invalid"}


@pytest.mark.parametrize("value", ["ftp://proxy:21", "proxy.corp:3128", 3128,
                                   "http://user:pw@proxy:3128"])
def test_a_bad_proxy_names_the_key_and_never_echoes_credentials(value: object) -> None:
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.proxy") as caught:
        parse_config({"upstream": [{**UPSTREAM, "proxy": value}]})
    assert "pw" not in str(caught.value)


def test_proxy_key_parsed() -> None:
    (up,) = parse_config({"upstream": [{**UPSTREAM, "proxy": "direct"}]}).upstreams
    assert up.proxy == "direct"
