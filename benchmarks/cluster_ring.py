"""Figure F2, membership: what growing a cluster from 3 to 4 nodes does to the ring.

`python -m benchmarks ring` (a group of `make bench`, no root needed) or
`python -m benchmarks.cluster_ring` on its own. Uses the mirror's own ring
(`mirror.cluster.ring`) on 10 000 random sha256 digests (fixed seed):

* the fraction of digests whose owner moves when a fourth node joins (ideal 1/4; the group
  fails beyond 25 % +- 2 points),
* every moved digest must move to the new node, and its old owner must be rank 2 on the new
  ring (so the new owner's peer fill finds it there and costs no upstream bytes); the group
  fails otherwise,
* how evenly the 4 nodes share the digests (largest share / smallest),
* owner lookups per second on 4 and 16 nodes against an anchor of one plain
  `hashlib.blake2b(digest, digest_size=8)` per call: a lookup scores every node (one
  blake2b each) and sorts them, so the ratio is about 1/N or a bit below.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mirror.cluster import ring

from .report import Row, render_table
from .scenarios import Ctx

SEED = 12
DIGESTS = 10_000
TOLERANCE_POINTS = 2.0


def random_digests(count: int = DIGESTS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [f"sha256:{hashlib.sha256(rng.randbytes(32)).hexdigest()}" for _ in range(count)]


def node_ids(n: int) -> list[str]:
    return [f"m{i}" for i in range(1, n + 1)]


@dataclass
class Membership:
    digests: int
    old_nodes: int
    new_node: str
    moved: int
    moved_elsewhere: int  # moved, but not to the new node
    old_owner_not_rank2: int  # moved, but the old owner is not second on the new ring
    shares: dict[str, int]  # digests owned per node on the new ring

    @property
    def moved_fraction(self) -> float:
        return self.moved / self.digests

    @property
    def ideal_fraction(self) -> float:
        return 1 / (self.old_nodes + 1)

    @property
    def balance(self) -> float:
        """Largest share / smallest share on the new ring (1.0: perfectly even)."""
        return max(self.shares.values()) / max(min(self.shares.values()), 1)


def membership(digests: list[str], old_nodes: int = 3) -> Membership:
    """Grow the ring from `old_nodes` to `old_nodes + 1` and check where the digests go."""
    before_ids = node_ids(old_nodes)
    after_ids = node_ids(old_nodes + 1)
    new = after_ids[-1]
    moved = elsewhere = not_rank2 = 0
    shares: Counter[str] = Counter()
    for d in digests:
        old_owner = ring.owner(before_ids, d)
        after = ring.rank(after_ids, d)
        shares[after[0]] += 1
        if after[0] == old_owner:
            continue
        moved += 1
        if after[0] != new:
            elsewhere += 1
        if after[1] != old_owner:
            not_rank2 += 1
    return Membership(len(digests), old_nodes, new, moved, elsewhere, not_rank2,
                      {n: shares[n] for n in after_ids})


def _rate(fn: Callable[[str], object], digests: list[str], seconds: float) -> float:
    """Calls per second of fn over the digests, cycling until `seconds` have passed."""
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for d in digests:
            fn(d)
        calls += len(digests)
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - started)


def _blake2b(digest: str) -> bytes:
    return hashlib.blake2b(digest.encode(), digest_size=8).digest()


def lookup_rates(digests: list[str], nodes: int, rounds: int = 3,
                 seconds: float = 0.3) -> tuple[float, float]:
    """(owner lookups/s, anchor blake2b calls/s): best of `rounds` interleaved rounds, so
    load from elsewhere on the machine hits both alike."""
    ids = node_ids(nodes)
    sample = digests[:1000]

    def lookup(d: str) -> str:
        return ring.owner(ids, d)

    best_lookup = best_anchor = 0.0
    for _ in range(rounds):
        best_lookup = max(best_lookup, _rate(lookup, sample, seconds))
        best_anchor = max(best_anchor, _rate(_blake2b, sample, seconds))
    return best_lookup, best_anchor


def ring_rows(quick: bool = False) -> list[Row]:
    """The group's rows. Raises RuntimeError (after building them) if the membership
    property does not hold; the caller appends the rows first."""
    digests = random_digests()
    m = membership(digests)
    label = f"{m.old_nodes}->{m.old_nodes + 1} nodes, {m.digests} digests"
    pct = 100 * m.moved_fraction
    ideal = 100 * m.ideal_fraction
    rows = [
        Row("ring", f"{label}: owner moved", "%", pct, "ideal 1/N", ideal,
            None, None, extra={"seed": SEED, "moved": m.moved}),
        Row("ring", f"{label}: moved, off 1/N by", "points", abs(pct - ideal), "tolerance",
            TOLERANCE_POINTS, None, ("mirror<=", TOLERANCE_POINTS)),
        Row("ring", f"{label}: moved not to {m.new_node}", "digests", m.moved_elsewhere,
            "ideal", 0, None, ("mirror<=", 0)),
        Row("ring", f"{label}: old owner not rank 2", "digests", m.old_owner_not_rank2,
            "ideal", 0, None, ("mirror<=", 0),
            note="" if m.old_owner_not_rank2 == 0 else "a peer fill would go upstream"),
        Row("ring", f"{m.old_nodes + 1} nodes: largest / smallest share", "x", m.balance,
            "ideal", 1.0, None, None, extra={"shares": m.shares}),
    ]
    rounds, seconds = (2, 0.15) if quick else (3, 0.3)
    for n in (4, 16):
        lookups, anchor = lookup_rates(digests, n, rounds, seconds)
        rows.append(Row("ring", f"owner lookups, {n} nodes", "lookups/s", lookups,
                        "blake2b per call", anchor, None, None,
                        note="" if n > 4 else "a lookup hashes every node and sorts"))
    failures = []
    if abs(pct - ideal) > TOLERANCE_POINTS:
        failures.append(f"{pct:.2f} % of owners moved, ideal {ideal:.0f} % "
                        f"+- {TOLERANCE_POINTS:g} points")
    if m.moved_elsewhere:
        failures.append(f"{m.moved_elsewhere} moved digests went to an old node")
    if m.old_owner_not_rank2:
        failures.append(f"{m.old_owner_not_rank2} moved digests lost their old owner at rank 2")
    if failures:
        raise MembershipBroken("; ".join(failures), rows)
    return rows


class MembershipBroken(RuntimeError):
    def __init__(self, message: str, rows: list[Row]) -> None:
        super().__init__(message)
        self.rows = rows


def bench_ring(ctx: Ctx) -> None:
    """The `ring` group of `python -m benchmarks`: pure computation, no servers."""
    try:
        ctx.rows.extend(ring_rows(ctx.opts.quick))
    except MembershipBroken as exc:
        ctx.rows.extend(exc.rows)
        raise


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    try:
        rows = ring_rows(quick)
    except MembershipBroken as exc:
        print(render_table(exc.rows))
        print(f"\nmembership broken: {exc}", file=sys.stderr)
        return 1
    print(render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
