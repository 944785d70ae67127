"""Sync rules (`[[sync]]`): the images a site will need, cached before it needs them.

A run of a rule lists each repository's tags (paginated `tags/list`), asks the upstream what
every selected tag names now with one HEAD, and caches through the proxy (so through the
same single-flight downloads a client's pull uses) only the images it does not already hold
whole. What it cached is recorded per rule (`upstream/repository:tag` → digest): the next
run skips those, a `pin = true` rule keeps them from eviction (cache/eviction.py `pins`),
and a tag the rule no longer selects drops out. Pins follow the rule as configured now
(eviction.py `rule_pins`): a reload narrowing its repositories or tags, setting pin = false
or removing it unpins what it no longer selects at once, whatever its next run does.

The server runs every rule every `interval` in one worker at a time (a flock per rule, which
`mirror sync` takes too, so a rule never runs twice at once); a failed run is tried again
the next interval, and a rule a reload changed is run at the next check. A run the server
started stops before its next image when a reload removed or changed its rule (the image it
is caching, and every client download it shares, goes on to the end; what the rule held and
still selects stays held until a run of the new rule decides), and the scheduler takes each
rule from the running configuration just before it runs it, so a rule removed during
another's run never starts.
An upstream's 429 is waited out (its Retry-After) and the step retried.

What the upstream lists is not trusted: names and tags outside the OCI grammar are skipped
(a catalog's `team/../secret` must not pass a pattern the deny rules would refuse), a `Link`
that comes back to a page already read ends the list, and the tags regex runs with a time
limit per tag (the `regex` engine's), so a catastrophic pattern fails the rule, not the
worker. A repository whose list could not be read keeps what the rule held for it, pinned
while the rule selects it: a failed run never unpins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from mirror import metrics
from mirror.cache.index import Index
from mirror.cache.locks import is_locked, try_exclusive
from mirror.cache.store import StorageFailed
from mirror.config import TAG_MATCH_SECONDS, SyncConfig
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import validate_name, validate_tag
from mirror.oci.rules import Pattern
from mirror.pull.content import ContentStore
from mirror.pull.images import (
    ACCEPT_ALL,
    Counter,
    Progress,
    cache_image,
    default_platform,
    is_complete,
)
from mirror.pull.proxy import Denied, Proxy
from mirror.pull.source import Relayed, Source

log = logging.getLogger("mirror.sync")

PAGE = 1000  # tags asked for per tags/list page
MAX_PAGES = 100  # a repository's tags read at most (100 000: a hostile list ends)
RATE_LIMIT_TRIES = 5  # a step refused with 429 this many times fails the image
MAX_RATE_WAIT = 300.0  # seconds waited at most for one 429's Retry-After
# how often the server looks for a rule that is due (the tests: less)
CHECK_SECONDS = float(os.environ.get("MIRROR_SYNC_CHECK_SECONDS", "5"))
T = TypeVar("T")


@dataclass
class RunResult:
    """What one run of a rule did (or, with `dry_run`, would do)."""

    rule: str
    selected: int = 0  # tags the rule selects
    cached: list[str] = field(default_factory=list)  # images cached (or to be) this run
    blobs: int = 0  # blobs those needed (most already stored by other images)
    dropped: list[str] = field(default_factory=list)  # no longer selected: unpinned
    failed: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    stopped: str | None = None  # why the run stopped before its last image (a reload)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (f"{self.selected} tags selected, {len(self.cached)} images cached, "
                f"{len(self.dropped)} no longer selected")
        if self.failed:
            what, why = self.failed[0]
            text += f"; {len(self.failed)} failed (first: {what}: {why})"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        return text


def platforms_of(rule: SyncConfig) -> Sequence[str] | None:
    return [default_platform()] if rule.platforms == () else rule.platforms


def literal_name(pattern: Pattern) -> str | None:
    """The repository a pattern without wildcards names (library/ added on Docker Hub as
    routing adds it), None for a pattern."""
    if "*" in pattern.text:
        return None
    for candidate in (pattern.text, f"library/{pattern.text}"):
        if pattern.matches(candidate):
            return candidate
    return None


def next_page(link: str | None) -> str | None:
    """The `last` of a `Link: <…?last=x&n=…>; rel="next"` header (pure)."""
    if not link or 'rel="next"' not in link:
        return None
    target = link.partition("<")[2].partition(">")[0]
    values = parse_qs(urlsplit(target).query).get("last")
    return values[0] if values else None


class RuleRun:
    """One run of one rule over the proxy and the rule's upstream source."""

    def __init__(self, rule: SyncConfig, proxy: Proxy, source: Source, store: ContentStore,
                 index: Index, progress: Progress, dry_run: bool = False,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rule, self.proxy, self.source = rule, proxy, source
        self.store, self.index, self.progress = store, index, progress
        self.dry_run, self.sleep = dry_run, sleep
        # The rule as the running configuration has it now (None: removed); the scheduler
        # sets it, so a reload stops its run between images. None: never superseded.
        self.current: Callable[[], SyncConfig | None] | None = None
        self.result = RunResult(rule.name)
        self._unlisted: set[str] = set()  # repositories whose tags could not be read
        self._catalog_failed = False  # so the patterns' repositories are not known

    async def run(self) -> RunResult:
        done = self.index.synced(self.rule.name)
        kept: dict[str, str] = {}
        selected = await self._selected()
        self.result.selected = len(selected)
        for image, (repository, tag) in selected.items():
            if (why := self._superseded()) is not None:
                self.result.stopped = why
                log.info("sync: a reload changed the rule, its run stops", extra={
                    "rule": self.rule.name, "stopped": why})
                if not self.dry_run:  # what it held stays held: the next run decides
                    self.index.set_synced(self.rule.name, {**done, **kept})
                return self.result
            digest = await self._image(image, repository, tag, done.get(image))
            if digest is not None:
                kept[image] = digest
        unknown = {image: digest for image, digest in done.items()
                   if image not in selected and self._unknown(image)}
        kept.update(unknown)  # not listed this run: still held (and pinned)
        self.result.dropped = sorted(done.keys() - selected.keys() - unknown.keys())
        if not self.dry_run:
            self.index.set_synced(self.rule.name, kept)
        return self.result

    def _superseded(self) -> str | None:
        """Why this run should stop now (its rule removed or changed by a reload), or None."""
        if self.current is None:
            return None
        now = self.current()
        if now is None:
            return "the rule was removed by a reload"
        if fingerprint(now) != fingerprint(self.rule):
            return "the rule was changed by a reload: the new rule runs next"
        return None

    def _unknown(self, image: str) -> bool:
        """Whether this run could not say if the rule still selects `image` (a held
        `upstream/repository:tag`): its repository's list failed, or the catalog did."""
        repository = image[len(self.source.name) + 1:].rpartition(":")[0]
        if repository in self._unlisted:
            return True
        literal = {literal_name(p) for p in self.rule.repositories}
        return self._catalog_failed and repository not in literal

    async def _selected(self) -> dict[str, tuple[str, str]]:
        """`upstream/repository:tag` → (repository, tag), for every tag the rule selects."""
        found: dict[str, tuple[str, str]] = {}
        for repository, named in await self._repositories():
            try:
                tags = await self._pages(functools.partial(
                    self.proxy.relay, self.source, repository, "tags/list"), "tags")
            except RegistryError as exc:
                if isinstance(exc, Denied) and not named:
                    continue  # a pattern's repository the rules deny: not the rule's
                self._unlisted.add(repository)
                self.result.failed.append((f"{self.source.name}/{repository}", exc.message))
                continue
            for tag in self._matching(repository, tags):
                found[f"{self.source.name}/{repository}:{tag}"] = (repository, tag)
        return found

    def _matching(self, repository: str, tags: list[str]) -> list[str]:
        """The tags the rule's regex selects, of those that are tags at all."""
        matching = []
        for tag in tags:
            try:
                validate_tag(tag)
                if self.rule.tags.search(tag, timeout=TAG_MATCH_SECONDS):
                    matching.append(tag)
            except RegistryError:
                continue  # not an OCI tag: nothing a client could pull by it
            except TimeoutError:
                self._unlisted.add(repository)
                self.result.failed.append((f"{self.source.name}/{repository}", (
                    f"the tags regex {self.rule.tags_text!r} took over {TAG_MATCH_SECONDS}s on "
                    f"tag {tag!r}: simplify it (no nested repetition like (a+)+)")))
                return []
        return matching

    async def _repositories(self) -> list[tuple[str, bool]]:
        """(repository, named by the rule rather than matched by a pattern)."""
        names = [literal_name(p) for p in self.rule.repositories]
        found = [(name, True) for name in names if name is not None]
        patterns = [p for p, name in zip(self.rule.repositories, names, strict=True)
                    if name is None]
        if patterns:
            try:
                listed = await self._pages(functools.partial(
                    self.source.relay, "", "_catalog"), "repositories")
            except RegistryError as exc:
                self.result.failed.append((", ".join(p.text for p in patterns), "the "
                                           f"upstream's catalog: {exc.message} (patterns "
                                           "need /v2/_catalog: name the repositories)"))
                self._catalog_failed, listed = True, []
            named = {name for name, _ in found}
            found += [(r, False) for r in listed if r not in named and _is_name(r)
                      and any(p.matches(r) for p in patterns)]
        return found

    async def _pages(self, get: Callable[[dict[str, str], ErrorCode], Awaitable[Relayed]],
                     key: str) -> list[str]:
        """Every page of a tags list or the catalog, following `Link` (bounded)."""
        items: list[str] = []
        last: str | None = None
        asked: set[str] = set()
        for _ in range(MAX_PAGES):
            query = {"n": str(PAGE), **({"last": last} if last else {})}
            answer = await self._patient(functools.partial(get, query, ErrorCode.NAME_UNKNOWN))
            page = _page(answer.body, key)
            items += page
            last = next_page(answer.headers.get("Link"))
            if last is None or not page or last in asked:  # a Link back: the list is read
                return items
            asked.add(last)
        log.warning("sync: a list past its bound, the rest not read", extra={
            "rule": self.rule.name, "list": key, "items": len(items)})
        return items

    async def _image(self, image: str, repository: str, tag: str, had: str | None
                     ) -> str | None:
        """The digest the rule holds for the tag after this run (None: none)."""
        try:
            answer = await self._patient(lambda: self.proxy.resolve_tag(
                self.source, repository, tag, ACCEPT_ALL))
            digest = answer.digest
            if had == str(digest) and is_complete(self.store, digest, platforms_of(self.rule)):
                return had
            self.result.cached.append(image)
            if self.dry_run:
                return had
            self.result.blobs += await self._patient(lambda: cache_image(
                self.proxy, self.source, repository, digest, platforms_of(self.rule),
                self.progress, self.rule.referrers))
            return str(digest)
        except RegistryError as exc:
            self.result.failed.append((image, exc.message))
        except (StorageFailed, OSError) as exc:
            self.result.failed.append((image, f"the cache disk could not store it (full or "
                                       f"read-only?): {exc}; free space in the cache dir"))
        return had  # what it held stays held (and pinned) until the new one is whole

    async def _patient(self, step: Callable[[], Awaitable[T]]) -> T:
        """`step`, with an upstream's 429 waited out (its Retry-After, bounded)."""
        for attempt in range(RATE_LIMIT_TRIES):
            try:
                return await step()
            except RegistryError as exc:
                if exc.code is not ErrorCode.TOOMANYREQUESTS or attempt == RATE_LIMIT_TRIES - 1:
                    raise
                wait = _retry_after(exc.headers)
                log.info("sync: rate limited by the upstream, waiting", extra={
                    "rule": self.rule.name, "upstream": self.source.name, "seconds": wait})
                await self.sleep(wait)
        raise AssertionError("unreachable")


def _retry_after(headers: Mapping[str, str] | None) -> float:
    try:
        return min(MAX_RATE_WAIT, max(1.0, float((headers or {}).get("Retry-After", "30"))))
    except ValueError:
        return 30.0


def _is_name(repository: str) -> bool:
    try:
        validate_name(repository)
    except RegistryError:
        return False
    return True


def _page(body: bytes, key: str) -> list[str]:
    """The `tags` of a tags list page, the `repositories` of a catalog page."""
    try:
        items = json.loads(body).get(key) or []
    except (ValueError, AttributeError):
        raise RegistryError(ErrorCode.UPSTREAM_UNAVAILABLE,
                            f"the upstream's list of {key} is not JSON") from None
    if not isinstance(items, list):
        raise RegistryError(ErrorCode.UPSTREAM_UNAVAILABLE, f"the upstream's list of {key} "
                            "is not a list")
    return [t for t in items if isinstance(t, str)]


# running rules: by the server on their interval, by `mirror sync` at once ------------------
def lock_name(rule: SyncConfig) -> str:
    return f"sync-{rule.name}"


def is_running(rule: SyncConfig, lock_path: Callable[[str], Path]) -> bool:
    """Whether a run of the rule is alive in any process (its lock is held): a state that
    says "running" without one is a run cut short."""
    return is_locked(lock_path(lock_name(rule)))


def fingerprint(rule: SyncConfig) -> str:
    """What a run of the rule selects and keeps (its interval aside): a change is run now."""
    what = (rule.upstream, [p.text for p in rule.repositories], rule.tags_text,
            rule.platforms, rule.pin, rule.referrers)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:16]


