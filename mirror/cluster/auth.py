"""The HMAC every `/_cluster/*` request carries, pure.

    X-Mirror-Cluster: v1 <node_id> <unix seconds> <hex HMAC-SHA256>

The MAC covers the version, the sending node, the time, the method and the raw path with its
query, so a captured header is good for that one request within WINDOW seconds either side
(clocks on a site agree far better than that). A node id may not contain spaces.

A node cut off from the node that holds a blob's fill lock may send its client there with a
grant in the query instead (`?grant=v1.<expiry>.<MAC>.<node_id>`): good for GET and HEAD of
that one path until the expiry, like a presigned URL, since a client follows a redirect to
another host without its Authorization header.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Mirror-Cluster"
VERSION = "v1"
WINDOW = 30.0


class ClusterAuthError(Exception):
    """The request is not from a node holding the cluster's secret; the message says why."""


def _mac(secret: bytes, node_id: str, timestamp: str, method: str, path_qs: str) -> str:
    message = "\n".join((VERSION, node_id, timestamp, method.upper(), path_qs)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, node_id: str, method: str, path_qs: str, now: float) -> str:
    """The header value for one request from `node_id`."""
    if not node_id or " " in node_id:
        raise ValueError(f"a node id is one word, got {node_id!r}")
    timestamp = str(int(now))
    return f"{VERSION} {node_id} {timestamp} {_mac(secret, node_id, timestamp, method, path_qs)}"


def grant(secret: bytes, node_id: str, path: str, expires: float) -> str:
    """The `grant` query value that lets a client GET or HEAD `path` (no query) until
    `expires` (unix seconds)."""
    if not node_id or " " in node_id:
        raise ValueError(f"a node id is one word, got {node_id!r}")
    expiry = str(int(expires))
    return f"{VERSION}.{expiry}.{_mac(secret, node_id, expiry, 'GRANT', path)}.{node_id}"


def verify_grant(secret: bytes, value: str, method: str, path: str, now: float) -> str:
    """The granting node's id, or ClusterAuthError."""
    parts = value.split(".", 3)
    if not value.isascii() or len(parts) != 4 or parts[0] != VERSION:
        raise ClusterAuthError(f"malformed grant (expected {VERSION}.EXPIRY.MAC.NODE)")
    _, expiry, mac, node_id = parts
    if method not in ("GET", "HEAD"):
        raise ClusterAuthError("a grant is for GET and HEAD only")
    if not expiry.isdigit() or now > int(expiry):
        raise ClusterAuthError("the grant has expired: ask the mirror again")
    if not hmac.compare_digest(mac, _mac(secret, node_id, expiry, "GRANT", path)):
        raise ClusterAuthError("the grant does not match this path or the cluster's secret")
    return node_id


def verify(secret: bytes, header: str | None, method: str, path_qs: str, now: float,
           window: float = WINDOW) -> str:
    """The sending node's id, or ClusterAuthError."""
    if not header:
        raise ClusterAuthError(f"no {HEADER} header: /_cluster/ is for the cluster's nodes")
    parts = header.split(" ")
    if not header.isascii() or len(parts) != 4 or parts[0] != VERSION:
        raise ClusterAuthError(f"malformed {HEADER} header (expected {VERSION} NODE TIME MAC)")
    _, node_id, timestamp, mac = parts
    if not timestamp.isdigit() or abs(now - int(timestamp)) > window:
        raise ClusterAuthError(f"{HEADER} is outside the {window:g} s window: check the "
                               "nodes' clocks")
    if not hmac.compare_digest(mac, _mac(secret, node_id, timestamp, method, path_qs)):
        raise ClusterAuthError(f"{HEADER} does not match: the nodes' secret files differ")
    return node_id
