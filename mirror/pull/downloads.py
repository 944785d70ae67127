"""Single-flight blob downloads: one upstream GET per digest, however many clients ask.

A download belongs to no client. Its leader task writes the upstream body into
`tmp/<alg>-<hex>.partial`, hashing as it goes; every client (the first one included) streams
from that file as it grows, with sendfile, starting wherever its range starts. The partial file
is claimed with an flock, so workers in other processes sharing the cache dir follow the file
instead of downloading again, and take the download over when its holder dies (the lock dies
with it). Only content whose digest matched is renamed into the store.

The event loop only moves bytes: a chunk of OFF_LOOP_BYTES or more is written and hashed in a
thread (`off_loop`; hashlib and os.write release the GIL), the leader awaiting it before it
reads the next one, so the bytes land in order and readers see `written` grow as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mirror import metrics
from mirror.cache.locks import try_lock
from mirror.cache.store import StorageFailed
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError
from mirror.oci.reference import Digest
from mirror.pull.content import ContentStore
from mirror.pull.source import BlobStream

log = logging.getLogger("mirror.download")

REMOTE_POLL_SECONDS = 0.01
SPILL_BYTES = 16 * 1024 * 1024
# A chunk this large is hashed (and written) in a thread: on the loop, SHA-256 and the write
# of the bytes a fill streams took most of its CPU time, and every other request waited. A
# smaller one costs the loop less than the thread hop would.
OFF_LOOP_BYTES = 64 * 1024

_T = TypeVar("_T")


async def off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` in the default executor's thread. A caller cancelled meanwhile still waits
    for it to return before the cancellation goes on: it may be reading or writing a file
    descriptor the caller closes once cancelled (and the number could be reused)."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        raise


async def hash_update(hasher: Any, data: bytes | memoryview) -> None:
    """`hasher.update(data)`, in a thread when `data` is OFF_LOOP_BYTES or more."""
    if len(data) >= OFF_LOOP_BYTES:
        await off_loop(hasher.update, data)
    else:
        hasher.update(data)

# fetch(offset) -> the blob's body from `offset` (pull/source.py BlobStream: offset > 0 is a
# resume); a source refusing is a RegistryError, a body breaking off a ConnectionError.
Fetch = Callable[[int], Awaitable[BlobStream]]


class BodySender(Protocol):
    async def send(self, file_fd: int, offset: int, count: int) -> None: ...

    async def send_bytes(self, data: bytes | memoryview) -> None: ...


class State(enum.Enum):
    STARTING = "starting"  # waiting for the upstream's response headers
    STREAMING = "streaming"
    VERIFIED = "verified"  # every byte landed and matched the digest
    FAILED = "failed"


class ClientAbort(Exception):
    """The body a client is streaming cannot be completed: abort its connection."""


class _UpstreamBroke(Exception):
    def __init__(self, pos: int, error: BaseException) -> None:
        super().__init__(repr(error))
        self.pos = pos


class _RelayEnded(Exception):
    """Nobody is reading an uncached relay: it stops (a reader arriving later fetches its own
    bytes from the upstream)."""


MAX_VOUCHED = 8  # readers' fetches kept per download to resume it with


class Download:
    def __init__(self, digest: Digest, store: ContentStore, fd: int | None, leader: bool,
                 upstream: str = "", fetch: Fetch | None = None, attempts: int = 1) -> None:
        self.digest = digest
        self.upstream = upstream  # for the metrics
        self.store = store
        self.fd = fd  # None: no partial file could be created (a full or read-only disk)
        self.leader = leader
        self.owns_partial = leader and fd is not None  # ours to unlink or commit
        self.fetch = fetch  # the starting request's; it may be one the proxy then refused
        self.vouched: list[Fetch] = []  # those of readers confirmed for their name (vouch)
        self.attempts = attempts
        self.size: int | None = None
        self.written = 0
        self.state = State.STARTING
        self.error: RegistryError | StorageFailed | None = None
        self.readers = 0
        self.had_readers = False
        self.resumed = 0
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        # (upstream, repository) this process fetches it for; None when following another
        # worker. Set by the proxy, which decides whether joining needs a confirmation.
        self.origin: tuple[str, str] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # Uncached (the disk filled, or no file could be made): bytes from disk_end on are
        # relayed from memory, never cached.
        self.disk_end: int | None = None if fd is not None else 0
        # The shared relay ended without every byte: readers fetch theirs from the upstream.
        self.relay_gone = False
        # Whether a client arriving now may join. Not once the download failed, nor once it
        # relays what a dropped leader left (that leader failed or ran out of space, and this
        # relay fetches under the name of whoever started following): a client arriving
        # then starts a fresh download under its own name, instead of a body that may be cut.
        self.takes_joiners = True
        self.on_disk_full: Callable[[], None] | None = None
        self._spill: collections.deque[tuple[int, bytes]] = collections.deque()
        self._spill_bytes = 0
        self._positions: dict[object, int] = {}
        self._bodies: list[BlobStream] = []  # every body the leader read, for reject()

    # progress signalling ------------------------------------------------------------------
    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _changed(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def _wait_past(self, *states: State, relay_gone_ok: bool = False) -> None:
        while self.state in states:
            await self._changed()
        if self.state is State.FAILED and not (relay_gone_ok and self.relay_gone):
            assert self.error is not None
            raise self.error

    async def wait_headers(self) -> int | None:
        """The blob's size once the upstream answered; raises the upstream's error (a relay
        that ended for want of space is no error: its readers fetch the bytes themselves)."""
        await self._wait_past(State.STARTING, relay_gone_ok=True)
        return self.size

    async def wait_done(self) -> None:
        """Until the download verified; raises its error when it failed."""
        await self._wait_past(State.STARTING, State.STREAMING)

    def vouch(self, fetch: Fetch) -> None:
        """A reader the proxy confirmed for its (upstream, repository): its fetch may resume
        this download (the request that started it may have been refused after starting it,
        an intruder's under another name, and its fetch would fail everyone's resume)."""
        if len(self.vouched) < MAX_VOUCHED:
            self.vouched.append(fetch)

    async def fetch_any(self, offset: int) -> BlobStream:
        """The rest from `offset`, by the newest confirmed reader's fetch first, the starting
        request's last; one refused (404, 401, 403) hands over to the next."""
        candidates = [*reversed(self.vouched), *([self.fetch] if self.fetch else [])]
        refused: RegistryError | None = None
        for fetch in candidates:
            try:
                return await fetch(offset)
            except RegistryError as exc:
                if exc.status not in (401, 403, 404):
                    raise
                refused = refused or exc
        if refused is None:
            raise RegistryError(ErrorCode.UNKNOWN, f"nothing to fetch {self.digest} with")
        raise refused

    # serving ------------------------------------------------------------------------------
    async def stream(self, sender: BodySender, start: int, length: int) -> None:
        """Send bytes [start, start+length) as they land. The final byte of the blob is held
        back until the whole body verified, so no client ever receives a complete wrong blob.
        Bytes the cache could not keep come from the memory window of an uncached relay, or,
        once gone from it, from the upstream directly.
        """
        fd = self._reader_fd()
        reader = object()
        self.readers += 1
        self.had_readers = True
        self._positions[reader] = start
        pos, end = start, start + length
        try:
            while pos < end:
                if self.state is State.FAILED and not self.relay_gone:
                    raise ClientAbort(str(self.error))
                available = min(self.written, end)
                if self.state is not State.VERIFIED and self.size is not None:
                    available = min(available, self.size - 1)
                on_disk = available if self.disk_end is None else min(available, self.disk_end)
                if pos < on_disk and fd is not None:
                    await sender.send(fd, pos, on_disk - pos)
                    pos = on_disk
                elif self.disk_end is not None and pos < available and (
                        piece := self._spilled(pos, available)) is not None:
                    await sender.send_bytes(piece)
                    pos += len(piece)
                elif pos < available or self.relay_gone:
                    # Gone from memory (or never kept): this reader's own upstream request.
                    self._leave(reader)
                    reader = None
                    await self._stream_direct(sender, fd, pos, end)
                    return
                else:
                    await self._changed()
                    continue
                self._positions[reader] = pos
                if self.disk_end is not None:
                    self._notify()  # the leader may be waiting to drop spilled chunks
        finally:
            if fd is not None:
                os.close(fd)
            if reader is not None:
                self._leave(reader)
            if self.readers == 0 and self.task is not None and self.task.done():
                self._close_fd()

    def _reader_fd(self) -> int | None:
        if self.fd is not None:
            return os.dup(self.fd)
        if self.state is State.VERIFIED and self.disk_end is None:
            return self.store.open_fd(self.digest)  # committed, and our fd closed meanwhile
        return None

    def _leave(self, reader: object) -> None:
        self._positions.pop(reader, None)
        self.readers -= 1
        if self.disk_end is not None or self.readers == 0:
            self._notify()  # lets the relay drop chunks and the abandon check run

    def _spilled(self, pos: int, available: int) -> memoryview | None:
        for offset, chunk in self._spill:
            if offset <= pos < offset + len(chunk):
                return memoryview(chunk)[pos - offset: available - offset]
        return None

    async def _stream_direct(self, sender: BodySender, fd: int | None, pos: int,
                             end: int) -> None:
        """Send [pos, end) from the upstream with this reader's own Range request, uncached.
        When the bytes before `pos` are in `fd` (the partial file as far as it got), the whole
        blob is hashed and its final byte held back until it matched; a range starting past
        them cannot be verified (like any range of a blob still downloading)."""
        if self.fetch is None:
            raise ClientAbort(f"the bytes from {pos} of {self.digest} are no longer available")
        metrics.UNCACHED_RELAYS.labels("direct").inc()
        log.info("relaying a client's rest straight from the upstream", extra={
            "digest": str(self.digest), "offset": pos, "end": end})
        hasher = await off_loop(self._hash_prefix, fd, pos)
        attempts = self.attempts
        while True:
            try:
                pos = await self._send_from_upstream(sender, pos, end, hasher)
                return
            except _UpstreamBroke as exc:
                attempts -= 1
                if attempts <= 0:
                    raise ClientAbort(f"upstream body of {self.digest} kept breaking: "
                                      f"{exc}") from None
                pos = exc.pos

    def _hash_prefix(self, fd: int | None, pos: int) -> hashlib._Hash | None:
        """The hash of bytes [0, pos) read from `fd`, or None when they are not all there."""
        if fd is None or os.fstat(fd).st_size < pos:
            return None if pos else self.digest.hasher()
        hasher = self.digest.hasher()
        done = 0
        while done < pos:
            chunk = os.pread(fd, min(1 << 20, pos - done), done)
            if not chunk:
                return None
            hasher.update(chunk)
            done += len(chunk)
        return hasher

    async def _send_from_upstream(self, sender: BodySender, pos: int, end: int,
                                  hasher: hashlib._Hash | None) -> int:
        assert self.fetch is not None
        try:
            body = await self.fetch_any(pos)
        except RegistryError as exc:
            raise ClientAbort(exc.message) from None
        except (TimeoutError, ConnectionError) as exc:
            raise _UpstreamBroke(pos, exc) from None
        try:
            size = self._check_direct(body)
            last = size - 1 if hasher is not None and end == size else None
            read, held = pos, b""
            while read < end:
                try:
                    chunk = await body.read()
                except (TimeoutError, ConnectionError) as exc:
                    raise _UpstreamBroke(read, exc) from None
                if not chunk:
                    raise _UpstreamBroke(read, ConnectionError("upstream body ended early"))
                chunk = chunk[: end - read]
                if hasher is not None:
                    await hash_update(hasher, chunk)
                read += len(chunk)
                if last is not None and read > last:
                    chunk, held = chunk[:-1], chunk[-1:]  # the final byte waits for the digest
                if chunk:
                    await sender.send_bytes(chunk)
            if held:
                assert hasher is not None
                if hasher.hexdigest() != self.digest.hex:
                    metrics.DIGEST_MISMATCHES.labels("blob").inc()
                    body.reject()
                    raise ClientAbort(f"upstream sent content that does not match {self.digest}")
                await sender.send_bytes(held)
            return read
        finally:
            body.close()

    def _check_direct(self, body: BlobStream) -> int:
        size = body.total if body.total is not None else self.size
        if size is None or (self.size is not None and size != self.size):
            raise ClientAbort(f"upstream changed or did not say the size of {self.digest}")
        return size

    # leading ------------------------------------------------------------------------------
    def _write_meta(self) -> None:
        """The expected size, for followers in other worker processes. Without it they could
        not answer their clients' headers: a failed write drops the partial file, so they
        fetch for themselves, and this download relays uncached."""
        try:
            self.store.write_partial_meta(self.digest, self.size)
        except OSError as exc:
            self._disk_full(exc)

    def _drop_partial(self) -> None:
        """Unlink our partial file and its metadata (followers elsewhere see st_nlink 0)."""
        if not self.owns_partial:
            return
        self.owns_partial = False
        self.store.drop_partial(self.digest)

    def _fail(self, error: RegistryError | StorageFailed, fallback: bool = False) -> None:
        """`fallback`: the failure is ours, not the upstream's: readers fetch the bytes they
        still need from the upstream themselves."""
        self.error = error
        if fallback:
            self.relay_gone = True
            if self.disk_end is None:
                self.disk_end = self.written
        self.state = State.FAILED
        self._drop_partial()
        self._notify()

    async def lead(self, fetch: Fetch, attempts: int) -> None:
        """Download the blob into the partial file, resuming with Range after breaks."""
        hasher = self.digest.hasher()
        self.written = await off_loop(self._rehash_existing, hasher)
        body = None
        try:
            if self.written and hasher.copy().hexdigest() == self.digest.hex:
                self.size = self.written  # complete: its leader died before the rename
            else:
                body = await self._fetch_rest(fetch, attempts, hasher)
            if hasher.hexdigest() != self.digest.hex:
                metrics.DIGEST_MISMATCHES.labels("blob").inc()
                log.error("digest mismatch: discarding", extra={
                    "digest": str(self.digest), "actual": hasher.hexdigest()})
                raise UpstreamError(ErrorCode.DIGEST_INVALID,
                                    f"upstream sent content that does not match {self.digest}")
            # Stored before the last byte is released, so a client that has the whole body
            # finds the blob in the store on its next request.
            if self.disk_end is None:
                await self._commit()
            self.state = State.VERIFIED
            self._notify()
        except RegistryError as exc:
            if exc.code is ErrorCode.DIGEST_INVALID:
                for used in self._bodies:  # wrong bytes: whoever sent them is not asked again
                    used.reject()
            self._fail(exc)
        except _RelayEnded:
            self._fail(StorageFailed(f"{self.digest} could not be cached and nobody was "
                                     "reading it"), fallback=True)
        except asyncio.CancelledError:
            self._fail(RegistryError(ErrorCode.UNKNOWN, "download cancelled"))  # shutting down
            raise
        except OSError as exc:
            log.error("cache write failed", extra={"digest": str(self.digest), "error": str(exc)})
            self._fail(StorageFailed(f"could not write {self.digest} to the cache: "
                                     f"{exc.strerror}"), fallback=True)
        except Exception as exc:  # never leave readers waiting for a download that died
            log.exception("download failed", extra={"digest": str(self.digest)})
            self._fail(RegistryError(ErrorCode.UNKNOWN,
                                     f"download of {self.digest} failed: {exc!r}"), fallback=True)
        finally:
            if body is not None:
                body.close()
            self._drop_partial()

    async def _fetch_rest(self, fetch: Fetch, attempts: int, hasher: hashlib._Hash
                          ) -> BlobStream:
        """Everything after `written` into the partial file, resuming after breaks; returns
        the last body, for the caller to close."""
        body = await self._open(fetch, self.written)
        try:
            self.state = State.STREAMING
            if self.owns_partial:
                self._write_meta()
            self._notify()
            while True:
                try:
                    await self._copy_body(body, hasher)
                    return body
                except (TimeoutError, ConnectionError) as exc:
                    body.close()
                    attempts -= 1
                    log.warning("upstream body broke, resuming", extra={
                        "digest": str(self.digest), "offset": self.written,
                        "error": repr(exc), "attempts_left": attempts})
                    if attempts <= 0:
                        raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE,
                                            f"download of {self.digest} kept breaking: {exc}"
                                            ) from None
                    self.resumed += 1
                    metrics.DOWNLOADS_RESUMED.inc()
                    body = await self._open(fetch, self.written)
        except BaseException:
            body.close()
            raise

    async def _commit(self) -> None:
        """Into the store; when the disk refuses (full, read-only), the verified bytes stay
        readable through our fd and are served uncached."""
        assert self.fd is not None
        try:
            await off_loop(os.fdatasync, self.fd)
            self.store.commit_partial(self.digest)
            self.owns_partial = False
        except OSError as exc:
            log.error("could not store a verified blob: served uncached", extra={
                "digest": str(self.digest), "error": str(exc)})
            self._cache_failed(exc)

    def _cache_failed(self, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            metrics.DISK_FULL.inc()
        self._drop_partial()
        if self.on_disk_full is not None:
            self.on_disk_full()

    def _rehash_existing(self, hasher: hashlib._Hash) -> int:
        """Bytes a dead worker already wrote are kept: hash them and resume after them."""
        if self.fd is None:
            return 0
        size = os.fstat(self.fd).st_size
        pos = 0
        while pos < size:
            chunk = os.pread(self.fd, 1 << 20, pos)
            if not chunk:
                break
            hasher.update(chunk)
            pos += len(chunk)
        os.lseek(self.fd, pos, os.SEEK_SET)
        return pos

    def _write_hashed(self, chunk: bytes, hasher: hashlib._Hash) -> OSError | None:
        """Append `chunk` to the partial file and hash it (in a thread for a large chunk:
        nothing here touches the download's state); the write's error, if any (the bytes
        are hashed all the same: they are relayed from memory instead)."""
        assert self.fd is not None
        view = memoryview(chunk)
        error = None
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:  # full, read-only now, quota, I/O error: stop caching
            error = exc
        hasher.update(chunk)
        return error

    def _disk_full(self, exc: OSError) -> None:
        """The disk refused a write: drop the partial file and keep relaying the upstream's
        bytes to the clients from memory; nothing of this download will be cached."""
        self.disk_end = self.written
        log.error("disk full: relaying without caching", extra={
            "digest": str(self.digest), "offset": self.written, "error": exc.strerror})
        metrics.UNCACHED_RELAYS.labels("write_failed").inc()
        self._cache_failed(exc)

    async def _relay(self, chunk: bytes) -> None:
        """Keep `chunk` in memory for the readers, holding at most SPILL_BYTES: the download
        waits for the slowest reader rather than buffering without bound."""
        if not self.readers:
            raise _RelayEnded
        self._spill.append((self.written, chunk))
        self._spill_bytes += len(chunk)
        while self._spill:
            slowest = min(self._positions.values(), default=self.written)
            offset, oldest = self._spill[0]
            if slowest >= offset + len(oldest):
                self._spill.popleft()
                self._spill_bytes -= len(oldest)
            elif self._spill_bytes > SPILL_BYTES and self.readers:
                self._notify()
                await self._changed()
            else:
                break

    async def _open(self, fetch: Fetch, offset: int) -> BlobStream:
        body = await fetch(offset)  # from `offset`: the source speaks Range, not we
        self._bodies.append(body)
        if body.total is not None:
            if self.size is not None and body.total != self.size:
                body.close()
                raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE,
                                    f"upstream changed the size of {self.digest}")
            self.size = body.total
        return body

    async def _copy_body(self, body: BlobStream, hasher: hashlib._Hash) -> None:
        while chunk := await body.read():
            if self.size is not None and self.written + len(chunk) > self.size:
                raise UpstreamError(ErrorCode.DIGEST_INVALID,
                                    f"upstream sent more than {self.size} bytes for {self.digest}")
            if self.disk_end is None:
                if len(chunk) >= OFF_LOOP_BYTES:
                    error = await off_loop(self._write_hashed, chunk, hasher)
                else:
                    error = self._write_hashed(chunk, hasher)
                if error is not None:
                    self._disk_full(error)
            else:
                await hash_update(hasher, chunk)
            if self.disk_end is not None:
                await self._relay(chunk)
            self.written += len(chunk)
            self._notify()
        if self.size is not None and self.written < self.size:
            raise ConnectionError(
                f"upstream closed the body at {self.written} of {self.size} bytes")
        if self.size is None:
            self.size = self.written

    def _close_fd(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # also releases the flock
            self.fd = None

    # following another process ------------------------------------------------------------
    async def follow(self, take_over: Callable[[Download], Awaitable[None]]) -> None:
        """Track a download led by another worker through the filesystem."""
        assert self.fd is not None
        while True:
            # Locked first, inspected after: once we hold the lock its holder is gone, and
            # whether it renamed the file into the store (or dropped it) is final. (Checked
            # the other way round, a leader committing in between looked like an orphan, and
            # the take-over asked the upstream for the range after the last byte: a 416.)
            locked = try_lock(self.fd)
            st = os.fstat(self.fd)
            if self.size is None:
                self.size = self.store.read_partial_meta(self.digest)
            changed = st.st_size != self.written
            self.written = st.st_size
            if self.size is not None and self.state is State.STARTING:
                self.state, changed = State.STREAMING, True
            if self.store.is_stored_from(self.digest, self.fd):
                self.size = self.size if self.size is not None else st.st_size
                self.state = State.VERIFIED
                self._notify()
                return
            if st.st_nlink == 0:
                await self._lead_uncached(st.st_size)
                return
            if locked:
                await take_over(self)
                return
            if changed:
                self._notify()
            await asyncio.sleep(REMOTE_POLL_SECONDS)

    async def _lead_uncached(self, on_disk: int) -> None:
        """The leader dropped its file (its disk filled, or it failed): fetch the rest for
        our own readers, uncached, resuming after the bytes it wrote (hashed first, so the
        whole blob is verified). An upstream that fails fails us too, with its own error."""
        assert self.fetch is not None
        log.warning("the leading worker dropped its download: relaying the rest uncached",
                    extra={"digest": str(self.digest), "offset": on_disk})
        metrics.UNCACHED_RELAYS.labels("leader_dropped").inc()
        self.leader, self.owns_partial, self.disk_end = True, False, on_disk
        self.takes_joiners = False
        await self.lead(self.fetch_any, self.attempts)

@dataclass(frozen=True)
class InFlight:
    """A download in progress, as the status page and the metrics see it."""
    digest: Digest
    size: int | None
    written: int
    readers: int
    upstream: str
    started: float  # time.monotonic()


class Downloads:
    """The downloads in flight in this process, keyed by digest."""

    def __init__(self, store: ContentStore, finish_abandoned: bool) -> None:
        self.store = store
        self.finish_abandoned = finish_abandoned
        self._active: dict[Digest, Download] = {}  # the one a new client joins
        self._superseded: set[Download] = set()  # still running for the clients they have
        self.on_disk_full: Callable[[], None] | None = None

    def get(self, digest: Digest) -> Download | None:
        """The download of `digest` a client arriving now joins, if any."""
        download = self._active.get(digest)
        return download if download is not None and _joinable(download) else None

    def _running(self) -> list[Download]:
        return [*self._active.values(), *self._superseded]

    def in_flight(self) -> list[InFlight]:
        """A snapshot of this process's downloads (read-only)."""
        return [InFlight(d.digest, d.size, d.written, d.readers, d.upstream, d.started)
                for d in self._running()]

    async def drain(self, grace: float) -> None:
        """Let the downloads in flight finish for `grace` seconds (shutdown_timeout), then
        cancel the rest and wait for them to clean up their partial files."""
        tasks = [d.task for d in self._running() if d.task is not None and not d.task.done()]
        if not tasks:
            return
        if grace > 0:
            log.info("shutting down: waiting for downloads in flight",
                     extra={"downloads": len(tasks), "timeout_s": grace})
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            log.warning("shutting down: cancelling unfinished downloads",
                        extra={"downloads": len(pending)})
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def start(self, digest: Digest, fetch: Fetch, attempts: int, upstream: str = ""
              ) -> Download | None:
        """Join or start the download of `digest`; None when it is already stored."""
        existing = self._active.get(digest)
        if existing is not None:
            if _joinable(existing):
                return existing
            self._superseded.add(existing)  # its clients keep it; a new one starts afresh
            del self._active[digest]
        claimed = self._claim(digest)
        if claimed is None:
            return None
        fd, leader = claimed
        download = Download(digest, self.store, fd, leader, upstream, fetch, attempts)
        download.on_disk_full = self.on_disk_full
        self._active[digest] = download

        async def take_over(d: Download) -> None:
            d.leader = d.owns_partial = True
            log.warning("taking over an orphaned download", extra={"digest": str(digest)})
            await d.lead(d.fetch_any, attempts)

        coro = download.lead(fetch, attempts) if leader else download.follow(take_over)
        download.task = asyncio.ensure_future(coro)
        download.task.add_done_callback(lambda _t: self._finished(download))
        if not self.finish_abandoned:
            watcher = asyncio.ensure_future(self._cancel_when_abandoned(download))
            download.task.add_done_callback(lambda _t: watcher.cancel())
        return download

    def _finished(self, download: Download) -> None:
        if self._active.get(download.digest) is download:
            del self._active[download.digest]
        self._superseded.discard(download)
        if download.readers == 0:
            download._close_fd()  # else the last reader closes it

    async def _cancel_when_abandoned(self, download: Download) -> None:
        while download.state in (State.STARTING, State.STREAMING):
            # An uncached relay ends by itself at its next chunk without readers, as a relay
            # that ran out of them (a reader arriving meanwhile fetches for itself).
            if download.had_readers and download.readers == 0 and download.task and \
                    download.disk_end is None:
                log.info("download abandoned by every client: cancelling",
                         extra={"digest": str(download.digest)})
                # Not joined meanwhile: the task may finish a write in a thread first.
                download.takes_joiners = False
                download.task.cancel()
                return
            await download._changed()

    def _claim(self, digest: Digest) -> tuple[int | None, bool] | None:
        """Open the partial file: (fd, True) when we lead, (fd, False) when another process
        does, (None, True) when no file can be made (we lead, relaying uncached), None when
        the blob is in the store already."""
        for _ in range(100):
            if self.store.has(digest):
                return None
            try:
                fd = self.store.open_partial(digest)
            except OSError as exc:  # a full or read-only disk: cost the caching, not the client
                log.warning("cannot create a download file: relaying uncached", extra={
                    "digest": str(digest), "error": exc.strerror})
                metrics.UNCACHED_RELAYS.labels("create_failed").inc()
                return None, True
            if not try_lock(fd):
                return fd, False
            if self.store.is_partial(digest, fd):
                if self.store.has(digest):
                    self.store.drop_partial(digest)
                    os.close(fd)
                    return None
                return fd, True
            os.close(fd)  # the previous holder renamed it away between open and lock: retry
        raise RegistryError(ErrorCode.UNKNOWN, f"could not claim a download of {digest}")


def _joinable(download: Download) -> bool:
    if not download.takes_joiners or download.state is State.FAILED:
        return False
    if download.leader or download.fd is None:
        return True
    try:  # the worker it follows dropped its file: follow() notices at its next poll
        return os.fstat(download.fd).st_nlink > 0
    except OSError:
        return False
