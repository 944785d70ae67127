"""Core pull-through behaviour (issue 2) with a real upstream and real clients.

Clients name the registry `blackhole.host`, where nothing listens: they can only succeed
through the mirror, whose default upstream is named `blackhole.host` and points at the real
docker-registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import (
    Containerd,
    RawResponse,
    UpstreamRegistry,
    assert_pulled,
    http_request,
    skopeo_copy,
    skopeo_copy_async,
    skopeo_pull,
    verify_dir,
    wait_for_exit,
    write_registries_conf,
)
from tests.support.clients import run as run_cmd
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry, ThrottledProxy, wait_until

pytestmark = pytest.mark.integration

MB = 1 << 20
ALL_MANIFEST_TYPES = (
    oci.OCI_MANIFEST,
    oci.OCI_INDEX,
    oci.DOCKER_MANIFEST,
    oci.DOCKER_MANIFEST_LIST,
)
# Several Accept header lines, as dockerd and podman send them.
ACCEPT_ALL = [("Accept", t) for t in ALL_MANIFEST_TYPES]


def digests(blobs: tuple[oci.Blob, ...]) -> set[str]:
    return {b.digest for b in blobs}


def assert_registry_error(resp: RawResponse, status: int | set[int], codes: set[str]) -> None:
    statuses = {status} if isinstance(status, int) else status
    assert resp.status in statuses, (resp.status, resp.body[:500])
    ctype = resp.header("Content-Type") or ""
    assert ctype.startswith("application/json"), ctype
    body = resp.json()
    assert isinstance(body.get("errors"), list) and body["errors"], body
    assert body["errors"][0].get("code") in codes, body


def mirror_blob_gets(mirror: MirrorProcess, digest: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The mirror's log lines for GETs of a blob, once at least `at_least` are written."""
    mirror.wait_log(
        lambda _: len(mirror.requests_for(f"/blobs/{digest}", "GET")) >= at_least,
        what=f"{at_least} GET(s) of {digest} in the mirror's log",
    )
    return mirror.requests_for(f"/blobs/{digest}", "GET")


# --- fixtures ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_upstream_fixture_serves_pushed_images(
    upstream: UpstreamRegistry, test_images: oci.ImageSet, tmp_path: Path
) -> None:
    """The fixtures themselves, without the mirror: pushed bytes are what the upstream serves."""
    cases: list[tuple[str, str, oci.Image | oci.ImageIndex]] = [
        ("test/big", "v1", test_images.big),
        ("test/multi", "v1", test_images.multi),
        ("test/small", "v3", test_images.small),
        ("test/docker", "v1", test_images.docker),
        ("test/dockerlist", "v1", test_images.docker_list),
    ]
    for repo, tag, art in cases:
        r = http_request(upstream.host, "GET", f"/v2/{repo}/manifests/{tag}", ACCEPT_ALL)
        assert r.status == 200
        assert r.body == art.manifest_bytes
        assert r.header("Docker-Content-Digest") == art.manifest.digest
    out = tmp_path / "direct"
    skopeo_copy(f"docker://{upstream.host}/test/small:v1", f"dir:{out}")
    assert_pulled(verify_dir(out), test_images.small)


# --- basics -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_base_endpoint(mirror: MirrorProcess) -> None:
    r = http_request(mirror.host, "GET", "/v2/")
    assert r.status == 200
    assert r.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert json.loads(r.body) == {}


@pytest.mark.timeout(60)
def test_request_log_lines(mirror: MirrorProcess, test_images: oci.ImageSet) -> None:
    cfg = test_images.small.config
    for _ in range(2):
        r = http_request(mirror.host, "GET", f"/v2/test/small/blobs/{cfg.digest}")
        assert r.status == 200
        mirror.wait_cached([cfg.digest])
    entries = mirror_blob_gets(mirror, cfg.digest, at_least=2)
    assert len(entries) == 2, mirror.request_log()
    for e in entries:
        assert {"method", "path", "status", "bytes", "cache", "duration_ms"} <= e.keys(), e
        assert e["status"] == 200
    assert entries[0]["cache"] == "miss"
    assert entries[1]["cache"] == "hit"
    assert entries[1]["bytes"] == cfg.size


# --- skopeo -------------------------------------------------------------------------------


