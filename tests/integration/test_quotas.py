"""Per-upstream shares with the real upstreams and skopeo: two upstreams filling past their
`max_size` shares each lose their own least recently used content (not the other's), under a
global bound nowhere near reached; `mirror status` and the status page show the shares."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import UpstreamRegistry, skopeo_pull, write_registries_conf
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import BASIC_PASSWORD, BASIC_USER, ClosedPort, wait_until
from tests.support.webhookreceiver import Receiver

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_two_upstreams_past_their_shares_each_lose_their_own_oldest_content(
        mirror_factory: Any, upstream: UpstreamRegistry, basic_upstream: UpstreamRegistry,
        test_images: oci.ImageSet, tmp_path: Path, workers: int) -> None:
    a, b = ClosedPort(), "quota-b.test"  # b: a name that resolves nowhere
    try:
        mirror: MirrorProcess = mirror_factory([
            Upstream(name=a.host, url=upstream.url, extra={"max_size": "20MiB"}),
            Upstream(name=b, url=basic_upstream.url, username=BASIC_USER,
                     password=BASIC_PASSWORD, extra={"max_size": "200KiB"}),
        ], server_extra={"workers": workers}, cache_extra={"prefetch": False})
        conf = write_registries_conf(tmp_path / "b.conf", b, [f"{mirror.host}/{b}"])
        small, big = test_images.small, test_images.big

        def held_of(image: oci.Image) -> int:
            held = mirror.cached_digests()
            return sum(x.size for x in image.all_blobs if x.digest in held)

        skopeo_pull(conf, b, "test/small", "v1", tmp_path / "small")
        assert held_of(small) > 200 << 10  # it came in whole, past its share
        wait_until(lambda: held_of(small) <= 200 << 10, 60, interval=0.3,
                   what="b's share enforced")
        b_kept = mirror.cached_digests()
        conf = write_registries_conf(tmp_path / "a.conf", a.host, [mirror.host])
        skopeo_pull(conf, a.host, "test/big", "v1", tmp_path / "big")
        wait_until(lambda: held_of(big) <= 20 << 20, 60, interval=0.3,
                   what="a's share enforced")
        assert b_kept <= mirror.cached_digests()  # a's eviction took nothing of b's
        status = subprocess.run([sys.executable, "-m", "mirror", "status", "--config",
                                 str(mirror.config_path)], capture_output=True, text=True,
                                timeout=60)
        lines = [ln for ln in status.stdout.splitlines() if ln.startswith("upstream:")]
        assert any(a.host in ln and "of its share 20.0 MiB" in ln for ln in lines), lines
        assert any(b in ln and "of its share 200.0 KiB" in ln for ln in lines), lines
        page = httpx.get(f"{mirror.url}/", trust_env=False, timeout=10).text
        assert page.count('class="share"') == 2
    finally:
        a.close()


@pytest.mark.timeout(120)
def test_pins_beyond_a_share_are_warned_at_start_and_on_the_status_page_until_a_reload(
        mirror_factory: Any, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort) -> None:
    """A pinned image larger than its upstream's share: kept whole, said on the status page,
    in the log at the next start and in mirror_pins_over_bound; a reload raising the share
    (quotas are reloaded) takes the warning off the page."""
    host = blackhole.host
    mirror: MirrorProcess = mirror_factory(
        [Upstream(name=host, url=upstream.url, extra={"max_size": "100KiB"})],
        cache_extra={"pin": [f"{host}/test/small:v1"], "prefetch": False})
    small = test_images.small
    with httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as c:
        r = c.get("/v2/test/small/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 200, r.text
        for blob in small.blobs:
            assert c.get(f"/v2/test/small/blobs/{blob.digest}").status_code == 200
    said = f"pinned images of {host} hold"

    def warnings() -> list[str]:
        page = httpx.get(f"{mirror.url}/", trust_env=False, timeout=10).text
        return [w for w in page.split('<p class="bad warning">')[1:] if said in w]

    wait_until(lambda: bool(warnings()), 30, interval=0.2, what="the status page's warning")
    assert "more than its max_size (102400)" in warnings()[0]
    mirror.wait_cached([b.digest for b in small.all_blobs])  # pinned: nothing evicted

    mirror.restart()
    wait_until(lambda: any(e.get("msg") == "pins exceed a bound" and said in e.get("problem", "")
                           for e in mirror.log_entries()), 30, interval=0.1,
               what="the warning at start")
    assert mirror.metric("mirror_pins_over_bound") == 1

    mirror.upstreams[0].extra["max_size"] = "10MiB"
    mirror.write_config()
    assert mirror.proc is not None
    mirror.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not warnings(), 30, interval=0.2, what="the warning gone after reload")
    assert {b.digest for b in small.all_blobs} <= mirror.cached_digests()


@pytest.mark.timeout(120)
def test_what_a_share_evicts_is_told_to_a_webhook_once_per_digest(
        mirror_factory: Any, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        blackhole: ClosedPort, tmp_path: Path) -> None:
    """The `evict` events (issue 15 item 3) of a share enforced with two workers: one per
    digest that left the cache, none for what stayed, each signed."""
    receiver = Receiver(tmp_path / "receiver", "quota-secret").start()
    try:
        host = blackhole.host
        mirror: MirrorProcess = MirrorProcess(
            tmp_path / "hooked", [Upstream(name=host, url=upstream.url,
                                           extra={"max_size": "100KiB"})],
            server_extra={"workers": 2}, cache_extra={"prefetch": False})
        mirror.arrays["webhook"] = [{"name": "ops", "url": receiver.url,
                                     "secret": "quota-secret", "events": ["fill", "evict"]}]
        mirror.start()
        try:
            small = test_images.small
            with httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as c:
                assert c.get("/v2/test/small/manifests/v1", headers={
                    "Accept": "application/vnd.oci.image.manifest.v1+json"}).status_code == 200
                for blob in small.blobs:
                    assert c.get(f"/v2/test/small/blobs/{blob.digest}").status_code == 200
            every = {b.digest for b in small.all_blobs}

            def held() -> int:
                return sum(b.size for b in small.all_blobs if b.digest in
                           mirror.cached_digests())

            wait_until(lambda: held() <= 100 << 10, 60, interval=0.2, what="the share enforced")
            gone = every - mirror.cached_digests()
            assert gone, "nothing was evicted"

            def told(action: str) -> list[str]:
                return [e["target"]["digest"] for e in receiver.actions(action)]

            wait_until(lambda: set(told("evict")) >= gone and mirror.metric(
                "mirror_webhook_queue_length") == 0, 30, interval=0.1, what="the evictions told")
        finally:
            mirror.stop()
        assert sorted(told("evict")) == sorted(gone)  # once each, nothing that stayed
        assert sorted(told("fill")) == sorted(every)
        attempts = receiver.attempts()
        assert attempts and all(a["good"] for a in attempts), attempts
    finally:
        receiver.stop()
