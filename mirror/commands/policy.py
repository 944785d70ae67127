"""`mirror policy check IMAGE…`: what the signature policies decide for each image and why,
fetching its manifest and signatures (through the proxy, so into the cache) but no layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mirror.config import Config
from mirror.oci import mediatypes as mt
from mirror.oci.errors import RegistryError
from mirror.oci.routing import parse_image
from mirror.runtime import open_mirror


async def check(config: Config, images: Sequence[str]) -> int:
    """Print one line per image; returns how many an enforced policy refuses (or that could
    not be resolved)."""
    refs = [parse_image(i, [u.name for u in config.upstreams], strict=True) for i in images]
    refused = 0
    no_prefetch = dataclasses.replace(config.cache, prefetch=False)  # a check pulls no layers
    async with open_mirror(dataclasses.replace(config, cache=no_prefetch)) as mirror:
        for ref in refs:
            source = mirror.sources[ref.upstream]
            try:
                m = await mirror.proxy.manifest(source, ref.repository, ref.reference,
                                                mt.ALL_MANIFEST_TYPES, head=False)
            except RegistryError as exc:
                print(f"{ref}: cannot be resolved: {exc.message}")
                refused += 1
                continue
            what = f"{ref} ({m.digest})"
            if mirror.trust is None:
                print(f"{what}: allowed: no [[policy]] is configured")
                continue
            policy, reason = await mirror.trust.decide(source, ref.repository, m)
            if policy is None:
                print(f"{what}: allowed: no [[policy]] matches {ref.upstream}/{ref.repository}")
            elif reason is None:
                covered = len(mt.child_manifests(m.data or b""))
                print(f"{what}: allowed by [[policy]] {policy.name!r}: a cosign signature "
                      "verifies with one of its keys"
                      + (f" (it covers the index's {covered} platform manifests)"
                         if covered else ""))
            else:
                verdict = "denied" if policy.enforce else "served with a warning (mode = warn)"
                print(f"{what}: {verdict} by [[policy]] {policy.name!r}: {reason}")
                refused += policy.enforce
    return refused