# (repo, the image set's attribute, None or the arch picked from it, skopeo --all)
PULLS = {
    "single-arch": ("test/big", "big", None, False),
    "multi-arch-all": ("test/multi", "multi", None, True),
    "multi-arch-default": ("test/multi", "multi", "amd64", False),  # this machine's platform
    "docker-schema2": ("test/docker", "docker", None, False),
    "docker-manifest-list-all": ("test/dockerlist", "docker_list", None, True),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("row", PULLS.values(), ids=PULLS.keys())
def test_skopeo_pull(
    mirror: MirrorProcess,
    registries_conf: Path,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
    row: tuple[str, str, str | None, bool],
) -> None:
    """A cold pull through the mirror: the exact image, each blob fetched once, all of it
    verified in the cache and nothing left in tmp/."""
    repo, which, arch, all_platforms = row
    art: oci.Image | oci.ImageIndex = getattr(test_images, which)
    if arch is not None:
        assert isinstance(art, oci.ImageIndex)
        art = art.image_for(arch)
    pulled = skopeo_pull(
        registries_conf, blackhole.host, repo, "v1", tmp_path / "out", all_platforms=all_platforms
    )
    assert_pulled(pulled, art)
    for b in art.blobs:
        assert [e["status"] for e in mirror_blob_gets(mirror, b.digest)] == [200], b
    mirror.wait_cached(digests(art.all_blobs))
    assert digests(art.all_blobs) <= mirror.verify_cache()
    assert mirror.tmp_files() == []


@pytest.mark.timeout(180)
def test_second_pull_makes_no_upstream_blob_gets(
    mirror: MirrorProcess,
    registries_conf: Path,
    blackhole: ClosedPort,
    upstream: UpstreamRegistry,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    big = test_images.big
    mark = upstream.registry.mark()
    skopeo_pull(registries_conf, blackhole.host, "test/big", "v1", tmp_path / "cold")
    cold = upstream.registry.blob_gets(mark)
    assert set(cold) == digests(big.blobs), cold
    assert all(n == 1 for n in cold.values()), cold
    mirror.wait_cached(digests(big.blobs))

    mark = upstream.registry.mark()
    pulled = skopeo_pull(registries_conf, blackhole.host, "test/big", "v1", tmp_path / "warm")
    assert_pulled(pulled, big)
    assert upstream.registry.blob_gets(mark) == {}
    for b in big.blobs:
        caches = [e["cache"] for e in mirror_blob_gets(mirror, b.digest, at_least=2)]
        assert caches[-1] == "hit", (b.digest, caches)


# --- containerd ---------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(240)
def test_ctr_pull_through_hosts_toml(
    ctd: Containerd,
    mirror: MirrorProcess,
    hosts_dir: Path,
    blackhole: ClosedPort,
    upstream: UpstreamRegistry,
    test_images: oci.ImageSet,
) -> None:
    big, multi = test_images.big, test_images.multi
    big_ref = f"{blackhole.host}/test/big:v1"
    multi_ref = f"{blackhole.host}/test/multi:v1"

    ctd.pull(big_ref, hosts_dir=hosts_dir)
    ctd.pull(multi_ref, hosts_dir=hosts_dir, all_platforms=True)

    assert ctd.image_digest(big_ref) == big.manifest.digest
    assert ctd.image_digest(multi_ref) == multi.index.digest
    ctd.check_image(big_ref)
    ctd.check_image(multi_ref)
    verified = ctd.verify_content()
    assert digests(big.all_blobs) | digests(multi.all_blobs) <= verified
    assert ctd.content_bytes(big.manifest.digest) == big.manifest_bytes
    assert ctd.content_bytes(multi.index.digest) == multi.index_bytes
    # Docker schema 2 manifest list with gzip layers (unpacked by containerd).
    dlist = test_images.docker_list
    dlist_ref = f"{blackhole.host}/test/dockerlist:v1"
    ctd.pull(dlist_ref, hosts_dir=hosts_dir)
    ctd.check_image(dlist_ref)
    assert ctd.image_digest(dlist_ref) == dlist.index.digest
    assert digests(dlist.image_for("amd64").all_blobs) <= ctd.verify_content()
    # containerd sent ?ns=<registry>; the mirror routed it to the upstream of that name.
    mirror.wait_cached(digests(big.all_blobs) | digests(multi.all_blobs))
    assert digests(big.all_blobs) | digests(multi.all_blobs) <= mirror.verify_cache()

    # A cold client again: everything now comes from the mirror's cache.
    ctd.remove_all()
    mark = upstream.registry.mark()
    ctd.pull(big_ref, hosts_dir=hosts_dir)
    ctd.check_image(big_ref)
    assert digests(big.all_blobs) <= ctd.verify_content()
    assert upstream.registry.blob_gets(mark) == {}


# --- crash safety -------------------------------------------------------------------------


def _largest_partial(mirror: MirrorProcess) -> int:
    sizes = [0]
    for p in mirror.tmp_files():
        with contextlib.suppress(FileNotFoundError):
            sizes.append(p.stat().st_size)
    return max(sizes)


@pytest.mark.timeout(240)
def test_kill9_during_cold_pull_then_restart(
    mirror_factory: Any,
    upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    big = test_images.big
    biggest = max(big.layers, key=lambda b: b.size)
    # Slow the upstream down (20 MB/s) so the pull can be interrupted part-way.
    proxy = ThrottledProxy(upstream.registry.port, rate=20 * MB).start()
    try:
        mirror = mirror_factory([Upstream(name=blackhole.host, url=proxy.url)])
        conf = write_registries_conf(
            tmp_path / "registries.conf", registry=blackhole.host, mirrors=[mirror.host]
        )
        proc = skopeo_copy_async(
            f"docker://{blackhole.host}/test/big:v1",
            f"dir:{tmp_path / 'interrupted'}",
            registries_conf=conf,
            log_path=tmp_path / "skopeo-interrupted.log",
        )
        try:
            wait_until(
                lambda: _largest_partial(mirror) > 8 * MB,
                timeout=60,
                interval=0.01,
                what="a partial blob > 8 MB under <cache>/tmp/",
            )
        finally:
            mirror.kill9()
        assert wait_for_exit(proc, 60) != 0, "skopeo succeeded although the mirror was killed"
        assert biggest.digest not in mirror.cached_digests()

        proxy.set_rate(None)
        mirror.start()
        assert mirror.tmp_files() == [], "temporary files left after restart"
        mirror.verify_cache()

        pulled = skopeo_pull(conf, blackhole.host, "test/big", "v1", tmp_path / "after")
        assert_pulled(pulled, big)
        mirror.wait_cached(digests(big.all_blobs))
        assert digests(big.all_blobs) <= mirror.verify_cache()
        assert mirror.tmp_files() == []
        verify = run_cmd([sys.executable, "-m", "mirror", "verify", "--config",
                          str(mirror.config_path)], timeout=120, check=False)
        assert verify.returncode == 0 and " 0 bad" in verify.stdout, verify
    finally:
        proxy.stop()


@pytest.mark.timeout(120)
def test_cold_blob_streams_before_the_download_completes(
    mirror_factory: Any,
    upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
) -> None:
    """A miss is streamed to the client as it arrives, not after the whole blob is in:
    with the upstream at 20 MB/s, the first MiB of the 100 MB layer reaches the client
    while the download is still far from done."""
    biggest = max(test_images.big.layers, key=lambda b: b.size)
    proxy = ThrottledProxy(upstream.registry.port, rate=20 * MB).start()
    try:
        mirror = mirror_factory([Upstream(name=blackhole.host, url=proxy.url)])
        url = f"{mirror.url}/v2/test/big/blobs/{biggest.digest}"
        h = hashlib.sha256()
        got = 0
        with httpx.Client(timeout=60, trust_env=False) as c, c.stream("GET", url) as r:
            assert r.status_code == 200
            assert r.headers.get("Docker-Content-Digest") == biggest.digest
            chunks = r.iter_raw()
            while got < MB:
                chunk = next(chunks)
                h.update(chunk)
                got += len(chunk)
            assert biggest.digest not in mirror.cached_digests()
            assert proxy.bytes_forwarded < biggest.size // 2, "the blob was buffered first"
            proxy.set_rate(None)
            for chunk in chunks:
                h.update(chunk)
                got += len(chunk)
        assert got == biggest.size
        assert h.hexdigest() == biggest.hex
        mirror.wait_cached([biggest.digest])
    finally:
        proxy.stop()


# --- manifests ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("repo", "which", "media_type"),
    [
        ("test/big", "big", oci.OCI_MANIFEST),
        ("test/multi", "multi", oci.OCI_INDEX),
        ("test/docker", "docker", oci.DOCKER_MANIFEST),
        ("test/dockerlist", "docker_list", oci.DOCKER_MANIFEST_LIST),
    ],
)
def test_manifest_head_and_get(
    mirror: MirrorProcess,
    test_images: oci.ImageSet,
    repo: str,
    which: str,
    media_type: str,
) -> None:
    art: oci.Image | oci.ImageIndex = getattr(test_images, which)
    expected = art.manifest_bytes
    for ref in ("v1", art.manifest.digest):
        for method in ("HEAD", "GET", "HEAD"):
            r = http_request(mirror.host, method, f"/v2/{repo}/manifests/{ref}", ACCEPT_ALL)
            assert r.status == 200, (method, ref, r.status, r.body[:300])
            assert r.header("Content-Type") == media_type, (method, ref)
            assert r.header("Content-Length") == str(len(expected)), (method, ref)
            assert r.header("Docker-Content-Digest") == art.manifest.digest, (method, ref)
            if method == "GET":
                assert r.body == expected, (method, ref)
                assert hashlib.sha256(r.body).hexdigest() == art.manifest.hex
            else:
                assert r.body == b""
            if ref.startswith("sha256:"):  # immutable
                assert "immutable" in (r.header("Cache-Control") or ""), (method, ref)
                assert r.header("ETag") == f'"{ref}"', (method, ref)


@pytest.mark.timeout(60)
def test_manifest_head_is_not_an_upstream_get(
    mirror: MirrorProcess, upstream: UpstreamRegistry, test_images: oci.ImageSet
) -> None:
    mark = upstream.registry.mark()
    r = http_request(mirror.host, "HEAD", "/v2/test/small/manifests/v1", ACCEPT_ALL)
    assert r.status == 200
    assert r.header("Docker-Content-Digest") == test_images.small.manifest.digest
    gets = [e for e in upstream.registry.manifest_requests(mark) if e.method == "GET"]
    assert gets == [], "a client HEAD became an upstream manifest GET"


@pytest.mark.timeout(120)
def test_tag_revalidated_with_head_and_refetched_on_change(
    mirror_factory: Any,
    upstream: UpstreamRegistry,
    test_images: oci.ImageSet,
) -> None:
    repo = "test/mutable"
    imgs = test_images
    upstream.push(imgs.layout, "small", imgs.small, repo, "v1")
    mirror: MirrorProcess = mirror_factory(tag_ttl="0s")
    path = f"/v2/{repo}/manifests/v1"

    r = http_request(mirror.host, "GET", path, ACCEPT_ALL)
    assert r.body == imgs.small.manifest_bytes
    mark = upstream.registry.mark()
    r = http_request(mirror.host, "GET", path, ACCEPT_ALL)
    assert r.body == imgs.small.manifest_bytes
    methods = [e.method for e in upstream.registry.manifest_requests(mark)]
    assert "GET" not in methods, f"unchanged tag fetched again: {methods}"
    assert "HEAD" in methods, f"expired tag not revalidated: {methods}"

    # The tag moves upstream: the next request sees the new manifest.
    upstream.push(imgs.layout, "multi", imgs.multi, repo, "v1")
    r = http_request(mirror.host, "GET", path, ACCEPT_ALL)
    assert r.status == 200
    assert r.body == imgs.multi.index_bytes
    assert r.header("Docker-Content-Digest") == imgs.multi.index.digest


@pytest.mark.timeout(60)
def test_tag_trusted_within_ttl(
    mirror: MirrorProcess, upstream: UpstreamRegistry, test_images: oci.ImageSet
) -> None:
    path = "/v2/test/small/manifests/v2"
    assert http_request(mirror.host, "GET", path, ACCEPT_ALL).status == 200
    mark = upstream.registry.mark()
    for method in ("GET", "HEAD"):
        r = http_request(mirror.host, method, path, ACCEPT_ALL)
        assert r.status == 200
        assert r.header("Docker-Content-Digest") == test_images.small.manifest.digest
    assert upstream.registry.manifest_requests(mark) == []


@pytest.mark.timeout(60)
def test_unknown_manifest_and_blob(mirror: MirrorProcess) -> None:
    r = http_request(mirror.host, "GET", "/v2/test/small/manifests/nope", ACCEPT_ALL)
    assert_registry_error(r, 404, {"MANIFEST_UNKNOWN"})
    missing = "sha256:" + "0" * 64
    r = http_request(mirror.host, "GET", f"/v2/test/small/blobs/{missing}")
    assert_registry_error(r, 404, {"BLOB_UNKNOWN"})
    r = http_request(mirror.host, "GET", "/v2/test/nosuchrepo/manifests/v1", ACCEPT_ALL)
    assert_registry_error(r, 404, {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"})
    assert mirror.cached_digests() == set()


# --- blobs --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_blob_get_and_head(
    mirror: MirrorProcess, upstream: UpstreamRegistry, test_images: oci.ImageSet
) -> None:
    layer = test_images.small.layers[1]
    data = layer.read()
    path = f"/v2/test/small/blobs/{layer.digest}"
    mark = upstream.registry.mark()
    r = http_request(mirror.host, "HEAD", path)
    assert r.status == 200
    assert upstream.registry.blob_gets(mark) == {}, "a cold blob HEAD became an upstream GET"
    for i in range(2):  # miss, then hit
        if i:
            mirror.wait_cached([layer.digest])
        for method in ("HEAD", "GET"):
            r = http_request(mirror.host, method, path)
            assert r.status == 200, (method, r.status)
            assert r.header("Content-Length") == str(layer.size), method
            assert r.header("Docker-Content-Digest") == layer.digest, method
            assert "immutable" in (r.header("Cache-Control") or ""), method
            assert r.header("ETag") == f'"{layer.digest}"', method
            assert r.body == (data if method == "GET" else b""), method
    assert layer.digest in mirror.verify_cache()


# --- read-only and input validation -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/test/small/blobs/uploads/"),
        ("PATCH", "/v2/test/small/blobs/uploads/0a1b2c3d"),
        ("PUT", "/v2/test/small/blobs/uploads/0a1b2c3d?digest=sha256:" + "0" * 64),
        ("PUT", "/v2/test/small/manifests/v9"),
        ("DELETE", "/v2/test/small/manifests/sha256:" + "0" * 64),
        ("DELETE", "/v2/test/small/blobs/sha256:" + "0" * 64),
    ],
)
def test_writes_are_rejected(
    mirror: MirrorProcess, upstream: UpstreamRegistry, method: str, path: str
) -> None:
    mark = upstream.registry.mark()
    r = http_request(
        mirror.host,
        method,
        path,
        [("Content-Type", oci.OCI_MANIFEST)],
        body=b"{}",
    )
    assert_registry_error(r, 405, {"UNSUPPORTED"})
    assert upstream.registry.entries_since(mark) == [], "a write reached the upstream"


HEX64 = "a" * 64


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "codes"),
    [
        ("/v2/test/small/blobs/sha256:abc", {"DIGEST_INVALID"}),
        ("/v2/test/small/blobs/sha256:" + "A" * 64, {"DIGEST_INVALID"}),
        ("/v2/test/small/blobs/sha256:" + "g" * 64, {"DIGEST_INVALID"}),
        ("/v2/test/small/blobs/sha256:" + HEX64 + "00", {"DIGEST_INVALID"}),
        ("/v2/test/small/blobs/md5:" + "a" * 32, {"DIGEST_INVALID", "UNSUPPORTED"}),
        ("/v2/test/small/blobs/" + HEX64, {"DIGEST_INVALID"}),
        ("/v2/test/small/manifests/sha256:zz", {"DIGEST_INVALID", "MANIFEST_INVALID"}),
        ("/v2/Test/Small/manifests/v1", {"NAME_INVALID"}),
        ("/v2/test/-small/manifests/v1", {"NAME_INVALID"}),
        ("/v2/test//small/manifests/v1", {"NAME_INVALID"}),
        ("/v2/test/%2e%2e/%2e%2e/%2e%2e/etc/blobs/sha256:" + HEX64, {"NAME_INVALID"}),
        ("/v2/test/..%2f..%2fetc/manifests/v1", {"NAME_INVALID"}),
        # a malformed tag read is 404 MANIFEST_UNKNOWN, as the spec's pull tests expect
        # (tests/inprocess/test_hardening_edge.py::test_status_codes_the_spec_names)
    ],
)
def test_bad_names_and_digests_are_400(
    mirror: MirrorProcess, upstream: UpstreamRegistry, path: str, codes: set[str]
) -> None:
    mark = upstream.registry.mark()
    for method in ("GET", "HEAD"):
        r = http_request(mirror.host, method, path, ACCEPT_ALL)
        if method == "HEAD":
            assert r.status == 400, (path, r.status)
        else:
            assert_registry_error(r, 400, codes)
    assert upstream.registry.entries_since(mark) == [], "an invalid request reached the upstream"
    assert mirror.cached_files() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "path",
    [
        "/v2/../../../etc/passwd",
        "/v2/test/../../../../etc/blobs/sha256:" + HEX64,
        "/v2/test/small/blobs/../../../../../../etc/passwd",
    ],
)
def test_dot_segments_never_escape(
    mirror: MirrorProcess, upstream: UpstreamRegistry, path: str
) -> None:
    # Whether the server normalises dot segments (then: 404) or sees them (then: 400), the
    # answer is a registry error and nothing reaches the upstream or the disk.
    mark = upstream.registry.mark()
    r = http_request(mirror.host, "GET", path)
    assert_registry_error(r, {400, 404}, {"NAME_INVALID", "DIGEST_INVALID", "NAME_UNKNOWN"})
    assert upstream.registry.entries_since(mark) == []
    assert mirror.cached_files() == []


