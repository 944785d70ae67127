"""Client access control with real clients: skopeo through the mirror's token flow,
anonymously for a public upstream and with a user for an authenticated one."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.support import oci
from tests.support.clients import UpstreamRegistry, run, skopeo_base, verify_dir
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort

pytestmark = pytest.mark.integration


def conf(path: Path, registry: str, location: str) -> Path:
    path.write_text(f"""unqualified-search-registries = []
[[registry]]
location = "{registry}"
insecure = true
[[registry.mirror]]
location = "{location}"
insecure = true
""")
    return path


def pull(registries_conf: Path, ref: str, out: Path, authfile: Path | None = None,
         check: bool = True) -> Any:
    args = [*skopeo_base(registries_conf), "copy", "--retry-times", "0"]
    if authfile is not None:
        args += ["--authfile", str(authfile)]
    return run([*args, f"docker://{ref}", f"dir:{out}"], timeout=120, check=check)


class AuthMirror(MirrorProcess):
    """A mirror with `[auth] htpasswd` set."""

    def __init__(self, *args: Any, htpasswd: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.htpasswd = htpasswd

    def config_text(self) -> str:
        return super().config_text() + f'\n[auth]\nhtpasswd = "{self.htpasswd}"\n'


@pytest.fixture
def mirror(blackhole: ClosedPort, upstream: UpstreamRegistry, tmp_path: Path
           ) -> Iterator[MirrorProcess]:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"ci:{hashed}\n")
    m = AuthMirror(tmp_path / "mirror", [
        Upstream(name=blackhole.host, url=upstream.url),
        Upstream(name="localhost", url=upstream.url, extra={"access": "authenticated"})],
        htpasswd=htpasswd)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.mark.timeout(240)
def test_skopeo_through_the_mirrors_token_flow(
        mirror: MirrorProcess, blackhole: ClosedPort, test_images: oci.ImageSet,
        tmp_path: Path) -> None:
    small = test_images.small
    # public upstream: anonymous pull works (the client fetches an anonymous token)
    public = conf(tmp_path / "public.conf", blackhole.host, mirror.host)
    pull(public, f"{blackhole.host}/test/small:v1", tmp_path / "anon")
    assert verify_dir(tmp_path / "anon").manifest == small.manifest_bytes
    # authenticated upstream: refused anonymously, served to a user
    private = conf(tmp_path / "private.conf", "localhost", f"{mirror.host}/localhost")
    refused = pull(private, "localhost/test/small:v1", tmp_path / "refused", check=False)
    assert refused.returncode != 0
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {mirror.host: {
        "auth": base64.b64encode(b"ci:pw").decode()}}}))
    pull(private, "localhost/test/small:v1", tmp_path / "user", authfile=authfile)
    assert verify_dir(tmp_path / "user").manifest == small.manifest_bytes
    mirror.wait_log(lambda log: any(str(e["path"]).startswith("/token") for e in log),
                    what="skopeo's requests to the mirror's token endpoint")
