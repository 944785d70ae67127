"""`mirror warm`: fill the cache with images ahead of time, through the same proxy and
single-flight downloads a client pull uses (so it cooperates with a running server)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm import tqdm

from mirror.config import Config
from mirror.oci.errors import RegistryError
from mirror.oci.routing import parse_image
from mirror.pull.images import cache_image
from mirror.runtime import open_mirror


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
                    n = await cache_image(mirror.proxy, mirror.sources[ref.upstream],
                                          ref.repository, ref.reference, platforms, bar,
                                          referrers)
                    print(f"{ref}: {n} blobs cached")
                except RegistryError as exc:
                    failed += 1
                    print(f"mirror: warm {ref}: {exc.message}", file=sys.stderr)
    return failed