# --- tags ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_tags_list_passes_through(mirror: MirrorProcess, upstream: UpstreamRegistry) -> None:
    r = http_request(mirror.host, "GET", "/v2/test/small/tags/list")
    assert r.status == 200
    assert r.json() == {"name": "test/small", "tags": ["v1", "v2", "v3"]}
    assert (r.header("Content-Type") or "").startswith("application/json")

    # distribution 2.8 ignores n/last, so only check that they reach the upstream and that
    # any Link header stays on the mirror.
    mark = upstream.registry.mark()
    r = http_request(mirror.host, "GET", "/v2/test/small/tags/list?n=2&last=v1")
    assert r.status == 200
    assert r.json()["name"] == "test/small"
    link = r.header("Link")
    assert link is None or upstream.host not in link, f"Link leads to the upstream: {link}"
    targets = [e.target for e in upstream.registry.entries_since(mark)]
    assert any(
        t.startswith("/v2/test/small/tags/list?") and "n=2" in t and "last=v1" in t
        for t in targets
    ), targets
    r = http_request(mirror.host, "GET", "/v2/test/nosuchrepo/tags/list")
    assert_registry_error(r, 404, {"NAME_UNKNOWN"})


# --- upstream down ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unreachable_upstream_is_a_gateway_error(
    mirror_factory: Any, blackhole: ClosedPort
) -> None:
    dead = ClosedPort()
    try:
        mirror: MirrorProcess = mirror_factory(
            [Upstream(name=blackhole.host, url=f"http://{dead.host}")]
        )
        r = http_request(mirror.host, "GET", "/v2/")
        assert r.status == 200
        r = http_request(mirror.host, "GET", "/v2/test/small/manifests/v1", ACCEPT_ALL)
        assert r.status in (502, 503, 504), (r.status, r.body[:300])
        assert (r.header("Content-Type") or "").startswith("application/json")
        assert r.json()["errors"][0]["code"]
        text = r.body.decode(errors="replace")
        assert dead.host in text or blackhole.host in text, f"upstream not named: {text}"
        r = http_request(mirror.host, "GET", "/v2/test/small/blobs/sha256:" + HEX64)
        assert r.status in (502, 503, 504)
        assert mirror.running
    finally:
        dead.close()