def is_due(state: Mapping[str, Any], rule: SyncConfig, now: float) -> bool:
    """A rule never run, or changed since its last run, is due; so is one whose last run
    never finished (the server stopped or was killed under it: its lock is free again, so
    it is run again at start, not an interval later); else `interval` after its last run
    started (so a failed run is tried again the next interval, and a changed interval
    applies at once). While another process runs the rule it looks due too: its lock says
    no."""
    return now >= next_run(state, rule, now, running=False)


def next_run(state: Mapping[str, Any], rule: SyncConfig, now: float, running: bool) -> float:
    """When the scheduler starts the rule next, as is_due decides (for the status page): `now`
    (its next check) for a rule never run, changed since its last run or cut short; else
    `interval` after its last run started, with the interval configured now."""
    started = state.get("started")
    if (started is None or state.get("rule") != fingerprint(rule)
            or ("running" in state and not running)):
        return now
    return float(started) + rule.interval


async def run_locked(rule: SyncConfig, run: RuleRun, index: Index, lock: Path,
                     due: Callable[[Mapping[str, Any]], bool] = lambda state: True
                     ) -> RunResult | None:
    """Run under the rule's lock, recording the run (not a dry one) in the index; None when
    another process holds the lock, or `due` says the state it finds is not due."""
    with try_exclusive(str(lock)) as mine:
        if not mine or not due(index.sync_state(rule.name)):
            return None
        return await run_held(rule, run, index)


