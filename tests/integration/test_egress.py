"""Egress through a forward proxy (Debian's tinyproxy): an upstream's `proxy` key, the
HTTP(S)_PROXY / NO_PROXY environment, `proxy = "direct"`, and a proxy that goes away."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import oci
from tests.support.clients import UpstreamRegistry
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


@dataclass
class Tinyproxy:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]
    marks: int = 0

    def requests(self, upstream: UpstreamRegistry) -> str:
        """The proxy's log once every request before this call is in it: a marker request
        of the test's own through the proxy, waited for (tinyproxy writes its log late)."""
        self.marks += 1
        marker = f"/v2/?marker={self.marks}"
        with httpx.Client(proxy=self.url, trust_env=False, timeout=10) as client:
            client.get(f"{upstream.url}{marker}")
        wait_until(lambda: marker in self._text(), 10, what="the proxy's log written")
        return self._text()

    def _text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    port, log = free_port(), tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{log}"\n'
                    f'LogLevel Info\nMaxClients 64\nAllow 127.0.0.1\n')
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(port), 10, what="tinyproxy listening")
        yield Tinyproxy(f"http://127.0.0.1:{port}", log, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for m in started:
        m.stop()


def start(mirrors: list[MirrorProcess], path: Path, upstreams: list[Upstream],
          env: dict[str, str]) -> MirrorProcess:
    m = MirrorProcess(path, upstreams, cache_extra={"prefetch": False})
    m.env = env
    mirrors.append(m)
    return m.start()


def pull(m: MirrorProcess, prefix: str, repository: str,
         image: oci.Image | oci.ImageIndex) -> None:
    """The manifest by tag and every blob, through the mirror, checked byte for byte."""
    base = f"{m.url}/v2/{prefix}{repository}"
    r = httpx.get(f"{base}/manifests/v1", headers={"Accept": ACCEPT}, trust_env=False,
                  timeout=30)
    assert r.status_code == 200, r.text
    for blob in image.blobs:
        r = httpx.get(f"{base}/blobs/{blob.digest}", trust_env=False, timeout=30)
        assert r.status_code == 200 and oci.sha256_digest(r.content) == blob.digest


def test_the_proxy_key_and_the_environment_choose_the_route(
        tinyproxy: Tinyproxy, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        mirrors: list[MirrorProcess], tmp_path: Path) -> None:
    small, multi = test_images.small, test_images.multi
    # HTTP_PROXY for the first upstream; the second says "direct"
    m = start(mirrors, tmp_path / "env", [
        Upstream(name="via-env.test", url=upstream.url),
        Upstream(name="direct.test", url=upstream.url, extra={"proxy": "direct"})],
        {"HTTP_PROXY": tinyproxy.url, "NO_PROXY": "example.invalid"})
    pull(m, "", "test/small", small)  # the default upstream: via-env.test
    seen = tinyproxy.requests(upstream)
    for blob in small.blobs:  # config and layers (the manifest came by tag)
        assert f"/v2/test/small/blobs/{blob.digest}" in seen
    pull(m, "direct.test/", "test/multi", multi)
    assert "/v2/test/multi/" not in tinyproxy.requests(upstream)

    # the proxy key wins over NO_PROXY naming the upstream's host
    m2 = start(mirrors, tmp_path / "key", [
        Upstream(name="key.test", url=upstream.url, extra={"proxy": tinyproxy.url})],
        {"NO_PROXY": "127.0.0.1"})
    pull(m2, "", "test/multi", multi)
    assert "/v2/test/multi/manifests/v1" in tinyproxy.requests(upstream)

    # NO_PROXY naming the upstream's host: direct, though HTTP_PROXY is set
    before = tinyproxy.requests(upstream).count("/v2/test/small/")
    m3 = start(mirrors, tmp_path / "noproxy", [Upstream(name="np.test", url=upstream.url)],
               {"HTTP_PROXY": tinyproxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    pull(m3, "", "test/small", small)
    assert tinyproxy.requests(upstream).count("/v2/test/small/") == before


def test_a_proxy_that_is_gone_fails_a_cold_miss_fast_with_a_registry_error(
        tinyproxy: Tinyproxy, upstream: UpstreamRegistry, test_images: oci.ImageSet,
        mirrors: list[MirrorProcess], tmp_path: Path) -> None:
    m = start(mirrors, tmp_path / "gone", [
        Upstream(name="gone.test", url=upstream.url,
                 extra={"proxy": tinyproxy.url, "connect_timeout": "2s"})], {})
    pull(m, "", "test/small", test_images.small)  # cached while the proxy is there
    tinyproxy.proc.terminate()
    tinyproxy.proc.wait(timeout=10)
    pull(m, "", "test/small", test_images.small)  # hits need no proxy
    blob = test_images.multi.blobs[0]
    r = httpx.get(f"{m.url}/v2/test/multi/blobs/{blob.digest}", trust_env=False, timeout=30)
    assert r.status_code in (502, 503, 504), r.text
    error = r.json()["errors"][0]
    assert error["code"] in ("UPSTREAM_UNREACHABLE", "UNAVAILABLE"), error
    assert "gone.test" in error["message"], error
