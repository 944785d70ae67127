"""Prefetch: after a manifest miss, the image's config and layers are downloaded ahead of the
client's requests, a few at a time, so a client that fetches a few layers at once finds the
next ones in flight already."""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable

from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import referenced_blobs
from mirror.oci.reference import Digest, parse_digest
from mirror.pull.content import ContentStore
from mirror.pull.downloads import Download, Downloads
from mirror.pull.source import Source

PREFETCH_AHEAD = 2  # prefetched downloads running at once (beyond what clients asked for)
PREFETCH_QUEUE = 10_000

# start(source, repository, digest): the proxy's own way of starting a download (it records
# the provenance of private content first); None when the blob is stored meanwhile.
Start = Callable[[Source, str, Digest], Download | None]


class Prefetcher:
    def __init__(self, store: ContentStore, downloads: Downloads, start: Start) -> None:
        self.store = store
        self.downloads = downloads
        self.start = start
        self._queue: collections.deque[tuple[Source, str, Digest]] = (
            collections.deque(maxlen=PREFETCH_QUEUE))
        self._running: set[Digest] = set()

    def image(self, source: Source, repository: str, manifest: bytes) -> None:
        """Queue an image manifest's config and layers, in order."""
        for value in referenced_blobs(manifest)[0]:
            with contextlib.suppress(RegistryError):
                self._queue.append((source, repository, parse_digest(value)))
        self._pump()

    def _pump(self) -> None:
        """Keep PREFETCH_AHEAD queued downloads running. Prefetch only fills the link's idle
        time: all at once, the layers a client asks for first would share the bandwidth with
        every other layer and arrive later than without prefetch."""
        while self._queue and len(self._running) < PREFETCH_AHEAD:
            source, repository, digest = self._queue.popleft()
            if self.store.size(digest) is not None or self.downloads.get(digest) is not None:
                continue
            download = self.start(source, repository, digest)
            if download is None or download.task is None:
                continue
            self._running.add(digest)
            download.task.add_done_callback(functools.partial(self._done, digest))

    def _done(self, digest: Digest, _task: object) -> None:
        self._running.discard(digest)
        self._pump()
