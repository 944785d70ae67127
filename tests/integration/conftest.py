"""Fixtures for the integration tests: a real upstream registry holding images built
offline, the mirror as a subprocess, skopeo and containerd as clients.

Session-scoped (built/started once):
  test_images      oci.ImageSet: .big (layers of 1, 10, 100 MB), .multi (amd64+arm64 index),
                   .small (two small layers), all in one OCI layout (.layout); and Docker
                   schema 2 ones (gzip layers): .docker, .docker_list (amd64+arm64)
  upstream         clients.UpstreamRegistry: docker-registry with the images pushed:
                   test/big:v1, test/multi:v1, test/small:{v1,v2,v3},
                   test/docker:v1 (schema 2), test/dockerlist:v1 (manifest list)
  token_server     TokenServer (users: admin/adminpw pull+push, reader/readerpw pull)
  token_upstream   clients.UpstreamRegistry with `auth: token`: public/small:v1, private/small:v1
  basic_upstream   UpstreamRegistry with `auth: htpasswd` (Basic; registry.BASIC_USER and
                   BASIC_PASSWORD): test/small:v1
  containerd       a private containerd (root only)
Function-scoped:
  mirror           a started mirror with a fresh, empty cache in front of `upstream`
  registries_conf  a registries.conf routing blackhole.host through `mirror`
  hosts_dir        a containerd hosts dir routing blackhole.host through `mirror`
  ctd              `containerd` emptied of images and content (a cold client)
  own_upstream     an upstream of this test's own, holding test/small:v1 (to stop and start)
From tests/support/mirrorfixtures.py (shared with tests/faults): blackhole, mirror_factory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import clients, oci
from tests.support.mirror import MirrorProcess
from tests.support.mirrorfixtures import MirrorFactory, blackhole, mirror_factory
from tests.support.redisserver import RedisServer
from tests.support.registry import (
    BASIC_PASSWORD,
    BASIC_USER,
    ClosedPort,
    Registry,
    htpasswd_auth,
)
from tests.support.tokenserver import TOKEN_USERS, TokenServer

__all__ = ["blackhole", "mirror_factory"]  # fixtures shared with tests/faults

MB = 1 << 20
BIG_LAYER_SIZES = (1 * MB, 10 * MB, 100 * MB)
SMALL_LAYER_SIZES = (64 * 1024, 300 * 1024)


# --- session fixtures -------------------------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[MirrorProcess]]:
    """Mirrors a test starts, each stopped when the test ends."""
    procs: list[MirrorProcess] = []
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> oci.ImageSet:
    layout = oci.OCILayout(tmp_path_factory.mktemp("layout"))
    big = oci.build_image(layout.blobs_dir, BIG_LAYER_SIZES, labels={"image": "big"})
    amd64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="amd64")
    arm64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="arm64")
    multi = oci.build_index(layout.blobs_dir, [amd64, arm64])
    small = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, labels={"image": "small"})
    docker = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, docker=True)
    d_amd64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="amd64", docker=True)
    d_arm64 = oci.build_image(layout.blobs_dir, SMALL_LAYER_SIZES, arch="arm64", docker=True)
    docker_list = oci.build_index(layout.blobs_dir, [d_amd64, d_arm64], docker=True)
    layout.add(big, "big")
    layout.add(multi, "multi")
    layout.add(small, "small")
    layout.write_index()
    return oci.ImageSet(layout, big, multi, small, docker, docker_list)


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
        up.push_direct(imgs.docker, "test/docker", "v1")
        up.push_direct(imgs.docker_list, "test/dockerlist", "v1")
        yield up
    finally:
        reg.stop()


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
def basic_upstream(
    tmp_path_factory: pytest.TempPathFactory, test_images: oci.ImageSet
) -> Iterator[clients.UpstreamRegistry]:
    workdir = tmp_path_factory.mktemp("basic-upstream")
    reg = Registry(workdir, auth=htpasswd_auth(workdir)).start()
    up = clients.UpstreamRegistry(reg)
    try:
        creds = f"{BASIC_USER}:{BASIC_PASSWORD}"
        up.push(test_images.layout, "small", test_images.small, "test/small", "v1", creds=creds)
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
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (tests/support/redisserver.py)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def own_upstream(tmp_path: Path, test_images: oci.ImageSet) -> Iterator[clients.UpstreamRegistry]:
    registry = Registry(tmp_path / "own-upstream").start()
    up = clients.UpstreamRegistry(registry)
    try:
        up.push(test_images.layout, "small", test_images.small, "test/small", "v1")
        yield up
    finally:
        registry.stop()


@pytest.fixture
def ctd(containerd: clients.Containerd) -> Iterator[clients.Containerd]:
    containerd.remove_all()
    yield containerd
    containerd.remove_all()
