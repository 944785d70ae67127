"""Which node owns a digest: rendezvous (highest-random-weight) hashing, pure.

Every node scores every live node for a digest with blake2b(node_id + digest) and ranks them
highest first; the first is the owner, the next ones are where a fill looks before the
upstream. Adding a node moves only the digests the new node now wins (about 1/N of them), and
each of those keeps its old owner at rank 2, so a re-pull after growing costs no upstream
bytes. Nodes that disagree about membership rank differently: that costs a duplicate fetch,
never wrong bytes (every byte is verified against its digest).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(node_id: str, digest: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node_id}{digest}".encode(), digest_size=8)
                          .digest(), "big")


def rank(node_ids: Iterable[str], digest: str) -> list[str]:
    """The nodes for `digest`, owner first (ties, all but impossible, by node_id)."""
    return sorted(set(node_ids), key=lambda n: (-score(n, digest), n))


def owner(node_ids: Iterable[str], digest: str) -> str:
    ranked = rank(node_ids, digest)
    if not ranked:
        raise ValueError("no nodes to own a digest")
    return ranked[0]
