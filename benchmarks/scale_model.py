"""A model of internet scale for the edge -> regional -> origin tiers: `python -m
benchmarks.scale_model [flags]`. Deterministic (fixed seed), pure Python, no network; a few
seconds. docs/scale.md explains the model, its assumptions and its limits.

The shape (defaults): 10 000 nodes in 100 sites pull a 1 GB image at once. Each site has an
edge cluster of E mirror nodes behind a load balancer; the edge clusters' upstream is a
regional cluster of R nodes, whose upstream is the origin registry. Within a cluster every
digest has one owner (the mirror's real ring, mirror.cluster.ring, is used to place the
layers), every node fetches each digest once (single-flight; a non-owner from the owner),
so one site costs the regional tier one copy of the image and the regional tier costs the
origin one copy.

Bytes are counted exactly from that. Times come from a fluid flow model: every transfer
streams (a node serves bytes while it downloads them), so a client's rate is capped by the
slowest tier in front of it; the edge cluster's egress is shared max-min fairly among its
clients, the regional egress among the sites, and clients and sites have a seeded random
spread of speeds. Published figures of other systems are printed for comparison: they are
the projects' own measurements, not ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from mirror.cluster import ring

GBIT = 1e9 / 8  # bytes/s in a Gbit/s
RESULTS = Path(__file__).resolve().parent / "results.json"

# The measured figures taken from benchmarks/results.json, and where.
SERVE_KEY = ("warm", "blob 1 GB, 8 clients", 2)
FANOUT_KEY = ("fan-in", "N=32 wall time", 2)


def key_text(key: tuple[str, str, int]) -> str:
    group, name, workers = key
    return f'results.json rows[group="{group}", name="{name}", workers={workers}].mirror'


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    clients: int = 10_000
    sites: int = 100
    image_gb: float = 1.0
    layers: int = 8
    edge_nodes: int = 4  # per site
    regional_nodes: int = 8
    client_gbit: float = 10.0  # a pulling node's NIC
    edge_gbit: float = 25.0  # an edge mirror node's NIC
    regional_gbit: float = 25.0  # a regional mirror node's NIC
    wan_gbit: float = 10.0  # a site's WAN link to the regional tier
    regional_egress_gbit: float = 100.0  # the regional tier's egress link, all sites together
    origin_gbit: float = 2.0  # the origin's rate limit for the regional tier
    serve_gbs: float = 4.05  # one mirror node's ceiling serving stored blobs, GB/s
    fanout_factor: float = 1.06  # a cold fill's wall time / a direct pull's, with clients attached
    relay_overhead: float = 0.10  # a relayed hop's throughput loss, fraction
    client_spread: float = 0.3  # sigma of a client's rate factor exp(-sigma*|Z|)
    wan_spread: float = 0.2  # the same for a site's WAN link
    hop_ms: float = 50.0  # time to first byte per tier hop (client->edge->regional->origin)
    start_spread_s: float = 0.0  # clients start uniformly within this window
    seed: int = 12

    @property
    def image(self) -> float:
        return self.image_gb * 1e9

    @property
    def per_site(self) -> list[int]:
        base, extra = divmod(self.clients, self.sites)
        return [base + (1 if s < extra else 0) for s in range(self.sites)]


@dataclass
class Outcome:
    scenario: Scenario
    origin_bytes: float
    regional_to_sites: float
    regional_relays: float
    wan_bytes_per_site: float
    edge_relays_per_site: float
    edge_node_out_max: float
    edge_node_out_mean: float
    direct_origin_bytes: float  # every node pulling from the origin itself
    stage_seconds: dict[str, float]  # each tier's time if it were the only limit
    completions: list[float]  # per pulling node, seconds since the rollout started

    def pct(self, q: float) -> float:
        xs = sorted(self.completions)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    @property
    def bottleneck(self) -> str:
        return max(self.stage_seconds, key=lambda k: self.stage_seconds[k])


# -- pieces ---------------------------------------------------------------------------------
def layer_sizes(sc: Scenario, rng: random.Random) -> list[tuple[str, float]]:
    """The image's layers: (sha256 digest, bytes), sizes seeded-random, summing to the image."""
    weights = [rng.uniform(0.2, 1.0) ** 2 for _ in range(sc.layers)]
    total = sum(weights)
    return [(f"sha256:{hashlib.sha256(rng.randbytes(32)).hexdigest()}", sc.image * w / total)
            for w in weights]


