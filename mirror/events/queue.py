"""One webhook's events on disk: a bounded FIFO that every worker appends to and one worker's
Sender drains. Each flush of a worker's buffer is one entry, a chunk of at most `chunk`
events (time of the event, its encoded JSON), so a busy mirror writes a row every flush, not
one per event (SQLite work per event, in a thread, held up the requests). The number of
events queued is kept beside them and changed only under the queue's own lock; a count a
kill -9 left behind is taken again when a worker opens the queue. An event leaves the queue
only once its receiver acknowledged it."""

from __future__ import annotations

import itertools
from pathlib import Path

import diskcache

Item = tuple[float, bytes]
COUNT = "events"


class EventQueue:
    def __init__(self, directory: Path, bound: int, chunk: int) -> None:
        self.bound, self.chunk = bound, chunk
        self._deque = diskcache.Deque(directory=str(directory / "chunks"))
        self._meta = diskcache.Cache(str(directory / "meta"))
        with self._deque.transact():
            self._meta.set(COUNT, sum(len(c) for c in self._deque))

    def put(self, items: list[Item]) -> int:
        """Appends what fits under the bound, atomically with respect to the other workers;
        returns how many did not fit (dropped: the newest, so what waits keeps its order)."""
        if not items:
            return 0
        with self._deque.transact():
            room = max(0, self.bound - len(self))
            kept = items[:room]
            for start in range(0, len(kept), self.chunk):
                self._deque.append(kept[start:start + self.chunk])
            self._meta.incr(COUNT, len(kept))
        return len(items) - len(kept)

    def peek(self, count: int) -> list[list[Item]]:
        """The oldest chunks, as many as hold at most `count` events (one at least)."""
        out: list[list[Item]] = []
        total = 0
        for chunk in itertools.islice(iter(self._deque), count):
            if out and total + len(chunk) > count:
                break
            out.append(chunk)
            total += len(chunk)
        return out

    def remove(self, chunks: int) -> None:
        """Drops the oldest `chunks` (those a receiver acknowledged; only the worker holding
        the sender's lock removes, so they are the ones it peeked)."""
        with self._deque.transact():
            gone = 0
            for _ in range(chunks):
                try:
                    gone += len(self._deque.popleft())
                except IndexError:
                    break
            self._meta.incr(COUNT, -gone)

    def __len__(self) -> int:
        return int(self._meta.get(COUNT, 0))

    def close(self) -> None:
        self._deque.cache.close()
        self._meta.close()
