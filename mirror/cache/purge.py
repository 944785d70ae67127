"""`mirror purge`: what removing an image, or a whole repository, takes out of the cache, and
taking it out while the server runs.

What goes, for a target in one (upstream, repository):
  - its roots: a tag's manifest; a digest (with the repository's tags pointing to it); or
    every manifest the repository's tags, held records (Index.hold) and referrers answers
    name. For each root and each platform manifest of an index: what is attached to it in
    the repository, the tag schema's tags (`sha256-<hex>`, `.sig`, `.att`, `.sbom`) and the
    referrers answers kept for it, whose manifests become roots too;
  - the closure of the roots: each stored manifest and blob they reference.
What stays of that closure: whatever anything else reaches — any other stored manifest (of
any repository or upstream; found by reading the store, not trusting the index), the tags,
referrers answers and held records left, the pins (`[cache] pin`), and every digest being
downloaded now (a partial file in tmp/, whichever worker writes it).

Naming a pinned image refuses (`Pinned`); a repository purge keeps its pinned images (their
tags, what is attached to them, their content) and says so.

Taking it out (`execute`): the repository's records first (tags, referrers answers, held
records, access confirmations), then each manifest is marked purged (a worker holding it in
memory drops it instead of storing it again: pull/proxy.py) and each file is unlinked with
its index entry, so the index's totals (and the cache size metrics) stay exact. A client
streaming a blob being deleted keeps its open file; a worker following a download that is
committed and deleted at once serves the bytes from its own fd; a client arriving later gets
the content from the upstream again. Content another pull stores between the plan and the
deletion is not seen: at worst the image it belongs to fetches a deleted blob again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mirror.cache.index import Index, TagEntry
from mirror.cache.locks import exclusive
from mirror.cache.store import BlobStore
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import manifest_references
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.referrers import fallback_tags
from mirror.oci.routing import ImageRef, parse_image

# A stored file larger than this is no manifest (the distribution spec's bound).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    upstream: str
    repository: str
    reference: Digest | str | None  # None: the whole repository

    def __str__(self) -> str:
        if self.reference is None:
            return f"{self.upstream}/{self.repository}"
        return str(ImageRef(self.upstream, self.repository, self.reference))


class NotCached(Exception):
    """Nothing of the target is in the cache."""


class Pinned(Exception):
    """The target is pinned (`[cache] pin`)."""


@dataclass
class Plan:
    target: Target
    tags: set[str] = field(default_factory=set)  # of target's repository
    referrers: set[tuple[Digest, str]] = field(default_factory=set)  # (subject, artifactType)
    released: set[Digest] = field(default_factory=set)  # held records dropped
    forgotten: set[Digest] = field(default_factory=set)  # access confirmations dropped
    manifests: dict[Digest, int] = field(default_factory=dict)  # to delete, with their sizes
    blobs: dict[Digest, int] = field(default_factory=dict)
    bucket: set[Digest] = field(default_factory=set)  # blobs whose bucket objects go too
    shared: set[Digest] = field(default_factory=set)  # stored, and still used by others
    pinned: set[Digest] = field(default_factory=set)  # stored, and pinned
    in_flight: set[Digest] = field(default_factory=set)  # being downloaded now
    kept_tags: set[str] = field(default_factory=set)  # pinned, or attached to a pinned image

    @property
    def bytes(self) -> int:
        return sum(self.manifests.values()) + sum(self.blobs.values())


@dataclass
class Result:
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    tags: int = 0
    referrers: int = 0
    in_flight: set[Digest] = field(default_factory=set)  # found downloading at deletion


class _Graph:
    """What stored manifests reference, each file read once."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._refs: dict[Digest, tuple[list[Digest], list[Digest]] | None] = {}

    def refs(self, digest: Digest) -> tuple[list[Digest], list[Digest]] | None:
        """(config and layer digests, child manifest digests) of a stored manifest; None
        when it is not stored or not a manifest."""
        if digest not in self._refs:
            self._refs[digest] = self._read(digest, self.store.size(digest))
        return self._refs[digest]

    def _read(self, digest: Digest, size: int | None) -> tuple[list[Digest],
                                                               list[Digest]] | None:
        if size is None or size > MAX_MANIFEST_BYTES:
            return None
        try:
            with open(self.store.path(digest), "rb") as f:
                if f.read(64).lstrip()[:1] != b"{":
                    return None  # a layer, not JSON: skipped after a few bytes
                f.seek(0)
                data = f.read()
        except OSError:
            return None
        refs = manifest_references(data)
        return None if refs is None else (_digests(refs[0]), _digests(refs[1]))

    def children(self, digest: Digest) -> list[Digest]:
        refs = self.refs(digest)
        return [] if refs is None else refs[1]

    def closure(self, roots: Iterable[Digest]) -> tuple[set[Digest], set[Digest]]:
        """(manifests, blobs) reachable from `roots` (manifest digests): the manifests
        among them that are stored, and every blob they name, stored or not."""
        manifests: set[Digest] = set()
        blobs: set[Digest] = set()
        pending = list(roots)
        seen: set[Digest] = set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            refs = self.refs(digest)
            if refs is None:
                continue
            manifests.add(digest)
            blobs.update(refs[0])
            pending.extend(refs[1])
        return manifests, blobs - manifests

    def stored_manifests(self, skip: set[Digest]) -> set[Digest]:
        """Every stored file that reads as a manifest (but those in `skip`), whatever the
        index says: a lost or rebuilt index does not know every manifest's kind."""
        found = set()
        for digest, size, _ in self.store.iter_stored():
            if digest in skip:
                continue
            if digest not in self._refs:
                self._refs[digest] = self._read(digest, size)
            if self._refs[digest] is not None:
                found.add(digest)
        return found


