"""Who the client is, behind reverse proxies: `X-Forwarded-For` is believed only when the
connection comes from a configured trusted proxy (`[server] trusted_proxies`), and then only
as far back as the proxies in it are trusted too; the first address that is not a trusted
proxy is the client. Anything else (no trusted proxy, a header that does not parse) gives the
connection's own address, so a client cannot choose the address its logins are counted
against by sending the header itself."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from mirror.config import Network


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str | None, forwarded_for: Sequence[str],
                   trusted: Sequence[Network]) -> str:
    """The client of a request from `peer` with these `X-Forwarded-For` header values."""
    if peer is None:
        return "-"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return client  # a hop that is no address: nothing before it is believed
        client = hop
        if not _trusted(hop, trusted):
            return hop
    return client
