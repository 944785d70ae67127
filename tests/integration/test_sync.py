"""[[sync]] rules against the real upstream (docker-registry), with tags added, moved and
removed between runs, counted from the upstream's own access log:
- the figure: a run over 100 tags of which 3 changed costs the tags list, 100 HEADs and the 3
  new images' manifests and blobs, nothing more; an unchanged run, the list and 100 HEADs;
- the server runs a rule once for all its workers and records it (status page, metrics);
  what it cached is pulled with no upstream blob GET;
- `pin = true` keeps what the rule selects from eviction; a tag the rule no longer selects
  loses its pin; `--dry-run` changes nothing and fetches no manifest or blob;
- a bad rule: exit 2 naming the key at start, the running rules kept at a reload."""

from __future__ import annotations

import json
import signal
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
from tests.support.registry import ClosedPort, Registry, env_without_proxies, wait_until

pytestmark = pytest.mark.integration
KB = 1024
REPO = "sync/app"
TAGS = [f"1.0.{i}" for i in range(100)]
RULE = {"name": "app", "repositories": [REPO], "tags": r"^1\.0\.\d+$", "platforms": "all"}


def _image(blobs: Path, label: str, size: int = 2 * KB) -> oci.Image:
    return oci.build_image(blobs, [size], labels={"image": label})


@pytest.fixture
def hundred(tmp_path: Path) -> Iterator[tuple[UpstreamRegistry, Path]]:
    """An upstream with sync/app:1.0.0 … 1.0.99 (each its own image) and tags the rule does
    not select (latest, dev)."""
    blobs = tmp_path / "blobs"
    registry = Registry(tmp_path / "upstream").start()
    up = UpstreamRegistry(registry)
    try:
        for tag in [*TAGS, "latest", "dev"]:
            push_direct(up.url, REPO, tag, _image(blobs, tag))
        yield up, blobs
    finally:
        registry.stop()


def _mirror(tmp_path: Path, up: UpstreamRegistry, blackhole: ClosedPort, name: str = "m",
            **rule: Any) -> MirrorProcess:
    m = MirrorProcess(tmp_path / name, [Upstream(name=blackhole.host, url=up.url)])
    m.arrays["sync"] = [{"upstream": blackhole.host, **RULE, **rule}]
    m.env["MIRROR_SYNC_CHECK_SECONDS"] = "0.5"  # a rule a reload added runs at once
    m.write_config()
    return m


def _command(m: MirrorProcess, *args: str, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    """`mirror ARGS… --config <m's file>`, as an operator runs it beside the server."""
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args, "--config", str(m.config_path)],
        capture_output=True, text=True, timeout=timeout, env=env_without_proxies(),
        cwd=m.workdir)