def water_fill(capacity: float, caps: Sequence[float],
               weights: Sequence[float] | None = None) -> list[float]:
    """Weighted max-min fair shares of `capacity` among flows capped at `caps`: flow i gets
    min(caps[i], weights[i] * level), the level set so the shares fill the capacity."""
    w = list(weights) if weights is not None else [1.0] * len(caps)
    order = sorted(range(len(caps)), key=lambda i: caps[i] / w[i])
    rates = [0.0] * len(caps)
    left, weight_left = capacity, sum(w)
    for k, i in enumerate(order):
        level = left / weight_left
        if caps[i] <= w[i] * level:
            rates[i] = caps[i]
            left -= caps[i]
            weight_left -= w[i]
        else:
            for j in order[k:]:
                rates[j] = w[j] * level
            break
    return rates


def ceiling(rng: random.Random, sigma: float) -> float:
    """A flow's own rate factor <= 1 (a slower disk or CPU): exp(-sigma*|Z|)."""
    return math.exp(-sigma * abs(rng.gauss(0.0, 1.0))) if sigma > 0 else 1.0


def unfairness(rng: random.Random, sigma: float) -> float:
    """A flow's weight on a contended link (TCP is not fair): exp(sigma*Z), median 1."""
    return math.exp(sigma * rng.gauss(0.0, 1.0)) if sigma > 0 else 1.0


def fluid(size: float, capacity: float, caps: list[float], weights: list[float],
          starts: list[float]) -> list[float]:
    """Completion times of flows of `size` bytes starting at `starts`, each capped at its
    cap, sharing `capacity` weighted max-min fairly (an event-driven fluid model)."""
    n = len(caps)
    done = [math.inf] * n
    left = [size] * n
    pending = sorted(range(n), key=lambda i: starts[i])
    active: list[int] = []
    t = starts[pending[0]] if pending else 0.0
    p = 0
    while p < n or active:
        while p < n and starts[pending[p]] <= t + 1e-12:
            active.append(pending[p])
            p += 1
        if not active:
            t = starts[pending[p]]
            continue
        rates = water_fill(capacity, [caps[i] for i in active], [weights[i] for i in active])
        finish = min(left[i] / r for i, r in zip(active, rates, strict=True) if r > 0)
        step = min(finish, starts[pending[p]] - t) if p < n else finish
        still = []
        for i, r in zip(active, rates, strict=True):
            left[i] -= r * step
            if left[i] <= size * 1e-9:
                done[i] = t + step
            else:
                still.append(i)
        active = still
        t += step
    return done


# -- the model ------------------------------------------------------------------------------
def run(sc: Scenario) -> Outcome:
    rng = random.Random(f"scale-{sc.seed}")
    layers = layer_sizes(sc, rng)
    e, r, s = sc.edge_nodes, sc.regional_nodes, sc.sites
    per_site = sc.per_site

    # Bytes: one fetch per digest per cluster; a non-owner fetches each digest once from
    # its owner (single-flight per node), so a cluster of k nodes relays (k-1) copies.
    origin_bytes = sc.image
    regional_to_sites = s * sc.image
    regional_relays = (r - 1) * sc.image
    edge_relays = (e - 1) * sc.image
    node_out: list[float] = []
    for site, n in enumerate(per_site):
        ids = [f"site{site}-e{j}" for j in range(e)]
        owned = dict.fromkeys(ids, 0.0)
        for digest, size in layers:
            owned[ring.owner(ids, digest)] += size
        for j, node in enumerate(ids):
            clients_here = n // e + (1 if j < n % e else 0)
            node_out.append(clients_here * sc.image + owned[node] * (e - 1))

    # Capacities (bytes/s). A node serves at most min(NIC, the measured serving ceiling);
    # a cold fill with clients attached runs at 1/fanout_factor of the link; a relayed hop
    # loses relay_overhead of its rate.
    serve = sc.serve_gbs * 1e9
    cold = 1 / sc.fanout_factor
    hop = 1 / (1 + sc.relay_overhead)
    origin_rate = min(sc.origin_gbit * GBIT, r * sc.regional_gbit * GBIT) * cold
    regional_cap = min(sc.regional_egress_gbit * GBIT,
                       r * min(sc.regional_gbit * GBIT, serve) * s / (s + r - 1))
    # The share of a site's fetches that reach a regional non-owner and are relayed:
    regional_hop = 1 / (1 + sc.relay_overhead * (r - 1) / r)
    edge_cap_node = min(sc.edge_gbit * GBIT, serve)

    latency = 3 * sc.hop_ms / 1000
    # The sites as flows of one image each over the regional egress (weighted: some sites'
    # connections get more than others), capped by their WAN link and the origin's rate:
    # every site streams the first copy as it arrives at the regional tier.
    wans = [sc.wan_gbit * GBIT * ceiling(rng, sc.wan_spread) for _ in range(s)]
    site_caps = [min(w * cold * regional_hop, origin_rate) for w in wans]
    site_w = [unfairness(rng, sc.wan_spread) for _ in range(s)]
    site_done = fluid(sc.image, regional_cap * cold * regional_hop, site_caps, site_w,
                      [latency] * s)
    completions: list[float] = []
    for site, n in enumerate(per_site):
        # The site's arrival rate, averaged over its transfer; then the hop from the layer's
        # edge owner to the other edge nodes, which (e-1)/e of the clients are behind.
        arrival = sc.image / (site_done[site] - latency)
        pipeline = arrival * (1 - (e - 1) / e * (1 - hop))
        edge_cap = e * edge_cap_node * n / (n + e - 1)  # minus the edge nodes' relays
        caps = [min(sc.client_gbit * GBIT * ceiling(rng, sc.client_spread), pipeline)
                for _ in range(n)]
        weights = [unfairness(rng, sc.client_spread) for _ in range(n)]
        starts = [latency + rng.uniform(0, sc.start_spread_s) for _ in range(n)]
        completions += fluid(sc.image, edge_cap, caps, weights, starts)

    n_max = max(per_site)
    stages = {
        "origin": sc.image / origin_rate,
        "regional egress": regional_to_sites / (regional_cap * cold * regional_hop),
        "site WAN (slowest)": sc.image / (min(wans) * cold),
        "edge egress": (n_max + e - 1) * sc.image / (e * edge_cap_node),
        "client NIC": sc.image / (sc.client_gbit * GBIT),
    }
    return Outcome(sc, origin_bytes, regional_to_sites, regional_relays, sc.image,
                   edge_relays, max(node_out), statistics.fmean(node_out),
                   sc.clients * sc.image, stages, completions)


