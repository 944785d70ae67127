"""A Bearer-token upstream: distribution with `auth: token` and the tests' token server.

Anonymous tokens grant `pull` on `public/*` only; the user `reader` may pull everything.
The mirror is configured without and with credentials; skopeo pulls through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import oci
from tests.support.clients import (
    Result,
    UpstreamRegistry,
    assert_pulled,
    http_request,
    skopeo_copy,
    verify_dir,
    write_registries_conf,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import BASIC_PASSWORD, BASIC_USER, ClosedPort, Registry
from tests.support.tokenserver import TOKEN_USERS, TokenServer

pytestmark = pytest.mark.integration

ACCEPT_ALL = [
    ("Accept", t)
    for t in (oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_MANIFEST_LIST)
]


def _mirror(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    username: str | None = None,
    password: str | None = None,
) -> MirrorProcess:
    m: MirrorProcess = mirror_factory(
        [
            Upstream(
                name=blackhole.host,
                url=token_upstream.url,
                username=username,
                password=password,
            )
        ]
    )
    return m


def _pull(
    mirror: MirrorProcess, blackhole: ClosedPort, repo: str, out: Path, check: bool = True
) -> Result:
    conf = write_registries_conf(
        out.parent / f"{out.name}.conf", registry=blackhole.host, mirrors=[mirror.host]
    )
    return skopeo_copy(
        f"docker://{blackhole.host}/{repo}:v1", f"dir:{out}", registries_conf=conf, check=check
    )


def _pull_verified(
    mirror: MirrorProcess, blackhole: ClosedPort, repo: str, out: Path, image: oci.Image
) -> None:
    """A skopeo pull of `repo`:v1 through the mirror got exactly `image`."""
    _pull(mirror, blackhole, repo, out)
    assert_pulled(verify_dir(out), image)


def _assert_cached(mirror: MirrorProcess, image: oci.Image) -> None:
    mirror.wait_cached(b.digest for b in image.all_blobs)
    assert {b.digest for b in image.all_blobs} <= mirror.verify_cache()


def _scoped(ts: TokenServer, start: int, repo: str) -> list[tuple[str | None, int]]:
    return [
        (r.user, r.status)
        for r in ts.requests[start:]
        if any(s.startswith(f"repository:{repo}:") for s in r.scopes)
    ]


@pytest.mark.timeout(120)
def test_anonymous_token_pull(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    token_server: TokenServer,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    small = test_images.small
    mirror = _mirror(mirror_factory, token_upstream, blackhole)
    start = len(token_server.requests)
    _pull_verified(mirror, blackhole, "public/small", tmp_path / "out", small)
    tokens = _scoped(token_server, start, "public/small")
    assert tokens, "the mirror never asked the token server"
    assert all(user is None for user, _ in tokens), tokens
    # The token is cached per scope: a handful of requests, not one per upstream request.
    assert len(tokens) <= 2, tokens
    _assert_cached(mirror, small)


@pytest.mark.timeout(120)
def test_anonymous_mirror_cannot_pull_private(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    mirror = _mirror(mirror_factory, token_upstream, blackhole)
    res = _pull(mirror, blackhole, "private/small", tmp_path / "out", check=False)
    assert res.returncode != 0
    r = http_request(mirror.host, "GET", "/v2/private/small/manifests/v1", ACCEPT_ALL)
    assert r.status in (401, 403, 404), (r.status, r.body[:300])
    errors = r.json()["errors"]
    assert errors[0]["code"] in {"UNAUTHORIZED", "DENIED", "NAME_UNKNOWN", "MANIFEST_UNKNOWN"}
    digest = test_images.small.layers[0].digest
    r = http_request(mirror.host, "GET", f"/v2/private/small/blobs/{digest}")
    assert r.status in (401, 403, 404), (r.status, r.body[:300])
    assert mirror.cached_files() == []


@pytest.mark.timeout(120)
def test_credentialed_token_pull(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    token_server: TokenServer,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    small = test_images.small
    mirror = _mirror(mirror_factory, token_upstream, blackhole, "reader", "readerpw")
    start = len(token_server.requests)
    _pull_verified(mirror, blackhole, "private/small", tmp_path / "private", small)
    tokens = _scoped(token_server, start, "private/small")
    assert tokens and all(t == ("reader", 200) for t in tokens), tokens
    # Public images work with credentials too.
    _pull_verified(mirror, blackhole, "public/small", tmp_path / "public", small)


@pytest.mark.timeout(120)
def test_wrong_credentials_are_an_auth_error(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    blackhole: ClosedPort,
) -> None:
    mirror = _mirror(mirror_factory, token_upstream, blackhole, "reader", "wrong")
    r = http_request(mirror.host, "GET", "/v2/private/small/manifests/v1", ACCEPT_ALL)
    assert r.status in (401, 403), (r.status, r.body[:300])
    assert r.json()["errors"][0]["code"] in {"UNAUTHORIZED", "DENIED"}
    assert mirror.running


@pytest.mark.timeout(120)
def test_token_pull_second_time_from_cache(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    mirror = _mirror(mirror_factory, token_upstream, blackhole, "reader", "readerpw")
    _pull(mirror, blackhole, "private/small", tmp_path / "one")
    mirror.wait_cached(b.digest for b in test_images.small.all_blobs)
    mark = token_upstream.registry.mark()
    _pull_verified(mirror, blackhole, "private/small", tmp_path / "two", test_images.small)
    assert token_upstream.registry.blob_gets(mark) == {}


# --- Basic auth (distribution's htpasswd) ----------------------------------------------------


@pytest.mark.timeout(120)
def test_basic_auth_upstream(
    mirror_factory: Any,
    basic_upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    small = test_images.small
    mirror = _mirror(mirror_factory, basic_upstream, blackhole, BASIC_USER, BASIC_PASSWORD)
    _pull_verified(mirror, blackhole, "test/small", tmp_path / "out", small)
    _assert_cached(mirror, small)


@pytest.mark.timeout(120)
def test_basic_auth_upstream_without_credentials(
    mirror_factory: Any, basic_upstream: UpstreamRegistry, blackhole: ClosedPort
) -> None:
    mirror = _mirror(mirror_factory, basic_upstream, blackhole)
    r = http_request(mirror.host, "GET", "/v2/test/small/manifests/v1", ACCEPT_ALL)
    assert r.status in (401, 403), (r.status, r.body[:300])
    assert r.json()["errors"][0]["code"] in {"UNAUTHORIZED", "DENIED"}
    # The upstream's Basic challenge must not be relayed as-is: the client has no
    # credentials for the upstream, and dockerd would send its Docker Hub ones.
    assert "mirror-tests-basic" not in (r.header("WWW-Authenticate") or "")


@pytest.mark.timeout(120)
def test_rejected_cached_token_is_refreshed_once(
    mirror_factory: Any,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    """A cached token that the upstream suddenly rejects (signing key rotated, registry
    restarted) leads to one new token and a successful retry, not an error."""
    ts = TokenServer(tmp_path / "tokens", users=dict(TOKEN_USERS)).start()
    reg = Registry(tmp_path / "registry", auth=ts.registry_auth_config()).start()
    try:
        up = UpstreamRegistry(reg)
        small = test_images.small
        up.push(test_images.layout, "small", small, "public/small", "v1", creds="admin:adminpw")
        mirror = _mirror(mirror_factory, up, blackhole)
        path = f"/v2/public/small/blobs/{small.layers[0].digest}"
        r = http_request(mirror.host, "GET", path)
        assert r.status == 200 and r.body == small.layers[0].read()

        ts.rotate_key()
        reg.restart()
        start = len(ts.requests)
        r = http_request(mirror.host, "GET", f"/v2/public/small/blobs/{small.layers[1].digest}")
        assert r.status == 200, (r.status, r.body[:300])
        assert r.body == small.layers[1].read()
        assert len(_scoped(ts, start, "public/small")) == 1, ts.requests[start:]
    finally:
        reg.stop()
        ts.stop()


@pytest.mark.timeout(120)
def test_token_request_names_service_and_scope(
    mirror_factory: Any,
    token_upstream: UpstreamRegistry,
    token_server: TokenServer,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
) -> None:
    mirror = _mirror(mirror_factory, token_upstream, blackhole)
    start = len(token_server.requests)
    r = http_request(mirror.host, "GET", "/v2/public/small/manifests/v1", ACCEPT_ALL)
    assert r.status == 200 and r.body == test_images.small.manifest_bytes
    reqs = token_server.requests[start:]
    assert reqs, "no token requested"
    for req in reqs:
        assert req.query.get("service") == [token_server.service], req
        assert "repository:public/small:pull" in req.scopes, req
        assert req.user is None
