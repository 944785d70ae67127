"""Pure upstream selection: which configured registry a request is for, and the repository
name to ask it for.

In order: containerd's `?ns=<registry host>`; a path prefix `/v2/<upstream name>/<repo>/...`
(what a registries.conf mirror location with a path produces); else the default (first)
upstream, which is what the docker daemon's `registry-mirrors` reaches.
"""

from __future__ import annotations

from collections.abc import Sequence

from mirror.errors import RegistryError
from mirror.reference import validate_name

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("docker.io", "registry-1.docker.io", "index.docker.io")


def _canonical(name: str) -> str:
    return DOCKER_HUB if name in DOCKER_HUB_ALIASES else name


def select_upstream(raw_name: str, ns: str | None, upstreams: Sequence[str]) -> tuple[str, str]:
    """(upstream name, repository) for a request path's repository part and `ns` parameter."""
    by_canonical = {_canonical(u): u for u in upstreams}
    if ns is not None:
        chosen = by_canonical.get(_canonical(ns))
        if chosen is None:
            raise RegistryError(
                "NAME_UNKNOWN",
                f"no upstream named {ns!r} is configured (ns parameter); configured: "
                + ", ".join(upstreams),
            )
        prefix = chosen + "/"
        repository = raw_name.removeprefix(prefix)
    else:
        first, _, rest = raw_name.partition("/")
        chosen = by_canonical.get(_canonical(first)) if rest else None
        if chosen is not None:
            repository = rest
        else:
            chosen, repository = upstreams[0], raw_name
    validate_name(repository)
    if _canonical(chosen) == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return chosen, repository
