"""Issue 15 end to end, with the real upstream (docker-registry) and `mirror serve`:
- a `[[policy]]` added by SIGHUP refuses an unsigned image at its next manifest request,
  and removed by SIGHUP serves it again (1 and 2 workers);
- a `[[webhook]]` whose URL a reload changes sends the events after it to the new receiver
  (none to the old one, none lost or twice), and one removed by a reload gets no more;
- custom `headers` reach the receiver, and a burst of events is batched: fewer POSTs than
  events, each event once, every POST signed;
- `max_unused` on the local disk: content unpulled past it is removed under the size bound,
  content pulled lately stays (access times backdated through the index while stopped)."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.cache.index import Index
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest
from tests.integration.test_webhooks import SECRET, hook, pull_small
from tests.support import oci
from tests.support.clients import UpstreamRegistry
from tests.support.mirror import MirrorProcess, Upstream, _pid_then
from tests.support.registry import ClosedPort, wait_until
from tests.support.signing import make_key
from tests.support.webhookreceiver import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = "test/small"
THREADS = 8


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[list[Receiver]]:
    started = [Receiver(tmp_path / f"receiver{n}", SECRET).start() for n in range(3)]
    yield started
    for r in started:
        r.stop()


def _mirror(tmp_path: Path, upstream: UpstreamRegistry, host: str, workers: int,
            **arrays: list[dict[str, Any]]) -> MirrorProcess:
    m = MirrorProcess(tmp_path / "m", [Upstream(name=host, url=upstream.url)],
                      server_extra={"workers": workers}, cache_extra={"prefetch": False})
    m.arrays.update({k: v for k, v in arrays.items() if v})
    return m.start()


def _reload(m: MirrorProcess, workers: int, **arrays: list[dict[str, Any]]) -> None:
    """Write the arrays (an empty list: the array removed), SIGHUP, wait for every worker."""
    for name, tables in arrays.items():
        if tables:
            m.arrays[name] = tables
        else:
            m.arrays.pop(name, None)
    m.write_config()
    before = sum(e.get("msg") == "configuration reloaded" for e in m.log_entries())
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGHUP)
    wait_until(lambda: sum(e.get("msg") == "configuration reloaded" for e in m.log_entries())
               >= before + workers, 20, interval=0.05, what=f"{workers} workers reloaded")


def _on_every_worker(m: MirrorProcess, workers: int, path: str) -> set[int]:
    """The statuses of GET `path` until every worker has answered it."""
    seen: dict[int, set[int]] = collections.defaultdict(set)
    for _ in range(100):
        pid, status = _pid_then(m, path)
        seen[pid].add(status)
        if len(seen) == workers:
            break
    assert len(seen) == workers, f"only workers {set(seen)} answered"
    return set().union(*seen.values())


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_policy_added_by_reload_refuses_the_next_request_and_removed_serves_again(
        tmp_path: Path, upstream: UpstreamRegistry, blackhole: ClosedPort,
        workers: int) -> None:
    host = blackhole.host
    path = f"/v2/{REPO}/manifests/v1"
    m = _mirror(tmp_path, upstream, host, workers)
    try:
        assert _on_every_worker(m, workers, path) == {200}  # unsigned, cached: served
        key = make_key(tmp_path / "keys", "site")
        _reload(m, workers, policy=[{"name": "site", "match": [f"{host}/test/**"],
                                     "keys": [str(key.public)], "mode": "enforce"}])
        assert _on_every_worker(m, workers, path) == {403}
        r = httpx.get(f"{m.url}{path}", headers={"Accept": mt.OCI_MANIFEST}, trust_env=False,
                      timeout=30)
        assert r.json()["errors"][0]["code"] == "DENIED"
        assert "no cosign signature" in r.text and "'site'" in r.text, r.text
        _reload(m, workers, policy=[])
        assert _on_every_worker(m, workers, path) == {200}
    finally:
        m.stop()


def _digests(r: Receiver) -> list[str]:
    return sorted(e["target"]["digest"] for e in r.actions("pull"))


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_webhook_moved_by_reload_tells_the_new_receiver_and_removed_tells_no_one(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receivers: list[Receiver], workers: int) -> None:
    old, new, witness = receivers
    image = test_images.small
    audit = {**hook(witness, events=["pull"]), "name": "audit"}  # there throughout
    m = _mirror(tmp_path, upstream, blackhole.host, workers,
                webhook=[hook(old, events=["pull"]), audit])
    try:
        first = pull_small(m, image)
        wait_until(lambda: _digests(old) == sorted(first), 30, interval=0.05,
                   what="the first pulls told to the old receiver")
        _reload(m, workers, webhook=[hook(new, events=["pull"]), audit])
        second = pull_small(m, image)
        wait_until(lambda: len(_digests(new)) >= len(second), 30, interval=0.05,
                   what="the pulls after the reload told to the new receiver")
        _reload(m, workers, webhook=[audit])
        third = pull_small(m, image)
        # the witness has everything: what the removed webhook would have had is out too
        wait_until(lambda: len(_digests(witness)) >= len(first + second + third), 30,
                   interval=0.05, what="every pull told to the witness")
    finally:
        m.stop()
    assert _digests(old) == sorted(first)
    assert _digests(new) == sorted(second)  # none of the others, none twice, none lost
    assert _digests(witness) == sorted(first + second + third)
    for r in receivers:
        ids = [e["id"] for e in r.events()]
        assert len(ids) == len(set(ids))
        assert all(a["good"] for a in r.attempts())


def test_custom_headers_arrive_and_a_burst_is_batched_each_event_once_signed(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receivers: list[Receiver]) -> None:
    receiver = receivers[0]
    image = test_images.small
    m = _mirror(tmp_path, upstream, blackhole.host, 2, webhook=[hook(
        receiver, events=["pull"], headers={"X-Custom-Site": "edge-7"})])
    blob = image.layers[0].digest
    burst = 240
    try:
        pull_small(m, image)  # cold: the rest are hits
        wait_until(lambda: len(receiver.events()) >= 1 + len(image.blobs), 30, interval=0.05,
                   what="the cold pull told")
        told = len(receiver.events())

        def get(count: int) -> set[int]:
            with httpx.Client(trust_env=False, timeout=30) as c:  # keep-alive: a burst
                return {c.get(f"{m.url}/v2/{REPO}/blobs/{blob}").status_code
                        for _ in range(count)}

        with ThreadPoolExecutor(THREADS) as pool:
            assert set().union(*pool.map(get, [burst // THREADS] * THREADS)) == {200}
        wait_until(lambda: len(receiver.events()) >= told + burst, 30, interval=0.05,
                   what=f"{burst} events told")
        assert m.metric("mirror_webhook_events_total", result="sent") == told + burst
    finally:
        m.stop()
    events = receiver.events()
    assert len(events) == told + burst and len({e["id"] for e in events}) == len(events)
    assert collections.Counter(e["target"]["digest"] for e in events)[blob] == burst + 1
    attempts = receiver.attempts()
    assert all(a["good"] and a["typed"] for a in attempts), attempts  # each POST signed
    assert all(a["headers"] == {"X-Custom-Site": "edge-7"} for a in attempts), attempts
    assert sum(a["events"] for a in attempts) == len(events)  # no POST retried
    assert len(attempts) < len(events) / 2, len(attempts)  # envelopes of several events
    assert max(a["events"] for a in attempts) > 1


def test_max_unused_removes_what_was_not_pulled_lately_under_the_size_bound(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort) -> None:
    host = blackhole.host
    m = MirrorProcess(tmp_path / "m", [Upstream(name=host, url=upstream.url,
                                                extra={"max_unused": "1d"})],
                      cache_extra={"prefetch": False})
    old, recent = test_images.small, test_images.docker
    old_digests = {b.digest for b in old.all_blobs}
    recent_digests = {b.digest for b in recent.all_blobs}
    assert not old_digests & recent_digests
    m.start()
    try:
        with httpx.Client(base_url=m.url, trust_env=False, timeout=30) as c:
            for repo, image in (("test/small", old), ("test/docker", recent)):
                r = c.get(f"/v2/{repo}/manifests/v1", headers={
                    "Accept": f"{mt.OCI_MANIFEST}, {mt.DOCKER_MANIFEST}"})
                assert r.status_code == 200, r.text
                for blob in image.blobs:
                    assert c.get(f"/v2/{repo}/blobs/{blob.digest}").status_code == 200
        m.wait_cached(old_digests | recent_digests)
        m.stop()
        index = Index(m.cache_dir / "index")  # the server stopped: its last accesses written
        try:
            for digest in map(parse_digest, old_digests):
                entry = index.entry(digest)
                assert entry is not None, digest
                index.add_entry(digest, entry.size, entry.kind,
                                last_access=time.time() - 2 * 86400)
        finally:
            index.close()
        m.start()
        wait_until(lambda: not old_digests & m.cached_digests(), 30, interval=0.1,
                   what="the content unpulled for two days removed")
        assert recent_digests <= m.cached_digests()
        wait_until(lambda: any(str(e.get("msg", "")).startswith(
            f"unused past {host}'s max_unused") for e in m.log_entries()), 10, interval=0.05,
                   what="the eviction's log line")  # written after the last deletion
    finally:
        m.stop()
