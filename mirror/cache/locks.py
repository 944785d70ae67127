"""File locks that coordinate worker processes sharing a cache dir (they die with their
holder, so a crashed worker never leaves one behind). The only module that calls flock."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

POLL_SECONDS = 0.005


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on an open file if no other open file description holds it;
    it is released when the last fd sharing this one is closed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_locked(path: Path) -> bool:
    """Whether some live process holds the lock on `path` (locks die with their holder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)


def _open(path: str) -> int | None:
    """The lock file, opened read-only (flock needs no more, and an existing lock file still
    opens on a read-only cache dir); None when it cannot be had (a full or read-only disk):
    the caller goes on without coordination rather than failing a request."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


def lock_problem(path: Path) -> str | None:
    """Why the lock file at `path` cannot be opened (a read-only or full disk), or None: for
    a caller that found a lock not taken and must tell "held" from "impossible"."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def try_exclusive(path: str) -> Iterator[bool]:
    """Yields whether this process got the lock at once (another may hold it)."""
    fd = _open(path)
    if fd is None:
        yield False
        return
    try:
        yield try_lock(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def exclusive(path: str, give_up_after: float) -> AsyncIterator[bool]:
    """Waits (without blocking the event loop) for the lock; yields False when
    `give_up_after` seconds passed first (or the lock file cannot be made), and the caller
    goes on without it."""
    fd = _open(path)
    if fd is None:
        yield False
        return
    deadline = time.monotonic() + give_up_after
    try:
        while not try_lock(fd):
            if time.monotonic() > deadline:
                yield False
                return
            await asyncio.sleep(POLL_SECONDS)
        yield True
    finally:
        os.close(fd)


def hold_for_life(path: str) -> int | None:
    """Takes the lock and keeps it for as long as this process (and the children it forks,
    which share the open file) lives: returns the fd to keep open, or None when another
    process holds it. OSError when the lock file cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if not try_lock(fd):
        os.close(fd)
        return None
    return fd
