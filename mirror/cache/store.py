"""The content-addressed disk store: the only module that builds paths inside the cache dir.

Layout under the cache dir:
    blobs/<algorithm>/<first two hex>/<hex>   verified content (blobs and manifests alike)
    tmp/<algorithm>-<hex>.partial             a download in progress (see pull/downloads.py),
                                               flock-ed by the process writing it
    tmp/<algorithm>-<hex>.partial.meta        its expected size, for the other workers
    tmp/.ready-<pid>                           readiness probe (see http/health.py)
    index/                                     the diskcache index (see index.py)
    locks/<name>.lock                          locks between workers (see locks.py)
    auth.secret                                the token-signing key (see http/access.py)

Content enters `blobs/` only by an atomic rename after its digest was verified, so a crash at
any moment leaves `blobs/` holding only verified files; `tmp/` is emptied at start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mirror.cache.locks import is_locked
from mirror.oci.reference import HEX_LENGTH, Digest

PARTIAL_SUFFIX = ".partial"
META_SUFFIX = ".meta"
SECRET_FILE = "auth.secret"

log = logging.getLogger("mirror.store")


class StorageFailed(Exception):
    """The mirror's own disk could not take content it needed to (full, read-only, an I/O
    error), and nothing else could serve the client instead."""


class DigestMismatch(Exception):
    def __init__(self, expected: Digest, actual: str) -> None:
        super().__init__(f"content does not match {expected}: got {actual}")
        self.expected = expected
        self.actual = actual


OnCommit = Callable[[Digest, int, str], None]  # (digest, size, kind) after content is stored


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.on_commit: OnCommit | None = None
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.index_dir = root / "index"
        self.locks_dir = root / "locks"
        self._blobs = str(self.blobs_dir)
        for d in (self.blobs_dir, self.tmp_dir, self.locks_dir):
            with contextlib.suppress(OSError):  # a read-only cache dir still serves its content
                d.mkdir(parents=True, exist_ok=True)

    # paths -------------------------------------------------------------------------------
    def path(self, digest: Digest) -> Path:
        return Path(self._file(digest))

    def _file(self, digest: Digest) -> str:
        """`path` as a string: the reads on the hot path (a manifest hit) skip pathlib."""
        return f"{self._blobs}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def lock_path(self, name: str) -> Path:
        return self.locks_dir / f"{name}.lock"

    def partial_path(self, digest: Digest) -> Path:
        return self.tmp_dir / f"{digest.algorithm}-{digest.hex}{PARTIAL_SUFFIX}"

    def partial_meta_path(self, digest: Digest) -> Path:
        partial = self.partial_path(digest)
        return partial.with_name(partial.name + META_SUFFIX)

    def secret_path(self) -> Path:
        return self.root / SECRET_FILE

    # reads -------------------------------------------------------------------------------
    def has(self, digest: Digest) -> bool:
        return os.path.exists(self._file(digest))

    def size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self._file(digest)).st_size
        except FileNotFoundError:
            return None

    def open_fd(self, digest: Digest) -> int | None:
        """An O_RDONLY fd on the stored file, or None. The caller closes it."""
        try:
            return os.open(self._file(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def read_bytes(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    # writes ------------------------------------------------------------------------------
    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store small content (manifests) after checking it against its digest."""
        actual = digest.hasher()
        actual.update(data)
        if actual.hexdigest() != digest.hex:
            raise DigestMismatch(digest, f"{digest.algorithm}:{actual.hexdigest()}")
        if self.path(digest).exists():
            return
        tmp = self.tmp_dir / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.small"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fdatasync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            os.close(fd)
        self.commit(tmp, digest, "manifest")

    def put_stream(self, digest: Digest, read: Callable[[int], bytes]) -> int:
        """Store content read in chunks from `read`, verified before it enters the store."""
        tmp = self.tmp_dir / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.import"
        hasher = digest.hasher()
        size = 0
        try:
            with open(tmp, "wb") as f:
                while chunk := read(1 << 20):
                    hasher.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fdatasync(f.fileno())
            if hasher.hexdigest() != digest.hex:
                raise DigestMismatch(digest, f"{digest.algorithm}:{hasher.hexdigest()}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.commit(tmp, digest)
        return size

    def commit(self, tmp: Path, digest: Digest, kind: str = "blob") -> None:
        """Atomically move verified content from tmp/ into place. Raises the OSError of a full
        or read-only disk, with `tmp` removed."""
        final = self.path(digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            size = final.stat().st_size
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.on_commit is not None:
            try:
                self.on_commit(digest, size, kind)
            except Exception:  # the content is stored; only its bookkeeping is missing
                log.exception("recording stored content failed", extra={"digest": str(digest)})

    def delete(self, digest: Digest) -> int:
        """Remove stored content; returns the bytes freed."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    # downloads in progress (pull/downloads.py) --------------------------------------------
    def open_partial(self, digest: Digest) -> int:
        """An O_RDWR fd on the partial file of `digest`, created when missing (OSError on a
        full or read-only disk). Whoever holds its lock (locks.try_lock) writes it."""
        return os.open(self.partial_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def is_partial(self, digest: Digest, fd: int) -> bool:
        """Whether `fd` is still the partial file of `digest` (not renamed or dropped)."""
        try:
            return os.stat(self.partial_path(digest)).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def is_stored_from(self, digest: Digest, fd: int) -> bool:
        """Whether the partial file open as `fd` was committed as `digest`."""
        try:
            return self.path(digest).stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def commit_partial(self, digest: Digest) -> None:
        """Commit the (verified) partial file of `digest`; OSError as `commit`."""
        self.commit(self.partial_path(digest), digest)
        with contextlib.suppress(OSError):
            self.partial_meta_path(digest).unlink()

    def drop_partial(self, digest: Digest) -> None:
        """Unlink the partial file and its metadata (a process still reading it sees
        st_nlink 0)."""
        for path in (self.partial_path(digest), self.partial_meta_path(digest)):
            with contextlib.suppress(OSError):
                path.unlink()

    def write_partial_meta(self, digest: Digest, size: int | None) -> None:
        """The expected size, for the processes following the download; OSError when the
        disk refuses it (nothing is left behind)."""
        meta = self.partial_meta_path(digest)
        tmp = meta.with_name(meta.name + f".{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"size": size}))
            os.replace(tmp, meta)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def read_partial_meta(self, digest: Digest) -> int | None:
        """The expected size written by the download's leader, None when not (yet) known."""
        return _read_meta(self.partial_meta_path(digest))

    def in_flight_partials(self) -> Iterator[tuple[Digest, int, int | None]]:
        """Every download in progress on disk, by any process: (digest, written, size)."""
        try:
            entries = [e for e in os.scandir(self.tmp_dir) if e.name.endswith(PARTIAL_SUFFIX)]
        except OSError:
            return
        for entry in entries:
            algorithm, _, hex_ = entry.name.removesuffix(PARTIAL_SUFFIX).partition("-")
            try:
                written = entry.stat().st_size
            except OSError:
                continue
            yield Digest(algorithm, hex_), written, _read_meta(Path(entry.path + META_SUFFIX))

    # other files ---------------------------------------------------------------------------
    def probe_write(self) -> None:
        """Write and remove a small file in tmp/: OSError when the cache dir refuses writes
        (see `write_problem`)."""
        path = self.tmp_dir / f".ready-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def shared_secret(self) -> bytes:
        """The token-signing key, shared by every worker through the cache dir (created
        once)."""
        path = self.secret_path()
        if path.exists():
            return path.read_bytes()
        # Written whole under another name, then linked into place: a worker that created
        # the final name and then wrote it let a second worker read it empty in between
        # (its tokens were then refused by the first, and the first's by it).
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        draft = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another worker's came first
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
        return path.read_bytes()

    # maintenance -------------------------------------------------------------------------
    def clean_temporaries(self) -> int:
        """Remove leftovers of interrupted downloads (called at start, before serving).

        A partial file whose lock is still held belongs to a live download in another worker
        and is kept.
        """
        removed = 0
        if not self.tmp_dir.is_dir() or not self.locks_dir.is_dir():
            return 0
        for lock in self.locks_dir.iterdir():
            if not is_locked(lock):
                with contextlib.suppress(OSError):  # a read-only cache dir keeps its files
                    lock.unlink(missing_ok=True)
        for entry in self.tmp_dir.iterdir():
            # <digest>.partial, .partial.meta and .partial.meta.<pid> of a live download stay
            partial = entry.name.split(PARTIAL_SUFFIX)[0] + PARTIAL_SUFFIX
            if PARTIAL_SUFFIX in entry.name and is_locked(self.tmp_dir / partial):
                continue
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
        return removed

    def write_problem(self, exc: OSError) -> str:
        """Why the cache dir cannot be written, in an operator's words."""
        if exc.errno == errno.EROFS:
            return f"cache directory is read-only: {self.root}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"cache directory is full: {self.root} ({exc.strerror})"
        return f"cannot write to {self.tmp_dir}: {exc.strerror}"

    def iter_stored(self) -> Iterator[tuple[Digest, int, float]]:
        """Every stored file as (digest, size, mtime); skips anything not named like content."""
        for algo_dir in self.blobs_dir.iterdir():
            length = HEX_LENGTH.get(algo_dir.name)
            if length is None or not algo_dir.is_dir():
                continue
            for shard in algo_dir.iterdir():
                if not shard.is_dir():
                    continue
                for f in shard.iterdir():
                    if len(f.name) != length or not f.name.startswith(shard.name):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = f.stat()
                        yield Digest(algo_dir.name, f.name), st.st_size, st.st_mtime


def _read_meta(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        size = json.loads(path.read_text())["size"]
        return int(size) if size is not None else None
    return None
