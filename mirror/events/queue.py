"""One webhook's events on disk: a bounded FIFO (diskcache's Deque, SQLite underneath) that
every worker appends to and one worker's Sender drains. Items are (time of the event, its
encoded JSON); an event leaves the queue only once its receiver acknowledged it."""

from __future__ import annotations

import itertools
from pathlib import Path

import diskcache

Item = tuple[float, bytes]


class EventQueue:
    def __init__(self, directory: Path, bound: int) -> None:
        self.bound = bound
        self._deque = diskcache.Deque(directory=str(directory))

    def put(self, items: list[Item]) -> int:
        """Appends what fits under the bound, atomically with respect to the other workers;
        returns how many did not fit (dropped: the newest, so what waits keeps its order)."""
        if not items:
            return 0
        with self._deque.transact():
            room = max(0, self.bound - len(self._deque))
            self._deque.extend(items[:room])
        return max(0, len(items) - room)

    def peek(self, count: int) -> list[Item]:
        return list(itertools.islice(iter(self._deque), count))

    def remove(self, count: int) -> None:
        """Drops the first `count` items (those a receiver acknowledged; only the worker
        holding the sender's lock removes, so they are the ones it peeked)."""
        with self._deque.transact():
            for _ in range(count):
                try:
                    self._deque.popleft()
                except IndexError:
                    return

    def __len__(self) -> int:
        return len(self._deque)

    def close(self) -> None:
        self._deque.cache.close()