@pytest.mark.timeout(120)
def test_registries_conf_mirror_with_upstream_prefix(
    mirror_factory: Any,
    upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    """`location = "MIRROR/<upstream name>"` routes by prefix (here not the default upstream,
    which is dead). skopeo rejects a `host:port` path component, hence a dotted name."""
    dead = ClosedPort()
    try:
        mirror: MirrorProcess = mirror_factory(
            [
                Upstream(name=blackhole.host, url=f"http://{dead.host}"),
                Upstream(name="registry.example", url=upstream.url),
            ]
        )
        conf = write_registries_conf(
            tmp_path / "prefixed.conf",
            registry=blackhole.host,
            mirrors=[f"{mirror.host}/registry.example"],
        )
        small = test_images.small
        pulled = skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "out")
        assert_pulled(pulled, small)
        mirror.wait_log(
            lambda log: any(str(e["path"]).startswith("/v2/registry.example/test/small/")
                            for e in log), what="requests under the upstream's path prefix")
    finally:
        dead.close()


# --- Accept handling ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_accept_header_lines_are_all_read(
    mirror: MirrorProcess, test_images: oci.ImageSet
) -> None:
    """The index type only on the second Accept line (distribution answers 404 to a client
    that does not accept an OCI index, so the mirror must pass on every line)."""
    multi = test_images.multi
    accept = [("Accept", oci.OCI_MANIFEST), ("Accept", oci.OCI_INDEX)]
    r = http_request(mirror.host, "GET", "/v2/test/multi/manifests/v1", accept)
    assert r.status == 200, r.body[:300]
    assert r.body == multi.index_bytes
    assert r.header("Content-Type") == oci.OCI_INDEX
    # Comma-separated in one line works too.
    accept = [("Accept", f"{oci.DOCKER_MANIFEST}, {oci.OCI_INDEX};q=0.9")]
    r = http_request(mirror.host, "GET", "/v2/test/multi/manifests/v1", accept)
    assert r.status == 200
    assert r.body == multi.index_bytes


