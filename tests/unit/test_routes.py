import pytest

from mirror.oci import routing
from mirror.oci.errors import RegistryError
from mirror.oci.routes import Kind, Route, parse_v2_path
from mirror.oci.routing import select_upstream

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("tail", "route"), [
    ("", Route(Kind.BASE)),
    ("_catalog", Route(Kind.CATALOG)),
    ("library/nginx/manifests/latest", Route(Kind.MANIFEST, "library/nginx", "latest")),
    (f"a/b/blobs/{D}", Route(Kind.BLOB, "a/b", D)),
    ("a/tags/list", Route(Kind.TAGS, "a")),
    (f"a/referrers/{D}", Route(Kind.REFERRERS, "a", D)),
    # names containing the endpoint words route on the last occurrence
    ("x/manifests/blobs/manifests/v1", Route(Kind.MANIFEST, "x/manifests/blobs", "v1")),
    (f"blobs/blobs/{D}", Route(Kind.BLOB, "blobs", D)),
    ("a/blobs/uploads/", Route(Kind.UPLOAD, "a")),
    ("a/blobs/uploads/some-uuid", Route(Kind.UPLOAD, "a")),
])
def test_parse_v2_path(tail: str, route: Route) -> None:
    assert parse_v2_path(tail) == route


@pytest.mark.parametrize("tail", ["a", "a/manifests/", "a/unknown/x", "a/tags"])
def test_unknown_paths(tail: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_v2_path(tail)
    assert exc.value.status == 404


UPSTREAMS = ["docker.io", "ghcr.io", "127.0.0.1:5001"]


@pytest.mark.parametrize(("name", "ns", "expected"), [
    ("nginx", None, ("docker.io", "library/nginx")),
    ("library/nginx", None, ("docker.io", "library/nginx")),
    ("docker.io/library/nginx", None, ("docker.io", "library/nginx")),
    ("docker.io/nginx", None, ("docker.io", "library/nginx")),
    ("ghcr.io/owner/repo", None, ("ghcr.io", "owner/repo")),
    ("owner/repo", "ghcr.io", ("ghcr.io", "owner/repo")),
    ("test/multi", "127.0.0.1:5001", ("127.0.0.1:5001", "test/multi")),
    ("127.0.0.1:5001/test/multi", None, ("127.0.0.1:5001", "test/multi")),
    ("nginx", "docker.io", ("docker.io", "library/nginx")),
    ("nginx", "registry-1.docker.io", ("docker.io", "library/nginx")),
    # a one-component name equal to an upstream name is a repository, not a prefix
    ("ghcr.io", None, ("docker.io", "library/ghcr.io")),
])
def test_select_upstream(name: str, ns: str | None, expected: tuple[str, str]) -> None:
    assert select_upstream(name, ns, UPSTREAMS) == expected


def test_unknown_ns_is_an_error_naming_the_configured_upstreams() -> None:
    with pytest.raises(RegistryError) as exc:
        select_upstream("a/b", "quay.io", UPSTREAMS)
    assert exc.value.code == "NAME_UNKNOWN"
    assert "ghcr.io" in exc.value.message and "quay.io" in exc.value.message


@pytest.mark.parametrize("name", ["../etc", "ghcr.io/../x", "ghcr.io/", "UPPER/x"])
def test_invalid_names_after_prefix(name: str) -> None:
    with pytest.raises(RegistryError) as exc:
        select_upstream(name, None, UPSTREAMS)
    assert exc.value.code == "NAME_INVALID"


# a mirror as the upstream (edge -> regional tiers) --------------------------------------------
@pytest.mark.parametrize(("name", "url", "ns"), [
    ("docker.io", "https://registry-1.docker.io", None),  # the registry itself
    ("docker.io", "https://index.docker.io", None),
    ("ghcr.io", "https://GHCR.io", None),
    ("127.0.0.1:5000", "http://127.0.0.1:5000", None),
    ("docker.io", "http://regional.example:5000", "docker.io"),  # a mirror in front
    ("ghcr.io", "https://regional.example", "ghcr.io"),
])
def test_a_mirror_upstream_is_told_the_registry_and_a_registry_is_not(
        name: str, url: str, ns: str | None) -> None:
    assert routing.tier_ns(name, url) == ns
