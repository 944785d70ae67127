"""A real Prometheus server (Debian's) scrapes a mirror serving with two workers, with the
shipped rules (docs/prometheus, the `for:` durations shortened to seconds for the test): the
scraped counters add up both workers' requests, and MirrorUpstreamDown fires, naming the
upstream, once the test stops the upstream registry (and not before)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.clients import UpstreamRegistry
from tests.support.mirror import MirrorProcess, Upstream, on_both_workers
from tests.support.registry import HOST, ClosedPort, free_port, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus missing: `make system-deps` installs it")]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "prometheus"
REPO = "test/small"


class Prometheus:
    def __init__(self, directory: Path, target: str) -> None:
        directory.mkdir(parents=True)
        rules = []
        for name in ("mirror-rules.yml", "mirror-alerts.yml"):
            text = re.sub(r"for: \d+m", "for: 3s", (DOCS / name).read_text())
            (directory / name).write_text(text)
            rules.append(str(directory / name))
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{', '.join(rules)}]\n"
            "scrape_configs:\n  - job_name: mirror\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://{HOST}:{free_port()}"
        self.log = (directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'db'}",
             f"--web.listen-address={self.url.split('://')[1]}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, 60, interval=0.2, what="prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return httpx.get(f"{self.url}/-/ready", trust_env=False, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, trust_env=False,
                      timeout=10)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def firing(self, name: str) -> list[dict[str, str]]:
        r = httpx.get(f"{self.url}/api/v1/alerts", trust_env=False, timeout=10)
        return [a["labels"] for a in r.json()["data"]["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == "firing"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.mark.timeout(240)
def test_prometheus_scrapes_all_workers_and_the_upstream_down_alert_fires(
        tmp_path: Path, own_upstream: UpstreamRegistry, blackhole: ClosedPort) -> None:
    mirror = MirrorProcess(tmp_path / "mirror", [Upstream(
        name=blackhole.host, url=own_upstream.url,
        extra={"connect_timeout": "1s", "read_timeout": "2s"})], server_extra={"workers": 2})
    mirror.start()
    prometheus = Prometheus(tmp_path / "prometheus", mirror.host)
    try:
        on_both_workers(mirror, 404, REPO)  # both workers answered; the upstream is up
        made = mirror.metric("mirror_http_requests_total", route="manifest")
        assert made >= 2
        wait_until(lambda: [float(s["value"][1]) for s in prometheus.query(
            'sum(mirror_http_requests_total{route="manifest"})')] == [made], 30,
            interval=0.5, what="the scrape adding up both workers")
        wait_until(lambda: prometheus.query("mirror_upstream_up == 1") != [], 30,
                   interval=0.5, what="the upstream seen up")
        assert prometheus.firing("MirrorUpstreamDown") == []
        own_upstream.registry.stop()
        on_both_workers(mirror, 500, REPO)
        wait_until(lambda: prometheus.firing("MirrorUpstreamDown") != [], 60, interval=0.5,
                   what="MirrorUpstreamDown firing")
        (alert,) = prometheus.firing("MirrorUpstreamDown")
        assert alert["upstream"] == blackhole.host and alert["severity"] == "warning"
    finally:
        prometheus.stop()
        mirror.stop()
