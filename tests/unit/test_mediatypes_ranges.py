import json

import pytest

from mirror.http.ranges import ByteRange, RangeNotSatisfiable, multipart_layout, parse_ranges
from mirror.oci import mediatypes as mt


def test_accept_reads_every_header_line_and_drops_parameters() -> None:
    accepted = mt.parse_accept([f"{mt.DOCKER_MANIFEST}, {mt.OCI_INDEX};q=0.5",
                                mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST])
    assert accepted == (mt.DOCKER_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST)


def test_acceptability() -> None:
    assert mt.is_acceptable(mt.OCI_INDEX, ())
    assert mt.is_acceptable(mt.OCI_INDEX, ("*/*",))
    assert not mt.is_acceptable(mt.OCI_INDEX, (mt.DOCKER_MANIFEST,))
    assert mt.is_acceptable(mt.DOCKER_SCHEMA1_SIGNED, (mt.DOCKER_SCHEMA1,))


def test_upstream_accept_defaults_to_every_manifest_type() -> None:
    assert mt.upstream_accept(()).split(", ") == list(mt.MANIFEST_TYPES)
    assert mt.upstream_accept((mt.DOCKER_MANIFEST,)) == mt.DOCKER_MANIFEST


def test_sniff_and_references() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": "sha256:1"}]}).encode()
    assert mt.sniff_media_type(index) == mt.OCI_INDEX
    image = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:c"}, "layers": [
        {"digest": "sha256:l1"}, {"digest": "sha256:foreign", "urls": ["https://x"]}]}).encode()
    assert mt.sniff_media_type(image) == mt.OCI_MANIFEST
    assert mt.referenced_blobs(image) == (["sha256:c", "sha256:l1"], [])
    assert mt.referenced_blobs(index) == ([], ["sha256:1"])
    assert mt.sniff_media_type(json.dumps({"mediaType": mt.DOCKER_MANIFEST}).encode()) \
        == mt.DOCKER_MANIFEST
    assert mt.referenced_blobs(b"not json") == ([], [])


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", [ByteRange(0, 9)]), ("bytes=5-", [ByteRange(5, 99)]),
    ("bytes=-10", [ByteRange(90, 99)]), ("bytes=-1000", [ByteRange(0, 99)]),
    ("bytes=90-1000", [ByteRange(90, 99)]),
    ("bytes=0-1, 5-6", [ByteRange(0, 1), ByteRange(5, 6)]),
    ("bytes=0-1,200-300", [ByteRange(0, 1)]),  # the unsatisfiable one is dropped
    ("items=0-1", None), ("bytes=9-3", None), ("bytes=x-y", None), ("bytes=0-1,x", None),
    ("bytes=" + ",".join(["0-0"] * 65), [ByteRange(0, 0)]),  # overlaps merge into one
])
def test_parse_ranges(header: str | None, expected: list[ByteRange] | None) -> None:
    assert parse_ranges(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0",
                                    "bytes=100-,200-"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_ranges(header, 100)


def test_multipart_layout_length_matches_what_is_sent() -> None:
    layout = multipart_layout([ByteRange(0, 1), ByteRange(5, 9)], 100, "B")
    assert layout.content_type == "multipart/byteranges; boundary=B"
    body = b"".join(head + b"x" * r.length + b"\r\n" for head, r in layout.parts) + layout.closing
    assert len(body) == layout.length
    assert layout.parts[1][0] == (b"--B\r\nContent-Type: application/octet-stream\r\n"
                                  b"Content-Range: bytes 5-9/100\r\n\r\n")


def test_content_range() -> None:
    assert ByteRange(0, 9).content_range(100) == "bytes 0-9/100"
