"""Cache lifecycle with the real upstream and real clients: eviction, pins, a dead upstream,
start with the upstream down, `mirror verify`, export/import to a mirror with no network."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.clients import (
    Containerd,
    UpstreamRegistry,
    skopeo_pull,
    write_hosts_toml,
    write_registries_conf,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry, wait_until

pytestmark = pytest.mark.integration
KB = 1024


def digests(blobs: tuple[oci.Blob, ...]) -> set[str]:
    return {b.digest for b in blobs}


def mirror_cli(mirror: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config",
                           str(mirror.config_path)], capture_output=True, text=True, timeout=120)


def cache_bytes(mirror: MirrorProcess) -> int:
    total = 0
    for p in mirror.cached_files():
        with contextlib.suppress(FileNotFoundError):  # evicted since it was listed
            total += p.stat().st_size
    return total


@pytest.fixture
def own_upstream(tmp_path: Path, test_images: oci.ImageSet) -> Iterator[UpstreamRegistry]:
    """A registry this test may kill, holding test/small:v1 and test/multi:v1."""
    reg = Registry(tmp_path / "own-upstream").start()
    up = UpstreamRegistry(reg)
    up.push(test_images.layout, "small", test_images.small, "test/small", "v1")
    up.push(test_images.layout, "multi", test_images.multi, "test/multi", "v1")
    try:
        yield up
    finally:
        reg.stop()


@pytest.mark.timeout(240)
def test_eviction_keeps_the_store_under_max_size_while_pulls_succeed(
        mirror_factory: object, blackhole: ClosedPort, upstream: UpstreamRegistry,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    limit = 900 * KB
    mirror = mirror_factory(max_size=f"{limit}B",  # type: ignore[operator]
                            cache_extra={"low_watermark": "80%", "prefetch": False,
                                         "pin": [f"{blackhole.host}/test/small:v1"]})
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    small = test_images.small
    skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "small")
    # more than max_size in total goes through the mirror
    for arch in ("amd64", "arm64"):
        skopeo_pull(conf, blackhole.host, "test/multi", "v1", tmp_path / f"multi-{arch}")
    pulled = skopeo_pull(conf, blackhole.host, "test/docker", "v1", tmp_path / "docker")
    assert pulled.blobs == digests(test_images.docker.blobs)
    wait_until(lambda: cache_bytes(mirror) <= limit, 15, what="the store back under max_size")
    cached = mirror.verify_cache()
    assert digests(small.all_blobs) <= cached  # pinned
    status = mirror_cli(mirror, "status")
    assert status.returncode == 0 and "pinned:       " in status.stdout, status


@pytest.mark.timeout(300)
def test_upstream_killed_and_mirror_started_with_upstream_down(
        mirror_factory: object, own_upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path, containerd: Containerd) -> None:
    mirror: MirrorProcess = mirror_factory(  # type: ignore[operator]
        [Upstream(name=blackhole.host, url=own_upstream.url)], tag_ttl="0s")
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    hosts = write_hosts_toml(tmp_path / "hosts", blackhole.host, mirror.url)
    small = test_images.small
    skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "warm")
    containerd.remove_all()
    containerd.pull(f"{blackhole.host}/test/multi:v1", hosts_dir=hosts)
    mirror.wait_cached(digests(small.all_blobs))

    own_upstream.registry.stop()  # the upstream dies
    by_digest = f"@{small.manifest.digest}"
    for tag, out in (("v1", "down-tag"), (by_digest, "down-digest")):
        pulled = skopeo_pull(conf, blackhole.host, "test/small", tag, tmp_path / out)
        assert pulled.manifest == small.manifest_bytes
        assert pulled.blobs == digests(small.blobs)
    mirror.wait_log(lambda log: any(e.get("cache") == "stale" for e in log),
                    what="a stale answer in the mirror's log")
    containerd.remove_all()
    containerd.pull(f"{blackhole.host}/test/multi:v1", hosts_dir=hosts)
    containerd.check_image(f"{blackhole.host}/test/multi:v1")

    # a restart while the upstream is still down: starts, and serves the cache
    mirror.restart()
    pulled = skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "restarted")
    assert pulled.manifest == small.manifest_bytes


@pytest.mark.timeout(240)
def test_verify_finds_and_removes_corruption(
        mirror: MirrorProcess, registries_conf: Path, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    small = test_images.small
    skopeo_pull(registries_conf, blackhole.host, "test/small", "v1", tmp_path / "out")
    mirror.wait_cached(digests(small.blobs))
    clean = mirror_cli(mirror, "verify")
    assert clean.returncode == 0 and " 0 bad" in clean.stdout, clean
    victim = mirror.blob_path(small.blobs[-1].digest)
    with victim.open("r+b") as f:  # bit rot
        f.write(b"\0")
    dirty = mirror_cli(mirror, "verify")
    assert dirty.returncode == 1 and small.blobs[-1].digest in dirty.stdout, dirty
    assert not victim.exists()
    mirror.verify_cache()
    # the next pull fetches it again
    pulled = skopeo_pull(registries_conf, blackhole.host, "test/small", "v1", tmp_path / "again")
    assert pulled.blobs == digests(small.blobs)


@pytest.mark.timeout(300)
def test_export_then_import_on_a_mirror_with_no_network(
        mirror_factory: object, blackhole: ClosedPort, test_images: oci.ImageSet,
        tmp_path: Path, containerd: Containerd) -> None:
    online: MirrorProcess = mirror_factory()  # type: ignore[operator]
    conf = write_registries_conf(tmp_path / "online.conf", blackhole.host, [online.host])
    warm = mirror_cli(online, "warm", f"{blackhole.host}/test/small:v1",
                      f"{blackhole.host}/test/multi:v1", "--all-platforms")
    assert warm.returncode == 0, warm
    archive = tmp_path / "images.tar"
    exported = mirror_cli(online, "export", "-o", str(archive),
                          f"{blackhole.host}/test/small:v1", f"{blackhole.host}/test/multi:v1")
    assert exported.returncode == 0, exported
    del conf

    offline: MirrorProcess = mirror_factory(  # type: ignore[operator]
        [Upstream(name=blackhole.host, url=f"http://{blackhole.host}")],
        cache_extra={"offline": True})
    imported = mirror_cli(offline, "import", str(archive))
    assert imported.returncode == 0, imported
    offline.verify_cache()
    conf = write_registries_conf(tmp_path / "offline.conf", blackhole.host, [offline.host])
    small = test_images.small
    pulled = skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "out")
    assert pulled.manifest == small.manifest_bytes and pulled.blobs == digests(small.blobs)
    pulled = skopeo_pull(conf, blackhole.host, "test/multi", "v1", tmp_path / "multi",
                         all_platforms=True)
    assert pulled.manifest == test_images.multi.index_bytes
    hosts = write_hosts_toml(tmp_path / "hosts", blackhole.host, offline.url)
    containerd.remove_all()
    containerd.pull(f"{blackhole.host}/test/multi:v1", hosts_dir=hosts)
    containerd.check_image(f"{blackhole.host}/test/multi:v1")
    # a corrupted archive is refused
    data = bytearray(archive.read_bytes())
    data[-20000] ^= 0xFF
    archive.write_bytes(bytes(data))
    refused = mirror_cli(offline, "import", str(archive))
    assert refused.returncode == 1 and "does not match" in refused.stderr, refused
    offline.verify_cache()
