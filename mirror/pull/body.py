"""The body of a blob answer: one object whatever the bytes come from (the store, a download
in flight, nothing at all for an upstream's answer to HEAD), so a handler sends it without
asking which it is."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Protocol

from mirror.pull.downloads import Download

# What a body is sent as: literal bytes (multipart headers) and (start, length) spans of the
# blob, in order.
Piece = bytes | tuple[int, int]


class BodySink(Protocol):
    """Where a body goes (http/zerocopy.py's Sender)."""

    async def send(self, file_fd: int, offset: int, count: int) -> None: ...

    async def send_bytes(self, data: bytes | memoryview) -> None: ...

    def corked(self) -> contextlib.AbstractContextManager[None]: ...


class BlobBody(Protocol):
    @property
    def size(self) -> int | None: ...  # used by: http/app (Content-Length, Range); None: unsaid

    @property
    def sendable(self) -> bool: ...  # used by: http/app (False: headers only, an upstream HEAD)

    @property
    def seekable(self) -> bool: ...  # used by: http/app (several ranges only when all on disk)

    async def send(self, sink: BodySink, pieces: Sequence[Piece]) -> None: ...  # used by: app

    async def stored(self) -> None: ...  # used by: pull/images (until it is in the store)

    def close(self) -> None: ...  # used by: http/app, pull/images


class StoredBody:
    """A verified file in the store, open: it stays readable if evicted meanwhile."""

    sendable = True
    seekable = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size: int | None = os.fstat(fd).st_size

    async def send(self, sink: BodySink, pieces: Sequence[Piece]) -> None:
        with sink.corked():  # the whole body is there: full segments only
            for piece in pieces:
                if isinstance(piece, bytes):
                    await sink.send_bytes(piece)
                else:
                    await sink.send(self.fd, *piece)

    async def stored(self) -> None:
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DownloadBody:
    """A download in flight: bytes are sent as they land (and verified, see Download)."""

    sendable = True
    seekable = False

    def __init__(self, download: Download) -> None:
        self.download = download
        self.size = download.size

    async def send(self, sink: BodySink, pieces: Sequence[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, bytes):
                await sink.send_bytes(piece)
            else:
                await self.download.stream(sink, *piece)

    async def stored(self) -> None:
        await self.download.wait_done()

    def close(self) -> None:
        return None


class HeadOnlyBody:
    """The upstream's answer to a HEAD for a blob not cached: a size, no bytes."""

    sendable = False
    seekable = False

    def __init__(self, size: int | None) -> None:
        self.size = size

    async def send(self, sink: BodySink, pieces: Sequence[Piece]) -> None:
        raise AssertionError("a HEAD answer has no body to send")

    async def stored(self) -> None:
        return None

    def close(self) -> None:
        return None

