"""`mirror purge IMAGE|REPOSITORY…`: remove images (or whole repositories) from the cache, with
what is attached to them and the blobs nothing else uses (cache/purge.py decides), while
the server runs. With `[s3]`, the purged blobs' objects are deleted from the bucket too (the
bucket is a copy of the local tier: a blob left there would be served again)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mirror.cache.eviction import pins
from mirror.cache.index import Index
from mirror.cache.purge import (
    Busy,
    NotCached,
    Pinned,
    Plan,
    Result,
    Target,
    purge_target,
)
from mirror.cache.store import BlobStore
from mirror.commands.status import human
from mirror.config import Config
from mirror.oci.reference import Digest
from mirror.oci.routing import parse_target
from mirror.runtime import open_bucket_tier, open_cache
from mirror.tiers.bounds import BucketKeeper

LOCK_WAIT = 60.0  # seconds to wait for an eviction or another purge to finish


async def purge(config: Config, targets: Sequence[str], dry_run: bool) -> int:
    """Print what each target loses (or would); returns how many could not be purged."""
    names = [u.name for u in config.upstreams]
    parsed = [Target(*parse_target(t, names)) for t in targets]
    failed = 0
    with open_cache(config) as (store, index):
        if config.s3 is not None and not dry_run:
            async with open_bucket_tier(config, store, index) as keeper:
                for target in parsed:
                    failed += not await _one(config, store, index, target, dry_run, keeper)
        else:
            for target in parsed:
                failed += not await _one(config, store, index, target, dry_run, None)
    return failed


async def _one(config: Config, store: BlobStore, index: Index, target: Target, dry_run: bool,
               keeper: BucketKeeper | None) -> bool:
    try:
        outcome = await purge_target(
            store, index, target, lambda: pins(config, index), [u.name for u in config.upstreams],
            LOCK_WAIT, dry_run, None if keeper is None else keeper.bucket.delete)
    except (Busy, NotCached, Pinned) as exc:
        print(f"mirror: purge: {exc}", file=sys.stderr)
        return False
    if outcome.result is None:
        _print_plan(outcome.plan)
        return True
    print(_summary(outcome.plan, outcome.result)
          + (f"; bucket: {outcome.deleted} objects deleted" if keeper is not None else "")
          + (f" ({outcome.failed} failed: {keeper.bucket.last_error})"
             if keeper is not None and outcome.failed else ""))
    return not outcome.failed


def _print_plan(plan: Plan) -> None:
    target = plan.target
    for tag in sorted(plan.tags):
        print(f"would remove tag {target.upstream}/{target.repository}:{tag}")
    for subject, artifact_type in sorted(plan.referrers, key=str):
        print(f"would remove the referrers answer of {subject}"
              + (f" (artifactType {artifact_type})" if artifact_type else ""))
    for kind, found in (("manifest", plan.manifests), ("blob", plan.blobs)):
        for digest, size in sorted(found.items(), key=lambda item: str(item[0])):
            print(f"would remove {kind} {digest} ({human(size)})")
    for why, kept in (("other cached images use it", plan.shared), ("pinned", plan.pinned),
                      ("being downloaded", plan.in_flight)):
        for digest in sorted(kept, key=str):
            print(f"would keep {digest}: {why}")
    print(f"would purge {target}: {len(plan.manifests)} manifests, {len(plan.blobs)} blobs "
          f"({human(plan.bytes)}), {len(plan.tags)} tags, {len(plan.referrers)} referrers "
          f"answers{_kept(plan, plan.in_flight)}"
          + (f"; up to {len(plan.bucket)} bucket objects" if plan.bucket else ""))


def _kept(plan: Plan, in_flight: set[Digest]) -> str:
    parts = [f"{n} {what}" for n, what in (
        (len(plan.shared), "used by other cached images"), (len(plan.pinned), "pinned"),
        (len(in_flight), "being downloaded")) if n]
    if plan.kept_tags:
        parts.append(f"the tags of pinned images ({', '.join(sorted(plan.kept_tags))})")
    return f"; kept {', '.join(parts)}" if parts else ""


def _summary(plan: Plan, result: Result) -> str:
    return (f"purged {plan.target}: {result.manifests} manifests, {result.blobs} blobs "
            f"({human(result.bytes)}), {result.tags} tags, {result.referrers} referrers "
            f"answers{_kept(plan, plan.in_flight | result.in_flight)}")