@pytest.mark.timeout(60)
def test_cached_index_not_served_to_client_that_does_not_accept_it(
    mirror: MirrorProcess, test_images: oci.ImageSet
) -> None:
    r = http_request(mirror.host, "GET", "/v2/test/multi/manifests/v1", ACCEPT_ALL)
    assert r.status == 200 and r.body == test_images.multi.index_bytes
    mirror.wait_cached([test_images.multi.index.digest])
    for accept in ([oci.DOCKER_MANIFEST], [oci.OCI_MANIFEST, oci.DOCKER_MANIFEST]):
        for method in ("GET", "HEAD"):
            r = http_request(
                mirror.host, method, "/v2/test/multi/manifests/v1", [("Accept", a) for a in accept]
            )
            served_index = r.status == 200 and r.header("Content-Type") == oci.OCI_INDEX
            assert not served_index, f"{method} with Accept {accept} got an OCI index"
            # What the upstream itself answers such a client:
            assert r.status == 404, (method, accept, r.status)


SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("accept", [[oci.OCI_MANIFEST], [SCHEMA1_SIGNED]])
def test_docker_image_for_a_client_without_schema2_in_accept(
    mirror: MirrorProcess, upstream: UpstreamRegistry, accept: list[str]
) -> None:
    """distribution 2.8 answers such a client with a schema 1 manifest converted on the fly
    (signed; Docker-Content-Digest is over the JWS payload, not the body's bytes). The
    upstream is healthy, so the mirror must not answer 5xx: either the upstream's answer
    (same type and digest) or 404 MANIFEST_UNKNOWN."""
    hdrs = [("Accept", a) for a in accept]
    direct = http_request(upstream.host, "GET", "/v2/test/docker/manifests/v1", hdrs)
    assert direct.status == 200 and direct.header("Content-Type") == SCHEMA1_SIGNED
    r = http_request(mirror.host, "GET", "/v2/test/docker/manifests/v1", hdrs)
    assert r.status in (200, 404), (r.status, r.body[:300])
    if r.status == 200:
        assert r.header("Content-Type") == SCHEMA1_SIGNED
        assert r.header("Docker-Content-Digest") == direct.header("Docker-Content-Digest")
    else:
        assert_registry_error(r, 404, {"MANIFEST_UNKNOWN"})


