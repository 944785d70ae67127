"""[[webhook]] with a real receiver (tests/support/webhookreceiver.py, a process of its own)
and the real upstream (docker-registry): every event delivered exactly once, signed, in the
registry's envelope, across the receiver going away and the mirror restarting (gracefully and
with kill -9); a receiver answering 500 or never answering holds no request back; a full queue
drops and counts; upstream down/up told once for all the workers; denials told with their
reason; a webhook added by SIGHUP."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.oci import mediatypes as mt
from tests.support import oci
from tests.support.clients import UpstreamRegistry
from tests.support.mirror import MirrorProcess, Upstream, on_both_workers
from tests.support.registry import ClosedPort, wait_until
from tests.support.webhookreceiver import Receiver

pytestmark = pytest.mark.integration
SECRET = "webhook-test-secret"
AGENT = "webhook-test-client"
REPO = "test/small"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "receiver", SECRET)
    yield r
    r.stop()


def hook(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {"name": "ops", "url": receiver.url, "secret": SECRET, "timeout": "1s", **extra}


def start_mirror(tmp_path: Path, upstream_url: str, host: str, workers: int,
                 hooks: list[dict[str, Any]], **upstream_extra: Any) -> MirrorProcess:
    m = MirrorProcess(tmp_path / "mirror", [Upstream(name=host, url=upstream_url,
                                                     extra=upstream_extra)],
                      server_extra={"workers": workers})
    if hooks:
        m.arrays["webhook"] = hooks
    return m.start()


def pull_small(mirror: MirrorProcess, image: oci.Image) -> list[str]:
    """GETs the manifest by tag and each blob, each on a connection of its own (so they
    spread over the workers); returns the digests pulled."""
    headers = {"Accept": mt.OCI_MANIFEST, "User-Agent": AGENT}
    r = httpx.get(f"{mirror.url}/v2/{REPO}/manifests/v1", headers=headers, trust_env=False,
                  timeout=30)
    assert r.status_code == 200, r.text
    pulled = [image.manifest.digest]
    for blob in image.blobs:
        r = httpx.get(f"{mirror.url}/v2/{REPO}/blobs/{blob.digest}", headers=headers,
                      trust_env=False, timeout=30)
        assert r.status_code == 200, r.text
        pulled.append(blob.digest)
    return pulled


def settled(mirror: MirrorProcess, receiver: Receiver, count: int) -> None:
    """The receiver holds `count` events and nothing waits in the queue."""
    wait_until(lambda: len(receiver.events()) >= count and mirror.metric(
        "mirror_webhook_queue_length") == 0, 30, interval=0.1,
        what=f"{count} events delivered")


def assert_signed_and_typed(receiver: Receiver) -> None:
    attempts = receiver.attempts()
    assert attempts and all(a["good"] and a["typed"] for a in attempts), attempts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_every_event_arrives_once_across_a_receiver_outage_and_a_restart(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receiver: Receiver, workers: int) -> None:
    image = test_images.small
    receiver.start()
    mirror = start_mirror(tmp_path, upstream.url, blackhole.host, workers, [hook(receiver)])
    try:
        pulled = pull_small(mirror, image)  # cold: fills, then pulls
        every = {b.digest for b in image.all_blobs}
        settled(mirror, receiver, len(pulled) + len(every))
        receiver.stop()
        pulled += pull_small(mirror, image)  # hits, the receiver away
        wait_until(lambda: mirror.metric("mirror_webhook_events_total", result="failed") > 0,
                   30, interval=0.1, what="a failed delivery")
        assert mirror.stop() == 0
        mirror.start()
        receiver.start()
        pulled += pull_small(mirror, image)
        settled(mirror, receiver, len(pulled) + len(every))
    finally:
        mirror.stop()
    events = receiver.events()
    assert len({e["id"] for e in events}) == len(events), "an event arrived twice"
    pulls = [e for e in events if e["action"] == "pull"]
    assert sorted(e["target"]["digest"] for e in pulls) == sorted(pulled)
    assert {e["target"]["repository"] for e in pulls} == {REPO}
    assert {e["request"]["useragent"] for e in pulls} == {AGENT}
    assert {e["request"]["addr"] for e in pulls} == {"127.0.0.1"}
    assert all(e["source"]["instanceID"] and e["upstream"] == blackhole.host for e in pulls)
    manifest_pulls = [e for e in pulls if e["target"]["digest"] == image.manifest.digest]
    assert {e["target"]["tag"] for e in manifest_pulls} == {"v1"}
    assert {e["target"]["mediaType"] for e in manifest_pulls} == {mt.OCI_MANIFEST}
    fills = collections.Counter(e["target"]["digest"] for e in events if e["action"] == "fill")
    assert fills == collections.Counter(every), "each digest filled once, from the cold pull"
    assert_signed_and_typed(receiver)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_failing_or_hanging_receiver_holds_no_request_back(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receiver: Receiver, mode: str) -> None:
    image = test_images.small
    receiver.start(mode)
    mirror = start_mirror(tmp_path, upstream.url, blackhole.host, 2,
                          [hook(receiver, events=["pull"])])
    try:
        pulled = pull_small(mirror, image)
        wait_until(lambda: mirror.metric("mirror_webhook_events_total", result="failed") > 0,
                   30, interval=0.1, what="a failed delivery")
        for _ in range(5):  # hits while the receiver fails: each as fast as ever
            started = time.monotonic()
            pulled += pull_small(mirror, image)
            assert time.monotonic() - started < 2.0
        assert receiver.events() == []
        receiver.stop()
        receiver.start("ok")
        settled(mirror, receiver, len(pulled))
        assert len(receiver.actions("pull")) == len(pulled)
        assert mirror.metric("mirror_webhook_events_total", result="sent") == len(pulled)
    finally:
        mirror.stop()
    assert_signed_and_typed(receiver)


@pytest.mark.timeout(180)
def test_a_full_queue_drops_the_newest_counts_and_logs_them(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receiver: Receiver) -> None:
    image = test_images.small
    mirror = start_mirror(tmp_path, upstream.url, blackhole.host, 2,
                          [hook(receiver, events=["pull"], max_queue=5)])
    try:
        pulled = pull_small(mirror, image) + pull_small(mirror, image)  # the receiver away
        dropped = len(pulled) - 5
        wait_until(lambda: mirror.metric("mirror_webhook_events_total", result="dropped")
                   == dropped, 30, interval=0.1, what=f"{dropped} events dropped")
        assert any(e.get("msg") == "webhook queue full: newest events dropped"
                   for e in mirror.log_entries())
        receiver.start()
        settled(mirror, receiver, 5)
        kept = collections.Counter(e["target"]["digest"] for e in receiver.events())
        # five of them, in no promised order: the workers flush their buffers each in turn
        assert kept.total() == 5 and not kept - collections.Counter(pulled)
    finally:
        mirror.stop()


@pytest.mark.timeout(180)
def test_queued_events_survive_kill_9_and_a_webhook_added_by_sighup(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, receiver: Receiver) -> None:
    image = test_images.small
    mirror = start_mirror(tmp_path, upstream.url, blackhole.host, 2, [])
    try:
        pull_small(mirror, image)  # no webhook yet: told to no one
        mirror.arrays["webhook"] = [hook(receiver, events=["pull"])]
        mirror.write_config()
        assert mirror.proc is not None
        os.kill(mirror.proc.pid, signal.SIGHUP)
        wait_until(lambda: sum(e.get("msg") == "configuration reloaded"
                               for e in mirror.log_entries()) == 2, 20,
                   what="both workers reloaded")
        pulled = pull_small(mirror, image)  # queued on disk: the receiver is away
        wait_until(lambda: mirror.metric("mirror_webhook_queue_length") == len(pulled), 30,
                   interval=0.1, what="the events on disk")
        mirror.kill9()
        mirror.start()
        receiver.start()
        settled(mirror, receiver, len(pulled))
        assert sorted(e["target"]["digest"] for e in receiver.events()) == sorted(pulled)
    finally:
        mirror.stop()


@pytest.mark.timeout(240)
def test_upstream_down_and_up_are_told_once_for_all_workers_and_denials_with_reason(
        tmp_path: Path, own_upstream: UpstreamRegistry, blackhole: ClosedPort,
        receiver: Receiver) -> None:
    receiver.start()
    mirror = start_mirror(tmp_path, own_upstream.url, blackhole.host, 2,
                          [hook(receiver, events=["upstream_down", "upstream_up", "denied"])],
                          deny=["secret/**"], read_timeout="2s", connect_timeout="1s")
    try:
        on_both_workers(mirror, 404, REPO)  # the upstream answers: up, and no event
        r = httpx.get(f"{mirror.url}/v2/secret/app/manifests/v1", trust_env=False, timeout=10,
                      headers={"User-Agent": AGENT})
        assert r.status_code == 403
        own_upstream.registry.stop()
        on_both_workers(mirror, 500, REPO)
        own_upstream.registry.start()
        on_both_workers(mirror, 404, REPO)
        wait_until(lambda: len(receiver.events()) >= 3, 30, interval=0.1, what="3 events")
        # what is told after these would arrive by now: the queue has drained
        wait_until(lambda: mirror.metric("mirror_webhook_queue_length") == 0, 30,
                   interval=0.1, what="an empty queue")
    finally:
        mirror.stop()
    actions = [e["action"] for e in receiver.events()]
    assert sorted(actions) == ["denied", "upstream_down", "upstream_up"], actions
    down = receiver.actions("upstream_down")[0]
    assert down["upstream"] == blackhole.host and down["error"]
    denied = receiver.actions("denied")[0]
    assert denied["target"]["repository"] == "secret/app"
    assert denied["target"]["tag"] == "v1"
    assert "secret/**" in denied["reason"]
    assert denied["request"]["useragent"] == AGENT
    assert_signed_and_typed(receiver)
