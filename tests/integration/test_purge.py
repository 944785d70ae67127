"""`mirror purge` and `/v2/_catalog` with the real upstream (docker-registry), skopeo and the
mirror serving with two workers: a purged image's layers shared with another image stay (the
other pulls with 0 upstream blob GETs), the purged one pulls again from the upstream; a pinned
image is refused; a purge while the 100 MB layer is downloading does not break the client; the
catalog of thousands of repositories paginates."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx
import pytest

from mirror.cache.index import Index
from mirror.oci.reference import parse_digest
from tests.support import oci
from tests.support.clients import (
    UpstreamRegistry,
    assert_pulled,
    skopeo_copy_async,
    skopeo_pull,
    verify_dir,
    wait_for_exit,
    write_registries_conf,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry, ThrottledProxy, wait_until

pytestmark = pytest.mark.integration
KB, MB = 1024, 1 << 20


@dataclass(frozen=True)
class Shared:
    """purge/a:v1 and purge/b:v1 share their first layer; purge/a has a cosign signature
    at its tag-schema tag."""

    upstream: UpstreamRegistry
    a: oci.Image
    b: oci.Image
    signature: oci.Image

    @property
    def shared(self) -> str:
        return self.a.layers[0].digest

    def only_a(self) -> set[str]:
        return {self.a.manifest.digest, self.a.config.digest, self.a.layers[1].digest}

    def of_b(self) -> set[str]:
        return {b.digest for b in self.b.all_blobs}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    layout = oci.OCILayout(tmp_path_factory.mktemp("purge-layout"))
    common = oci.write_random_layer(layout.blobs_dir, 300 * KB, name="common.bin")
    a = oci.image_of(layout.blobs_dir, [common, oci.write_random_layer(
        layout.blobs_dir, 200 * KB, name="a.bin")], labels={"image": "a"})
    b = oci.image_of(layout.blobs_dir, [common, oci.write_random_layer(
        layout.blobs_dir, 100 * KB, name="b.bin")], labels={"image": "b"})
    signature = oci.build_image(layout.blobs_dir, [2 * KB], labels={"signature": "a"})
    for image, tag in ((a, "a"), (b, "b"), (signature, "sig")):
        layout.add(image, tag)
    layout.write_index()
    registry = Registry(tmp_path_factory.mktemp("purge-upstream")).start()
    up = UpstreamRegistry(registry)
    try:
        up.push(layout, "a", a, "purge/a", "v1")
        up.push(layout, "b", b, "purge/b", "v1")
        up.push(layout, "sig", signature, "purge/a", f"sha256-{a.manifest.hex}.sig")
        yield Shared(up, a, b, signature)
    finally:
        registry.stop()


def mirror_cli(mirror: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config",
                           str(mirror.config_path)], capture_output=True, text=True, timeout=120)


def assert_totals_exact(mirror: MirrorProcess) -> None:
    """The index's totals (what mirror_cache_bytes and `status` show) are the store's."""
    index = Index(mirror.cache_dir / "index")
    try:
        files = mirror.cached_files()
        assert index.total_bytes() == sum(p.stat().st_size for p in files)
        assert index.entry_count() == len(files)
    finally:
        index.close()


@pytest.mark.timeout(300)
def test_a_purged_image_goes_its_shared_layers_stay_and_it_pulls_again_from_the_upstream(
        mirror_factory: object, shared: Shared, blackhole: ClosedPort, tmp_path: Path) -> None:
    mirror: MirrorProcess = mirror_factory(  # type: ignore[operator]
        [Upstream(name=blackhole.host, url=shared.upstream.url)], server_extra={"workers": 2})
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    registry, host = shared.upstream.registry, blackhole.host
    assert_pulled(skopeo_pull(conf, host, "purge/a", "v1", tmp_path / "a1"), shared.a)
    assert_pulled(skopeo_pull(conf, host, "purge/b", "v1", tmp_path / "b1"), shared.b)
    warm = mirror_cli(mirror, "warm", f"{host}/purge/a:v1")  # with its signature
    assert warm.returncode == 0, warm
    signature = {b.digest for b in shared.signature.all_blobs}
    mirror.wait_cached(shared.only_a() | shared.of_b() | signature)
    before = mirror.cached_digests()

    dry = mirror_cli(mirror, "purge", "--dry-run", f"{host}/purge/a:v1")
    assert dry.returncode == 0, dry
    assert f"would remove blob {shared.a.layers[1].digest}" in dry.stdout
    assert f"would remove tag {host}/purge/a:sha256-{shared.a.manifest.hex}.sig" in dry.stdout
    assert f"would keep {shared.shared}: other cached images use it" in dry.stdout
    assert mirror.cached_digests() == before

    purged = mirror_cli(mirror, "purge", f"{host}/purge/a:v1")
    assert purged.returncode == 0, purged
    assert f"purged {host}/purge/a:v1: 2 manifests, 4 blobs" in purged.stdout, purged.stdout
    assert "2 tags" in purged.stdout and "kept 1 used by other cached images" in purged.stdout
    left = mirror.cached_digests()
    assert not (shared.only_a() | signature) & left
    assert shared.of_b() <= left
    assert_totals_exact(mirror)
    mirror.verify_cache()

    mark = registry.mark()
    assert_pulled(skopeo_pull(conf, host, "purge/b", "v1", tmp_path / "b2"), shared.b)
    assert not registry.blob_gets(mark), "the other image's blobs came from the upstream"
    # the purged image: from the upstream again (its manifest too, although a worker held
    # it in memory), but not the layer it shares
    assert_pulled(skopeo_pull(conf, host, "purge/a", "v1", tmp_path / "a2"), shared.a)
    gets = registry.blob_gets(mark)
    assert gets[shared.a.layers[1].digest] == 1 and gets[shared.a.config.digest] == 1
    assert gets[shared.shared] == 0
    assert any(e.method == "GET" and e.path.startswith("/v2/purge/a/manifests/")
               for e in registry.manifest_requests(mark))

    missing = mirror_cli(mirror, "purge", f"{host}/purge/nothing:v1")
    assert missing.returncode == 1 and "is not in the cache" in missing.stderr, missing
    whole = mirror_cli(mirror, "purge", f"{host}/purge/b")  # a whole repository
    assert whole.returncode == 0, whole
    assert not (shared.of_b() - {shared.shared}) & mirror.cached_digests()
    assert shared.shared in mirror.cached_digests()  # purge/a:v1 is back and uses it
    assert_totals_exact(mirror)


@pytest.mark.timeout(240)
def test_a_pinned_image_is_refused_and_kept_in_a_repository_purge(
        mirror_factory: object, shared: Shared, blackhole: ClosedPort, tmp_path: Path) -> None:
    host = blackhole.host
    mirror: MirrorProcess = mirror_factory(  # type: ignore[operator]
        [Upstream(name=host, url=shared.upstream.url)], server_extra={"workers": 2},
        cache_extra={"pin": [f"{host}/purge/a:v1"]})
    conf = write_registries_conf(tmp_path / "r.conf", host, [mirror.host])
    assert_pulled(skopeo_pull(conf, host, "purge/a", "v1", tmp_path / "a"), shared.a)
    mirror.wait_cached(shared.only_a())
    refused = mirror_cli(mirror, "purge", f"{host}/purge/a:v1")
    assert refused.returncode == 1 and "is pinned" in refused.stderr, refused
    refused = mirror_cli(mirror, "purge", f"{host}/purge/a@{shared.a.manifest.digest}")
    assert refused.returncode == 1 and "is pinned" in refused.stderr, refused
    whole = mirror_cli(mirror, "purge", f"{host}/purge/a")
    assert whole.returncode == 0, whole
    assert "0 manifests, 0 blobs" in whole.stdout and "pinned" in whole.stdout, whole.stdout
    assert shared.only_a() | {shared.shared} <= mirror.cached_digests()
    mark = shared.upstream.registry.mark()
    assert_pulled(skopeo_pull(conf, host, "purge/a", "v1", tmp_path / "again"), shared.a)
    assert not shared.upstream.registry.blob_gets(mark)


def _largest_partial(mirror: MirrorProcess) -> int:
    return max((p.stat().st_size for p in mirror.tmp_files()
                if p.name.endswith(".partial")), default=0)


@pytest.mark.timeout(300)
def test_a_purge_during_the_big_layer_s_download_does_not_break_its_client(
        mirror_factory: object, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    big = test_images.big
    biggest = max(big.layers, key=lambda b: b.size)
    link = ThrottledProxy(upstream.registry.port, rate=10 * MB).start()
    try:
        mirror: MirrorProcess = mirror_factory(  # type: ignore[operator]
            [Upstream(name=blackhole.host, url=link.url)], server_extra={"workers": 2})
        conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
        out = tmp_path / "big"
        proc = skopeo_copy_async(f"docker://{blackhole.host}/test/big:v1", f"dir:{out}",
                                 registries_conf=conf, log_path=tmp_path / "skopeo.log")
        wait_until(lambda: _largest_partial(mirror) > 8 * MB, 60, interval=0.01,
                   what="the 100 MB layer downloading")
        purged = mirror_cli(mirror, "purge", f"{blackhole.host}/test/big:v1")
        assert purged.returncode == 0, purged
        assert "being downloaded" in purged.stdout, purged.stdout
        assert biggest.digest not in mirror.cached_digests()  # still downloading
        link.set_rate(None)
        assert wait_for_exit(proc, 120) == 0, (tmp_path / "skopeo.log").read_text()
        assert_pulled(verify_dir(out), big)
        mirror.wait_cached([biggest.digest])  # kept: it was in flight
        mirror.verify_cache()
        verify = mirror_cli(mirror, "verify")
        assert verify.returncode == 0 and " 0 bad" in verify.stdout, verify
        assert_totals_exact(mirror)
    finally:
        link.stop()


def catalog(mirror: MirrorProcess, query: str = "", **kwargs: object) -> httpx.Response:
    return httpx.get(f"{mirror.url}/v2/_catalog{query}", trust_env=False, timeout=30,
                     **kwargs)  # type: ignore[arg-type]


def walk(mirror: MirrorProcess, n: int) -> list[str]:
    """Every page from the first, following the Link headers."""
    names: list[str] = []
    target = f"?n={n}"
    for _ in range(1000):
        r = catalog(mirror, target)
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json", r.text
        got = r.json()["repositories"]
        assert len(got) <= n
        names += got
        link = r.headers.get("Link")
        if link is None:
            return names
        assert link.startswith("</v2/_catalog?") and link.endswith('>; rel="next"'), link
        target = link[len("</v2/_catalog"):-len('>; rel="next"')]
    raise AssertionError("the catalog's pages never ended")


@pytest.mark.timeout(300)
def test_the_catalog_lists_cached_repositories_and_paginates_thousands(
        mirror_factory: object, shared: Shared, blackhole: ClosedPort, tmp_path: Path) -> None:
    host = blackhole.host
    url = shared.upstream.url
    off: MirrorProcess = mirror_factory([Upstream(name=host, url=url)])  # type: ignore[operator]
    assert catalog(off).status_code == 404
    mirror: MirrorProcess = mirror_factory(  # type: ignore[operator]
        [Upstream(name=host, url=url), Upstream(name="second.test", url=url)],
        server_extra={"workers": 2, "catalog": True})
    assert catalog(mirror).json() == {"repositories": []}
    conf = write_registries_conf(tmp_path / "r.conf", host, [mirror.host])
    skopeo_pull(conf, host, "purge/a", "v1", tmp_path / "a")
    r = httpx.get(f"{mirror.url}/v2/second.test/purge/b/manifests/{shared.b.manifest.digest}",
                  headers={"Accept": oci.OCI_MANIFEST}, trust_env=False, timeout=30)
    assert r.status_code == 200
    assert catalog(mirror).json() == {"repositories": ["purge/a", "second.test/purge/b"]}

    # thousands more, written to the index as pulls would (every tag names A's manifest)
    index = Index(mirror.cache_dir / "index")
    expected = ["purge/a", "second.test/purge/b"]
    try:
        with index.db.transact():
            for i in range(2500):
                upstream, repository = (host, "second.test")[i % 2], f"team{i % 9}/app{i:04d}"
                index.set_tag(upstream, repository, "v1", parse_digest(shared.a.manifest.digest),
                              oci.OCI_MANIFEST)
                expected.append(repository if i % 2 == 0 else f"second.test/{repository}")
        index.set_tag(host, "evicted/app", "v1", parse_digest("sha256:" + "0" * 64),
                      oci.OCI_MANIFEST)  # a manifest not stored: not listed
    finally:
        index.close()
    expected.sort()
    assert walk(mirror, 100) == expected
    assert walk(mirror, 1000) == expected
    first = catalog(mirror)  # no n: at most 1000
    assert first.json()["repositories"] == expected[:1000] and "Link" in first.headers
    page = catalog(mirror, f"?n=3&last={expected[10]}")
    assert page.json()["repositories"] == expected[11:14]
    assert catalog(mirror, "?n=x").status_code == 400

    # a purged repository leaves the catalog (its manifest stays: the others name it)
    assert mirror_cli(mirror, "purge", f"{host}/purge/a").returncode == 0
    assert "purge/a" not in walk(mirror, 1000)
    assert shared.a.manifest.digest in mirror.cached_digests()


@pytest.mark.timeout(120)
def test_with_auth_the_catalog_needs_a_user(
        mirror_factory: object, shared: Shared, blackhole: ClosedPort, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n")
    mirror = MirrorProcess(tmp_path / "auth-mirror", [
        Upstream(name=blackhole.host, url=shared.upstream.url),
        Upstream(name="localhost", url=shared.upstream.url,
                 extra={"access": "authenticated"})], server_extra={"catalog": True})
    mirror.sections["auth"] = {"htpasswd": str(htpasswd)}
    mirror.start()
    try:
        r = httpx.get(f"{mirror.url}/v2/localhost/purge/a/manifests/v1", auth=("ci", "pw"),
                      headers={"Accept": oci.OCI_MANIFEST}, trust_env=False, timeout=30)
        assert r.status_code == 200, r.text
        anonymous = catalog(mirror)
        assert anonymous.status_code == 401
        assert "registry:catalog:*" in anonymous.headers["WWW-Authenticate"]
        token = httpx.get(f"{mirror.url}/token", trust_env=False, timeout=30).json()["token"]
        with_token = catalog(mirror, headers={"Authorization": f"Bearer {token}"})
        assert with_token.status_code == 401 and "localhost" not in with_token.text
        assert catalog(mirror, auth=("ci", "wrong")).status_code == 401
        user = catalog(mirror, auth=("ci", "pw"))
        assert user.status_code == 200 and user.json() == {
            "repositories": ["localhost/purge/a"]}
        token = httpx.get(f"{mirror.url}/token", auth=("ci", "pw"), trust_env=False,
                          timeout=30).json()["token"]
        assert catalog(mirror, headers={"Authorization": f"Bearer {token}"}).json() == {
            "repositories": ["localhost/purge/a"]}
    finally:
        mirror.stop()
