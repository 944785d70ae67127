"""Concurrent cold pulls: one upstream download per blob, whatever the number of clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import oci
from tests.support.clients import (
    UpstreamRegistry,
    skopeo_copy_async,
    verify_dir,
    wait_for_exit,
    write_registries_conf,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, ThrottledProxy

pytestmark = pytest.mark.integration
MB = 1 << 20
CLIENTS = 8


@pytest.mark.timeout(300)
def test_eight_concurrent_cold_skopeo_pulls_fetch_each_blob_once(
        mirror_factory: Any, upstream: UpstreamRegistry, blackhole: ClosedPort,
        test_images: oci.ImageSet, tmp_path: Path) -> None:
    big = test_images.big
    # A slowed upstream (100 MB/s) so that all eight pulls overlap the downloads.
    proxy = ThrottledProxy(upstream.registry.port, rate=100 * MB).start()
    try:
        # Two workers: the requests are spread over both processes, which must still make
        # one upstream request per blob and per manifest between them.
        mirror: MirrorProcess = mirror_factory([Upstream(name=blackhole.host, url=proxy.url)],
                                               server_extra={"workers": 2})
        conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
        mark = upstream.registry.mark()
        procs = [skopeo_copy_async(f"docker://{blackhole.host}/test/big:v1",
                                   f"dir:{tmp_path / f'client{i}'}", registries_conf=conf,
                                   log_path=tmp_path / f"client{i}.log")
                 for i in range(CLIENTS)]
        codes = [wait_for_exit(p, timeout=240) for p in procs]
    finally:
        proxy.stop()
    logs = [(tmp_path / f"client{i}.log").read_text() for i in range(CLIENTS)]
    assert codes == [0] * CLIENTS, logs
    for i in range(CLIENTS):
        pulled = verify_dir(tmp_path / f"client{i}")
        assert pulled.manifest == big.manifest_bytes
        assert pulled.blobs == {b.digest for b in big.blobs}
    gets = upstream.registry.blob_gets(mark)
    assert gets == {b.digest: 1 for b in big.blobs}, gets
    manifest_gets = [e for e in upstream.registry.manifest_requests(mark) if e.method == "GET"]
    assert len(manifest_gets) == 1, manifest_gets
    mirror.wait_cached({b.digest for b in big.blobs})
    mirror.verify_cache()
