"""Private content through real worker processes (issue 10, items 1 and 2): a private upstream
(Debian's docker-registry with `auth: token`, reached with credentials) beside the public
default upstream (an anonymous docker-registry), `[auth]` on, one and two workers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.integration.test_client_access import AuthMirror
from tests.support import oci
from tests.support.clients import UpstreamRegistry
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort

pytestmark = pytest.mark.integration
ACCEPT = ("application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def mirror(request: pytest.FixtureRequest, blackhole: ClosedPort, upstream: UpstreamRegistry,
           token_upstream: UpstreamRegistry, tmp_path: Path) -> Iterator[MirrorProcess]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n")
    m = AuthMirror(tmp_path / "mirror", [
        Upstream(name=blackhole.host, url=upstream.url),  # public, the default
        Upstream(name="priv.test", url=token_upstream.url, username="reader",
                 password="readerpw"),
    ], htpasswd=htpasswd, server_extra={"workers": request.param})
    m.start()
    yield m
    m.stop()


def _token(c: httpx.Client) -> dict[str, str]:
    basic = base64.b64encode(b"ci:pw").decode()
    r = c.get("/token", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200
    return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.mark.timeout(300)
def test_private_layers_stay_private_on_every_worker(
        mirror: MirrorProcess, test_images: oci.ImageSet, token_upstream: UpstreamRegistry,
        upstream: UpstreamRegistry) -> None:
    small = test_images.small
    with httpx.Client(base_url=mirror.url, timeout=30, trust_env=False) as c:
        user = _token(c)
        r = c.get("/v2/priv.test/private/small/manifests/v1",
                  headers={**user, "Accept": ACCEPT})
        assert r.status_code == 200 and r.content == small.manifest_bytes
        for blob in small.blobs:
            r = c.get(f"/v2/priv.test/private/small/blobs/{blob.digest}", headers=user)
            assert r.status_code == 200 and r.content == blob.read()
        mirror.wait_cached([b.digest for b in small.blobs])

        # Anonymous, through the public default upstream, under names it does not hold;
        # repeated, so that both workers answer (connections are spread by the kernel).
        for _ in range(6):
            with httpx.Client(base_url=mirror.url, timeout=30, trust_env=False) as anon:
                for blob in small.blobs:
                    for name in ("anything", "library/nothing", "private/small"):
                        r = anon.get(f"/v2/{name}/blobs/{blob.digest}")
                        assert r.status_code in (401, 404), (name, r.status_code)
                        assert r.content != blob.read()
                r = anon.get(f"/v2/anything/manifests/{small.manifest.digest}",
                             headers={"Accept": ACCEPT})
                assert r.status_code in (401, 404)

        # The public upstream really holds the same image as test/small: confirmed, served.
        for blob in small.blobs:
            r = c.get(f"/v2/test/small/blobs/{blob.digest}")
            assert r.status_code == 200 and r.content == blob.read()
    assert {b.digest for b in small.blobs} <= mirror.verify_cache()