# --- routing ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_repository_names_containing_api_words(
    mirror: MirrorProcess, upstream: UpstreamRegistry, test_images: oci.ImageSet
) -> None:
    small = test_images.small
    for repo in ("test/blobs/manifests", "test/manifests/tags/list"):
        upstream.push(test_images.layout, "small", small, repo, "v1")
        r = http_request(mirror.host, "GET", f"/v2/{repo}/manifests/v1", ACCEPT_ALL)
        assert r.status == 200, (repo, r.status, r.body[:300])
        assert r.body == small.manifest_bytes
        r = http_request(mirror.host, "GET", f"/v2/{repo}/blobs/{small.config.digest}")
        assert r.status == 200, (repo, r.status)
        assert r.body == small.config.read()
        r = http_request(mirror.host, "GET", f"/v2/{repo}/tags/list")
        assert r.status == 200, (repo, r.status)
        assert r.json() == {"name": repo, "tags": ["v1"]}


@pytest.mark.timeout(120)
def test_ns_query_selects_the_upstream(
    mirror_factory: Any,
    upstream: UpstreamRegistry,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
) -> None:
    """containerd's `?ns=<registry>` (percent-encoded) picks the upstream by name."""
    dead = ClosedPort()
    try:
        mirror: MirrorProcess = mirror_factory(
            [
                Upstream(name=blackhole.host, url=f"http://{dead.host}"),
                Upstream(name="reg2.example:5000", url=upstream.url),
            ]
        )
        small = test_images.small
        for ns in ("reg2.example%3A5000", "reg2.example:5000"):
            path = f"/v2/test/small/manifests/v1?ns={ns}"
            r = http_request(mirror.host, "GET", path, ACCEPT_ALL)
            assert r.status == 200, (ns, r.status, r.body[:300])
            assert r.body == small.manifest_bytes
            path = f"/v2/test/small/blobs/{small.config.digest}?ns={ns}"
            r = http_request(mirror.host, "GET", path)
            assert r.status == 200 and r.body == small.config.read()
        # Without ns (or with the default's name), the default upstream (dead) is used.
        r = http_request(mirror.host, "GET", "/v2/test/small/manifests/v2", ACCEPT_ALL)
        assert r.status in (502, 503, 504), r.status
    finally:
        dead.close()


