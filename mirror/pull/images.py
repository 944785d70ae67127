"""Whole images through the proxy: an image's manifests (the platforms asked for) and every
blob they reference, cached through the same single-flight downloads a client's pull uses,
and whether the store still holds all of one. Used by `mirror warm` and the sync rules
(pull/sync.py)."""

from __future__ import annotations

import asyncio
import contextlib
import platform as host_platform
from collections.abc import Sequence
from typing import Protocol

from mirror.oci import mediatypes as mt
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.oci.referrers import fallback_tags
from mirror.pull.content import ContentStore
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source

ACCEPT_ALL = mt.ALL_MANIFEST_TYPES
MAX_ATTACHED = 1000  # manifests attached to one image (a hostile index cannot go on forever)
ABSENT = frozenset({ErrorCode.MANIFEST_UNKNOWN, ErrorCode.NAME_UNKNOWN})  # nothing attached
PARALLEL_BLOBS = 4


class Progress(Protocol):
    """What counts blobs as they are cached (tqdm's bar is one)."""

    total: float | None

    def update(self, n: float = 1) -> bool | None: ...


class Counter:
    """A Progress that only counts (a sync rule run by the server)."""

    def __init__(self) -> None:
        self.total: float | None = 0
        self.done = 0.0

    def update(self, n: float = 1) -> bool | None:
        self.done += n
        return None


def default_platform() -> str:
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine)
    return f"linux/{arch}"


def platform_matches(descriptor: dict[str, object], wanted: Sequence[str] | None) -> bool:
    """Whether an index entry is for one of the wanted `os/arch[/variant]` (None: all)."""
    if wanted is None:
        return True
    p = descriptor.get("platform")
    if not isinstance(p, dict):
        return False
    name = f"{p.get('os')}/{p.get('architecture')}"
    full = f"{name}/{p['variant']}" if p.get("variant") else name
    return name in wanted or full in wanted


def _wanted_children(index: bytes, platforms: Sequence[str] | None) -> list[Digest]:
    return [parse_digest(str(child["digest"])) for child in mt.child_manifests(index)
            if platform_matches(child, platforms)]


def is_complete(store: ContentStore, root: Digest, platforms: Sequence[str] | None) -> bool:
    """Whether the store holds the image `root` names whole: the manifest, the platforms'
    manifests of an index and every blob they reference (a check on the disk only)."""
    data = store.read_bytes(root)
    if data is None:
        return False
    if mt.child_manifests(data):
        children = _wanted_children(data, platforms)
        return bool(children) and all(is_complete(store, c, None) for c in children)
    blobs, _ = mt.referenced_blobs(data)
    return all(store.has(parse_digest(d)) for d in blobs)


async def _blob(proxy: Proxy, source: Source, repository: str, digest: Digest) -> None:
    body, _ = await proxy.blob(source, repository, digest, head=False)
    try:
        await body.stored()
    finally:
        body.close()


async def _attached(proxy: Proxy, source: Source, repository: str,
                    subjects: Sequence[Digest]) -> list[bytes]:
    """The manifests of the signatures, attestations and SBOMs attached to `subjects`
    (through the referrers API and the tag schema), cached with their referrers answers;
    what is not there is skipped."""
    pending: list[Digest | str] = []
    for subject in subjects:
        pending += fallback_tags(subject)
        with contextlib.suppress(RegistryError):
            answer = await proxy.referrers(source, repository, subject, "")
            pending += _children(answer.body)
    found: list[bytes] = []
    for position in range(MAX_ATTACHED):  # what an index below adds is followed too
        if position >= len(pending):
            break
        reference = pending[position]
        try:
            m = await proxy.manifest(source, repository, reference, ACCEPT_ALL, head=False)
        except RegistryError as exc:
            if exc.code not in ABSENT:
                raise
            continue
        assert m.data is not None
        found.append(m.data)
        if m.media_type in mt.INDEX_TYPES:  # the tag schema's index of referrers
            pending += _children(m.data)
    return found


def _children(index: bytes) -> list[Digest | str]:
    children: list[Digest | str] = []
    for child in mt.child_manifests(index):
        with contextlib.suppress(RegistryError):
            children.append(parse_digest(str(child["digest"])))
    return children


async def cache_image(proxy: Proxy, source: Source, repository: str, reference: Digest | str,
                      platforms: Sequence[str] | None, progress: Progress,
                      referrers: bool = True) -> int:
    """Cache one image's manifests and blobs (and, with `referrers`, its signatures,
    attestations and SBOMs); returns the number of blobs."""
    top = await proxy.manifest(source, repository, reference, ACCEPT_ALL, head=False)
    assert top.data is not None
    images = [top.data]
    if top.media_type in mt.INDEX_TYPES:
        images = []
        for child in _wanted_children(top.data, platforms):
            m = await proxy.manifest(source, repository, child, ACCEPT_ALL, head=False)
            assert m.data is not None
            images.append(m.data)
        if not images:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN,
                                f"{repository}:{reference} has no image for {platforms}")
    if referrers:
        subjects = [top.digest, *(digest_of(data) for data in images if data is not top.data)]
        images += await _attached(proxy, source, repository, subjects)
    digests = {parse_digest(d) for data in images for d in mt.referenced_blobs(data)[0]}
    progress.total = (progress.total or 0) + len(digests)
    slots = asyncio.Semaphore(PARALLEL_BLOBS)

    async def one(digest: Digest) -> None:
        async with slots:
            await _blob(proxy, source, repository, digest)
            progress.update(1)

    await asyncio.gather(*(one(d) for d in digests))
    return len(digests)
