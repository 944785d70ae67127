"""The cache index (diskcache, SQLite underneath, safe across worker processes).

It holds what the content-addressed files cannot say by themselves: which digest a tag pointed
to and when that was learned, and the media type a manifest was served with. Losing the index
loses nothing that matters: media types are sniffed from the manifests' bytes, and tags are
asked again upstream.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import diskcache

from mirror.mediatypes import sniff_media_type
from mirror.reference import Digest

log = logging.getLogger("mirror.index")


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    fetched_at: float  # wall-clock seconds

    def age(self) -> float:
        return time.time() - self.fetched_at


def _open(directory: Path) -> diskcache.Cache:
    return diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62,
                           statistics=False)


class Index:
    def __init__(self, directory: Path) -> None:
        try:
            self.db = _open(directory)
            self.db.get("probe")
        except (sqlite3.DatabaseError, OSError) as exc:
            log.warning("index damaged: rebuilding", extra={"error": str(exc)})
            shutil.rmtree(directory, ignore_errors=True)
            self.db = _open(directory)

    # tags ----------------------------------------------------------------------------------
    @staticmethod
    def _tag_key(upstream: str, repository: str, tag: str) -> str:
        return f"tag\0{upstream}\0{repository}\0{tag}"

    def get_tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        value = self.db.get(self._tag_key(upstream, repository, tag))
        return TagEntry(*value) if value else None

    def set_tag(self, upstream: str, repository: str, tag: str, digest: Digest,
                media_type: str) -> TagEntry:
        entry = TagEntry(str(digest), media_type, time.time())
        self.db.set(self._tag_key(upstream, repository, tag),
                    (entry.digest, entry.media_type, entry.fetched_at))
        return entry

    # manifests -----------------------------------------------------------------------------
    def set_media_type(self, digest: Digest, media_type: str) -> None:
        self.db.set(f"mt\0{digest}", media_type)

    def media_type(self, digest: Digest, data: bytes) -> str:
        value = self.db.get(f"mt\0{digest}")
        return value if isinstance(value, str) else sniff_media_type(data)

    def close(self) -> None:
        self.db.close()
