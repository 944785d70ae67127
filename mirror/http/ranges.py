"""Pure parsing of HTTP `Range` headers, and the layout of multipart/byteranges bodies."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# More ranges than this (after merging overlaps) are answered with the whole body (200), as
# nginx's max_ranges does: RFC 9110 lets a server ignore Range, and a list of ranges is no way
# to make the server do unbounded work. Headers with more specs than MAX_SPECS are not parsed.
MAX_RANGES = 100
MAX_SPECS = 1000


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


def _parse_spec(spec: str, size: int) -> ByteRange | None:
    """One `first-last`, `first-` or `-suffix`; None when malformed. Raises
    RangeNotSatisfiable when it names no byte of the body."""
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0 or size == 0:
                raise RangeNotSatisfiable(spec)
            return ByteRange(max(0, size - suffix), size - 1)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable(spec)
    if start < 0 or end < start:
        return None
    return ByteRange(start, min(end, size - 1))


def parse_ranges(header: str | None, size: int) -> list[ByteRange] | None:
    """The byte ranges a `Range` header asks for, or None to serve the whole body (no header,
    another unit, a malformed spec, too many ranges). Ranges naming no byte are dropped;
    RangeNotSatisfiable when that leaves none.

    Disjoint ranges are kept as asked, in their order and number: podman's partial pulls
    match the parts of the answer to their chunks one by one, adjacent chunks included. When
    any overlap, they are merged and sorted (RFC 9110 allows both), so an answer never
    carries a byte twice: `bytes=0-,0-,0-…` is one range, not N copies of the blob."""
    if not header:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or specs.count(",") >= MAX_SPECS:
        return None
    ranges: list[ByteRange] = []
    for spec in specs.split(","):
        try:
            parsed = _parse_spec(spec, size)
        except RangeNotSatisfiable:
            continue
        if parsed is None:
            return None
        ranges.append(parsed)
    if not ranges:
        raise RangeNotSatisfiable(header)
    if _overlapping(ranges):
        ranges = merge(ranges)
    return ranges if len(ranges) <= MAX_RANGES else None


def _overlapping(ranges: list[ByteRange]) -> bool:
    ordered = sorted(ranges, key=lambda r: r.start)
    return any(b.start <= a.end for a, b in itertools.pairwise(ordered))


def merge(ranges: list[ByteRange]) -> list[ByteRange]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if out and r.start <= out[-1].end + 1:
            if r.end > out[-1].end:
                out[-1] = ByteRange(out[-1].start, r.end)
        else:
            out.append(r)
    return out


@dataclass(frozen=True)
class Multipart:
    """A multipart/byteranges body: each part's header bytes, then its range, then CRLF."""

    content_type: str
    parts: list[tuple[bytes, ByteRange]]
    closing: bytes

    @property
    def length(self) -> int:
        return sum(len(head) + r.length + 2 for head, r in self.parts) + len(self.closing)


def multipart_layout(ranges: list[ByteRange], size: int, boundary: str,
                     part_type: str = "application/octet-stream") -> Multipart:
    parts = [(f"--{boundary}\r\nContent-Type: {part_type}\r\n"
              f"Content-Range: {r.content_range(size)}\r\n\r\n".encode(), r) for r in ranges]
    return Multipart(f"multipart/byteranges; boundary={boundary}", parts,
                     f"--{boundary}--\r\n".encode())
