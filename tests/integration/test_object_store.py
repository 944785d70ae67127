"""The S3-compatible second tier (issue 13) against a real object store: SeaweedFS's S3
gateway (tests/support/seaweed.py), the real upstream registry, skopeo."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import clients
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, wait_until
from tests.support.seaweed import SeaweedS3, running

pytestmark = pytest.mark.integration
BUCKET = "mirror"  # one for all: SeaweedFS grows volumes per bucket; each test has a prefix


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with running(tmp_path_factory.mktemp("seaweed"), BUCKET) as store:
        yield store


@dataclass
class Space:
    """This test's part of the bucket: its key prefix."""

    store: SeaweedS3
    prefix: str

    def table(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint": self.store.endpoint, "bucket": BUCKET, "prefix": self.prefix,
                "access_key": self.store.access_key, "secret_key": self.store.secret_key,
                "part_size": "5MiB", "timeout": "2s", **extra}

    def key(self, digest: str) -> str:
        algorithm, hex_ = digest.split(":")
        return f"{self.prefix}blobs/{algorithm}/{hex_[:2]}/{hex_}"

    def objects(self) -> dict[str, int]:
        return self.store.keys(BUCKET, self.prefix)

    def get(self, digest: str) -> bytes:
        return self.store.get(BUCKET, self.key(digest))

    def uploads(self) -> list[str]:
        return [u["Key"] for u in self.store.uploads(BUCKET) if u["Key"].startswith(self.prefix)]


@pytest.fixture
def space(seaweed: SeaweedS3) -> Space:
    return Space(seaweed, f"t-{uuid.uuid4().hex[:10]}/")


def mirror_with(started: list[MirrorProcess], workdir: Path, up: clients.UpstreamRegistry,
                s3: dict[str, Any], workers: int = 1, name: str | None = None) -> MirrorProcess:
    proc = MirrorProcess(workdir, [Upstream(name=name or up.host, url=up.url)],
                         cache_extra={"prefetch": False}, server_extra={"workers": workers})
    proc.sections["s3"] = s3
    started.append(proc)
    return proc.start()


def blobs(up: clients.UpstreamRegistry, repo: str) -> list[str]:
    return [b.digest for b in up.pushed[repo]["v1"].blobs]  # type: ignore[union-attr]


def pull(mirror: MirrorProcess, out: Path, repo: str) -> None:
    clients.skopeo_copy(f"docker://{mirror.host}/{repo}:v1", f"dir:{out}")
    clients.verify_dir(out)


def metric(mirror: MirrorProcess, name: str) -> float:
    text = httpx.get(f"{mirror.url}/metrics", trust_env=False, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_what_one_mirror_fetched_a_second_with_an_empty_dir_pulls_from_the_bucket(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess], workers: int) -> None:
    first = mirror_with(started, tmp_path / "a", upstream, space.table(), workers)
    digests = blobs(upstream, "test/big") + blobs(upstream, "test/small")
    pull(first, tmp_path / "out-a-big", "test/big")  # the 100 MB layer: a multipart upload
    pull(first, tmp_path / "out-a-small", "test/small")
    wait_until(lambda: {space.key(d) for d in digests} <= set(space.objects()), 60,
               interval=0.2, what="every blob written behind")
    for d in digests:  # whole and verified under its final key
        assert f"sha256:{hashlib.sha256(space.get(d)).hexdigest()}" == d
    assert not space.uploads()
    second = mirror_with(started, tmp_path / "b", upstream, space.table(), workers)
    mark = upstream.registry.mark()
    pull(second, tmp_path / "out-b-big", "test/big")
    pull(second, tmp_path / "out-b-small", "test/small")
    upstream.registry.barrier()
    assert not upstream.registry.blob_gets(mark)  # 0 upstream blob GETs
    assert metric(second, "mirror_bucket_hits_total") == len(digests)
    assert set(digests) <= second.verify_cache()  # now in its local tier too


def test_a_corrupted_object_is_deleted_and_the_blob_refetched(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    digest = blobs(upstream, "test/small")[-1]
    good = upstream.registry.blob_data_path(digest).read_bytes()
    bad = bytes([good[0] ^ 0xFF]) + good[1:]
    space.store.put(BUCKET, space.key(digest), bad)
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table())
    url = f"{mirror.url}/v2/test/small/blobs/{digest}"
    bodies = []
    for _ in range(3):  # a client's retry; the first body is cut short, never served whole
        try:
            r = httpx.get(url, trust_env=False, timeout=30)
        except httpx.HTTPError:
            continue
        bodies.append(r.content)
        if r.status_code == 200 and r.content == good:
            break
    assert bodies and bodies[-1] == good
    assert bad not in bodies
    assert metric(mirror, "mirror_bucket_corrupt_total") == 1
    # deleted, then written behind again from the upstream's verified copy
    wait_until(lambda: space.objects().get(space.key(digest)) == len(good) and
               space.get(digest) == good, 30, what="the object rewritten")


def test_with_the_object_store_frozen_pulls_go_on_from_the_upstream(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table())
    space.store.pause()
    try:
        pull(mirror, tmp_path / "out", "test/small")
        ready = httpx.get(f"{mirror.url}/readyz", trust_env=False, timeout=30).json()
    finally:
        space.store.resume()
    assert ready["status"] == "ready" and ready["bucket"]["usable"] is False
    assert any(e.get("msg") == "object store unusable: serving from the local tier and the "
               "upstream" for e in mirror.log_entries())
    assert metric(mirror, "mirror_bucket_errors_total") >= 1


