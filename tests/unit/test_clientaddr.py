"""http/clientaddr.py: X-Forwarded-For believed only from trusted proxies, and only so far."""

from __future__ import annotations

import pytest

from mirror.config import ConfigError, parse_config
from mirror.http.clientaddr import client_address

UPSTREAM = [{"name": "a.test", "url": "http://a.invalid"}]
TRUSTED = parse_config({"server": {"trusted_proxies": ["10.0.0.0/8", "::1"]},
                        "upstream": UPSTREAM}).server.trusted_proxies


@pytest.mark.parametrize(("peer", "header", "client"), [
    ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # not from a proxy: the header is the client's
    ("10.0.0.5", [], "10.0.0.5"),  # a proxy's own request
    ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
    ("10.0.0.5", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # the client forged the first
    ("10.0.0.5", ["203.0.113.7, 10.1.1.1"], "203.0.113.7"),  # two trusted proxies in a row
    ("10.0.0.5", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # two header lines
    ("10.0.0.5", ["10.2.2.2, 10.1.1.1"], "10.2.2.2"),  # only proxies: the farthest one
    ("10.0.0.5", ["203.0.113.7, garbage"], "10.0.0.5"),  # nothing before garbage is believed
    ("::1", ["2001:db8::7"], "2001:db8::7"),
    (None, ["203.0.113.7"], "-"),
])
def test_client_address(peer: str | None, header: list[str], client: str) -> None:
    assert client_address(peer, header, TRUSTED) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("10.0.0.5", ["203.0.113.7"], ()) == "10.0.0.5"


@pytest.mark.parametrize("value", [["10.0.0.0/33"], ["proxy.example"], "10.0.0.1", [1]])
def test_bad_trusted_proxies_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies"):
        parse_config({"server": {"trusted_proxies": value}, "upstream": UPSTREAM})
