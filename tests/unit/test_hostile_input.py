"""Property tests: whatever a client or an upstream sends, the pure parsers either answer or
raise a RegistryError (a registry JSON error), never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.http.ranges import RangeNotSatisfiable, parse_ranges
from mirror.oci.challenge import parse_www_authenticate
from mirror.oci.errors import RegistryError
from mirror.oci.mediatypes import parse_accept, referenced_blobs, sniff_media_type
from mirror.oci.reference import parse_digest, parse_reference, validate_name
from mirror.oci.routes import parse_v2_path
from mirror.oci.routing import parse_image, select_upstream

UPSTREAMS = ["docker.io", "ghcr.io", "127.0.0.1:5000"]
texty = st.text(st.characters(codec="utf-8"), max_size=300)
pathy = st.text(st.sampled_from("abc./:-_@%0123456789ABZsha256"), max_size=120)


@settings(max_examples=300)
@given(texty)
def test_challenges_never_crash(header: str) -> None:
    for c in parse_www_authenticate(header):
        assert c.scheme == c.scheme.lower()


@settings(max_examples=300)
@given(pathy | texty, st.one_of(st.none(), texty))
def test_paths_and_routing_raise_only_registry_errors(tail: str, ns: str | None) -> None:
    try:
        route = parse_v2_path(tail)
        upstream, repository = select_upstream(route.name, ns, UPSTREAMS)
        assert upstream in UPSTREAMS
        assert ".." not in repository.split("/") and not repository.startswith("/")
        if route.reference:
            parse_reference(route.reference)
    except RegistryError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=300)
@given(pathy | texty)
def test_digests_names_and_images(value: str) -> None:
    for parse in (parse_digest, validate_name, lambda v: parse_image(v, UPSTREAMS)):
        try:
            parse(value)
        except RegistryError as exc:
            assert exc.status == 400


@settings(max_examples=300)
@given(texty, st.integers(min_value=0, max_value=10**12))
def test_ranges(header: str, size: int) -> None:
    try:
        ranges = parse_ranges(header, size)
    except RangeNotSatisfiable:
        return
    for r in ranges or []:
        assert 0 <= r.start <= r.end < size


@settings(max_examples=200)
@given(st.binary(max_size=500) | texty.map(str.encode), st.lists(texty, max_size=3))
def test_manifest_sniffing_and_accept(data: bytes, accept: list[str]) -> None:
    assert isinstance(sniff_media_type(data), str)
    blobs, children = referenced_blobs(data)
    assert all(isinstance(d, str) for d in blobs + children)
    assert all("," not in t for t in parse_accept(accept))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["digest", "urls", "config", "layers", "manifests",
                                       "mediaType", "schemaVersion", "x"]), children,
                      max_size=5),
    max_leaves=20)


@settings(max_examples=300)
@given(json_values)
def test_manifest_shaped_garbage(doc: object) -> None:
    import json

    data = json.dumps(doc).encode()
    blobs, children = referenced_blobs(data)
    assert all(isinstance(d, str) for d in blobs + children)
    assert isinstance(sniff_media_type(data), str)
