"""Pure upstream selection: which configured registry a request is for, and the repository
name to ask it for.

In order: containerd's `?ns=<registry host>`; a path prefix `/v2/<upstream name>/<repo>/...`
(what a registries.conf mirror location with a path produces); else the default (first)
upstream, which is what the docker daemon's `registry-mirrors` reaches.

A first component that looks like a registry host but names no configured upstream
(`/v2/quay.io/foo/...`) still goes to the default upstream (Docker Hub has no dots in its
namespaces, other registries may): `unconfigured_registry` says when that happens, so the
server can warn and `mirror warm` can refuse.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, parse_digest, validate_name, validate_tag

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("docker.io", "registry-1.docker.io", "index.docker.io")


def _canonical(name: str) -> str:
    return DOCKER_HUB if name in DOCKER_HUB_ALIASES else name


@dataclass(frozen=True, slots=True)
class ImageRef:
    upstream: str
    repository: str
    reference: Digest | str  # digest or tag

    def __str__(self) -> str:
        sep = "@" if isinstance(self.reference, Digest) else ":"
        return f"{self.upstream}/{self.repository}{sep}{self.reference}"


def looks_like_host(component: str) -> bool:
    """Whether a name's first component reads as a registry host, as docker's reference
    grammar decides it: a dot, a port, or `localhost`."""
    return "." in component or ":" in component or component == "localhost"


def unconfigured_registry(raw_name: str, ns: str | None, upstreams: Sequence[str]) -> str | None:
    """The first component of a repository name when it looks like a registry host that is
    not configured (so the name will be taken as a repository of the default upstream)."""
    first, _, rest = raw_name.partition("/")
    if ns is not None or not rest or not looks_like_host(first):
        return None
    configured = {_canonical(u) for u in upstreams}
    return None if _canonical(first) in configured else first


def tier_ns(name: str, url: str) -> str | None:
    """The `ns` to send with requests for upstream `name` to `url`: its name, unless `url` is
    that registry itself. A mirror in front (a regional tier) then knows which registry a
    request is for, as it does from containerd; a registry ignores the parameter anyway."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    return None if _canonical(netloc.lower()) == _canonical(name.lower()) else name


def parse_image(ref: str, upstreams: Sequence[str], *, strict: bool = False) -> ImageRef:
    """An image reference as operators write it: `docker.io/library/nginx:1.27`, `nginx`,
    `ghcr.io/o/r@sha256:…`. The registry part selects the upstream as a path prefix does.
    `strict`: refuse a registry part that names no configured upstream."""
    name, at, digest = ref.partition("@")
    tag = "latest"
    if not at:
        slash, colon = name.rfind("/"), name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1:]
    if strict:
        _configured(ref, name, upstreams)
    upstream, repository = select_upstream(name, None, upstreams)
    return ImageRef(upstream, repository, parse_digest(digest) if at else validate_tag(tag))


def parse_target(ref: str, upstreams: Sequence[str]) -> tuple[str, str, Digest | str | None]:
    """(upstream, repository, reference) for what an operator names to remove: an image
    (`docker.io/library/nginx:1.27`, `…@sha256:…`), or with neither a tag nor a digest the
    whole repository (`docker.io/library/nginx`: reference None). A registry part that names
    no configured upstream is refused, as `parse_image(strict=True)` does."""
    name, at, _ = ref.partition("@")
    if at or name.rfind(":") > name.rfind("/"):
        image = parse_image(ref, upstreams, strict=True)
        return image.upstream, image.repository, image.reference
    _configured(ref, name, upstreams)
    upstream, repository = select_upstream(name, None, upstreams)
    return upstream, repository, None


def _configured(ref: str, name: str, upstreams: Sequence[str]) -> None:
    host = unconfigured_registry(name, None, upstreams)
    if host is not None:
        raise RegistryError(
            ErrorCode.NAME_INVALID,
            f"{ref}: {host} is not a configured upstream (configured: {', '.join(upstreams)}); "
            f"add an [[upstream]] for it, or name the image without a registry to use "
            f"{upstreams[0]}")


def catalog_name(upstream: str, repository: str, upstreams: Sequence[str]) -> str:
    """A cached repository as a client pulls it through the mirror: the plain repository
    for the default (first) upstream, `<upstream>/<repository>` for the others (the path
    prefix select_upstream routes)."""
    return repository if upstream == upstreams[0] else f"{upstream}/{repository}"


def select_upstream(raw_name: str, ns: str | None, upstreams: Sequence[str]) -> tuple[str, str]:
    """(upstream name, repository) for a request path's repository part and `ns` parameter."""
    return _select(raw_name, ns, tuple(upstreams))


@functools.lru_cache(maxsize=8192)
def _select(raw_name: str, ns: str | None, upstreams: tuple[str, ...]) -> tuple[str, str]:
    by_canonical = {_canonical(u): u for u in upstreams}
    if ns is not None:
        chosen = by_canonical.get(_canonical(ns))
        if chosen is None:
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN,
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
    return chosen, upstream_repository(chosen, repository)


def upstream_repository(upstream: str, repository: str) -> str:
    """The repository as `upstream` names it: Docker Hub's official images are `library/`
    ones (`nginx` is `library/nginx`); any other registry takes a name as it is."""
    if "/" not in repository and _canonical(upstream.lower()) == DOCKER_HUB:
        return f"library/{repository}"
    return repository
