"""`mirror warm`: fill the cache with images ahead of time, through the same proxy and
single-flight downloads a client pull uses (so it cooperates with a running server)."""

from __future__ import annotations

import asyncio
import platform as host_platform
import sys
from collections.abc import Sequence

from tqdm import tqdm

from mirror.config import Config
from mirror.oci import mediatypes as mt
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.routing import ImageRef, parse_image
from mirror.pull.proxy import Proxy
from mirror.pull.source import Source
from mirror.runtime import Mirror, open_mirror

ACCEPT_ALL = mt.ALL_MANIFEST_TYPES
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


async def warm_image(mirror: Mirror, ref: ImageRef, platforms: Sequence[str] | None,
                     bar: tqdm) -> int:  # type: ignore[type-arg]
    """Cache one image's manifests and blobs; returns the number of blobs."""
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
    digests = {parse_digest(d) for data in images for d in mt.referenced_blobs(data)[0]}
    bar.total = (bar.total or 0) + len(digests)
    slots = asyncio.Semaphore(PARALLEL_BLOBS)

    async def one(digest: Digest) -> None:
        async with slots:
            await _blob(proxy, upstream, ref.repository, digest)
            bar.update(1)

    await asyncio.gather(*(one(d) for d in digests))
    return len(digests)


async def warm(config: Config, images: Sequence[str], platforms: Sequence[str] | None) -> int:
    """Returns the number of images that failed."""
    names = [u.name for u in config.upstreams]
    refs = [parse_image(i, names, strict=True) for i in images]
    failed = 0
    async with open_mirror(config) as mirror:
        with tqdm(total=0, unit="blob", desc="warming",
                  disable=not sys.stderr.isatty()) as bar:
            for ref in refs:
                try:
                    n = await warm_image(mirror, ref, platforms, bar)
                    print(f"{ref}: {n} blobs cached")
                except RegistryError as exc:
                    failed += 1
                    print(f"mirror: warm {ref}: {exc.message}", file=sys.stderr)
    return failed
