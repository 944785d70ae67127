"""HTTPS: skopeo pulls through the mirror trusting a test CA (and refuses it without the CA);
SIGHUP reloads the certificate in every worker without dropping connections."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.inprocess.test_ops_certs import CertFiles, write_ca_and_cert
from tests.support import clients, oci
from tests.support.mirror import MirrorProcess
from tests.support.registry import ClosedPort, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class TLSMirror(MirrorProcess):
    """The mirror serving HTTPS; ready once it answers over TLS."""

    ca: Path

    @property
    def https_url(self) -> str:
        return f"https://{self.host}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirror exited:\n{self.stderr_tail()}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{self.https_url}/v2/", trust_env=False, timeout=1.0,
                          verify=ssl.create_default_context(cafile=str(self.ca)))
                return self._all_workers_listening()
            return False

        wait_until(ready, timeout, interval=0.05, what=f"mirror at {self.https_url}")


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return write_ca_and_cert(tmp_path / "certs", "127.0.0.1")


@pytest.fixture
def tls_mirror(tmp_path: Path, certs: CertFiles, upstream: clients.UpstreamRegistry,
               blackhole: ClosedPort) -> TLSMirror:
    from tests.support.mirror import Upstream

    # Live copies of the files, replaced in place by the reload test.
    live = tmp_path / "live"
    live.mkdir()
    (live / "server.crt").write_bytes(certs.cert.read_bytes())
    (live / "server.key").write_bytes(certs.key.read_bytes())
    m = TLSMirror(tmp_path / "mirror", [Upstream(name=blackhole.host, url=upstream.url)],
                  server_extra={"tls_cert": str(live / "server.crt"),
                                "tls_key": str(live / "server.key"), "workers": 2})
    m.ca = certs.ca_cert
    m.start()
    yield m  # type: ignore[misc]
    m.stop()


def test_skopeo_pulls_over_https_trusting_the_test_ca(
        tmp_path: Path, tls_mirror: TLSMirror, certs: CertFiles, blackhole: ClosedPort,
        test_images: oci.ImageSet) -> None:
    conf = clients.write_registries_conf(tmp_path / "registries.conf", registry=blackhole.host,
                                         mirrors=[tls_mirror.host], insecure=False)
    cert_dir = tmp_path / "trust"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(certs.ca_cert.read_bytes())
    image = test_images.big
    clients.skopeo_copy(f"docker://{blackhole.host}/test/big:v1", f"dir:{tmp_path / 'out'}",
                        registries_conf=conf, extra=["--src-cert-dir", str(cert_dir)])
    pulled = clients.verify_dir(tmp_path / "out")
    assert pulled.blobs == {b.digest for b in image.blobs}
    assert {e["cache"] for e in tls_mirror.requests_for(f"/blobs/{image.layers[-1].digest}")}
    tls_mirror.verify_cache()

    # Without the CA, the client refuses the mirror (and the closed primary fails too).
    empty = tmp_path / "empty-trust"
    empty.mkdir()
    failed = clients.skopeo_copy(f"docker://{blackhole.host}/test/small:v1",
                                 f"dir:{tmp_path / 'out2'}", registries_conf=conf,
                                 extra=["--src-cert-dir", str(empty)], check=False)
    assert failed.returncode != 0
    assert "certificate" in failed.stderr or "x509" in failed.stderr


def _serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _connect(m: TLSMirror, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", m.port, context=ctx, timeout=10)
    conn.connect()
    return conn


def _pid(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200
    return int(json.loads(resp.read())["pid"])


def test_sighup_reloads_the_certificate_without_dropping_connections(
        tmp_path: Path, tls_mirror: TLSMirror, certs: CertFiles) -> None:
    new = write_ca_and_cert(tmp_path / "new-certs", "127.0.0.1")
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(str(certs.ca_cert))
    ctx.load_verify_locations(str(new.ca_cert))
    # Connections to both workers, opened before the reload.
    old: dict[int, http.client.HTTPSConnection] = {}
    for _ in range(50):
        conn = _connect(tls_mirror, ctx)
        assert conn.sock is not None and _serial(conn.sock) == certs.serial  # type: ignore[arg-type]
        pid = _pid(conn)
        if pid in old:
            conn.close()
        else:
            old[pid] = conn
        if len(old) == 2:
            break
    assert len(old) == 2

    live = tmp_path / "live"
    (live / "server.crt").write_bytes(new.cert.read_bytes())
    (live / "server.key").write_bytes(new.key.read_bytes())
    assert tls_mirror.proc is not None
    os.kill(tls_mirror.proc.pid, signal.SIGHUP)

    def reloaded_everywhere() -> bool:
        seen: dict[int, int] = {}
        for _ in range(30):
            conn = _connect(tls_mirror, ctx)
            assert conn.sock is not None
            seen[_pid(conn)] = _serial(conn.sock)  # type: ignore[arg-type]
            conn.close()
        return len(seen) == 2 and set(seen.values()) == {new.serial}

    wait_until(reloaded_everywhere, 15, what="both workers serving the new certificate")
    for pid, conn in old.items():  # established connections carry on
        assert _pid(conn) == pid
        conn.close()
    assert tls_mirror.running
    time.sleep(0.1)
    assert any(e.get("msg") == "certificate reloaded" for e in tls_mirror.log_entries())