@pytest.mark.timeout(120)
def test_docker_io_library_names(
    mirror_factory: Any, upstream: UpstreamRegistry, test_images: oci.ImageSet
) -> None:
    """For the upstream named docker.io, `small`, `library/small` and
    `docker.io/library/small` are one repository."""
    small = test_images.small
    upstream.push(test_images.layout, "small", small, "library/small", "v1")
    mirror: MirrorProcess = mirror_factory([Upstream(name="docker.io", url=upstream.url)])
    for name in ("small", "library/small", "docker.io/library/small", "docker.io/small"):
        r = http_request(mirror.host, "GET", f"/v2/{name}/manifests/v1", ACCEPT_ALL)
        assert r.status == 200, (name, r.status, r.body[:300])
        assert r.body == small.manifest_bytes
        r = http_request(mirror.host, "GET", f"/v2/{name}/blobs/{small.layers[0].digest}")
        assert r.status == 200 and r.body == small.layers[0].read(), name


# --- blob transfer details --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_blob_ignores_accept_encoding(mirror: MirrorProcess, test_images: oci.ImageSet) -> None:
    """containerd sends `Accept-Encoding: zstd, gzip`: the blob's own bytes come back."""
    layer = test_images.small.layers[0]
    hdrs = [("Accept-Encoding", "zstd, gzip, br")]
    for i in range(2):  # miss, hit
        if i:
            mirror.wait_cached([layer.digest])
        r = http_request(mirror.host, "GET", f"/v2/test/small/blobs/{layer.digest}", hdrs)
        assert r.status == 200
        assert r.header("Content-Encoding") in (None, "identity")
        assert r.body == layer.read()


@pytest.mark.timeout(60)
def test_blob_ranges_on_a_cached_blob(mirror: MirrorProcess, test_images: oci.ImageSet) -> None:
    layer = test_images.small.layers[1]
    data = layer.read()
    path = f"/v2/test/small/blobs/{layer.digest}"
    assert http_request(mirror.host, "GET", path).status == 200
    mirror.wait_cached([layer.digest])
    r = http_request(mirror.host, "GET", path)
    assert r.header("Accept-Ranges") == "bytes"
    for spec, start, end in [
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, len(data) - 1),
        ("bytes=-512", len(data) - 512, len(data) - 1),
    ]:
        r = http_request(mirror.host, "GET", path, [("Range", spec)])
        assert r.status == 206, (spec, r.status)
        assert r.header("Content-Range") == f"bytes {start}-{end}/{len(data)}", spec
        assert r.body == data[start : end + 1], spec
    r = http_request(mirror.host, "GET", path, [("Range", f"bytes={len(data) + 10}-")])
    assert r.status == 416
    # podman's partial pulls send multi-range requests: 200 with the whole body or 206, not 416.
    r = http_request(mirror.host, "GET", path, [("Range", "bytes=0-9,100-199")])
    assert r.status in (200, 206), r.status
    if r.status == 200:
        assert r.body == data


@pytest.mark.timeout(120)
def test_cached_content_served_while_upstream_down(
    mirror_factory: Any,
    blackhole: ClosedPort,
    test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    """Once pulled, an image pulls by digest (and by tag within tag_ttl) with the upstream
    gone, across a mirror restart too: the cache on disk is the source of truth."""
    reg = Registry(tmp_path / "own-upstream").start()
    try:
        small = test_images.small
        own = UpstreamRegistry(reg)
        own.push(test_images.layout, "small", small, "test/small", "v1")
        mirror: MirrorProcess = mirror_factory([Upstream(name=blackhole.host, url=reg.url)])
        conf = write_registries_conf(
            tmp_path / "registries.conf", registry=blackhole.host, mirrors=[mirror.host]
        )
        skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "warm")
        mirror.wait_cached(digests(small.all_blobs))
    finally:
        reg.stop()

    pulled = skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "by-tag")
    assert pulled.manifest == small.manifest_bytes
    mirror.restart()
    pulled = skopeo_pull(
        conf, blackhole.host, "test/small", f"@{small.manifest.digest}", tmp_path / "by-digest"
    )
    assert_pulled(pulled, small)


# --- integrity -------------------------------------------------------------------------------


