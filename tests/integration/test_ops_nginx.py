"""Debian's nginx as a caching front (docs/nginx-mirror.conf, as documented): pulls through it
work, the second pull is served by nginx's cache, HEAD and If-None-Match are answered there,
and tag manifests vary with Accept."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import clients, oci
from tests.support.mirror import MirrorProcess
from tests.support.registry import ClosedPort, env_without_proxies, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOC_CONF = Path(__file__).resolve().parents[2] / "docs" / "nginx-mirror.conf"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


class Nginx:
    def __init__(self, workdir: Path, mirror_host: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        conf = DOC_CONF.read_text()
        # Only the addresses and the cache path differ from the documented file.
        conf = conf.replace("/var/cache/nginx/mirror", str(workdir / "cache"))
        conf = conf.replace("listen 80;", f"listen {self.host};")
        conf = conf.replace("server 127.0.0.1:5000;", f"server {mirror_host};")
        assert conf.count(str(workdir)) == 1 and self.host in conf and mirror_host in conf
        (workdir / "mirror.conf").write_text(conf)
        for d in ("logs", "cache", "tmp"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        tmp = workdir / "tmp"
        (workdir / "nginx.conf").write_text(f"""
user root;
worker_processes 2;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    include {workdir}/mirror.conf;
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        args = [nginx, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env_without_proxies(), start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.error_log()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{self.url}/healthz", trust_env=False).status_code == 200
            return False

        wait_until(up, 15, what="nginx in front of the mirror")
        return self

    def error_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / "logs" / "error.log").read_text()[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def nginx(tmp_path: Path, mirror: MirrorProcess) -> Iterator[Nginx]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (tests/install-system-deps.sh)")
    n = Nginx(tmp_path / "nginx", mirror.host).start()
    yield n
    n.stop()


def blob_requests(mirror: MirrorProcess) -> list[dict[str, object]]:
    return [e for e in mirror.request_log() if "/blobs/" in str(e["path"])]


def test_pulls_through_nginx_are_cached_there(
        tmp_path: Path, nginx: Nginx, mirror: MirrorProcess, blackhole: ClosedPort,
        test_images: oci.ImageSet) -> None:
    conf = clients.write_registries_conf(tmp_path / "registries.conf", registry=blackhole.host,
                                         mirrors=[nginx.host])
    image = test_images.small
    first = clients.skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "one")
    assert first.blobs == {b.digest for b in image.blobs}
    mirror.wait_log(lambda log: len([e for e in log if "/blobs/" in str(e["path"])])
                    >= len(image.blobs))
    seen_by_mirror = len(blob_requests(mirror))

    second = clients.skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "two")
    assert second.blobs == first.blobs and second.manifest == first.manifest
    assert len(blob_requests(mirror)) == seen_by_mirror, "blobs came from nginx's cache"

    layer = image.layers[-1]
    url = f"{nginx.url}/v2/test/small/blobs/{layer.digest}"
    with httpx.Client(trust_env=False, timeout=30) as c:
        got = c.get(url)
        assert got.status_code == 200 and got.content == layer.read()
        assert got.headers["X-Cache-Status"] == "HIT"
        assert got.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert got.headers["Docker-Content-Digest"] == layer.digest
        # The same blob under another repository name is the same cache entry.
        other = c.get(f"{nginx.url}/v2/another/name/blobs/{layer.digest}")
        assert other.headers["X-Cache-Status"] == "HIT" and other.content == got.content
        head = c.head(url)
        assert head.status_code == 200 and head.headers["X-Cache-Status"] == "HIT"
        assert head.headers["Content-Length"] == str(layer.size)
        assert head.headers["ETag"] == got.headers["ETag"] == f'"{layer.digest}"'
        not_modified = c.get(url, headers={"If-None-Match": got.headers["ETag"]})
        assert not_modified.status_code == 304 and not_modified.content == b""
    assert len(blob_requests(mirror)) == seen_by_mirror


def test_tag_manifests_vary_with_accept_behind_nginx(
        nginx: Nginx, mirror: MirrorProcess, test_images: oci.ImageSet) -> None:
    oci_digest = test_images.small.manifest.digest
    docker_digest = test_images.docker.manifest.digest
    with httpx.Client(trust_env=False, timeout=30) as c:
        for repo, accept, digest in (("test/small", OCI_MANIFEST, oci_digest),
                                     ("test/docker", DOCKER_MANIFEST, docker_digest)):
            url = f"{nginx.url}/v2/{repo}/manifests/v1"
            statuses = []
            for _ in range(2):
                r = c.get(url, headers={"Accept": accept})
                assert r.status_code == 200, r.text
                assert r.headers["Docker-Content-Digest"] == digest
                assert r.headers["Content-Type"] == accept
                assert r.headers["Vary"] == "Accept"
                assert re.fullmatch(r"max-age=\d+", r.headers["Cache-Control"])
                statuses.append(r.headers["X-Cache-Status"])
            assert statuses == ["MISS", "HIT"]
        # Another Accept is another variant: not answered from the first one's entry.
        r = c.get(f"{nginx.url}/v2/test/small/manifests/v1",
                  headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
        assert r.status_code == 200 and r.headers["X-Cache-Status"] == "MISS"
        # Errors are not cached.
        for _ in range(2):
            r = c.get(f"{nginx.url}/v2/test/nothing/manifests/v1")
            assert r.status_code == 404 and r.headers["X-Cache-Status"] == "MISS"
        assert c.get(f"{nginx.url}/metrics").status_code == 200