async def run_held(rule: SyncConfig, run: RuleRun, index: Index) -> RunResult:
    """The run, its lock already taken by the caller (the cache browser takes it before it
    answers "started", so that of two requests at once one only is told so)."""
    state = index.sync_state(rule.name)
    started = time.time()
    if not run.dry_run:
        index.set_sync_state(rule.name, {**state, "started": started, "running": os.getpid(),
                                         "rule": fingerprint(rule)})
    try:
        result = await run.run()
    except Exception as exc:  # a bug or the disk: recorded, tried again next interval
        log.exception("sync: a run failed", extra={"rule": rule.name})
        result = RunResult(rule.name, failed=[(rule.name, f"{type(exc).__name__}: {exc}")])
    if not run.dry_run:
        _record(rule, index, state, started, result)
    return result


def _record(rule: SyncConfig, index: Index, state: Mapping[str, Any], started: float,
            result: RunResult) -> None:
    finished = time.time()
    whole = result.ok and result.stopped is None  # a stopped run is no success to show
    index.set_sync_state(rule.name, {
        "started": started, "finished": finished, "ok": result.ok, "rule": fingerprint(rule),
        "summary": result.summary(), "cached": len(result.cached),
        "last_ok": finished if whole else state.get("last_ok")})
    metrics.SYNC_RUNS.labels(rule.name, "stopped" if result.stopped and result.ok else
                             "ok" if result.ok else "failed").inc()
    if whole:
        metrics.SYNC_LAST_OK.labels(rule.name).set(finished)
    log.log(logging.INFO if result.ok else logging.WARNING, "sync: run finished", extra={
        "rule": rule.name, "ok": result.ok, "selected": result.selected,
        "cached": len(result.cached), "blobs": result.blobs, "dropped": len(result.dropped),
        "failed": len(result.failed), "seconds": round(finished - started, 3),
        **({"stopped": result.stopped} if result.stopped else {}),
        **({"error": f"{result.failed[0][0]}: {result.failed[0][1]}"} if result.failed
           else {})})


