"""`mirror sync [--rule NAME] [--dry-run]`: run `[[sync]]` rules once, in the foreground,
through the same proxy and single-flight downloads a client pull uses (so it cooperates
with a running server; a rule the server is running is skipped, never run twice at once)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm import tqdm

from mirror.cache.locks import lock_problem
from mirror.config import Config, SyncConfig
from mirror.pull.sync import RunResult, lock_name, new_run, run_locked
from mirror.runtime import Mirror, open_mirror


async def sync(config: Config, names: Sequence[str], dry_run: bool) -> int:
    """Exit status: 0 when every rule ran and failed nothing, 1 otherwise, 2 for a rule
    that is not configured."""
    rules = [r for r in config.syncs if not names or r.name in names]
    unknown = sorted(set(names) - {r.name for r in config.syncs})
    if unknown:
        known = ", ".join(r.name for r in config.syncs) or "none"
        print(f"mirror: sync: no [[sync]] rule named {unknown[0]!r} (configured: {known})",
              file=sys.stderr)
        return 2
    if not rules:
        print(f"mirror: sync: {config.path} has no [[sync]] rules", file=sys.stderr)
        return 2
    status = 0
    async with open_mirror(config) as mirror:
        for rule in rules:
            status = max(status, await _one(mirror, rule, dry_run))
    return status


async def _one(mirror: Mirror, rule: SyncConfig, dry_run: bool) -> int:
    with tqdm(total=0, unit="blob", desc=rule.name, disable=not sys.stderr.isatty()) as bar:
        run = new_run(rule, mirror.proxy, mirror.sources, mirror.store, mirror.index, bar,
                      dry_run)
        if run is None:
            print(f"mirror: sync: {rule.name}: offline mode: nothing can be fetched",
                  file=sys.stderr)
            return 1
        lock = mirror.store.lock_path(lock_name(rule))
        result = await run_locked(rule, run, mirror.index, lock)
    if result is None:
        problem = lock_problem(lock)
        print(f"mirror: sync: {rule.name}: " + (
            "running in another process (the server); skipped" if problem is None else
            f"its lock file cannot be made ({problem}): the cache dir is read-only or full; "
            "nothing ran"), file=sys.stderr)
        return 1
    _report(result, dry_run)
    return 0 if result.ok else 1


def _report(result: RunResult, dry_run: bool) -> None:
    verb = "would cache" if dry_run else "cached"
    for image in result.cached:
        print(f"{result.rule}: {verb} {image}")
    for image in result.dropped:
        print(f"{result.rule}: no longer selected (unpinned): {image}")
    for what, why in result.failed:
        print(f"mirror: sync: {result.rule}: {what}: {why}", file=sys.stderr)
    print(f"{result.rule}: {result.summary()}" + (" (dry run: nothing changed)"
                                                  if dry_run else ""))