# -- published figures (NOT our measurements) and our model in the same shapes ---------------
@dataclass(frozen=True)
class Published:
    system: str
    shape: str
    figure: str
    p50: float | None
    p99: float | None
    source: str
    scenario: Scenario  # our design in the same shape


def published(base: Scenario) -> list[Published]:
    one_site = replace(base, sites=1, regional_nodes=3, wan_gbit=100.0,
                       regional_egress_gbit=100.0, origin_gbit=10.0, wan_spread=0.0)
    return [
        Published(
            "Uber Kraken (P2P)",
            "3 GB image (2 layers), 2 600 hosts at once, 300 MB/s limit per agent, "
            "5 trackers + 5 origins",
            "p50 10 s, p99 18 s, p99.9 22 s", 10.0, 18.0,
            "github.com/uber/kraken README, 'Benchmark'",
            replace(one_site, name="kraken shape", clients=2600, image_gb=3.0, layers=2,
                    edge_nodes=5, client_gbit=300e6 * 8 / 1e9),
        ),
        Published(
            "Dragonfly (P2P)",
            "200 MB file, clients 200 Mb/s, 2 servers at 2 000 Mb/s; time stays ~12 s "
            "as clients grow (graph up to 1 200)",
            "~12 s for all clients", 12.0, None,
            "github.com/dragonflyoss/Dragonfly README (v0.4 era), 'Comparison'",
            replace(one_site, name="dragonfly shape", clients=1200, image_gb=0.2, layers=1,
                    edge_nodes=2, edge_gbit=2.0, client_gbit=0.2),
        ),
        Published(
            "Spegel (P2P, per node)",
            "1 GB image (4 layers), 50 AKS Standard_D4ds_v5 nodes, daemonset v1->v2, "
            "disk ~250 MB/s",
            "average 5.1 s (baseline without Spegel 7.3 s)", 5.125, None,
            "github.com/spegel-org/spegel docs/BENCHMARK.md (v0.0.27)",
            replace(one_site, name="spegel shape", clients=50, image_gb=1.0, layers=4,
                    edge_nodes=3, edge_gbit=12.5, client_gbit=2.0),
        ),
    ]