class Scheduler:
    """In each serving worker: every CHECK_SECONDS, each rule that is due is run by the
    worker that takes its lock first (the others find it held, or no longer due). Each rule
    is taken from `rules()` just before its turn (a reload during another rule's run
    applies to it), and its run stops between images once `rules()` no longer has it as
    it started."""

    def __init__(self, rules: Callable[[], Sequence[SyncConfig]],
                 make_run: Callable[[SyncConfig], RuleRun | None], index: Index,
                 lock_path: Callable[[str], Path]) -> None:
        self.rules, self.make_run = rules, make_run
        self.index, self.lock_path = index, lock_path
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            for name in [r.name for r in self.rules()]:
                rule = self.current(name)
                if rule is not None:  # else removed by a reload during an earlier run
                    await self.tick(rule)
            await asyncio.sleep(CHECK_SECONDS)

    def current(self, name: str) -> SyncConfig | None:
        """The rule named `name` in the running configuration (None: not there now)."""
        return next((r for r in self.rules() if r.name == name), None)

    async def tick(self, rule: SyncConfig) -> RunResult | None:
        def due(state: Mapping[str, Any]) -> bool:
            return is_due(state, rule, time.time())

        try:
            if not due(self.index.sync_state(rule.name)):
                return None
            run = self.make_run(rule)
            if run is None:  # its upstream gone by a reload, or offline
                return None
            run.current = functools.partial(self.current, rule.name)
            return await run_locked(rule, run, self.index, self.lock_path(lock_name(rule)),
                                    due)
        except Exception:  # the index unreadable (a full disk): tried again next check
            log.exception("sync: the rule could not be started", extra={"rule": rule.name})
            return None


def new_run(rule: SyncConfig, proxy: Proxy, sources: Mapping[str, Source],
            store: ContentStore, index: Index, progress: Progress | None = None,
            dry_run: bool = False) -> RuleRun | None:
    """A run of `rule` over the running sources (None: its upstream is not configured, or
    the mirror is offline and would only fail)."""
    source = sources.get(rule.upstream)
    if source is None or proxy.offline:
        return None
    return RuleRun(rule, proxy, source, store, index, progress or Counter(), dry_run)
