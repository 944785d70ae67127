"""The cache browser (issue 16) against a real `mirror serve` with [auth] rules and the Debian
upstream: an admin clicks pin, unpin, purge and sync now in headless Chromium (Playwright
driving Debian's /usr/bin/chromium) and each takes effect in the shared cache (the CLI and
the files see it); a user without the role sees no button and only what it may pull; forged,
cross-site, anonymous and non-admin posts change nothing — with one worker and with two."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from tests.integration.test_ops_statuspage import png_pixels
from tests.support import oci
from tests.support.clients import UpstreamRegistry, env_without_proxies
from tests.support.mirror import MirrorProcess, RulesMirror, Upstream
from tests.support.registry import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UP = "localhost"
RULES = [
    {"users": ["ops", "ops2"], "admin": True, "allow": ["localhost/**"]},
    {"users": ["other"], "allow": ["localhost/test/small"]},
]
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.docker.distribution.manifest.v2+json"}
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--no-proxy-server"]
TOKEN = re.compile(r'name="csrf" value="([^"]+)"')


BrowserMirror = RulesMirror


def _mirror(tmp_path: Path, upstream: UpstreamRegistry, workers: int) -> BrowserMirror:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text("".join(f"{u}:{hashed}\n" for u in ("ops", "ops2", "other")))
    m = RulesMirror(tmp_path / "mirror", [Upstream(name=UP, url=upstream.url)],
                    htpasswd=htpasswd, rules=RULES, server_extra={"workers": workers})
    m.arrays["sync"] = [{"name": "small", "upstream": UP, "repositories": ["test/small"],
                         "tags": "^v1$", "interval": "24h"}]
    return m


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def mirror(request: pytest.FixtureRequest, upstream: UpstreamRegistry, tmp_path: Path
           ) -> Iterator[BrowserMirror]:
    m = _mirror(tmp_path, upstream, request.param)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def _get(m: MirrorProcess, path: str, user: str | None = "ops", **kw: Any) -> httpx.Response:
    return httpx.get(f"{m.url}{path}", auth=(user, "pw") if user else None, trust_env=False,
                     timeout=60, **kw)


def _fetch(m: MirrorProcess, repository: str, image: oci.Image, tag: str = "v1") -> None:
    """A pull as ops: the manifest, then every blob."""
    r = _get(m, f"/v2/{UP}/{repository}/manifests/{tag}", headers=ACCEPT)
    assert r.status_code == 200 and r.content == image.manifest_bytes, r.text
    for blob in image.blobs:
        assert _get(m, f"/v2/{UP}/{repository}/blobs/{blob.digest}").status_code == 200


def _synced(m: MirrorProcess) -> float:
    """When the sync rule last finished, from the status page (0: not yet)."""
    found = re.search(r'<tr class="sync-rule" data-name="small">.*?<td data-value="([\d.]*)"',
                      _get(m, "/").text)
    return float(found.group(1) or 0) if found else 0.0


def _purge_cli(m: MirrorProcess, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", "purge", target, "--config",
                           str(m.config_path)], capture_output=True, text=True, timeout=60,
                          env=env_without_proxies(), cwd=m.workdir)


def _browser(tmp_path: Path) -> Any:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (tests/install-system-deps.sh)")
    from playwright.sync_api import sync_playwright
    return sync_playwright()


def test_an_admin_pins_unpins_purges_and_syncs_in_chromium(
        tmp_path: Path, upstream: UpstreamRegistry, test_images: oci.ImageSet) -> None:
    m = _mirror(tmp_path, upstream, workers=2)
    m.start()
    try:
        _fetch(m, "test/docker", test_images.docker)
        _fetch(m, "test/small", test_images.small, "v2")
        wait_until(lambda: _synced(m) > 0, 60, what="the sync rule's first run")
        with _browser(tmp_path) as p:
            chromium = p.chromium.launch(executable_path=shutil.which("chromium"),
                                         args=BROWSER_FLAGS)
            try:
                _admin_session(chromium, m, tmp_path, test_images)
                _user_session(chromium, m)
            finally:
                chromium.close()
    finally:
        m.stop()


def _admin_session(chromium: Any, m: MirrorProcess, tmp_path: Path,
                   images: oci.ImageSet) -> None:
    context = chromium.new_context(http_credentials={"username": "ops", "password": "pw"},
                                   viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{m.url}/cache")
    small = page.locator('tr.repository[data-name="localhost/test/small"]')
    docker = page.locator('tr.repository[data-name="localhost/test/docker"]')
    assert small.locator("td.size").get_attribute("data-value") == str(
        sum(b.size for b in images.small.all_blobs))  # v1, v2 (and the sync's v1): one image
    assert docker.locator("td.size").get_attribute("data-value") == str(
        sum(b.size for b in images.docker.all_blobs))
    assert small.locator("td.tags").get_attribute("data-value") == "2"
    shot = tmp_path / "cache.png"
    page.screenshot(path=str(shot))
    width, _, rows = png_pixels(shot)
    assert width == 1280 and len({row[i:i + 3] for row in rows[::4]
                                  for i in range(0, len(row), 12)}) > 10, "a blank page"
    keep = Path(__file__).resolve().parents[2] / ".pytest_cache" / "cache-browser.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)

    image = "localhost/test/docker:v1"
    docker.locator("a").click()
    page.locator(f'button[data-action="pin"][data-target="{image}"]').click()
    assert page.locator("#result").inner_text() == "pinned"
    refused = _purge_cli(m, image)  # the pin is in the shared index: the CLI honours it
    assert refused.returncode != 0 and "pinned" in refused.stderr, refused
    page.locator("#back").click()
    row = page.locator('tr.image[data-reference="v1"]')
    assert row.get_attribute("data-pinned") == "by ops"
    assert row.locator('button[data-action="purge"]').count() == 0  # pinned: no purge
    row.locator('button[data-action="unpin"]').click()
    assert page.locator("#result").inner_text() == "unpinned"

    page.locator("#back").click()
    page.locator(f'button[data-action="purge"][data-target="{image}"]').click()
    assert page.locator("#result").inner_text() == f"purge {image}?"
    assert "would remove 1 tag(s), 1 manifest(s)" in page.locator("#details").inner_text()
    assert all(m.blob_path(b.digest).exists() for b in images.docker.all_blobs)  # asked only
    page.locator("button.confirm").click()
    assert page.locator("#result").inner_text() == "purged"
    assert not any(m.blob_path(b.digest).exists() for b in images.docker.all_blobs)
    page.goto(f"{m.url}/cache/localhost/test/docker")
    assert page.locator("tr.image").count() == 0

    before = _synced(m)
    page.goto(f"{m.url}/cache")
    page.locator('button[data-action="sync"][data-target="small"]').click()
    assert page.locator("#result").inner_text() == "sync started"
    wait_until(lambda: _synced(m) > before, 60, what="the sync run started by the button")
    context.close()


def _user_session(chromium: Any, m: MirrorProcess) -> None:
    context = chromium.new_context(http_credentials={"username": "other", "password": "pw"})
    page = context.new_page()
    page.goto(f"{m.url}/cache")
    assert page.locator("tr.repository").evaluate_all("rows => rows.map(r => r.dataset.name)"
                                                      ) == ["localhost/test/small"]
    assert page.locator("form, button").count() == 0
    page.goto(f"{m.url}/cache/localhost/test/small")
    assert page.locator("tr.image").count() >= 1 and page.locator("form, button").count() == 0
    context.close()


def _token(m: MirrorProcess, user: str = "ops") -> str:
    found = TOKEN.search(_get(m, "/cache", user).text)
    assert found, "no admin form on the page"
    return found.group(1)


def _post(m: MirrorProcess, fields: dict[str, str], user: str | None = "ops",
          origin: str | None = "") -> httpx.Response:
    headers = {} if origin is None else {"Origin": origin or m.url}
    with httpx.Client(trust_env=False, timeout=60) as client:
        return client.post(f"{m.url}/cache/actions", data=fields, headers=headers,
                           auth=(user, "pw") if user else None)


def _code(r: httpx.Response) -> str:
    return str(r.json()["errors"][0]["code"])


def test_admin_actions_need_the_role_a_token_and_this_origin(
        mirror: BrowserMirror, test_images: oci.ImageSet) -> None:
    _fetch(mirror, "test/docker", test_images.docker)
    image = "localhost/test/docker:v1"
    pin = {"action": "pin", "target": image}
    assert _get(mirror, "/cache", None).status_code == 401
    assert "Basic" in _get(mirror, "/cache", None).headers["WWW-Authenticate"]
    as_other = _get(mirror, "/cache", "other")
    assert as_other.status_code == 200 and "<form" not in as_other.text
    assert "test/docker" not in as_other.text  # not the user's to see
    assert _get(mirror, "/cache/localhost/test/docker", "other").status_code == 404

    token = _token(mirror)
    r = _post(mirror, {**pin, "csrf": token}, user=None)
    assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"]
    assert _code(_post(mirror, {**pin, "csrf": token}, user="other")) == "DENIED"
    for fields, origin in (({**pin}, ""), ({**pin, "csrf": "1.abc"}, ""),
                           ({**pin, "csrf": token}, "http://evil.test"),
                           ({**pin, "csrf": token}, None)):
        r = _post(mirror, fields, origin=origin)
        assert r.status_code == 403 and _code(r) == "DENIED", (fields, origin, r.text)
    r = _post(mirror, {**pin, "csrf": token}, user="ops2")  # another admin's token
    assert r.status_code == 403 and _code(r) == "DENIED"
    assert 'data-pinned=""' in _get(mirror, "/cache/localhost/test/docker").text  # unchanged

    evil = '<script>alert(1)</script>'
    r = _post(mirror, {"action": "purge", "target": f"localhost/{evil}", "csrf": token})
    assert r.status_code == 409 and "<script>" not in r.text

    # a token one worker issued is good on every worker
    workers = int(mirror.server_extra["workers"])
    seen: dict[int, int] = {}
    for _ in range(60):
        with httpx.Client(trust_env=False, timeout=60) as client:
            pid = int(client.get(f"{mirror.url}/healthz").json()["pid"])
            seen[pid] = client.post(f"{mirror.url}/cache/actions", auth=("ops", "pw"),
                                    data={**pin, "csrf": token},
                                    headers={"Origin": mirror.url}).status_code
        if len(seen) == workers:
            break
    assert len(seen) == workers and set(seen.values()) == {200}, seen
    assert 'data-pinned="by ops"' in _get(mirror, "/cache/localhost/test/docker").text
    denials = [e for e in mirror.request_log() if e["path"] == "/cache/actions"
               and e["status"] in (401, 403)]
    assert {e.get("user") for e in denials} >= {"other", "ops", "ops2"}, denials