# -- inputs ---------------------------------------------------------------------------------
def measured(path: Path) -> tuple[dict[str, float], list[str]]:
    """Scenario fields taken from a results.json, and a line saying where each came from."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, [f"{path}: not read ({type(exc).__name__}); defaults used"]

    def find(key: tuple[str, str, int]) -> float | None:
        for row in doc.get("rows", []):
            if (row.get("group"), row.get("name"), row.get("workers")) == key:
                v = row.get("mirror")
                return float(v) if isinstance(v, int | float) else None
        return None

    got: dict[str, float] = {}
    notes = []
    serve = find(SERVE_KEY)
    if serve:
        got["serve_gbs"] = serve
        notes.append(f"serve_gbs = {serve:.2f} GB/s: {key_text(SERVE_KEY)} "
                     f"(stored 1 GB blob, 8 clients, loopback; generated {doc.get('generated')})")
    fan = find(FANOUT_KEY)
    if fan:
        got["fanout_factor"] = fan
        notes.append(f"fanout_factor = {fan:.3f}: {key_text(FANOUT_KEY)} "
                     "(32 clients attached to one cold fill, wall time / a direct pull)")
    notes.append("relay_overhead: not measured yet (no cluster relay row in results.json); "
                 "a flag, default 10 %")
    return got, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Scenario()
    for f in fields(Scenario):
        if f.name == "name":
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=None, help=f"default {getattr(defaults, f.name)}")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="results.json to take serve_gbs and fanout_factor from")
    p.add_argument("--no-results", action="store_true",
                   help="ignore results.json: the defaults above only")
    return p.parse_args(argv)


# -- output ---------------------------------------------------------------------------------
def _bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip()
              for b in body]
    return "\n".join(lines)


def report(o: Outcome) -> str:
    sc = o.scenario
    rows = [
        ["origin egress", _bytes(o.origin_bytes),
         f"{_bytes(o.direct_origin_bytes)} if every node pulled from the origin "
         f"({o.direct_origin_bytes / o.origin_bytes:,.0f}x more)"],
        ["regional egress to sites", _bytes(o.regional_to_sites), f"{sc.sites} sites x image"],
        ["regional relays (internal)", _bytes(o.regional_relays),
         f"{sc.regional_nodes - 1} non-owners x image"],
        ["WAN per site", _bytes(o.wan_bytes_per_site), "one copy per site"],
        ["edge relays per site (internal)", _bytes(o.edge_relays_per_site),
         f"{sc.edge_nodes - 1} non-owners x image"],
        ["per edge node egress, max / mean",
         f"{_bytes(o.edge_node_out_max)} / {_bytes(o.edge_node_out_mean)}",
         f"{sc.clients // sc.sites // sc.edge_nodes} clients each + owned layers to peers"],
    ]
    for stage, sec in o.stage_seconds.items():
        rows.append([f"time if only {stage} limited", f"{sec:.1f} s",
                     "<- bottleneck" if stage == o.bottleneck else ""])
    rows += [
        ["rollout p50 / p99 / max",
         f"{o.pct(50):.1f} / {o.pct(99):.1f} / {max(o.completions):.1f} s",
         f"over {len(o.completions)} nodes, fluid model with spread"],
    ]
    return _table(["quantity", "value", "note"], rows)


def scenario_line(sc: Scenario) -> str:
    return (f"{sc.clients} nodes in {sc.sites} sites, {sc.image_gb:g} GB image in {sc.layers} "
            f"layers; edge {sc.edge_nodes} x {sc.edge_gbit:g} Gbit/s per site, regional "
            f"{sc.regional_nodes} x {sc.regional_gbit:g} Gbit/s, regional egress "
            f"{sc.regional_egress_gbit:g} Gbit/s, WAN {sc.wan_gbit:g} Gbit/s per site, origin "
            f"{sc.origin_gbit:g} Gbit/s, client NIC {sc.client_gbit:g} Gbit/s; serving ceiling "
            f"{sc.serve_gbs:.2f} GB/s per node, fan-out {sc.fanout_factor:.3f}, relay overhead "
            f"{sc.relay_overhead:.0%}, spreads {sc.client_spread:g}/{sc.wan_spread:g}, "
            f"{sc.hop_ms:g} ms per hop, seed {sc.seed}")


def comparison(base: Scenario) -> str:
    body = []
    for pub in published(base):
        sc = pub.scenario
        o = run(sc)
        ours = f"{o.pct(50):.1f} / {o.pct(99):.1f} s ({sc.edge_nodes} x {sc.edge_gbit:g} Gbit/s)"
        need, grown = "n/a", ""
        if pub.p50:
            # the edge nodes whose egress alone would serve every client in their p50
            n = math.ceil(sc.clients * sc.image / (pub.p50 * min(sc.edge_gbit * GBIT,
                                                                 sc.serve_gbs * 1e9)))
            g = run(replace(sc, edge_nodes=n))
            need, grown = str(n), f"{g.pct(50):.1f} / {g.pct(99):.1f} s"
        body.append([pub.system, pub.figure, ours, need, grown])
    table = _table(["system (published, NOT ours)", "their figure",
                    "our model, same shape: p50 / p99", "edge nodes for their p50",
                    "with those: p50 / p99"], body)
    notes = [f"  - {p.system}: {p.shape}. Source: {p.source}, as published by the project."
             for p in published(base)]
    return table + "\n\nShapes and sources (their figures are theirs, not measured here):\n" \
        + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    if not args.no_results:
        got, notes = measured(args.results)
        overrides.update(got)
    for f in fields(Scenario):
        v = getattr(args, f.name, None)
        if f.name != "name" and v is not None:
            overrides[f.name] = v
            notes.append(f"{f.name} = {v} (flag)")
    base = replace(Scenario(), **overrides)
    print("Scenario: " + scenario_line(base))
    print("Inputs:\n" + "\n".join(f"  - {n}" for n in notes))
    print()
    print(report(run(base)))
    print()
    print(comparison(base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
