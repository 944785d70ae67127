"""Edge → regional tiers (issue 12): an edge mirror whose upstream is another mirror, with the
real registry behind it. The regional tier serves several registries, so the edge tells it
which one (`?ns=`, as containerd does); `fallback_urls` reach the origin when the regional
tier is down; a cold miss with no tier reachable fails in seconds; HEAD of a blob nobody has
cached answers its size."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support import clients
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort

pytestmark = pytest.mark.integration

REGISTRY = "second.test"  # what the edge and the regional tier call the test registry


WORKERS = 2


def start(started: list[MirrorProcess], workdir: Path, *upstreams: Upstream) -> MirrorProcess:
    proc = MirrorProcess(workdir, list(upstreams), cache_extra={"prefetch": False},
                         server_extra={"workers": WORKERS})
    started.append(proc)
    return proc.start()


@pytest.fixture
def regional(tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
             started: list[MirrorProcess]) -> MirrorProcess:
    """A regional mirror whose default upstream is unreachable: only a request naming
    second.test reaches the registry."""
    return start(started, tmp_path / "regional",
                 Upstream(name="first.test", url=f"http://{blackhole.host}"),
                 Upstream(name=REGISTRY, url=upstream.url))


def edge(started: list[MirrorProcess], workdir: Path, url: str, **extra: object
         ) -> MirrorProcess:
    return start(started, workdir, Upstream(name=REGISTRY, url=url, extra=dict(extra)))


def pull(mirror: MirrorProcess, out: Path, repo: str = "test/small") -> clients.PulledDir:
    clients.skopeo_copy(f"docker://{mirror.host}/{repo}:v1", f"dir:{out}")
    return clients.verify_dir(out)


def test_two_edge_sites_pull_through_one_regional_tier_at_one_origin_fetch_per_blob(
        tmp_path: Path, upstream: clients.UpstreamRegistry, regional: MirrorProcess,
        started: list[MirrorProcess]) -> None:
    sites = [edge(started, tmp_path / f"edge{i}", regional.url) for i in range(2)]
    mark = upstream.registry.mark()
    for i, site in enumerate(sites):
        clients.assert_pulled(pull(site, tmp_path / f"out{i}"),
                              upstream.pushed["test/small"]["v1"])
    upstream.registry.barrier()
    image = upstream.pushed["test/small"]["v1"]
    gets = upstream.registry.blob_gets(mark)
    assert {b.digest for b in image.blobs} == set(gets)  # type: ignore[union-attr]
    assert set(gets.values()) == {1}  # the origin once, whatever the number of sites
    asked = [e for e in regional.request_log() if e["path"].startswith("/v2/test/")]
    assert asked and all(f"ns={REGISTRY}" in e["path"] and e.get("upstream") == REGISTRY
                         for e in asked), asked


def test_an_edge_falls_back_to_the_origin_while_its_regional_tier_is_down(
        tmp_path: Path, upstream: clients.UpstreamRegistry, blackhole: ClosedPort,
        started: list[MirrorProcess]) -> None:
    site = edge(started, tmp_path / "edge", f"http://{blackhole.host}",
                fallback_urls=[upstream.url])
    mark = upstream.registry.mark()
    clients.assert_pulled(pull(site, tmp_path / "out"), upstream.pushed["test/small"]["v1"])
    upstream.registry.barrier()
    assert len(upstream.registry.entries_since(mark)) >= 4  # the manifest, config, layers
    fell_back = [e for e in site.log_entries() if e.get("msg") == "upstream URL failed: "
                 "trying the next"]
    # once per worker: the regional URL is tried last for a while after it failed
    assert 1 <= len(fell_back) <= WORKERS, fell_back


def test_with_its_regional_tier_cut_off_an_edge_serves_what_it_has_and_fails_fast(
        tmp_path: Path, upstream: clients.UpstreamRegistry, regional: MirrorProcess,
        started: list[MirrorProcess]) -> None:
    site = edge(started, tmp_path / "edge", regional.url)
    pull(site, tmp_path / "warm")
    regional.stop()
    clients.assert_pulled(pull(site, tmp_path / "again"), upstream.pushed["test/small"]["v1"])
    cold = upstream.pushed["test/big"]["v1"].layers[0].digest  # type: ignore[union-attr]
    t0 = time.monotonic()
    r = httpx.get(f"{site.url}/v2/test/big/blobs/{cold}", trust_env=False, timeout=60)
    assert time.monotonic() - t0 < 5.0
    assert r.status_code == 502
    assert r.json()["errors"][0]["code"] == "UPSTREAM_UNREACHABLE"
    assert REGISTRY in r.json()["errors"][0]["message"]


def test_head_of_a_blob_no_tier_has_cached_answers_its_size_and_fetches_nothing(
        tmp_path: Path, upstream: clients.UpstreamRegistry, regional: MirrorProcess,
        started: list[MirrorProcess]) -> None:
    site = edge(started, tmp_path / "edge", regional.url)
    blob = max(upstream.pushed["test/big"]["v1"].layers,  # type: ignore[union-attr]
               key=lambda b: b.size)
    mark = upstream.registry.mark()
    r = httpx.head(f"{site.url}/v2/test/big/blobs/{blob.digest}", trust_env=False, timeout=30)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == blob.size
    assert r.headers["Docker-Content-Digest"] == blob.digest
    upstream.registry.barrier()
    assert not upstream.registry.blob_gets(mark)
    assert not site.cached_digests() and not regional.cached_digests()
