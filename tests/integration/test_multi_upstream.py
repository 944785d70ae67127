"""Several real upstreams behind one mirror: routing by containerd's ns, by path prefix and by
default; credentials (password, credential helper); private content across repositories."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import oci
from tests.support.clients import (
    Containerd,
    UpstreamRegistry,
    http_request,
    skopeo_pull,
    write_hosts_toml,
)
from tests.support.credhelper import write_credential_helper
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import BASIC_PASSWORD, BASIC_USER, ClosedPort
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.integration


def digests(blobs: tuple[oci.Blob, ...]) -> set[str]:
    return {b.digest for b in blobs}


@pytest.fixture
def names() -> Iterator[tuple[ClosedPort, ClosedPort]]:
    """Registry names for the token and the basic upstream; nothing listens there, so a
    client only succeeds through the mirror."""
    tok, basic = ClosedPort(), ClosedPort()
    yield tok, basic
    tok.close()
    basic.close()


def routes(log: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(upstream, repository path) of the manifest requests in a mirror's log."""
    return {(str(e.get("upstream")), str(e["path"]).split("?")[0].split("/manifests/")[0])
            for e in log if "/manifests/" in str(e["path"])}


def registries_conf(path: Path, mirror: MirrorProcess, routes: dict[str, str]) -> Path:
    """registry -> mirror location (with a path prefix naming the upstream, or none)."""
    lines = ["unqualified-search-registries = []"]
    for registry, location in routes.items():
        lines += ["", "[[registry]]", f'location = "{registry}"', "insecure = true",
                  "", "[[registry.mirror]]", f'location = "{location}"', "insecure = true"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def three(mirror_factory: Any, blackhole: ClosedPort, upstream: UpstreamRegistry,
          token_upstream: UpstreamRegistry, basic_upstream: UpstreamRegistry,
          names: tuple[ClosedPort, ClosedPort]) -> MirrorProcess:
    tok, basic = names
    mirror: MirrorProcess = mirror_factory([
        Upstream(name=blackhole.host, url=upstream.url),  # the default
        Upstream(name=tok.host, url=token_upstream.url, username="reader",
                 password="readerpw"),
        Upstream(name=basic.host, url=basic_upstream.url, username=BASIC_USER,
                 password=BASIC_PASSWORD),
    ])
    return mirror


@pytest.mark.timeout(300)
def test_containerd_selects_each_upstream_by_ns(
        three: MirrorProcess, blackhole: ClosedPort, names: tuple[ClosedPort, ClosedPort],
        test_images: oci.ImageSet, tmp_path: Path, ctd: Containerd) -> None:
    tok, basic = names
    hosts = tmp_path / "hosts"
    for registry in (blackhole.host, tok.host, basic.host):
        write_hosts_toml(hosts, registry, three.url)
    small = test_images.small
    for ref in (f"{blackhole.host}/test/small:v1", f"{tok.host}/private/small:v1",
                f"{basic.host}/test/small:v1"):
        ctd.pull(ref, hosts_dir=hosts)
        ctd.check_image(ref)
        assert ctd.image_digest(ref) == small.manifest.digest
    wanted = {(blackhole.host, "/v2/test/small"), (tok.host, "/v2/private/small"),
              (basic.host, "/v2/test/small")}
    three.wait_log(lambda log: wanted <= routes(log), what="requests routed to each upstream")


@pytest.mark.timeout(300)
def test_skopeo_selects_upstreams_by_path_prefix_and_default(
        mirror_factory: Any, blackhole: ClosedPort, upstream: UpstreamRegistry,
        token_upstream: UpstreamRegistry, test_images: oci.ImageSet, tmp_path: Path) -> None:
    # A path prefix must be a valid repository component (like "ghcr.io"), so the token
    # upstream is named "localhost" here: were the mirror bypassed, skopeo's fallback to the
    # primary location would only reach loopback, where nothing listens on 443.
    mirror: MirrorProcess = mirror_factory([
        Upstream(name=blackhole.host, url=upstream.url),
        Upstream(name="localhost", url=token_upstream.url, username="reader",
                 password="readerpw"),
    ])
    conf = registries_conf(tmp_path / "r.conf", mirror, {
        blackhole.host: mirror.host,  # no prefix: the default upstream
        "localhost": f"{mirror.host}/localhost",
    })
    small = test_images.small
    for registry, repo in ((blackhole.host, "test/small"), ("localhost", "public/small")):
        pulled = skopeo_pull(conf, registry, repo, "v1", tmp_path / registry.replace(":", "_"))
        assert pulled.manifest == small.manifest_bytes
        assert pulled.blobs == digests(small.blobs)
    wanted = {(blackhole.host, "/v2/test/small"), ("localhost", "/v2/localhost/public/small")}
    mirror.wait_log(lambda log: wanted <= routes(log), what="requests routed by path prefix")


def test_unknown_ns_is_refused_with_the_configured_names(
        three: MirrorProcess, names: tuple[ClosedPort, ClosedPort]) -> None:
    resp = http_request(three.host, "GET", "/v2/test/small/manifests/v1?ns=quay.io")
    assert resp.status == 404
    error = resp.json()["errors"][0]
    assert error["code"] == "NAME_UNKNOWN" and names[0].host in error["message"]


@pytest.mark.timeout(300)
def test_private_layer_not_readable_under_another_repository(
        mirror_factory: Any, token_upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    mirror: MirrorProcess = mirror_factory([Upstream(
        name=blackhole.host, url=token_upstream.url, username="reader", password="readerpw")])
    small = test_images.small
    layer = small.blobs[-1].digest
    ok = http_request(mirror.host, "GET", f"/v2/private/small/blobs/{layer}")
    assert ok.status == 200
    mirror.wait_cached({layer})
    # cached now, but "elsewhere/repo" holds no such layer upstream: refused, not served
    for method in ("GET", "HEAD"):
        denied = http_request(mirror.host, method, f"/v2/elsewhere/repo/blobs/{layer}")
        assert denied.status == 404, denied.status
        if method == "GET":
            assert denied.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert http_request(mirror.host, "GET", f"/v2/private/small/blobs/{layer}").status == 200


@pytest.fixture
def credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-test` on the mirror's PATH: logs the server it is asked about."""
    bindir = tmp_path / "helper-bin"
    log = tmp_path / "helper.log"
    write_credential_helper(bindir, "test", "reader", "readerpw", log)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


@pytest.mark.timeout(300)
def test_credential_helper_path(
        mirror_factory: Any, token_upstream: UpstreamRegistry, token_server: TokenServer,
        blackhole: ClosedPort, test_images: oci.ImageSet, tmp_path: Path,
        credential_helper: Path) -> None:
    mirror: MirrorProcess = mirror_factory([Upstream(
        name=blackhole.host, url=token_upstream.url, extra={"credential_helper": "test"})])
    conf = registries_conf(tmp_path / "r.conf", mirror, {blackhole.host: mirror.host})
    start = len(token_server.requests)
    pulled = skopeo_pull(conf, blackhole.host, "private/small", "v1", tmp_path / "out")
    assert pulled.manifest == test_images.small.manifest_bytes
    # asked about the upstream's host only (once per worker process: each caches its answer)
    assert set(credential_helper.read_text().split()) == {token_upstream.host}
    users = {r.user for r in token_server.requests[start:]}
    assert users == {"reader"}, users
