"""The cache index (diskcache, SQLite underneath, safe across worker processes).

It holds what the content-addressed files cannot say by themselves:
- tags: which digest a tag pointed to and when that was learned;
- media types: the type a manifest was served with;
- entries: every stored file's size, kind and last access, for LRU eviction, plus the total;
- counters: hits and misses, for `mirror status`;
- bucket objects (with `[s3]`): each object's size and last access as this node saw it (S3
  keeps no access time), for the bucket's bounds (tiers/bounds.py), plus their total.

Access times are batched in memory and written in one transaction per flush, so a cache hit
costs no disk write. Losing the index loses nothing that matters: `rebuild_entries` recreates
the entries from the store, media types are sniffed from the manifests' bytes, and tags are
asked again upstream.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from mirror import metrics
from mirror.oci.mediatypes import sniff_media_type
from mirror.oci.reference import Digest, parse_digest

log = logging.getLogger("mirror.index")

# How often a serving process writes its batched access times (maintenance.py does).
ACCESS_FLUSH_SECONDS = 2.0
TOTAL = "total_bytes"
COUNT = "entry_count"
COPY_TOTAL = "copy_bytes"  # the stored bytes of relay copies (cluster: what another node owns)
ENTRIES_COMPLETE = "entries_complete"
BUCKET_TOTAL = "bucket_bytes"
BUCKET_COUNT = "bucket_count"
BUCKET_KNOWN = "bucket_known"  # the bucket (endpoint, bucket, prefix) whose listing is held
SCAN_PAGE = 256  # keys read at a time by Index.scan


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    fetched_at: float  # wall-clock seconds

    def age(self) -> float:
        return time.time() - self.fetched_at


@dataclass(frozen=True, slots=True)
class Entry:
    digest: Digest
    size: int
    last_access: float
    kind: str  # "blob" or "manifest"


# What a full disk, a read-only cache dir or a damaged index raises from SQLite ("database or
# disk is full", "attempt to write a readonly database", "database disk image is malformed")
# or diskcache (its files, lock timeouts).
INDEX_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout)
FAILURE_LOG_SECONDS = 10.0
_last_failure_log = 0.0


def _failed(operation: str, exc: BaseException) -> None:
    global _last_failure_log
    metrics.INDEX_FAILURES.labels(operation).inc()
    now = time.monotonic()
    if now - _last_failure_log >= FAILURE_LOG_SECONDS:  # not once per request
        _last_failure_log = now
        log.error("index operation failed: serving anyway; free space in the cache dir or make "
                  "it writable (a damaged index is replaced at the next start)",
                  extra={"operation": operation, "error": str(exc)})


class _GuardedCache(diskcache.Cache):  # type: ignore[misc]
    """A diskcache that never fails a request: a lost write costs a tag, an access time or a
    counter, which are asked or counted again; a failed read answers the default (unknown:
    asked upstream, or private until confirmed). Failures are logged and counted
    (mirror_index_failures_total). Operations inside a transaction fail with it, whole."""

    def _guard(self, name: str, default: Any, *args: Any, **kwargs: Any) -> Any:
        write = getattr(diskcache.Cache, name)
        if self._txn_id == threading.get_ident():
            return write(self, *args, **kwargs)  # the enclosing transaction answers for it
        try:
            return write(self, *args, **kwargs)
        except INDEX_ERRORS as exc:
            _failed(name, exc)
            return default

    def get(self, key: Any, default: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._guard("get", default, key, default, *args, **kwargs)

    def set(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("set", False, *args, **kwargs)

    def add(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("add", False, *args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("delete", False, *args, **kwargs)

    def incr(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("incr", 0, *args, **kwargs)

    def decr(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("decr", 0, *args, **kwargs)

    def touch(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard("touch", False, *args, **kwargs)

    @contextlib.contextmanager
    def transact(self, retry: bool = False) -> Iterator[None]:
        if self._txn_id == threading.get_ident():
            with super().transact(retry):
                yield
            return
        txn = super().transact(retry)
        try:
            txn.__enter__()
        except INDEX_ERRORS as exc:
            _failed("transaction", exc)
            yield  # without a transaction: each operation is guarded on its own
            return
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(*INDEX_ERRORS):
                txn.__exit__(type(exc), exc, exc.__traceback__)  # rolls back
            if not isinstance(exc, INDEX_ERRORS):
                raise
            _failed("transaction", exc)
            return
        try:
            txn.__exit__(None, None, None)  # commits
        except INDEX_ERRORS as exc:
            _failed("transaction", exc)


def _open(directory: Path) -> diskcache.Cache:
    return _GuardedCache(str(directory), eviction_policy="none", size_limit=2**62,
                         statistics=False)


OPEN_BUSY_SECONDS = 30.0  # how long a starting worker waits for the others' writes


def _open_when_free(directory: Path) -> diskcache.Cache:
    """Other workers writing make SQLite answer "database is locked" to one opening it: that
    is waited out, never taken for a full disk (a worker on a private copy would keep tags and
    pins the others never see)."""
    deadline = time.monotonic() + OPEN_BUSY_SECONDS
    while True:
        try:
            return _open(directory)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


READ_ONLY_COPY_LIMIT = 256 * 1024 * 1024  # bytes of a read-only index copied to a temp dir


def _writable(directory: Path) -> bool:
    return os.access(directory if directory.exists() else directory.parent, os.W_OK)


def _temporary_copy(directory: Path) -> Path:
    """SQLite cannot open an index on a read-only cache dir (it writes even to read): this
    process works on a copy in a temporary directory (tags and media types kept, nothing
    written back); an index too big to copy starts empty."""
    copy = Path(tempfile.mkdtemp(prefix="mirror-index-"))
    with contextlib.suppress(OSError):
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        if size <= READ_ONLY_COPY_LIMIT:
            shutil.copytree(directory, copy, dirs_exist_ok=True)
    log.warning("cache directory is read-only: the index is a temporary copy for this "
                "process", extra={"index": str(directory), "copy": str(copy)})
    return copy


@contextlib.contextmanager
def _opening(directory: Path) -> Iterator[None]:
    """Workers open the index one at a time: one that finds it damaged replaces it while no
    other is half-way through opening the files it deletes."""
    locks = directory.parent / "locks"  # the store's lock directory (cache/store.py)
    try:
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{directory.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a read-only or full cache dir: nothing is replaced there anyway
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Index:
    def __init__(self, directory: Path) -> None:
        self._temporary: Path | None = None
        if not _writable(directory):
            directory = self._temporary = _temporary_copy(directory)
        with _opening(directory):
            self._open(directory)
        self._accessed: dict[str, float] = {}

    def _open(self, directory: Path) -> None:
        try:
            self.db = _open_when_free(directory)
            diskcache.Cache.get(self.db, ENTRIES_COMPLETE)  # unguarded: does it read at all?
        except (sqlite3.OperationalError, OSError) as exc:
            if self._temporary is not None:
                raise
            # Full, read-only or locked: not damaged, so not to be deleted (a worker started
            # on a full disk must not take the index with it).
            log.error("index cannot be opened in place: using a temporary copy", extra={
                "error": str(exc)})
            directory = self._temporary = _temporary_copy(directory)
            self.db = _open(directory)
        except sqlite3.DatabaseError as exc:
            log.warning("index damaged: starting a new one", extra={"error": str(exc)})
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
                media_type: str, fetched_at: float | None = None) -> TagEntry:
        entry = TagEntry(str(digest), media_type, time.time() if fetched_at is None
                         else fetched_at)
        self.db.set(self._tag_key(upstream, repository, tag),
                    (entry.digest, entry.media_type, entry.fetched_at))
        return entry

    def tags(self) -> Iterator[tuple[str, str, str, TagEntry]]:
        """Every known tag as (upstream, repository, tag, entry)."""
        for key in self.scan("tag\0"):
            value = self.db.get(key)
            if value:
                _, upstream, repository, tag = key.split("\0")
                yield upstream, repository, tag, TagEntry(*value)

    def repository_tags(self, upstream: str, repository: str) -> dict[str, TagEntry]:
        """The known tags of one repository."""
        found = {}
        for key in self.scan(f"tag\0{upstream}\0{repository}\0"):
            value = self.db.get(key)
            if value:
                found[key.rsplit("\0", 1)[1]] = TagEntry(*value)
        return found

    def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        self.db.delete(self._tag_key(upstream, repository, tag))

    # the keys under a prefix, in order: an indexed range of diskcache's SQLite table ------
    def scan(self, prefix: str, after: str | None = None, page: int = SCAN_PAGE
             ) -> Iterator[str]:
        """The str keys starting with `prefix`, in order, those after `after` only (a key).
        A page at a time, so a scan costs what it reads, not the whole index; a failed read
        ends it (as a failed get answers unknown)."""
        stop = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        low, op = (prefix, ">=") if after is None or after < prefix else (after, ">")
        while True:
            try:
                rows = self.db._sql(
                    f"SELECT key FROM Cache WHERE key {op} ? AND key < ? AND raw = 1 "
                    "ORDER BY key LIMIT ?", (low, stop, page)).fetchall()
            except INDEX_ERRORS as exc:
                _failed("scan", exc)
                return
            keys = [key for (key,) in rows if isinstance(key, str)]
            yield from keys
            if len(rows) < page:
                return
            low, op = rows[-1][0], ">"

    def _components(self, kind: str, upstream: str, after: str | None) -> Iterator[str]:
        """The distinct repositories under `kind\0upstream\0`, in order, those after `after`
        only: one indexed lookup per repository (the keys of one are skipped at once)."""
        base = f"{kind}\0{upstream}\0"
        start = None if after is None else f"{base}{after}\x01"  # past every key of `after`
        while True:
            key = next(self.scan(base, start, page=1), None)
            if key is None:
                return
            repository = key[len(base):].split("\0", 1)[0]
            yield repository
            start = f"{base}{repository}\x01"

    # referrers indexes (cached like tags: what a subject's referrers were, and when) --------
    @staticmethod
    def _referrers_key(upstream: str, repository: str, subject: Digest,
                       artifact_type: str) -> str:
        return f"ref\0{upstream}\0{repository}\0{subject}\0{artifact_type}"

    def get_referrers(self, upstream: str, repository: str, subject: Digest,
                      artifact_type: str) -> tuple[TagEntry, str] | None:
        """(the stored index's digest, Content-Type and time, OCI-Filters-Applied)."""
        value = self.db.get(self._referrers_key(upstream, repository, subject, artifact_type))
        return (TagEntry(*value[:3]), value[3]) if value else None

    def set_referrers(self, upstream: str, repository: str, subject: Digest,
                      artifact_type: str, digest: Digest, content_type: str,
                      filters_applied: str) -> None:
        self.db.set(self._referrers_key(upstream, repository, subject, artifact_type),
                    (str(digest), content_type, time.time(), filters_applied))

    def repository_referrers(self, upstream: str, repository: str
                             ) -> list[tuple[Digest, str, TagEntry]]:
        """The referrers answers kept for one repository: (subject, artifactType, entry)."""
        found = []
        for key in self.scan(f"ref\0{upstream}\0{repository}\0"):
            value = self.db.get(key)
            if value:
                subject, artifact_type = key.split("\0")[3:5]
                with contextlib.suppress(Exception):
                    found.append((parse_digest(subject), artifact_type, TagEntry(*value[:3])))
        return found

    def referrers_digests(self) -> Iterator[tuple[str, str, Digest, str, Digest]]:
        """Every referrers answer kept: (upstream, repository, subject, artifactType, its
        index's digest)."""
        for key in self.scan("ref\0"):
            value = self.db.get(key)
            if value:
                _, upstream, repository, subject, artifact_type = key.split("\0")
                with contextlib.suppress(Exception):
                    yield (upstream, repository, parse_digest(subject), artifact_type,
                           parse_digest(value[0]))

    def delete_referrers(self, upstream: str, repository: str, subject: Digest,
                         artifact_type: str) -> None:
        self.db.delete(self._referrers_key(upstream, repository, subject, artifact_type))

    # which repositories hold a manifest (for the catalog and `mirror purge`) ----------------
    @staticmethod
    def _held_key(upstream: str, repository: str, digest: Digest) -> str:
        return f"held\0{upstream}\0{repository}\0{digest}"

    def hold(self, upstream: str, repository: str, digest: Digest) -> None:
        """A manifest was answered under (upstream, repository): the repository holds it
        (the proxy writes it at a miss and at most once a minute per process for hits; tags
        say the same for what is tagged). Dropped by `mirror purge`, not by eviction: a
        reader checks that the manifest is still stored."""
        self.db.add(self._held_key(upstream, repository, digest), time.time())

    def repository_held(self, upstream: str, repository: str) -> set[Digest]:
        found = set()
        for key in self.scan(f"held\0{upstream}\0{repository}\0"):
            with contextlib.suppress(Exception):
                found.add(parse_digest(key.rsplit("\0", 1)[1]))
        return found

    def held(self) -> Iterator[tuple[str, str, Digest]]:
        """Every (upstream, repository, manifest digest) a repository was seen to hold."""
        for key in self.scan("held\0"):
            _, upstream, repository, digest = key.split("\0")
            with contextlib.suppress(Exception):
                yield upstream, repository, parse_digest(digest)

    def release(self, upstream: str, repository: str, digest: Digest) -> None:
        self.db.delete(self._held_key(upstream, repository, digest))

    def repositories(self, upstream: str, after: str | None = None) -> Iterator[str]:
        """The repositories of `upstream` with a tag or a held manifest, in order, those
        after `after` only (whether their manifests are still stored is the caller's to
        check: `repository_digests`)."""
        seen = None
        for repository in heapq.merge(self._components("tag", upstream, after),
                                      self._components("held", upstream, after)):
            if repository != seen:
                seen = repository
                yield repository

    def repository_digests(self, upstream: str, repository: str) -> Iterator[Digest]:
        """The manifests a repository's tags point to, then those it holds (lazily: the
        catalog stops at the first one stored)."""
        for entry in self.repository_tags(upstream, repository).values():
            with contextlib.suppress(Exception):
                yield parse_digest(entry.digest)
        yield from self.repository_held(upstream, repository)

    # content `mirror purge` removed: a worker holding it in memory must not store it again -
    def mark_purged(self, digest: Digest) -> None:
        self.db.set(f"purged\0{digest}", time.time())

    def was_purged(self, digest: Digest) -> bool:
        """Whether `mirror purge` removed this content (and it was not stored since)."""
        return self.db.get(f"purged\0{digest}") is not None

    def forget_access(self, upstream: str, repository: str, digest: Digest) -> None:
        self.db.delete(self._access_key(upstream, repository, digest))

    def forget_provenance(self, digest: Digest) -> None:
        """The content is gone: whatever brings it back says again where it came from."""
        self.db.delete(self._provenance_key(digest))

    # signature policy verdicts (pull/trust.py): digests a policy allows, by its fingerprint -
    def set_trusted(self, policy: str, digest: Digest) -> None:
        self.db.set(f"trust\0{policy}\0{digest}", 1)

    def is_trusted(self, policy: str, digest: Digest) -> bool:
        return self.db.get(f"trust\0{policy}\0{digest}") is not None

    def record_denial(self, policy: str, what: str, reason: str, keep: int = 20) -> None:
        """A signature policy's refusal, for the status page (the last `keep`, all workers)."""
        with self.db.transact():
            recent = list(self.db.get("denials", []))[-(keep - 1):]
            self.db.set("denials", [*recent, (time.time(), policy, what, reason)])

    def recent_denials(self) -> list[tuple[float, str, str, str]]:
        """(wall-clock time, policy, upstream/repository@digest, reason), oldest first."""
        return [(float(t), str(p), str(w), str(r)) for t, p, w, r in self.db.get("denials", [])]

    # sync rules (pull/sync.py): each rule's last run, and the images it keeps -------------
    def sync_state(self, rule: str) -> dict[str, Any]:
        """The rule's run record (started, finished, ok, result, next…); {} before any."""
        return dict(self.db.get(f"sync\0{rule}", {}))

    def set_sync_state(self, rule: str, state: dict[str, Any]) -> None:
        self.db.set(f"sync\0{rule}", state)

    def synced(self, rule: str) -> dict[str, str]:
        """`upstream/repository:tag` → the digest the rule cached whole for it."""
        return dict(self.db.get(f"synced\0{rule}", {}))

    def set_synced(self, rule: str, images: dict[str, str]) -> None:
        self.db.set(f"synced\0{rule}", images)

    # pins an admin made at run time (the cache browser), beside `[cache] pin` ---------------
    def add_pin(self, image: str, user: str) -> None:
        """`image` as `upstream/repository:tag` or `…@digest` (str of an ImageRef)."""
        self.db.set(f"pin\0{image}", (user, time.time()))

    def remove_pin(self, image: str) -> bool:
        return bool(self.db.delete(f"pin\0{image}"))

    def runtime_pins(self) -> dict[str, tuple[str, float]]:
        """image → (the admin who pinned it, when)."""
        found = {}
        for key in self.scan("pin\0"):
            value = self.db.get(key)
            if value:
                found[key[4:]] = (str(value[0]), float(value[1]))
        return found

    # the status page's history (http/history.py): one row of counters per slot ------------
    def history_slot(self) -> int:
        return int(self.db.get("history-slot", -1))

    def append_history(self, slot: int, row: dict[str, float], keep: int) -> None:
        with self.db.transact():
            rows = list(self.db.get("history", []))[-(keep - 1):]
            self.db.set("history", [*rows, row])
            self.db.set("history-slot", slot)

    def history(self) -> list[dict[str, float]]:
        """The rows, oldest first."""
        return list(self.db.get("history", []))

    # manifests -----------------------------------------------------------------------------
    def set_media_type(self, digest: Digest, media_type: str) -> None:
        self.db.set(f"mt\0{digest}", media_type)

    def media_type(self, digest: Digest, data: bytes) -> str:
        value = self.db.get(f"mt\0{digest}")
        return value if isinstance(value, str) else sniff_media_type(data)

    def is_manifest(self, digest: Digest) -> bool:
        return self.db.get(f"mt\0{digest}") is not None

    # entries (sizes and access times, for eviction) ---------------------------------------
    def add_entry(self, digest: Digest, size: int, kind: str,
                  last_access: float | None = None) -> None:
        key = f"e\0{digest}"
        with self.db.transact():
            self.db.delete(f"purged\0{digest}")  # stored again: no longer purged
            if self.db.get(key) is None:
                self.db.incr(TOTAL, size)
                self.db.incr(COUNT)
                if self.db.get(f"c\0{digest}") is not None:
                    self.db.incr(COPY_TOTAL, size)
                upstream = self.db.get(f"up\0{digest}")
                if upstream is not None:
                    self.db.incr(f"total\0{upstream}", size)
            self.db.set(key, (size, time.time() if last_access is None else last_access, kind))

    def remove_entry(self, digest: Digest) -> None:
        key = f"e\0{digest}"
        with self.db.transact():
            value = self.db.get(key)
            if value is not None:
                self.db.delete(key)
                self.db.decr(TOTAL, value[0])
                self.db.decr(COUNT)
                if self.db.delete(f"c\0{digest}"):
                    self.db.decr(COPY_TOTAL, value[0])
                upstream = self.db.get(f"up\0{digest}")
                if upstream is not None:
                    self.db.decr(f"total\0{upstream}", value[0])
            self.db.delete(f"up\0{digest}")
            self.db.delete(f"mt\0{digest}")

    # the upstream each digest came through first, for per-upstream bounds -----------------
    def attribute(self, digest: Digest, upstream: str) -> None:
        """Before `digest` enters the store from `upstream` (the first upstream keeps it)."""
        if self.db.get(f"up\0{digest}") is None:
            self.db.add(f"up\0{digest}", upstream)

    def upstream_of(self, digest: Digest) -> str | None:
        value = self.db.get(f"up\0{digest}")
        return value if isinstance(value, str) else None

    def upstream_total(self, upstream: str) -> int:
        """Bytes stored that came through `upstream` first."""
        return int(self.db.get(f"total\0{upstream}", 0))

    def mark_copy(self, digest: Digest) -> None:
        """`digest` is being relayed from the node that owns it: once stored it is a relay
        copy, kept within `[cluster] relay_cache` (mark first: the entry comes at commit)."""
        key = f"c\0{digest}"
        with self.db.transact():
            if self.db.get(key) is None:
                self.db.set(key, 1)
                if (value := self.db.get(f"e\0{digest}")) is not None:
                    self.db.incr(COPY_TOTAL, value[0])

    def unmark_copy(self, digest: Digest) -> None:
        """The node owns `digest` now: its stored copy is its own."""
        with self.db.transact():
            if self.db.delete(f"c\0{digest}") and (
                    value := self.db.get(f"e\0{digest}")) is not None:
                self.db.decr(COPY_TOTAL, value[0])

    def record_upload(self, upload_id: str, pid: int | None) -> None:
        """A multipart upload to the bucket started (pid: the uploading process) or ended
        (None), so that one a kill -9 interrupted is aborted at the next start."""
        if pid is None:
            self.db.delete(f"u\0{upload_id}")
        else:
            self.db.set(f"u\0{upload_id}", pid)

    def uploads(self) -> dict[str, int]:
        """Multipart uploads in progress: upload id -> the process that started it."""
        found: dict[str, int] = {}
        for key in self.db.iterkeys():
            if isinstance(key, str) and key.startswith("u\0"):
                pid = self.db.get(key)
                if isinstance(pid, int):
                    found[key[2:]] = pid
        return found

    def is_copy(self, digest: Digest) -> bool:
        return self.db.get(f"c\0{digest}") is not None

    def copy_bytes(self) -> int:
        return int(self.db.get(COPY_TOTAL, 0))

    # bucket objects (sizes and this node's access times, for the bucket's bounds) ---------
    def bucket_add(self, digest: Digest, size: int, last_access: float | None = None) -> None:
        """The bucket holds `digest` (an upload completed, or it was found there): a new
        object gets `last_access` (default now); a known one is touched (batched)."""
        key = f"b\0{digest}"
        if self.db.get(key) is not None:
            self.touch(digest)
            return
        with self.db.transact():
            self.db.delete(f"bt\0{digest}")
            if self.db.get(key) is None:
                self.db.incr(BUCKET_TOTAL, size)
                self.db.incr(BUCKET_COUNT)
                self.db.set(key, (size, time.time() if last_access is None else last_access))

    def bucket_remove(self, digest: Digest, trimmed: bool = False) -> None:
        """The object is gone; `trimmed`: deleted for the bounds, so not to be written behind
        again from the local dir (bucket_trimmed) unless it is fetched again."""
        key = f"b\0{digest}"
        with self.db.transact():
            if trimmed:
                self.db.set(f"bt\0{digest}", 1)
            value = self.db.get(key)
            if value is not None:
                self.db.delete(key)
                self.db.decr(BUCKET_TOTAL, value[0])
                self.db.decr(BUCKET_COUNT)

    def bucket_trimmed(self, digest: Digest) -> bool:
        return self.db.get(f"bt\0{digest}") is not None

    def bucket_has(self, digest: Digest) -> bool:
        return self.db.get(f"b\0{digest}") is not None

    def bucket_objects(self) -> Iterator[Entry]:
        for key in self.db.iterkeys():
            if isinstance(key, str) and key.startswith("b\0"):
                value = self.db.get(key)
                if value is not None:
                    with contextlib.suppress(Exception):
                        yield Entry(parse_digest(key[2:]), value[0], value[1], "blob")

    def bucket_total(self) -> int:
        return int(self.db.get(BUCKET_TOTAL, 0))

    def bucket_count(self) -> int:
        return int(self.db.get(BUCKET_COUNT, 0))

    def bucket_known(self, identity: str) -> bool:
        """Whether the objects held are the listing of this bucket (endpoint, bucket, prefix)
        and what this node saw since; False for a new or lost index or another bucket."""
        return bool(self.db.get(BUCKET_KNOWN) == identity)

    def rebuild_bucket(self, listed: Iterator[tuple[Digest, int, float]],
                       identity: str) -> int:
        """Replace the bucket objects with a listing (LastModified as the last access, unless
        this node knew a later one); returns the count."""
        known = {e.digest: e.last_access for e in self.bucket_objects()}
        count = total = 0
        with self.db.transact():
            for key in list(self.db.iterkeys()):
                if isinstance(key, str) and key.startswith("b\0"):
                    self.db.delete(key)
            for digest, size, modified in listed:
                self.db.set(f"b\0{digest}", (size, max(modified, known.get(digest, 0.0))))
                count += 1
                total += size
            self.db.set(BUCKET_TOTAL, total)
            self.db.set(BUCKET_COUNT, count)
            self.db.set(BUCKET_KNOWN, identity)
        log.info("bucket index rebuilt from the listing", extra={
            "objects": count, "bytes": total})
        return count

    def touch(self, digest: Digest) -> None:
        """Note an access (of the local entry, and of the bucket object if there is one);
        written at the next flush()."""
        self._accessed[str(digest)] = time.time()

    def flush(self) -> None:
        accessed, self._accessed = self._accessed, {}
        if not accessed:
            return
        with self.db.transact():
            for digest, when in accessed.items():
                value = self.db.get(f"e\0{digest}")
                if value is not None and value[1] < when:
                    self.db.set(f"e\0{digest}", (value[0], when, value[2]))
                value = self.db.get(f"b\0{digest}")
                if value is not None and value[1] < when:
                    self.db.set(f"b\0{digest}", (value[0], when))

    def set_ratelimit(self, upstream: str, limit: str | None, remaining: str) -> None:
        self.db.set(f"ratelimit\0{upstream}", (limit, remaining, time.time()))

    def ratelimit(self, upstream: str) -> tuple[str | None, str, float] | None:
        value = self.db.get(f"ratelimit\0{upstream}")
        return (value[0], value[1], value[2]) if value else None

    # which repositories a private upstream confirmed to hold a digest ----------------------
    @staticmethod
    def _access_key(upstream: str, repository: str, digest: Digest) -> str:
        return f"acl\0{upstream}\0{repository}\0{digest}"

    def add_count(self, key: str, delta: int, ttl: float) -> int:
        """A counter shared by the workers (failed logins per address), gone after `ttl`
        seconds. A failing index answers `delta`: the count of this process's attempt alone."""
        full, value = f"count\0{key}", delta
        with self.db.transact():  # guarded: a failure is logged and counted, not raised
            value = int(self.db.get(full, 0)) + delta
            self.db.set(full, value, expire=ttl)
        return value

    def remember_access(self, upstream: str, repository: str, digest: Digest) -> None:
        self.db.set(self._access_key(upstream, repository, digest), True)

    def has_access(self, upstream: str, repository: str, digest: Digest) -> bool:
        return bool(self.db.get(self._access_key(upstream, repository, digest)))

    # where content came from: "public" (an anonymous upstream served it) or "private" -------
    @staticmethod
    def _provenance_key(digest: Digest) -> str:
        return f"provenance\0{digest}"

    def provenance(self, digest: Digest) -> str | None:
        value = self.db.get(self._provenance_key(digest))
        return value if isinstance(value, str) else None

    def mark_private(self, digest: Digest) -> None:
        """Before content fetched with credentials can be stored: restrictive, so it may be
        written early. Never downgrades "public" (what anyone can fetch is no secret)."""
        self.db.add(self._provenance_key(digest), "private")

    def mark_public(self, digest: Digest) -> None:
        """Only once an anonymous upstream actually served or confirmed the digest."""
        self.db.set(self._provenance_key(digest), "public")

    def total_bytes(self) -> int:
        return int(self.db.get(TOTAL, 0))

    def entry_count(self) -> int:
        return int(self.db.get(COUNT, 0))

    def entries(self) -> Iterator[Entry]:
        for key in self.db.iterkeys():
            if isinstance(key, str) and key.startswith("e\0"):
                value = self.db.get(key)
                if value is not None:
                    with contextlib.suppress(Exception):
                        yield Entry(parse_digest(key[2:]), value[0], value[1], value[2])

    def entry(self, digest: Digest) -> Entry | None:
        value = self.db.get(f"e\0{digest}")
        return None if value is None else Entry(digest, value[0], value[1], value[2])

    def entries_complete(self) -> bool:
        return bool(self.db.get(ENTRIES_COMPLETE))

    def rebuild_entries(self, stored: Iterator[tuple[Digest, int, float]]) -> int:
        """Recreate every entry and the total from the store's files; returns the count."""
        started = time.monotonic()
        count, total, copies = 0, 0, 0
        with self.db.transact():
            for key in list(self.db.iterkeys()):
                if isinstance(key, str) and key.startswith("e\0"):
                    self.db.delete(key)
            shares: dict[str, int] = {}
            for digest, size, mtime in stored:
                kind = "manifest" if self.is_manifest(digest) else "blob"
                self.db.set(f"e\0{digest}", (size, mtime, kind))
                count += 1
                total += size
                copies += size if self.is_copy(digest) else 0
                if (upstream := self.upstream_of(digest)) is not None:
                    shares[upstream] = shares.get(upstream, 0) + size
            for key in list(self.db.iterkeys()):
                if isinstance(key, str) and key.startswith("total\0"):
                    self.db.delete(key)
            for upstream, size in shares.items():
                self.db.set(f"total\0{upstream}", size)
            self.db.set(TOTAL, total)
            self.db.set(COUNT, count)
            self.db.set(COPY_TOTAL, copies)
            self.db.set(ENTRIES_COMPLETE, True)
        log.info("index entries rebuilt", extra={
            "entries": count, "bytes": total,
            "seconds": round(time.monotonic() - started, 3)})
        return count

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        self.db.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
