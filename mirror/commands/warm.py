"""`mirror warm`: fill the cache with images ahead of time, through the same proxy and
single-flight downloads a client pull uses (so it cooperates with a running server)."""

from __future__ import annotations

import asyncio
import contextlib
import platform as host_platform
import sys
from collections.abc import Sequence

from tqdm import tqdm

from mirror.config import Config
from mirror.oci import mediatypes as mt
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.oci.referrers import fallback_tags
from mirror.oci.routing import ImageRef, parse_image
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source
from mirror.runtime import Mirror, open_mirror

ACCEPT_ALL = mt.ALL_MANIFEST_TYPES
MAX_ATTACHED = 1000  # manifests attached to one image (a hostile index cannot go on forever)
ABSENT = frozenset({ErrorCode.MANIFEST_UNKNOWN, ErrorCode.NAME_UNKNOWN})  # nothing attached
PARALLEL_BLOBS = 4


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


async def _blob(proxy: Proxy, upstream: Source, repository: str, digest: Digest) -> None:
    body, _ = await proxy.blob(upstream, repository, digest, head=False)
    try:
        await body.stored()
    finally:
        body.close()


async def _attached(proxy: Proxy, upstream: Source, repository: str,
                    subjects: Sequence[Digest]) -> list[bytes]:
    """The manifests of the signatures, attestations and SBOMs attached to `subjects`
    (through the referrers API and the tag schema), cached with their referrers answers;
    what is not there is skipped."""
    pending: list[Digest | str] = []
    for subject in subjects:
        pending += fallback_tags(subject)
        with contextlib.suppress(RegistryError):
            answer = await proxy.referrers(upstream, repository, subject, "")
            pending += _children(answer.body)
    found: list[bytes] = []
    for reference in pending[:MAX_ATTACHED]:
        try:
            m = await proxy.manifest(upstream, repository, reference, ACCEPT_ALL, head=False)
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


async def warm_image(mirror: Mirror, ref: ImageRef, platforms: Sequence[str] | None,
                     bar: tqdm, referrers: bool = True) -> int:  # type: ignore[type-arg]
    """Cache one image's manifests and blobs (and, with `referrers`, its signatures,
    attestations and SBOMs); returns the number of blobs."""
    proxy, upstream = mirror.proxy, mirror.sources[ref.upstream]
    top = await proxy.manifest(upstream, ref.repository, ref.reference, ACCEPT_ALL, head=False)
    assert top.data is not None
    images = [top.data]
    if top.media_type in mt.INDEX_TYPES:
        images = []
        for child in mt.child_manifests(top.data):
            if platform_matches(child, platforms):
                m = await proxy.manifest(upstream, ref.repository,
                                         parse_digest(str(child["digest"])), ACCEPT_ALL,
                                         head=False)
                assert m.data is not None
                images.append(m.data)
        if not images:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, f"{ref} has no image for {platforms}")
    if referrers:
        subjects = [top.digest, *(digest_of(data) for data in images if data is not top.data)]
        images += await _attached(proxy, upstream, ref.repository, subjects)
    digests = {parse_digest(d) for data in images for d in mt.referenced_blobs(data)[0]}
    bar.total = (bar.total or 0) + len(digests)
    slots = asyncio.Semaphore(PARALLEL_BLOBS)

    async def one(digest: Digest) -> None:
        async with slots:
            await _blob(proxy, upstream, ref.repository, digest)
            bar.update(1)

    await asyncio.gather(*(one(d) for d in digests))
    return len(digests)


async def warm(config: Config, images: Sequence[str], platforms: Sequence[str] | None,
               referrers: bool = True) -> int:
    """Returns the number of images that failed."""
    names = [u.name for u in config.upstreams]
    refs = [parse_image(i, names, strict=True) for i in images]
    failed = 0
    async with open_mirror(config) as mirror:
        with tqdm(total=0, unit="blob", desc="warming",
                  disable=not sys.stderr.isatty()) as bar:
            for ref in refs:
                try:
                    n = await warm_image(mirror, ref, platforms, bar, referrers)
                    print(f"{ref}: {n} blobs cached")
                except RegistryError as exc:
                    failed += 1
                    print(f"mirror: warm {ref}: {exc.message}", file=sys.stderr)
    return failed
