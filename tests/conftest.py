"""Shared fixtures for the integration tests: a real upstream registry holding images built
offline, the mirror as a subprocess, skopeo and containerd as clients.

Session-scoped (built/started once):
  test_images      oci.ImageSet: .big (layers of 1, 10, 100 MB), .multi (amd64+arm64 index),
                   .small (two small layers), all in one OCI layout (.layout)
  blackhole        ClosedPort: the registry name clients pull from (`blackhole.host`); nothing
                   listens there, so a client can only succeed through the mirror
  upstream         clients.UpstreamRegistry: docker-registry with the images pushed:
                   test/big:v1, test/multi:v1, test/small:{v1,v2,v3}
  token_server     TokenServer (users: admin/adminpw pull+push, reader/readerpw pull)
  token_upstream   clients.UpstreamRegistry with `auth: token`: public/small:v1, private/small:v1
  containerd       a private containerd (root only)
Function-scoped:
  mirror_factory   make(upstreams=None, **MirrorProcess kwargs) -> started MirrorProcess,
                   default upstream: name=blackhole.host, url=upstream.url; stopped after
  mirror           a started mirror with a fresh, empty cache in front of `upstream`
  registries_conf  a registries.conf routing blackhole.host through `mirror`
  hosts_dir        a containerd hosts dir routing blackhole.host through `mirror`
  ctd              `containerd` emptied of images and content (a cold client)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# `tests/` has no __init__.py: make `tests.support` importable however pytest is started.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support import clients, oci  # noqa: E402
from tests.support.mirror import MirrorProcess, Upstream  # noqa: E402
from tests.support.registry import ClosedPort, Registry  # noqa: E402
from tests.support.tokenserver import TokenServer  # noqa: E402

MB = 1 << 20
BIG_LAYER_SIZES = (1 * MB, 10 * MB, 100 * MB)
SMALL_LAYER_SIZES = (64 * 1024, 300 * 1024)


# --- markers ----------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (containerd)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


# --- session fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> oci.ImageSet:
    layout = oci.OCILayout(tmp_path_factory.mktemp("layout"))
    big = oci.build_image(layout.blobs_dir, BIG_LAYER_SIZES, labels={"image": "big"})
    amd64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="amd64")
    arm64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="arm64")
    multi = oci.build_index(layout.blobs_dir, [amd64, arm64])
    small = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, labels={"image": "small"})
    layout.add(big, "big")
    layout.add(multi, "multi")
    layout.add(small, "small")
    layout.write_index()
    return oci.ImageSet(layout, big, multi, small)


@pytest.fixture(scope="session")
def blackhole() -> Iterator[ClosedPort]:
    port = ClosedPort()
    yield port
    port.close()


@pytest.fixture(scope="session")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, test_images: oci.ImageSet
) -> Iterator[clients.UpstreamRegistry]:
    reg = Registry(tmp_path_factory.mktemp("upstream")).start()
    up = clients.UpstreamRegistry(reg)
    try:
        imgs = test_images
        up.push(imgs.layout, "big", imgs.big, "test/big", "v1")
        up.push(imgs.layout, "multi", imgs.multi, "test/multi", "v1")
        for tag in ("v1", "v2", "v3"):
            up.push(imgs.layout, "small", imgs.small, "test/small", tag)
        yield up
    finally:
        reg.stop()


TOKEN_USERS: dict[str, tuple[str, list[str]]] = {
    "admin": ("adminpw", ["pull", "push"]),
    "reader": ("readerpw", ["pull"]),
}


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    ts = TokenServer(tmp_path_factory.mktemp("tokens"), users=dict(TOKEN_USERS)).start()
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def token_upstream(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer, test_images: oci.ImageSet
) -> Iterator[clients.UpstreamRegistry]:
    reg = Registry(
        tmp_path_factory.mktemp("token-upstream"), auth=token_server.registry_auth_config()
    ).start()
    up = clients.UpstreamRegistry(reg)
    try:
        imgs = test_images
        for repo in ("public/small", "private/small"):
            up.push(imgs.layout, "small", imgs.small, repo, "v1", creds="admin:adminpw")
        yield up
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[clients.Containerd]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    ctd = clients.Containerd(tmp_path_factory.mktemp("ctd")).start()
    yield ctd
    ctd.stop()


# --- function fixtures ------------------------------------------------------------------

MirrorFactory = Callable[..., MirrorProcess]


@pytest.fixture
def mirror_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream: clients.UpstreamRegistry,
    blackhole: ClosedPort,
) -> Iterator[MirrorFactory]:
    started: list[MirrorProcess] = []

    def make(upstreams: list[Upstream] | None = None, **kwargs: Any) -> MirrorProcess:
        ups = upstreams or [Upstream(name=blackhole.host, url=upstream.url)]
        m = MirrorProcess(tmp_path / f"mirror{len(started)}", ups, **kwargs)
        started.append(m)
        return m.start()

    yield make
    for m in started:
        m.stop()
        if _failed(request):
            print(f"--- mirror stderr ({m.stderr_path}) ---\n{m.stderr_tail()}")


@pytest.fixture
def mirror(mirror_factory: MirrorFactory) -> MirrorProcess:
    return mirror_factory()


@pytest.fixture
def registries_conf(tmp_path: Path, mirror: MirrorProcess, blackhole: ClosedPort) -> Path:
    return clients.write_registries_conf(
        tmp_path / "registries.conf", registry=blackhole.host, mirrors=[mirror.host]
    )


@pytest.fixture
def hosts_dir(tmp_path: Path, mirror: MirrorProcess, blackhole: ClosedPort) -> Path:
    return clients.write_hosts_toml(tmp_path / "hosts", blackhole.host, mirror.url)


@pytest.fixture
def ctd(containerd: clients.Containerd) -> Iterator[clients.Containerd]:
    containerd.remove_all()
    yield containerd
    containerd.remove_all()
