"""What the cache holds, by repository and tag, for the status page's cache browser
(http/browser.py). Read-only, from the index and the stored manifests; blocking (a thread's).

- A repository row: its tags, the bytes its images hold in the store (each digest counted
  once), when something of it was last pulled, how many of its images are pinned.
- An image row (a tag, or a manifest the repository holds by digest only): its digest, its
  size (the manifest and every stored manifest and blob it references), last pulled (the
  latest access of any of them), and what pins it: `config` ([cache] pin), `sync <rule>`
  (a rule with pin = true), `by <user>` (an admin, in the browser).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.cache.eviction import image_digests, rule_pins
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import Config
from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.routing import ImageRef, parse_image

PAGE = 100  # rows a page of the browser shows


@dataclass(frozen=True)
class ImageRow:
    reference: str  # a tag, or a digest for a manifest held by digest only
    digest: str
    size: int  # stored bytes
    last_pulled: float | None
    pinned_by: tuple[str, ...]


@dataclass(frozen=True)
class RepositoryRow:
    upstream: str
    repository: str
    tags: int
    size: int
    last_pulled: float | None
    pinned: int  # images pinned


@dataclass(frozen=True)
class Page:
    rows: list[RepositoryRow] | list[ImageRow]
    page: int
    pages: int


def pin_sources(config: Config, index: Index) -> dict[str, list[str]]:
    """`upstream/repository:tag` (or `@digest`) → what pins it."""
    names = [u.name for u in config.upstreams]
    found: dict[str, list[str]] = {}

    def add(image: str, source: str) -> None:
        with contextlib.suppress(RegistryError):
            found.setdefault(str(parse_image(image, names)), []).append(source)

    for image in config.cache.pin:
        add(image, "config")
    for image, (user, _) in index.runtime_pins().items():
        add(image, f"by {user}")
    for rule in config.syncs:
        for image in rule_pins(rule, index):
            add(image, f"sync {rule.name}")
    return found


@dataclass
class _Sizer:
    """Sizes and last accesses of images, each manifest read and each entry looked up once."""

    store: BlobStore
    index: Index
    _digests: dict[Digest, set[Digest]] = field(default_factory=dict)

    def digests(self, root: Digest) -> set[Digest]:
        if root not in self._digests:
            self._digests[root] = image_digests(self.store, root)
        return self._digests[root]

    def measure(self, roots: Iterable[Digest]) -> tuple[int, float | None]:
        """(stored bytes, last access) of the images `roots` name, each digest once."""
        every: set[Digest] = set()
        for root in roots:
            every |= self.digests(root)
        size, last = 0, None
        for digest in every:
            entry = self.index.entry(digest)
            if entry is not None:
                size += entry.size
                last = entry.last_access if last is None else max(last, entry.last_access)
        return size, last


def _paged(items: list[str], page: int) -> tuple[list[str], int, int]:
    pages = max(1, -(-len(items) // PAGE))
    page = min(max(1, page), pages)
    return items[(page - 1) * PAGE:page * PAGE], page, pages


def repositories(config: Config, store: BlobStore, index: Index,
                 visible: Callable[[str, str], bool], page: int = 1) -> Page:
    """The cached repositories `visible` lets through, by upstream then name."""
    index.flush()
    names = [f"{u.name}/{r}" for u in config.upstreams for r in index.repositories(u.name)
             if visible(u.name, r)]
    shown, page, pages = _paged(names, page)
    sizer, pinned = _Sizer(store, index), pin_sources(config, index)
    rows = []
    for name in shown:
        upstream, _, repository = name.partition("/")
        images = _images(index, upstream, repository)
        if not images:  # only held manifests, all evicted since
            continue
        size, last = sizer.measure(images.values())
        rows.append(RepositoryRow(
            upstream, repository, sum(1 for r in images if not is_digest(r)), size,
            last, sum(1 for r in images if _image(upstream, repository, r) in pinned)))
    return Page(rows, page, pages)


def images(config: Config, store: BlobStore, index: Index, upstream: str, repository: str,
           page: int = 1) -> Page:
    """One repository's tags, then the manifests it holds by digest only."""
    index.flush()
    found = _images(index, upstream, repository)
    shown, page, pages = _paged(list(found), page)
    sizer, pinned = _Sizer(store, index), pin_sources(config, index)
    rows = []
    for reference in shown:
        digest = found[reference]
        size, last = sizer.measure([digest])
        by = pinned.get(_image(upstream, repository, reference), []) + (
            pinned.get(_image(upstream, repository, str(digest)), [])
            if not is_digest(reference) else [])
        rows.append(ImageRow(reference, str(digest), size, last, tuple(sorted(set(by)))))
    return Page(rows, page, pages)


def _images(index: Index, upstream: str, repository: str) -> dict[str, Digest]:
    """reference → manifest digest: the tags (in order), then the held manifests no tag
    names and the store still has (by their digest)."""
    found: dict[str, Digest] = {}
    for tag, entry in sorted(index.repository_tags(upstream, repository).items()):
        with contextlib.suppress(RegistryError):
            found[tag] = parse_digest(entry.digest)
    tagged = set(found.values())
    for digest in sorted(index.repository_held(upstream, repository), key=str):
        if digest not in tagged and index.entry(digest) is not None:
            found[str(digest)] = digest
    return found


def _image(upstream: str, repository: str, reference: str) -> str:
    """The reference as pins are keyed (str of an ImageRef)."""
    if is_digest(reference):
        return str(ImageRef(upstream, repository, parse_digest(reference)))
    return str(ImageRef(upstream, repository, reference))


def is_digest(reference: str) -> bool:
    return ":" in reference  # a tag never holds one
