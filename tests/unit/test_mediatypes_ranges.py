import json

import pytest

from mirror import mediatypes as mt
from mirror.ranges import ByteRange, RangeNotSatisfiable, parse_range


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
    (None, None), ("bytes=0-9", ByteRange(0, 9)), ("bytes=5-", ByteRange(5, 99)),
    ("bytes=-10", ByteRange(90, 99)), ("bytes=-1000", ByteRange(0, 99)),
    ("bytes=90-1000", ByteRange(90, 99)), ("bytes=0-1,5-6", None), ("items=0-1", None),
    ("bytes=9-3", None), ("bytes=x-y", None),
])
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_content_range() -> None:
    assert ByteRange(0, 9).content_range(100) == "bytes 0-9/100"