def _digests(values: Iterable[str]) -> list[Digest]:
    found = []
    for value in values:
        with contextlib.suppress(RegistryError):
            found.append(parse_digest(value))
    return found


def _digest(entry: TagEntry) -> Digest | None:
    try:
        return parse_digest(entry.digest)
    except RegistryError:
        return None


def in_flight(store: BlobStore) -> set[Digest]:
    """Digests being downloaded now by any process (their partial files in tmp/)."""
    return {digest for digest, _, _ in store.in_flight_partials()}


def plan_purge(store: BlobStore, index: Index, target: Target, pins: Sequence[str],
               upstreams: Sequence[str]) -> Plan:
    """What purging `target` removes and what it keeps (nothing is changed). Raises
    NotCached, or Pinned when the target names a pinned image."""
    index.flush()
    up, repo = target.upstream, target.repository
    graph = _Graph(store)
    tags = index.repository_tags(up, repo)
    referrers = index.repository_referrers(up, repo)
    held = index.repository_held(up, repo)

    pin_refs = [parse_image(p, upstreams) for p in pins]
    pinned_roots: set[Digest] = set()
    own_pinned_roots: set[Digest] = set()  # the pins of this repository
    pinned_tags: set[str] = set()
    for ref in pin_refs:
        ours = (ref.upstream, ref.repository) == (up, repo)
        if isinstance(ref.reference, Digest):
            root: Digest | None = ref.reference
        else:
            pinned_tags |= {ref.reference} if ours else set()
            entry = index.get_tag(ref.upstream, ref.repository, ref.reference)
            root = _digest(entry) if entry is not None else None
        if root is not None:
            pinned_roots.add(root)
            own_pinned_roots |= {root} if ours else set()
    pinned = set().union(*graph.closure(pinned_roots))

    # What is attached to a pinned image of this repository stays with it.
    kept_tags, kept_referrers = _attached(graph, tags, referrers, own_pinned_roots)
    kept_tags |= pinned_tags & set(tags)
    with_pins = own_pinned_roots | {d for t in kept_tags if (d := _digest(tags[t])) is not None}
    with_pins |= {d for s, a, e in referrers if (s, a) in kept_referrers
                  and (d := _digest(e)) is not None}

    plan = Plan(target)
    roots: set[Digest] = set()
    if target.reference is None:
        if not tags and not referrers and not held:
            raise NotCached(f"{target} is not in the cache (no tag or manifest of it is known)")
        plan.tags = set(tags) - kept_tags
        plan.referrers = {(s, a) for s, a, _ in referrers} - kept_referrers
        plan.kept_tags = kept_tags
        plan.pinned = {d for d in set().union(*graph.closure(with_pins)) if store.has(d)}
        roots = {d for d in held if d not in with_pins}
    elif isinstance(target.reference, str):
        entry = tags.get(target.reference)
        if entry is None:
            raise NotCached(f"{target} is not in the cache (the tag is not known)")
        if target.reference in pinned_tags:
            raise Pinned(f"{target} is pinned ([cache] pin, or a [[sync]] rule with pin = "
                         "true): unpin it first")
        plan.tags = {target.reference}
    else:
        digest = target.reference
        named = {t for t, e in tags.items() if e.digest == str(digest)}
        if not store.has(digest) and digest not in held and not named:
            raise NotCached(f"{target} is not in the cache")
        if digest in pinned:
            raise Pinned(f"{target} is pinned ([cache] pin or a pinning [[sync]] rule), or part "
                         "of a pinned image: "
                         "unpin it first")
        plan.tags, roots = named, {digest}
    roots |= {d for t in plan.tags if (d := _digest(tags[t])) is not None}

    # What is attached to the roots in this repository goes with them (not what is attached
    # to a pinned image as well).
    more_tags, more_referrers = _attached(graph, tags, referrers, roots)
    plan.tags |= more_tags - kept_tags
    plan.referrers |= more_referrers - kept_referrers
    roots |= {d for t in plan.tags if (d := _digest(tags[t])) is not None}
    roots |= {d for s, a, e in referrers if (s, a) in plan.referrers
              and (d := _digest(e)) is not None}

    doomed_manifests, doomed_blobs = graph.closure(roots)
    doomed = doomed_manifests | doomed_blobs

    # Everything else that reaches content keeps it.
    live: set[Digest] = set(pinned_roots)
    for u, r, t, e in index.tags():
        if ((u, r) != (up, repo) or t not in plan.tags) and (d := _digest(e)) is not None:
            live.add(d)
    for u, r, s, a, d in index.referrers_digests():
        if (u, r) != (up, repo) or (s, a) not in plan.referrers:
            live.add(d)
    for u, r, d in index.held():
        if (u, r) != (up, repo) or d not in doomed_manifests:
            live.add(d)
    live |= graph.stored_manifests(skip=doomed_manifests)
    live_manifests, live_blobs = graph.closure(live)
    downloading = in_flight(store)
    keep = live_manifests | live_blobs | pinned | downloading

    for digest in sorted(doomed, key=str):
        size = store.size(digest)
        if digest in keep:
            if size is not None or digest in downloading:
                (plan.in_flight if digest in downloading else plan.pinned if digest in pinned
                 else plan.shared).add(digest)
            continue
        if digest in doomed_blobs:
            plan.bucket.add(digest)
        if size is not None:
            (plan.manifests if digest in doomed_manifests else plan.blobs)[digest] = size

    # What this repository no longer holds: its held records and access confirmations.
    remaining = {d for t, e in tags.items()
                 if t not in plan.tags and (d := _digest(e)) is not None}
    remaining |= {d for s, a, e in referrers if (s, a) not in plan.referrers
                  and (d := _digest(e)) is not None}
    remaining |= {d for d in held if d not in doomed_manifests} | with_pins
    still_here = set().union(*graph.closure(remaining))
    plan.released = {d for d in held if d in doomed_manifests and d not in still_here}
    plan.forgotten = {d for d in doomed - still_here if index.has_access(up, repo, d)}
    return plan


