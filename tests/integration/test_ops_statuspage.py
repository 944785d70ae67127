"""The status page in headless Chromium (Debian's `chromium`): after real pulls it renders,
its numbers are those of /metrics, and the screenshot shows a styled page (its progress-bar
blue and dark text are in the pixels), not an empty or error page."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import clients, oci
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import ClosedPort, env_without_proxies, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars", "--window-size=1280,1100"]
BAR_BLUE = (0x4C, 0x8B, 0xF5)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (tests/install-system-deps.sh)")


def run_chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    env = {**env_without_proxies(), "HOME": str(tmp_path)}
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes): width, height, rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, bpp = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) for r in rows] if bpp == 3 else [
        b"".join(r[i:i + 3] for i in range(0, len(r), 4)) for r in rows]


def page_numbers(dom: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'id="([a-z-]+)" data-value="([0-9.e+-]+)"',
                                                   dom)}


def scrape(m: MirrorProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{m.url}/metrics", trust_env=False).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_status_page_in_chromium(tmp_path: Path, mirror_factory: MirrorFactory,
                                 blackhole: ClosedPort, test_images: oci.ImageSet) -> None:
    mirror = mirror_factory(max_size="2MiB")  # the small image fills a visible part of it
    registries_conf = clients.write_registries_conf(
        tmp_path / "registries.conf", registry=blackhole.host, mirrors=[mirror.host])
    for out in ("one", "two"):  # a cold pull, then a warm one: misses and hits
        clients.skopeo_pull(registries_conf, blackhole.host, "test/small", "v1", tmp_path / out)
    mirror.wait_log(lambda log: len([e for e in log if "/blobs/" in str(e["path"])]) >= 4)
    # Each worker publishes its pull counts once a second: wait until the page has them.
    wait_until(lambda: f"<td>{blackhole.host}/test/small</td>" in httpx.get(
        f"{mirror.url}/", trust_env=False).text, 10, what="the most-pulled table")

    dom = run_chromium(tmp_path, "--dump-dom", f"{mirror.url}/")
    metrics = scrape(mirror)
    assert "<h1>Registry mirror</h1>" in dom
    numbers = page_numbers(dom)
    hits = sum(total(metrics, "mirror_cache_requests_total", result=r)
               for r in ("hit", "revalidated", "stale"))
    misses = total(metrics, "mirror_cache_requests_total") - hits
    assert hits > 0 and misses > 0
    assert numbers["hits"] == hits
    assert numbers["misses"] == misses
    assert numbers["hit-ratio"] == pytest.approx(hits / (hits + misses))
    for page_id, metric, labels in (
            ("bytes-from-cache", "mirror_served_bytes_total", {"source": "cache"}),
            ("bytes-from-upstream", "mirror_served_bytes_total", {"source": "upstream"}),
            ("cache-bytes", "mirror_cache_bytes", {}),
            ("cache-max-bytes", "mirror_cache_max_bytes", {}),
            ("cache-entries", "mirror_cache_entries", {}),
            ("downloads-in-flight", "mirror_downloads_in_flight", {}),
            ("disk-size", "mirror_cache_disk_size_bytes", {}),
            ("stale", "mirror_stale_answers_total", {})):
        assert numbers[page_id] == total(metrics, metric, **labels), page_id
    assert numbers["bytes-from-cache"] >= sum(b.size for b in test_images.small.blobs)
    assert numbers["cache-bytes"] > 0 and numbers["cache-entries"] >= 3
    assert 0 < numbers["disk-free"] < numbers["disk-size"]
    assert numbers["disk-free"] == pytest.approx(  # the disk is written to in between
        total(metrics, "mirror_cache_disk_free_bytes"), rel=0.01)
    assert numbers["errors"] == sum(v for (n, ls), v in metrics.items()
                                    if n == "mirror_http_requests_total"
                                    and dict(ls).get("status", "").startswith("5"))
    assert f'data-name="{blackhole.host}"' in dom and ">reachable<" in dom
    assert re.search(r'<td>' + re.escape(blackhole.host) + r'/test/small</td>'
                     r'<td class="pulls" data-value="(\d+)"', dom)

    shot = tmp_path / "status.png"
    run_chromium(tmp_path, f"--screenshot={shot}", f"{mirror.url}/")
    width, height, rows = png_pixels(shot)
    keep = Path(__file__).resolve().parents[2] / ".pytest_cache" / "status.png"
    keep.parent.mkdir(exist_ok=True)  # for a person to look at after the run
    shutil.copy(shot, keep)
    assert (width, height) == (1280, 1100)
    pixels = {row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)}
    assert len(pixels) > 20, "a blank page"
    assert bytes(BAR_BLUE) in {row[i:i + 3] for row in rows for i in range(0, len(row), 3)}, \
        "the cache-use progress bar is not drawn"
    assert any(max(p) < 0x50 for p in pixels), "no dark text"


UPSTREAM_ORANGE = (0xE8, 0x91, 0x2D)  # http/charts.py: the "upstream" line


def test_charts_show_the_traffic_and_the_hit_ratio_is_one_everywhere(
        tmp_path: Path, blackhole: ClosedPort, test_images: oci.ImageSet,
        upstream: clients.UpstreamRegistry) -> None:
    """With a history slot of 1 s: the bytes a cold and a warm pull moved are in the charts'
    numbers and drawn; the hit ratios on the page, in /metrics and in `mirror status` are the
    same numbers, kept by two workers and across a restart."""
    mirror = MirrorProcess(tmp_path / "m", [Upstream(name=blackhole.host, url=upstream.url)],
                           server_extra={"workers": 2}, cache_extra={"prefetch": False})
    mirror.env["MIRROR_HISTORY_SECONDS"] = "1"
    mirror.start()
    try:
        conf = clients.write_registries_conf(tmp_path / "r.conf", blackhole.host,
                                             [mirror.host])
        small = test_images.small
        clients.skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "cold")
        clients.skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "warm")
        size = sum(b.size for b in small.blobs)

        def drawn(series: str) -> float:
            page = httpx.get(f"{mirror.url}/", trust_env=False, timeout=10).text
            hour = page.split("<h3>Last day</h3>")[0]
            found = re.search(f'data-series="{series}" data-points="([0-9.,e+-]*)"', hour)
            return sum(float(v) for v in found[1].split(",") if v) if found else 0.0

        wait_until(lambda: drawn("cache") >= size and drawn("upstream") >= size, 30,
                   interval=0.5, what="both pulls' bytes in the charts")
        mirror.stop()
        mirror.start()  # the history survives a restart (counters start again from zero)
        assert drawn("cache") >= size

        dom = run_chromium(tmp_path, "--dump-dom", f"{mirror.url}/")
        numbers = page_numbers(dom)
        metrics = scrape(mirror)
        status = subprocess.run([sys.executable, "-m", "mirror", "status", "--config",
                                 str(mirror.config_path)], capture_output=True, text=True,
                                timeout=60).stdout
        for page_id, basis in (("hit-ratio-hour", "requests"), ("hit-ratio-bytes-hour", "bytes")):
            value = numbers.get(page_id)
            assert value is not None, re.findall(r'id="hit-ratio[^<]*', dom)
            assert 0 < value < 1
            assert total(metrics, "mirror_hit_ratio", basis=basis, window="1h") == value
            assert f"{100 * value:.1f}% last hour" in status, status
        shot = tmp_path / "charts.png"
        run_chromium(tmp_path, f"--screenshot={shot}", f"{mirror.url}/")
        keep = Path(__file__).resolve().parents[2] / ".pytest_cache" / "charts.png"
        keep.parent.mkdir(exist_ok=True)  # for a person to look at after the run
        shutil.copy(shot, keep)
        _, _, rows = png_pixels(shot)
        colours = {row[i:i + 3] for row in rows for i in range(0, len(row), 3)}
        assert bytes(UPSTREAM_ORANGE) in colours, "the upstream line is not drawn"
    finally:
        mirror.stop()
