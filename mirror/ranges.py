"""Pure parsing of HTTP `Range` headers for blob responses."""

from __future__ import annotations

from dataclasses import dataclass


class RangeNotSatisfiable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a `Range` header asks for, or None to serve the whole body.

    Multi-range requests (podman's partial pulls send them) are answered with the whole body,
    which RFC 9110 allows. Raises RangeNotSatisfiable when no byte of the range exists.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0 or size == 0:
                raise RangeNotSatisfiable(header)
            return ByteRange(max(0, size - suffix), size - 1)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    if start < 0 or end < start:
        return None
    return ByteRange(start, min(end, size - 1))