def _attached(graph: _Graph, tags: dict[str, TagEntry],
              referrers: list[tuple[Digest, str, TagEntry]], roots: Iterable[Digest]
              ) -> tuple[set[str], set[tuple[Digest, str]]]:
    """The tag-schema tags and referrers answers of one repository attached to `roots` or
    to their platform manifests (and, in turn, to what those name)."""
    found_tags: set[str] = set()
    found_referrers: set[tuple[Digest, str]] = set()
    pending = list(roots)
    seen: set[Digest] = set()
    while pending:
        digest = pending.pop()
        for subject in [digest, *graph.children(digest)]:
            if subject in seen:
                continue
            seen.add(subject)
            for tag in fallback_tags(subject):
                entry = tags.get(tag)
                if entry is not None and tag not in found_tags:
                    found_tags.add(tag)
                    if (d := _digest(entry)) is not None:
                        pending.append(d)
            for s, a, e in referrers:
                if s == subject and (s, a) not in found_referrers:
                    found_referrers.add((s, a))
                    if (d := _digest(e)) is not None:
                        pending.append(d)
    return found_tags, found_referrers


def execute(store: BlobStore, index: Index, plan: Plan) -> Result:
    """Remove what `plan` says, records first. A blob that started downloading since the
    plan is left alone (its partial file says so)."""
    up, repo = plan.target.upstream, plan.target.repository
    result = Result(tags=len(plan.tags), referrers=len(plan.referrers))
    for tag in plan.tags:
        index.delete_tag(up, repo, tag)
    for subject, artifact_type in plan.referrers:
        index.delete_referrers(up, repo, subject, artifact_type)
    for digest in plan.released:
        index.release(up, repo, digest)
    for digest in plan.forgotten:
        index.forget_access(up, repo, digest)
    for digest in plan.manifests:
        index.mark_purged(digest)  # before the file goes: a worker's memory copy stays out
        result.bytes += store.delete(digest)
        index.remove_entry(digest)
        index.forget_provenance(digest)
        result.manifests += 1
    for digest in plan.blobs:
        if os.path.exists(store.partial_path(digest)):
            result.in_flight.add(digest)
            continue
        result.bytes += store.delete(digest)
        index.remove_entry(digest)
        index.forget_provenance(digest)
        result.blobs += 1
    return result