def _sync(m: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return _command(m, "sync", *args, timeout=300)


def _logged(m: MirrorProcess, msg: str, timeout: float = 60.0) -> dict[str, Any]:
    """The first log line whose message starts with `msg`, waited for."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [e for e in m.log_entries() if str(e.get("msg", "")).startswith(msg)]
        return bool(found)

    wait_until(seen, timeout, what=msg)
    return found[0]


def _requests(up: UpstreamRegistry, mark: int) -> dict[str, int]:
    """The upstream's requests since `mark`, by kind."""
    counts: dict[str, int] = {}
    for e in up.registry.entries_since(mark):
        kind = ("tags" if "/tags/list" in e.path else
                "manifest " + e.method if "/manifests/" in e.path else
                "blob " + e.method if "/blobs/" in e.path else e.method + " " + e.path)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.timeout(300)
def test_a_run_over_100_tags_of_which_3_changed_asks_100_heads_and_the_3_new_images(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, blobs = hundred
    m = _mirror(tmp_path, up, blackhole)
    first = _sync(m)
    assert first.returncode == 0, first.stderr
    assert "100 tags selected, 100 images cached" in first.stdout
    changed = {tag: _image(blobs, f"{tag}-new") for tag in ("1.0.7", "1.0.42", "1.0.99")}
    for tag, image in changed.items():
        push_direct(up.url, REPO, tag, image)
    up.registry.barrier()
    mark = up.registry.mark()

    second = _sync(m)
    assert second.returncode == 0, second.stderr
    assert "100 tags selected, 3 images cached" in second.stdout
    up.registry.barrier()
    new_blobs = {b.digest for image in changed.values() for b in image.blobs}
    assert _requests(up, mark) == {"tags": 1, "manifest HEAD": 100, "manifest GET": 3,
                                   "blob GET": len(new_blobs)}
    assert up.registry.blob_gets(mark) == dict.fromkeys(new_blobs, 1)
    assert {i.manifest.digest for i in changed.values()} | new_blobs <= m.cached_digests()

    mark = up.registry.mark()
    third = _sync(m)
    assert third.returncode == 0 and "0 images cached" in third.stdout, third.stdout
    up.registry.barrier()
    assert _requests(up, mark) == {"tags": 1, "manifest HEAD": 100}
    status = _command(m, "status")
    line = next(x for x in status.stdout.splitlines() if x.startswith("sync rule:"))
    assert "app: ok" in line and "0 images cached" in line and "100 images" in line, line


@pytest.mark.timeout(300)
def test_a_dry_run_lists_what_it_would_cache_and_fetches_no_manifest_or_blob(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.[0-4]$")
    mark = up.registry.mark()
    dry = _sync(m, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would cache") == 5, dry.stdout
    up.registry.barrier()
    assert _requests(up, mark) == {"tags": 1, "manifest HEAD": 5}
    real = _sync(m)
    assert "5 images cached" in real.stdout, real.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_the_server_runs_a_rule_once_for_all_workers_and_shows_it(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort,
        workers: int) -> None:
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.[0-9]$")
    m.server_extra["workers"] = workers
    mark = up.registry.mark()
    m.start()
    try:
        _logged(m, "sync: run finished")
        up.registry.barrier()
        assert _requests(up, mark)["manifest HEAD"] == 10
        gets = up.registry.blob_gets(mark)
        assert gets and set(gets.values()) == {1}
        runs = [e for e in m.log_entries() if e.get("msg") == "sync: run finished"]
        assert len(runs) == 1 and runs[0]["ok"] is True and runs[0]["cached"] == 10, runs
        assert m.metric("mirror_sync_runs_total", rule="app", result="ok") == 1
        page = httpx.get(f"{m.url}/", timeout=10).text
        assert 'class="sync-rule"' in page and "10 images cached" in page

        # what it cached is served with no upstream blob GET
        mark = up.registry.mark()
        for tag in ("1.0.0", "1.0.9"):
            r = httpx.get(f"{m.url}/v2/{REPO}/manifests/{tag}", timeout=10, headers={
                "Accept": "application/vnd.oci.image.manifest.v1+json"})
            assert r.status_code == 200
            for layer in json.loads(r.content)["layers"]:
                blob = httpx.get(f"{m.url}/v2/{REPO}/blobs/{layer['digest']}", timeout=10)
                assert blob.status_code == 200
        up.registry.barrier()
        assert up.registry.blob_gets(mark) == {}
    finally:
        m.stop()


def _purge(m: MirrorProcess, image: str) -> subprocess.CompletedProcess[str]:
    return _command(m, "purge", image)


@pytest.mark.timeout(300)
def test_what_a_pinning_rule_selects_is_pinned_until_it_no_longer_selects_it(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    """The pins eviction spares (cache/eviction.py pins) are the ones purge refuses."""
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.[01]$", pin=True)
    assert _sync(m).returncode == 0
    name = f"{blackhole.host}/{REPO}"
    for tag in ("1.0.0", "1.0.1"):
        refused = _purge(m, f"{name}:{tag}")
        assert refused.returncode == 1 and "pinned" in refused.stderr, refused.stderr

    m.arrays["sync"][0]["tags"] = r"^1\.0\.0$"  # 1.0.1 no longer selected
    m.write_config()
    narrowed = _sync(m)
    assert f"no longer selected (unpinned): {name}:1.0.1" in narrowed.stdout, narrowed.stdout
    assert _purge(m, f"{name}:1.0.1").returncode == 0
    assert _purge(m, f"{name}:1.0.0").returncode == 1


@pytest.mark.parametrize(("rule", "key"), [
    ({"tags": "(unclosed"}, "sync[0].tags"),
    ({"upstream": "nowhere.example"}, "sync[0].upstream"),
    ({"platforms": ["amd64"]}, "sync[0].platforms"),
])
def test_a_bad_rule_exits_2_naming_the_key(tmp_path: Path, upstream: UpstreamRegistry,
                                           blackhole: ClosedPort, rule: dict[str, Any],
                                           key: str) -> None:
    m = _mirror(tmp_path, upstream, blackhole, **rule)
    done = subprocess.run([*m.command()], capture_output=True, text=True, timeout=30,
                          env=env_without_proxies())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{key}:" in lines[0], done.stderr


@pytest.mark.timeout(120)
def test_a_reload_with_a_bad_rule_keeps_the_running_rules(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.0$")
    m.start()
    try:
        _logged(m, "sync: run finished")
        m.arrays["sync"][0]["tags"] = "(unclosed"
        m.write_config()
        assert m.proc is not None
        m.proc.send_signal(signal.SIGHUP)
        refused = _logged(m, "reload refused", timeout=20)
        assert "sync[0].tags" in refused["error"]
        page = httpx.get(f"{m.url}/", timeout=10).text
        assert "1 images cached" in page
    finally:
        m.stop()


@pytest.mark.timeout(120)
def test_a_pattern_is_matched_against_the_upstreams_catalog(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, blobs = hundred
    for repo in ("sync/other", "elsewhere/app"):
        push_direct(up.url, repo, "1.0.0", _image(blobs, repo))
    m = _mirror(tmp_path, up, blackhole, repositories=["sync/*"], tags=r"^1\.0\.0$")
    done = _sync(m)
    assert done.returncode == 0, done.stderr
    host = blackhole.host
    assert sorted(line.split()[-1] for line in done.stdout.splitlines()
                  if " cached " in line) == [f"{host}/sync/app:1.0.0",
                                             f"{host}/sync/other:1.0.0"]


@pytest.mark.timeout(120)
def test_a_rule_added_by_a_reload_is_run_by_the_server(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.0$")
    m.server_extra["workers"] = 2
    m.start()
    try:
        _logged(m, "sync: run finished")
        m.arrays["sync"].append({"upstream": blackhole.host, **RULE, "name": "more",
                                 "tags": r"^1\.0\.[12]$"})
        m.write_config()
        assert m.proc is not None
        m.proc.send_signal(signal.SIGHUP)

        def ran() -> bool:
            return any(e.get("msg") == "sync: run finished" and e.get("rule") == "more"
                       for e in m.log_entries())

        wait_until(ran, 60, what="the new rule's run")
        runs = [e for e in m.log_entries() if e.get("msg") == "sync: run finished"]
        assert sorted(e["rule"] for e in runs) == ["app", "more"], runs
        assert next(e for e in runs if e["rule"] == "more")["cached"] == 2
    finally:
        m.stop()


@pytest.mark.timeout(120)
def test_a_tag_removed_upstream_drops_out_of_the_rule_and_its_pin(
        tmp_path: Path, hundred: tuple[UpstreamRegistry, Path], blackhole: ClosedPort) -> None:
    up, _ = hundred
    m = _mirror(tmp_path, up, blackhole, tags=r"^1\.0\.[01]$", pin=True)
    assert _sync(m).returncode == 0
    name = f"{blackhole.host}/{REPO}"
    with httpx.Client(base_url=up.url, timeout=30, trust_env=False) as c:
        head = c.head(f"/v2/{REPO}/manifests/1.0.1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        digest = head.headers["Docker-Content-Digest"]
        assert c.delete(f"/v2/{REPO}/manifests/{digest}").status_code == 202
    again = _sync(m)
    assert again.returncode == 0, again.stderr
    assert f"no longer selected (unpinned): {name}:1.0.1" in again.stdout, again.stdout
    assert "1 tags selected" in again.stdout
    assert _purge(m, f"{name}:1.0.1").returncode == 0  # no longer pinned
    assert _purge(m, f"{name}:1.0.0").returncode == 1