def test_wrong_credentials_at_start_are_said_once_and_the_mirror_serves(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    mirror = mirror_with(started, tmp_path / "m", upstream,
                         space.table(secret_key="not-the-secret"))
    start_lines = [e for e in mirror.log_entries()
                   if e.get("msg", "").startswith("object store unusable at start")]
    assert len(start_lines) == 1 and BUCKET in str(start_lines[0])
    pull(mirror, tmp_path / "out", "test/small")
    ready = httpx.get(f"{mirror.url}/readyz", trust_env=False, timeout=30).json()
    assert ready["status"] == "ready" and ready["bucket"]["usable"] is False
    assert "403" in ready["bucket"]["error"] or "Forbidden" in ready["bucket"]["error"]
    assert not space.objects()


def test_a_kill_during_write_behind_leaves_no_object_and_the_upload_is_aborted(
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
    assert space.key(big) not in space.objects()  # never a partial object under its key
    assert space.uploads() == [space.key(big)]
    mirror.start()
    wait_until(lambda: not space.uploads(), 30, what="the upload aborted at start")
    assert space.key(big) not in space.objects()


def warm_bucket(started: list[MirrorProcess], workdir: Path, up: clients.UpstreamRegistry,
                space: Space, repo: str) -> list[str]:
    """A first mirror pulls `repo` and writes its blobs behind; returns their digests."""
    first = mirror_with(started, workdir, up, space.table())
    pull(first, workdir / "warm", repo)
    digests = blobs(up, repo)
    wait_until(lambda: {space.key(d) for d in digests} <= set(space.objects()), 30,
               what="written behind")
    return digests


def test_redirect_mode_sends_skopeo_to_the_bucket(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    digests = warm_bucket(started, tmp_path / "a", upstream, space, "test/small")
    edge = mirror_with(started, tmp_path / "b", upstream,
                       space.table(redirect=True))
    mark = upstream.registry.mark()
    pull(edge, tmp_path / "out", "test/small")
    upstream.registry.barrier()
    assert not upstream.registry.blob_gets(mark)
    redirected = [e for e in edge.request_log() if e["status"] == 307]
    assert {e["path"].rsplit("/", 1)[1] for e in redirected} == set(digests)
    assert not edge.cached_digests() & set(digests)  # the bytes went bucket -> client


def test_redirect_mode_sends_containerd_to_the_bucket(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess], blackhole: ClosedPort, ctd: clients.Containerd) -> None:
    """ctr follows the 307 to the presigned URL; its hosts.toml names only the mirror (the
    registry's own name is a closed port), so nothing can come from elsewhere."""
    image = upstream.pushed["test/big"]["v1"]
    digests = warm_bucket(started, tmp_path / "a", upstream, space, "test/big")
    edge = mirror_with(started, tmp_path / "b", upstream, space.table(redirect=True),
                       name=blackhole.host)
    hosts = clients.write_hosts_toml(tmp_path / "hosts", blackhole.host, edge.url)
    mark = upstream.registry.mark()
    ctd.pull(f"{blackhole.host}/test/big:v1", hosts_dir=hosts)
    upstream.registry.barrier()
    assert ctd.image_digest(f"{blackhole.host}/test/big:v1") == image.manifest.digest
    ctd.check_image(f"{blackhole.host}/test/big:v1")
    assert set(digests) <= ctd.verify_content()
    assert not upstream.registry.blob_gets(mark)
    redirected = {e["path"].rsplit("/", 1)[1].split("?")[0]
                  for e in edge.request_log() if e["status"] == 307}
    assert redirected == set(digests)
    assert not edge.cached_digests() & set(digests)


def test_purge_deletes_the_purged_blobs_from_the_bucket_too(
        tmp_path: Path, upstream: clients.UpstreamRegistry, space: Space,
        started: list[MirrorProcess]) -> None:
    """The bucket is a copy of the local tier: a purged blob left there would be served
    again (with 0 upstream GETs), so `mirror purge` deletes its object too."""
    mirror = mirror_with(started, tmp_path / "m", upstream, space.table(), workers=2)
    pull(mirror, tmp_path / "out", "test/small")
    digests = blobs(upstream, "test/small")
    wait_until(lambda: {space.key(d) for d in digests} <= set(space.objects()), 30,
               interval=0.1, what="the blobs written behind")
    purged = subprocess.run([sys.executable, "-m", "mirror", "purge",
                             f"{upstream.host}/test/small:v1", "--config",
                             str(mirror.config_path)], capture_output=True, text=True,
                            timeout=120)
    assert purged.returncode == 0, purged
    assert f"bucket: {len(digests)} objects deleted" in purged.stdout, purged.stdout
    assert not {space.key(d) for d in digests} & set(space.objects())
    mark = upstream.registry.mark()
    pull(mirror, tmp_path / "again", "test/small")
    assert upstream.registry.blob_gets(mark) == {d: 1 for d in digests}
    assert metric(mirror, "mirror_bucket_hits_total") == 0
