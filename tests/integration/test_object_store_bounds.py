"""The bucket's bounds, its visibility and the commands over it (issue 13), against the real
object store (SeaweedFS's S3 gateway), the real upstream registry and skopeo."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.integration.test_object_store import (
    BUCKET,
    Space,
    blobs,
    metric,
    mirror_with,
    pull,
    seaweed,
    space,
)
from tests.support import clients
from tests.support.mirror import REPO_ROOT, MirrorProcess, Upstream, env_without_proxies
from tests.support.registry import wait_until

pytestmark = pytest.mark.integration
__all__ = ["seaweed", "space"]  # the fixtures, shared with test_object_store.py


def written_behind(space: Space, digests: list[str], timeout: float = 30) -> None:
    wait_until(lambda: {space.key(d) for d in digests} <= set(space.objects()), timeout,
               interval=0.1, what="every blob written behind")


def run_mirror(proc: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_without_proxies()
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config",
                           str(proc.config_path)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=proc.workdir)


def trimmed(proc: MirrorProcess) -> int:
    return sum(int(e.get("objects", 0)) for e in proc.log_entries()
               if e.get("msg") == "bucket trimmed")


def test_max_unused_deletes_what_is_not_used_and_a_local_hit_keeps_its_object(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = mirror_with(started, tmp_path / "m", upstream,
                         space.table(max_size="1GiB", max_unused="2s"))
    pull(mirror, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    written_behind(space, digests)
    hot, cold = digests[-1], digests[:-1]
    url = f"{mirror.url}/v2/test/small/blobs/{hot}"

    def cold_gone() -> bool:
        assert httpx.get(url, trust_env=False, timeout=10).status_code == 200  # a local hit
        keys = set(space.objects())
        return not {space.key(d) for d in cold} & keys

    wait_until(cold_gone, 30, interval=0.3, what="the unused objects trimmed")
    assert space.key(hot) in space.objects()  # used: kept, under max_size
    assert trimmed(mirror) == len(cold)
    assert metric(mirror, "mirror_bucket_deleted_total") == len(cold)
    page = httpx.get(f"{mirror.url}/", trust_env=False, timeout=10).text
    assert "Object store" in page and 'id="bucket-objects" data-value="1.0"' in page


def test_a_pinned_image_over_max_size_is_kept_the_rest_goes_once_with_two_workers(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = MirrorProcess(tmp_path / "m", [Upstream(name=upstream.host, url=upstream.url)],
                           cache_extra={"prefetch": False,
                                        "pin": [f"{upstream.host}/test/small:v1"]},
                           server_extra={"workers": 2})
    mirror.sections["s3"] = space.table(max_size="1B")
    started.append(mirror)
    mirror.start()
    pull(mirror, tmp_path / "small", "test/small")
    pull(mirror, tmp_path / "multi", "test/multi")
    pinned, other = blobs(upstream, "test/small"), blobs(upstream, "test/multi")
    other = [d for d in other if d not in pinned]
    wait_until(lambda: {space.key(d) for d in pinned} <= set(space.objects()), 30,
               what="the pinned image written behind")
    wait_until(lambda: trimmed(mirror) > 0, 30, interval=0.2, what="a trim")
    wait_until(lambda: set(space.objects()) == {space.key(d) for d in pinned}, 30,
               interval=0.2, what="all but the pinned image trimmed")  # over the bound: kept
    trims = [e for e in mirror.log_entries() if e.get("msg") == "bucket trimmed"]
    assert any(e["pinned_kept"] == len(pinned) for e in trims)
    uploaded = {e["digest"] for e in mirror.log_entries()
                if e.get("msg") == "written behind to the bucket"}
    # each uploaded unpinned object deleted once, by one of the two workers
    assert trimmed(mirror) == len(uploaded - set(pinned))
    assert metric(mirror, "mirror_bucket_deleted_total") == len(uploaded - set(pinned))


def test_a_fresh_mirror_sharing_the_bucket_lists_it_and_status_shows_it(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    first = mirror_with(started, tmp_path / "a", upstream, space.table())
    pull(first, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    written_behind(space, digests)
    size = sum(space.objects()[space.key(d)] for d in digests)
    second = mirror_with(started, tmp_path / "b", upstream, space.table(max_size="2TiB"))
    wait_until(lambda: any(e.get("msg") == "bucket index rebuilt from the listing"
                           for e in second.log_entries()), 20, interval=0.1,
               what="the listing")
    rebuilt = [e for e in second.log_entries()
               if e.get("msg") == "bucket index rebuilt from the listing"]
    assert rebuilt[0]["objects"] == len(digests) and rebuilt[0]["bytes"] == size
    out = run_mirror(second, "status")
    assert out.returncode == 0, out.stderr
    assert f"object store: {space.store.endpoint}/{BUCKET}/{space.prefix}" in out.stdout
    assert f"{len(digests)} objects" in out.stdout and "of 2.0 TiB" in out.stdout
    assert "bucket oldest: last used" in out.stdout


def test_verify_tier_s3_deletes_and_reports_a_corrupt_object_and_gc_trims(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table())
    pull(mirror, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    written_behind(space, digests)
    mirror.stop()
    bad = digests[0]
    good = space.get(bad)
    space.store.put(BUCKET, space.key(bad), bytes([good[0] ^ 0xFF]) + good[1:])
    out = run_mirror(mirror, "verify", "--tier", "s3")
    assert out.returncode == 1, out.stderr
    assert f"removed {bad} from the bucket" in out.stdout
    assert f"verified {len(digests)} bucket objects" in out.stdout and "1 bad" in out.stdout
    assert space.key(bad) not in space.objects()
    assert run_mirror(mirror, "verify", "--tier", "s3").returncode == 0
    mirror.sections["s3"] = space.table(max_size="1B")
    mirror.write_config()
    deleted = []

    def collected() -> bool:  # what was used in the last moments is spared, then goes
        out = run_mirror(mirror, "gc")
        assert out.returncode == 0, out.stderr
        deleted.append(int(out.stdout.split("bucket: deleted ")[1].split()[0]))
        return not space.objects()

    wait_until(collected, 30, interval=0.5, what="gc trimming the bucket")
    assert sum(deleted) == len(digests) - 1
    mirror.sections["s3"] = space.table(max_size="0")
    mirror.write_config()
    out = run_mirror(mirror, "status")
    assert out.returncode == 2 and "s3.max_size" in out.stderr and "above 0" in out.stderr


def test_a_blob_a_kill_left_unwritten_reaches_the_bucket_after_the_restart(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    small = blobs(upstream, "test/small")
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table())
    space.store.pause()  # every upload fails (times out) and waits for its retry
    try:
        pull(mirror, tmp_path / "out", "test/small")
        wait_until(lambda: metric(mirror, "mirror_bucket_errors_total") >= 1, 30,
                   what="the write-behind failing")
        mirror.kill9()  # the queue and its retries die with it
    finally:
        space.store.resume()
    assert not {space.key(d) for d in small} & set(space.objects())
    mirror.start()
    written_behind(space, small, 30)
    for d in small:  # whole: its bytes hash to the digest
        assert f"sha256:{hashlib.sha256(space.get(d)).hexdigest()}" == d
    assert any(e.get("msg") == "local blobs the bucket lacks queued for writing behind"
               for e in mirror.log_entries())


def test_a_trim_while_the_store_is_frozen_does_not_stop_the_mirror(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = mirror_with(started, tmp_path / "m", upstream,
                         space.table(max_unused="2s"))
    pull(mirror, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    written_behind(space, digests)
    space.store.pause()
    try:
        errors = metric(mirror, "mirror_bucket_errors_total")
        wait_until(lambda: metric(mirror, "mirror_bucket_errors_total") > errors, 40,
                   interval=0.2, what="a trim failing on the frozen store")
        pull(mirror, tmp_path / "again", "test/small")  # served from the local tier
    finally:
        space.store.resume()
    wait_until(lambda: not {space.key(d) for d in digests} & set(space.objects()), 40,
               interval=0.3, what="the trim done once the store answers")
    assert mirror.running
    assert not [e for e in mirror.log_entries() if e.get("msg") == "cache maintenance failed"]


def test_export_fetches_a_blob_only_the_bucket_holds(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    first = mirror_with(started, tmp_path / "a", upstream, space.table())
    pull(first, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    written_behind(space, digests)
    edge = mirror_with(started, tmp_path / "b", upstream, space.table())
    r = httpx.get(f"{edge.url}/v2/test/small/manifests/v1", trust_env=False, timeout=30,
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                           "application/vnd.docker.distribution.manifest.v2+json"})
    assert r.status_code == 200
    edge.stop()
    assert not set(digests) & edge.cached_digests()  # only the manifest is local
    archive = tmp_path / "small.tar"
    out = run_mirror(edge, "export", "-o", str(archive), f"{upstream.host}/test/small:v1")
    assert out.returncode == 0, out.stderr
    assert f"fetched {len(digests)} blobs from the bucket" in out.stdout
    with tarfile.open(archive) as tar:
        for d in digests:
            member = tar.extractfile(f"blobs/sha256/{d.split(':')[1]}")
            assert member is not None
            assert f"sha256:{hashlib.sha256(member.read()).hexdigest()}" == d


def test_a_multipart_upload_a_kill_cut_is_aborted_and_the_blob_written_whole_after_restart(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    big = max(upstream.pushed["test/big"]["v1"].layers,  # type: ignore[union-attr]
              key=lambda b: b.size).digest
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table())
    r = httpx.get(f"{mirror.url}/v2/test/big/blobs/{big}", trust_env=False, timeout=60)
    assert r.status_code == 200
    wait_until(lambda: bool(space.uploads()), 30, interval=0.05,
               what="the multipart upload under way")
    mirror.kill9()
    assert space.key(big) not in space.objects()
    mirror.start()
    wait_until(lambda: space.key(big) in space.objects() and not space.uploads(), 60,
               interval=0.2, what="the blob written behind again")
    assert f"sha256:{hashlib.sha256(space.get(big)).hexdigest()}" == big