class Busy(Exception):
    """An eviction or another purge holds the cache (locks/evict.lock) past the wait."""


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    result: Result | None  # None: a dry run
    deleted: int = 0  # bucket objects deleted
    failed: int = 0  # bucket deletions failed (the first failure ends them)


async def purge_target(store: BlobStore, index: Index, target: Target,
                       pins: Callable[[], Sequence[str]], upstreams: Sequence[str],
                       wait: float, dry_run: bool = False,
                       delete: Callable[[Digest], Awaitable[bool]] | None = None) -> Outcome:
    """Plan and (unless `dry_run`) execute a purge, one at a time with eviction, other
    purges and the cache browser's pins (`pins` is read under the same lock, so a pin made
    meanwhile is seen), in a thread (the plan reads the store); then `delete` each purged
    blob's bucket object (with [s3]). Used by `mirror purge` and the cache browser. Raises
    Busy, NotCached or Pinned."""
    async with exclusive(str(store.lock_path("evict")), wait) as locked:
        if not locked:
            raise Busy(f"{target}: the cache is being evicted or purged by another process; "
                       "try again shortly")
        plan = await asyncio.to_thread(lambda: plan_purge(store, index, target, pins(),
                                                          upstreams))
        if dry_run:
            return Outcome(plan, None)
        result = await asyncio.to_thread(execute, store, index, plan)
    deleted = failed = 0
    for digest in sorted(plan.bucket - result.in_flight, key=str) if delete else ():
        if delete is None or not await delete(digest):
            failed += 1
            break  # the bucket is unusable now
        deleted += 1
    return Outcome(plan, result, deleted, failed)
