"""The content store, as the pull layer uses it: verified content by digest, and the partial
files of downloads in progress. The filesystem store (cache/store.py, BlobStore) is the first
implementation; it owns every path in the cache dir, every flock and the partial-file
metadata, so another store (an object store) implements this and nothing else changes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from mirror.oci.reference import Digest


class ContentStore(Protocol):
    # verified content ----------------------------------------------------------------------
    def has(self, digest: Digest) -> bool: ...  # used by: Downloads._claim

    def size(self, digest: Digest) -> int | None: ...  # used by: Proxy, commands/archive

    # used by: Proxy (sendfile of stored blobs), Download._reader_fd
    def open_fd(self, digest: Digest) -> int | None: ...

    # used by: Proxy (manifests), eviction, commands/archive
    def read_bytes(self, digest: Digest) -> bytes | None: ...

    def put_bytes(self, digest: Digest, data: bytes) -> None: ...  # used by: Proxy (manifests)

    # used by: commands/archive (import)
    def put_stream(self, digest: Digest, read: Callable[[int], bytes]) -> int: ...

    def delete(self, digest: Digest) -> int: ...  # used by: eviction, commands/verify

    # used by: Maintenance (index rebuild), commands/verify
    def iter_stored(self) -> Iterator[tuple[Digest, int, float]]: ...

    # downloads in progress -----------------------------------------------------------------
    def open_partial(self, digest: Digest) -> int: ...  # used by: Downloads._claim

    def is_partial(self, digest: Digest, fd: int) -> bool: ...  # used by: Downloads._claim

    def is_stored_from(self, digest: Digest, fd: int) -> bool: ...  # used by: Download.follow

    # commit a verified file: used by Download._commit
    def commit_partial(self, digest: Digest) -> None: ...

    def drop_partial(self, digest: Digest) -> None: ...  # used by: Download, Downloads._claim

    # used by: Download (leading)
    def write_partial_meta(self, digest: Digest, size: int | None) -> None: ...

    def read_partial_meta(self, digest: Digest) -> int | None: ...  # used by: Download.follow

    # used by: http/activity (downloads led by other workers)
    def in_flight_partials(self) -> Iterator[tuple[Digest, int, int | None]]: ...

    # coordination --------------------------------------------------------------------------
    # used by: Proxy (manifest fetches), Maintenance, eviction, process/serve
    def lock_path(self, name: str) -> Path: ...
