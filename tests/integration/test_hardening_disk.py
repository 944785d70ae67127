"""A full disk, a read-only cache dir and eviction, with real worker processes (issue 10,
items 10-12): every client of every worker gets the whole body, no 5xx, nothing left in tmp/,
and a manifest answered from any worker's memory is still on disk after another evicted it."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.cache.eviction import evict
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci.mediatypes import OCI_MANIFEST
from mirror.oci.reference import parse_digest
from tests.support import oci
from tests.support.clients import UpstreamRegistry
from tests.support.disk import fill
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, ThrottledProxy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
MB = 1 << 20
ROUNDS = 5




def pull(url: str, reached: threading.Event | None = None, at: int = 0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url` to the end; sets `reached` once `at` bytes arrived."""
    with httpx.Client(timeout=60, trust_env=False) as client, \
            client.stream("GET", url, headers=headers) as resp:
        body = bytearray()
        for chunk in resp.iter_bytes():
            body += chunk
            if reached is not None and len(body) >= at:
                reached.set()
        return resp.status_code, bytes(body)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tmp").iterdir() if not p.name.startswith(".ready"))


def layer(images: oci.ImageSet, size: int) -> oci.Blob:
    """The big image's layer of about `size` bytes (a tar holding that many)."""
    return next(b for b in images.big.layers if size <= b.size < size + 64 * 1024)


def two_workers(mirror_factory: Any, url: str, host: str, cache: Path,
                cache_extra: dict[str, Any] | None = None, **kwargs: Any) -> MirrorProcess:
    m: MirrorProcess = mirror_factory([Upstream(name=host, url=url)], cache_dir=cache,
                                      server_extra={"workers": 2},
                                      cache_extra={"prefetch": False, **(cache_extra or {})},
                                      **kwargs)
    return m


def test_two_workers_full_disk_every_client_gets_the_whole_blob(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tiny_disk: Path) -> None:
    blob = layer(test_images, 10 * MB)
    data = blob.path.read_bytes()
    # Slowed so that clients overlap: two start together (one worker leads, a client on the
    # other follows its file until the disk fills), two join past the disk (late joiners).
    proxy = ThrottledProxy(upstream.registry.port, rate=40 * MB).start()
    try:
        m = two_workers(mirror_factory, proxy.url, blackhole.host, tiny_disk, max_size="4MiB")
        url = f"{m.url}/v2/test/big/blobs/{blob.digest}"
        results: list[tuple[int, bytes]] = []
        with ThreadPoolExecutor(4) as pool:
            for _ in range(ROUNDS):
                past_disk = threading.Event()
                first = [pool.submit(pull, url, past_disk, 7 * MB) for _ in range(2)]
                assert past_disk.wait(30), "no client got past the disk's size"
                late = [pool.submit(pull, url) for _ in range(2)]
                results += [f.result(timeout=60) for f in (*first, *late)]
    finally:
        proxy.stop()
    failed = [(status, len(body)) for status, body in results if (status, body) != (200, data)]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed: {failed}"
    assert blob.digest not in m.cached_digests()
    wait_until(lambda: leftovers(tiny_disk) == [], 10, what="tmp/ emptied")
    m.verify_cache()


def test_two_workers_full_disk_cold_blob_and_manifest(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tiny_disk: Path) -> None:
    blob = layer(test_images, 1 * MB)
    data = blob.path.read_bytes()
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tiny_disk)
    fill(tiny_disk)
    accept = {"Accept": OCI_MANIFEST}
    with ThreadPoolExecutor(6) as pool:
        blobs = [pool.submit(pull, f"{m.url}/v2/test/big/blobs/{blob.digest}")
                 for _ in range(4)]
        manifests = [pool.submit(pull, f"{m.url}/v2/test/small/manifests/v1", None, 0, accept)
                     for _ in range(2)]
        assert [f.result(timeout=60) for f in blobs] == [(200, data)] * 4
        assert [f.result(timeout=60) for f in manifests] == [
            (200, test_images.small.manifest_bytes)] * 2
    assert m.cached_digests() == set()
    assert leftovers(tiny_disk) == []
    assert not any(e.get("level") == "error" and "unhandled" in str(e.get("msg"))
                   for e in m.log_entries())


def test_two_workers_read_only_cache_dir_relays_and_says_why(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tiny_disk: Path) -> None:
    cached, cold = layer(test_images, 1 * MB), test_images.small.layers[1]
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tiny_disk)
    assert pull(f"{m.url}/v2/test/big/blobs/{cached.digest}")[0] == 200
    m.wait_cached({cached.digest})
    subprocess.run(["mount", "--bind", "-o", "ro", str(tiny_disk), str(tiny_disk)], check=True)
    accept = {"Accept": OCI_MANIFEST}
    with ThreadPoolExecutor(6) as pool:
        futures: list[Future[tuple[int, bytes]]] = [
            pool.submit(pull, f"{m.url}/v2/test/big/blobs/{cached.digest}"),
            *(pool.submit(pull, f"{m.url}/v2/test/small/blobs/{cold.digest}")
              for _ in range(4)),
            pool.submit(pull, f"{m.url}/v2/test/small/manifests/v1", None, 0, accept)]
        answers = [f.result(timeout=60) for f in futures]
    assert answers == [(200, cached.path.read_bytes())] + [(200, cold.path.read_bytes())] * 4 \
        + [(200, test_images.small.manifest_bytes)]
    for _ in range(4):  # both workers say why
        resp = httpx.get(f"{m.url}/readyz", trust_env=False)
        assert resp.status_code == 503
        assert resp.json()["checks"]["cache_writable"]["detail"] == \
            f"cache directory is read-only: {tiny_disk}"
    assert cold.digest not in m.cached_digests()


