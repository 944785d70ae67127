"""Sync rules against the real upstream (docker-registry) and the real mirror, as an unlucky
operator meets them: the upstream goes down between runs, the cache disk fills or turns
read-only during a run, a careless tags regex meets a long tag name, a private upstream's
catalog needs the credentials.

Each was tried by an adversary review; those that failed then (the upstream down unpinning,
the regex hanging a worker, a full or read-only disk misreported) are regression tests for
their fixes. The hostile-upstream cases
(odd tags, a looping Link, catalog names with dot segments) are in
tests/unit/test_sync_adversary.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import UpstreamRegistry, push_direct
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import (
    BASIC_PASSWORD,
    BASIC_USER,
    ClosedPort,
    Registry,
    env_without_proxies,
    wait_until,
)

pytestmark = pytest.mark.integration
KB, MB = 1024, 1 << 20
REPO = "sync/app"


@pytest.fixture
def own(tmp_path: Path) -> Iterator[tuple[UpstreamRegistry, Path]]:
    """A registry of this test's own (to stop, or to push to) with sync/app:1.0.0 and 1.0.1."""
    blobs = tmp_path / "blobs"
    registry = Registry(tmp_path / "upstream").start()
    up = UpstreamRegistry(registry)
    try:
        for tag in ("1.0.0", "1.0.1"):
            push_direct(up.url, REPO, tag, oci.build_image(blobs, [2 * KB], labels={"t": tag}))
        yield up, blobs
    finally:
        registry.stop()


def _mirror(workdir: Path, up: UpstreamRegistry, host: str, cache_dir: Path | None = None,
            upstream: Upstream | None = None, **rule: Any) -> MirrorProcess:
    m = MirrorProcess(workdir, [upstream or Upstream(name=host, url=up.url)],
                      cache_dir=cache_dir)
    m.arrays["sync"] = [{"name": "app", "upstream": host, "repositories": [REPO],
                         "tags": r"^1\.0\.[01]$", "platforms": "all", **rule}]
    m.write_config()
    return m


def _command(m: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args, "--config", str(m.config_path)],
        capture_output=True, text=True, timeout=60, env=env_without_proxies(), cwd=m.workdir)


@pytest.mark.timeout(60)
def test_an_upstream_down_at_a_run_keeps_the_rules_pins(
        tmp_path: Path, own: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, _ = own
    m = _mirror(tmp_path / "m", up, blackhole.host, pin=True)
    first = _command(m, "sync")
    assert first.returncode == 0 and "2 images cached" in first.stdout, first.stderr
    up.registry.stop()

    down = _command(m, "sync")
    assert down.returncode == 1, down.stdout  # the failure is reported
    assert "Traceback" not in down.stderr, down.stderr
    assert "no longer selected (unpinned)" not in down.stdout, down.stdout
    refused = _command(m, "purge", f"{blackhole.host}/{REPO}:1.0.0")
    assert refused.returncode == 1 and "pinned" in refused.stderr, refused.stdout


@pytest.mark.timeout(60)
def test_a_catastrophic_tags_regex_does_not_stop_the_server_answering(
        tmp_path: Path, own: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, blobs = own
    push_direct(up.url, REPO, "a" * 40 + "-", oci.build_image(blobs, [KB]))
    m = _mirror(tmp_path / "m", up, blackhole.host, tags="^(a+)+$")
    mark = up.registry.mark()
    try:
        m.start(timeout=15)

        def listed() -> bool:
            up.registry.barrier()
            return any("/tags/list" in e.path for e in up.registry.entries_since(mark))

        wait_until(listed, 20, what="the rule's tags list")
        for _ in range(3):  # the list is read: the regex runs before (or while) these
            assert httpx.get(f"{m.url}/v2/", timeout=3, trust_env=False).status_code == 200
    finally:
        m.kill9()  # SIGTERM is not handled while the loop is inside re.search


def _fill_during_a_run(tmp_path: Path, own: tuple[UpstreamRegistry, Path], host: str,
                      disk: Path) -> tuple[MirrorProcess, subprocess.CompletedProcess[str]]:
    """A pinning rule synced on a 6 MiB cache disk, then a run that needs 8 MiB more."""
    up, blobs = own
    m = _mirror(tmp_path / "m", up, host, cache_dir=disk, pin=True)
    first = _command(m, "sync")
    assert first.returncode == 0, first.stderr
    push_direct(up.url, REPO, "1.0.1", oci.build_image(blobs, [8 * MB], labels={"t": "big"}))
    return m, _command(m, "sync")


@pytest.mark.timeout(60)
def test_a_full_disk_during_a_run_fails_it_and_keeps_what_it_held_pinned(
        tmp_path: Path, own: tuple[UpstreamRegistry, Path], blackhole: ClosedPort,
        tiny_disk: Path) -> None:
    m, full = _fill_during_a_run(tmp_path, own, blackhole.host, tiny_disk)
    assert full.returncode == 1, full.stdout
    assert "no longer selected (unpinned)" not in full.stdout, full.stdout
    status = _command(m, "status")
    line = next(x for x in status.stdout.splitlines() if x.startswith("sync rule:"))
    assert "app: failed" in line and "2 images pinned" in line, line
    for tag in ("1.0.0", "1.0.1"):  # 1.0.1 by the digest it had before it moved
        refused = _command(m, "purge", f"{blackhole.host}/{REPO}:{tag}")
        assert refused.returncode == 1 and "pinned" in refused.stderr, refused.stderr


@pytest.mark.timeout(60)
def test_a_full_disk_during_a_run_is_reported_as_a_full_disk(
        tmp_path: Path, own: tuple[UpstreamRegistry, Path], blackhole: ClosedPort,
        tiny_disk: Path) -> None:
    _, full = _fill_during_a_run(tmp_path, own, blackhole.host, tiny_disk)
    assert full.returncode == 1
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last or "disk" in last.lower(), last
    assert "2 tags selected" in full.stdout, full.stdout


@pytest.mark.timeout(60)
def test_a_read_only_cache_dir_is_reported_as_read_only_not_as_another_process(
        tmp_path: Path, own: tuple[UpstreamRegistry, Path], blackhole: ClosedPort,
        tiny_disk: Path) -> None:
    up, _ = own
    m = _mirror(tmp_path / "m", up, blackhole.host, cache_dir=tiny_disk, pin=True)
    subprocess.run(["mount", "--bind", "-o", "ro", str(tiny_disk), str(tiny_disk)], check=True,
                   timeout=30)
    ro = _command(m, "sync")
    assert ro.returncode == 1
    assert "Traceback" not in ro.stderr, ro.stderr
    last = ro.stderr.strip().splitlines()[-1]
    assert "another process" not in last and "read-only" in last, last


@pytest.mark.timeout(60)
def test_a_pattern_over_a_private_upstreams_catalog_uses_the_credentials(
        tmp_path: Path, basic_upstream: UpstreamRegistry, blackhole: ClosedPort) -> None:
    upstream = Upstream(name=blackhole.host, url=basic_upstream.url, username=BASIC_USER,
                        password=BASIC_PASSWORD)
    m = _mirror(tmp_path / "m", basic_upstream, blackhole.host, upstream=upstream,
                repositories=["test/*"], tags="^v1$")
    done = _command(m, "sync")
    assert done.returncode == 0, done.stderr
    assert f"cached {blackhole.host}/test/small:v1" in done.stdout, done.stdout