def _get_blob_outcome(host: str, path: str, expected: bytes) -> str:
    """'ok' when the full, correct body arrived; 'wrong' for a complete but different body;
    'aborted' when the connection broke or the body was cut short."""
    try:
        r = http_request(host, "GET", path, timeout=30)
    except (http.client.IncompleteRead, ConnectionError, http.client.HTTPException):
        return "aborted"
    if r.status != 200:
        return f"status {r.status}"
    if r.body == expected:
        return "ok"
    return "wrong"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_bad_upstream_bytes_are_never_cached(
    mirror: MirrorProcess,
    registries_conf: Path,
    blackhole: ClosedPort,
    upstream: UpstreamRegistry,
    tmp_path: Path,
    damage: str,
) -> None:
    """The upstream serves bytes that do not match the digest (its storage was tampered
    with): the client's transfer is aborted, nothing is cached, the next request retries."""
    layout = oci.OCILayout(tmp_path / "layout")
    img = oci.build_image(layout.blobs_dir, [2 * MB])
    layout.add(img, "bad")
    layout.write_index()
    repo = f"test/{damage}"
    upstream.push(layout, "bad", img, repo, "v1")
    layer = img.layers[0]
    good = layer.read()
    data_path = upstream.registry.blob_data_path(layer.digest)
    assert data_path.read_bytes() == good
    if damage == "corrupt":
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        data_path.write_bytes(bytes(bad))
    else:
        data_path.write_bytes(good[: len(good) - 4096])

    path = f"/v2/{repo}/blobs/{layer.digest}"
    mark = upstream.registry.mark()
    outcome = _get_blob_outcome(mirror.host, path, good)
    # Streamed: headers went out before the digest could be checked, so the transfer must
    # break off (a 502 before any header would also do).
    assert outcome in ("aborted", "status 502"), outcome
    mirror.wait_log(lambda _: len(mirror.requests_for(path, "GET")) >= 1)
    assert layer.digest not in mirror.cached_digests()
    mirror.verify_cache()

    # Not cached: the next request goes to the upstream again (and fails the same way).
    outcome = _get_blob_outcome(mirror.host, path, good)
    assert outcome != "ok"
    assert upstream.registry.blob_gets(mark)[layer.digest] == 2
    assert layer.digest not in mirror.cached_digests()

    # A real client fails instead of storing bad bytes.
    res = skopeo_copy(
        f"docker://{blackhole.host}/{repo}:v1",
        f"dir:{tmp_path / 'out'}",
        registries_conf=registries_conf,
        check=False,
    )
    assert res.returncode != 0
    wait_until(lambda: mirror.tmp_files() == [], 10, what="temporary files removed")
    assert layer.digest not in mirror.verify_cache()

    # Once the upstream is repaired, the blob is fetched and cached.
    data_path.write_bytes(good)
    assert _get_blob_outcome(mirror.host, path, good) == "ok"
    mirror.wait_cached([layer.digest])


# --- resources -------------------------------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.timeout(180)
def test_memory_stays_flat_for_a_100mb_blob(
    mirror: MirrorProcess, test_images: oci.ImageSet
) -> None:
    """Streaming, not buffering: the mirror's peak RSS grows far less than the blob size,
    on a miss (upstream → disk + client) and on a hit."""
    assert mirror.proc is not None
    pid = mirror.proc.pid
    small = test_images.small.layers[0]
    assert http_request(mirror.host, "GET", f"/v2/test/small/blobs/{small.digest}").status == 200
    before = _peak_rss_kib(pid)
    biggest = max(test_images.big.layers, key=lambda b: b.size)
    path = f"/v2/test/big/blobs/{biggest.digest}"
    for i in range(2):
        if i:
            mirror.wait_cached([biggest.digest])
        r = http_request(mirror.host, "GET", path, timeout=120)
        assert r.status == 200 and len(r.body) == biggest.size
        assert hashlib.sha256(r.body).hexdigest() == biggest.hex
        del r
    grown_mib = (_peak_rss_kib(pid) - before) / 1024
    assert grown_mib < 40, f"mirror peak RSS grew by {grown_mib:.0f} MiB for a 100 MiB blob"


# --- command line --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("key", "kwargs", "url"),
    [
        ("bogus", {"cache_extra": {"bogus": 1}}, None),
        ("max_size", {"max_size": "20XB"}, None),
        ("tag_ttl", {"tag_ttl": "soon"}, None),
        ("url", {}, "ftp://example"),
        ("listen", {"server_extra": {"listen": "nowhere"}}, None),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path,
    upstream: UpstreamRegistry,
    key: str,
    kwargs: dict[str, Any],
    url: str | None,
) -> None:
    m = MirrorProcess(
        tmp_path / "m", [Upstream(name=upstream.host, url=url or upstream.url)], **kwargs
    )
    m.write_config()
    res = run_cmd(m.command(), timeout=60, check=False)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(m.config_path) in lines[0] and key in lines[0], lines[0]


@pytest.mark.timeout(60)
def test_help(tmp_path: Path) -> None:
    for args in (["--help"], ["serve", "--help"]):
        res = run_cmd([sys.executable, "-m", "mirror", *args], timeout=30)
        assert "--config" in res.stdout or args == ["--help"], res.stdout
        assert res.stdout.strip()