def test_hot_manifest_evicted_by_another_worker_survives_a_restart_with_upstream_down(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tmp_path / "cache")
    url, accept = f"{m.url}/v2/test/small/manifests/v1", {"Accept": OCI_MANIFEST}
    manifest = test_images.small.manifest_bytes
    for _ in range(20):  # into both workers' memory
        assert pull(url, None, 0, accept) == (200, manifest)
    digest = test_images.small.manifest.digest
    store, index = BlobStore(m.cache_dir), Index(m.cache_dir / "index")
    try:
        # Evicted from disk (here by this process, as by any other worker or `mirror gc`).
        evict(store, index, 0, set())
        assert digest not in m.cached_digests()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and digest not in m.cached_digests():
            assert pull(url, None, 0, accept) == (200, manifest)  # served: back on disk
        assert digest in m.cached_digests()
        wait_until(lambda: any(e.digest == parse_digest(digest) for e in index.entries()), 10,
                   what="the manifest's index entry")
    finally:
        index.close()
    m.stop()
    m.upstreams = [Upstream(name=blackhole.host, url=f"http://{blackhole.host}")]
    m.start()  # empty memories, the upstream down: only the disk can answer
    assert pull(url, None, 0, accept) == (200, manifest)


def test_two_workers_memory_hits_reach_the_index_and_keep_a_manifest_from_eviction(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    small = test_images.small
    first, second = small.layers[0], small.layers[1]  # 64 KiB, 300 KiB
    big = layer(test_images, 1 * MB)
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tmp_path / "cache",
                    {"low_watermark": "1100KiB"}, max_size="1200KiB")
    url, accept = f"{m.url}/v2/test/small/manifests/v1", {"Accept": OCI_MANIFEST}
    assert pull(url, None, 0, accept)[0] == 200  # the oldest entry...
    for b in (first, second):
        assert pull(f"{m.url}/v2/test/small/blobs/{b.digest}")[0] == 200
    m.wait_cached({first.digest, second.digest, small.manifest.digest})
    index = Index(m.cache_dir / "index")
    try:
        def newest() -> bool:
            for _ in range(10):  # ...made the most recently used by memory hits on both
                assert pull(url, None, 0, accept)[0] == 200
            times = {str(e.digest): e.last_access for e in index.entries()}
            return times.get(small.manifest.digest, 0) > max(times[first.digest],
                                                             times[second.digest])
        wait_until(newest, 15, interval=0.2, what="memory hits flushed to the index")
    finally:
        index.close()
    assert pull(f"{m.url}/v2/test/big/blobs/{big.digest}")[0] == 200  # past max_size
    wait_until(lambda: first.digest not in m.cached_digests(), 15, what="eviction")
    assert small.manifest.digest in m.cached_digests()
    assert big.digest in m.cached_digests()


def test_two_workers_start_on_a_read_only_cache_dir(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tiny_disk: Path) -> None:
    cached, cold = layer(test_images, 1 * MB), test_images.small.layers[1]
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tiny_disk)
    accept = {"Accept": OCI_MANIFEST}
    manifest_url = f"{m.url}/v2/test/small/manifests/v1"
    assert pull(manifest_url, None, 0, accept)[0] == 200
    assert pull(f"{m.url}/v2/test/big/blobs/{cached.digest}")[0] == 200
    m.wait_cached({cached.digest, test_images.small.manifest.digest})
    m.stop()
    # Read-only from the start (as after a reboot with the filesystem still read-only).
    subprocess.run(["mount", "--bind", "-o", "ro", str(tiny_disk), str(tiny_disk)], check=True)
    m.start()
    assert pull(f"{m.url}/v2/test/big/blobs/{cached.digest}") == (200, cached.path.read_bytes())
    assert pull(f"{m.url}/v2/test/small/blobs/{cold.digest}") == (200, cold.path.read_bytes())
    resp = httpx.get(f"{m.url}/readyz", trust_env=False)
    assert resp.status_code == 503
    assert resp.json()["checks"]["cache_writable"]["detail"] == \
        f"cache directory is read-only: {tiny_disk}"
    # The tag is still known (the index was copied), so with the upstream down it is served.
    m.stop()
    m.upstreams = [Upstream(name=blackhole.host, url=f"http://{blackhole.host}")]
    m.start()
    assert pull(manifest_url, None, 0, accept) == (200, test_images.small.manifest_bytes)


def test_two_workers_restart_on_a_full_disk_keep_the_index(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tiny_disk: Path) -> None:
    m = two_workers(mirror_factory, upstream.url, blackhole.host, tiny_disk)
    url, accept = f"{m.url}/v2/test/small/manifests/v1", {"Accept": OCI_MANIFEST}
    manifest = test_images.small.manifest_bytes
    assert pull(url, None, 0, accept) == (200, manifest)
    m.wait_cached({test_images.small.manifest.digest})
    m.stop()
    fill(tiny_disk)
    # SQLite cannot even open the index on a full disk: the workers start anyway, and the
    # index is not mistaken for a damaged one (deleted): the tag is still known.
    m.upstreams = [Upstream(name=blackhole.host, url=f"http://{blackhole.host}")]
    m.start()
    for _ in range(4):
        assert pull(url, None, 0, accept) == (200, manifest)
    assert not any(e.get("msg") in ("worker failed", "index damaged: starting a new one")
                   for e in m.log_entries())
