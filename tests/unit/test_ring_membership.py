"""Membership changes on the ring (figure F2 of benchmarks/cluster_ring.py) as a correctness
property: 10 000 random sha256 digests from a fixed seed, the mirror's own ring code."""

from __future__ import annotations

import hashlib
import random

import pytest

from mirror.cluster import ring

SEED = 12
_rng = random.Random(SEED)
DIGESTS = [f"sha256:{hashlib.sha256(_rng.randbytes(32)).hexdigest()}" for _ in range(10_000)]


def nodes(n: int) -> list[str]:
    return [f"m{i}" for i in range(1, n + 1)]


def test_growing_3_to_4_nodes_moves_a_quarter_all_to_the_new_node_old_owner_rank_2() -> None:
    before = {d: ring.owner(nodes(3), d) for d in DIGESTS}
    after = {d: ring.rank(nodes(4), d) for d in DIGESTS}
    moved = [d for d in DIGESTS if after[d][0] != before[d]]
    assert abs(100 * len(moved) / len(DIGESTS) - 25.0) <= 2.0
    assert all(after[d][0] == "m4" for d in moved)
    # a peer fill by the new owner finds the digest on its old owner: no upstream bytes
    assert all(after[d][1] == before[d] for d in moved)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_growing_n_to_n_plus_1_moves_1_over_n_plus_1(n: int) -> None:
    sample = DIGESTS[:4000]
    moved = [d for d in sample if ring.owner(nodes(n + 1), d) != ring.owner(nodes(n), d)]
    assert abs(len(moved) / len(sample) - 1 / (n + 1)) <= 0.03
    assert all(ring.owner(nodes(n + 1), d) == f"m{n + 1}" for d in moved)


def test_removing_a_node_moves_only_its_digests_to_their_rank_2() -> None:
    sample = DIGESTS[:4000]
    gone = "m2"
    for d in sample:
        ranked = ring.rank(nodes(4), d)
        left = ring.owner([n for n in nodes(4) if n != gone], d)
        assert left == (ranked[1] if ranked[0] == gone else ranked[0])
