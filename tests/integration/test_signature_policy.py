"""Signature policy ([[policy]], pull/trust.py) with the real upstream and real clients:
signed images pull; unsigned ones, ones signed by another key, ones whose signed payload names
another digest and ones with an altered signature are refused with the reason in the client's
error; warn mode serves and counts; an index signed at the top pulls for every platform; the
signatures travel with `mirror export`/`import` to an offline mirror that still enforces.

The signatures are cosign's format, written by tests/support/signing.py (Debian's skopeo
cannot sign: "sigstore disabled")."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import (
    Containerd,
    Result,
    UpstreamRegistry,
    skopeo_copy,
    skopeo_pull,
    verify_dir,
    write_hosts_toml,
    write_registries_conf,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry
from tests.support.signing import Key, make_key, sign

pytestmark = pytest.mark.integration

IMAGES = ("signed", "unsigned", "other", "payload", "tampered", "free")


@dataclass
class Signed:
    upstream: UpstreamRegistry
    images: dict[str, oci.Image | oci.ImageIndex]
    good: Key
    other: Key


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, blackhole: ClosedPort) -> Iterator[Signed]:
    """acme/<name>:v1 for each of IMAGES (free: under public/, which no policy matches) and
    acme/multi:v1 (an index signed at the top), each a distinct image."""
    d = tmp_path_factory.mktemp("signed")
    layout = oci.OCILayout(d / "layout")
    images: dict[str, oci.Image | oci.ImageIndex] = {
        name: oci.build_image(layout.blobs_dir, (64 * 1024, 300 * 1024), labels={"image": name})
        for name in IMAGES}
    images["multi"] = oci.build_index(layout.blobs_dir, [
        oci.build_image(layout.blobs_dir, (64 * 1024,), arch=a, labels={"image": "multi"})
        for a in ("amd64", "arm64")])
    for name, image in images.items():
        layout.add(image, name)
    layout.write_index()
    up = UpstreamRegistry(Registry(d / "registry").start())
    good, other = make_key(d / "keys", "acme"), make_key(d / "keys", "other")
    try:
        for name, image in images.items():
            up.push(layout, name, image, repo(name), "v1")
        host = blackhole.host
        for name, key, extra in [("signed", good, {}), ("multi", good, {}), ("other", other, {}),
                                 ("payload", good, {"names": images["signed"].manifest.digest}),
                                 ("tampered", good, {"tamper": True})]:
            sign(up.url, host, repo(name), images[name].manifest.digest, key, **extra)
        yield Signed(up, images, good, other)
    finally:
        up.registry.stop()


def repo(name: str) -> str:
    return "public/free" if name == "free" else f"acme/{name}"


def policy_mirror(started: list[MirrorProcess], workdir: Path, blackhole: ClosedPort,
                  signed: Signed, mode: str = "enforce", workers: int = 1,
                  url: str | None = None, **kwargs: Any) -> MirrorProcess:
    m = MirrorProcess(workdir, [Upstream(name=blackhole.host, url=url or signed.upstream.url)],
                      server_extra={"workers": workers}, **kwargs)
    m.arrays["policy"] = [{"name": "acme", "match": [f"{blackhole.host}/acme/**"],
                           "keys": [str(signed.good.public)], "mode": mode}]
    started.append(m)
    return m.start()


def pull(conf: Path, host: str, name: str, out: Path, all_platforms: bool = False) -> Result:
    return skopeo_copy(f"docker://{host}/{repo(name)}:v1", f"dir:{out}", registries_conf=conf,
                       all_platforms=all_platforms, check=False)


def metric(mirror: MirrorProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{mirror.url}/metrics", trust_env=False, timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


REFUSALS = {
    "unsigned": "no cosign signature",
    "other": "a signature no key of the policy verifies",
    "payload": "a signed payload for another digest",
    "tampered": "a signature no key of the policy verifies",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_signed_images_pull_and_every_bad_signature_is_refused_with_its_reason(
        tmp_path: Path, blackhole: ClosedPort, signed: Signed, started: list[MirrorProcess],
        workers: int) -> None:
    mirror = policy_mirror(started, tmp_path / "m", blackhole, signed, workers=workers)
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    for name in ("signed", "free"):
        result = pull(conf, blackhole.host, name, tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert verify_dir(tmp_path / name).manifest == signed.images[name].manifest_bytes
    for name, reason in REFUSALS.items():
        result = pull(conf, blackhole.host, name, tmp_path / name)
        assert result.returncode != 0
        assert "denied" in result.stderr and reason in result.stderr, result.stderr
        assert "[[policy]] 'acme'" in result.stderr
    assert metric(mirror, "mirror_policy_decisions_total", decision="denied") >= len(REFUSALS)
    # a refused image's layers are not handed out by digest either, on any worker
    layer = signed.images["unsigned"].blobs[-1].digest
    for _ in range(4):
        r = httpx.get(f"{mirror.url}/v2/acme/unsigned/blobs/{layer}", trust_env=False,
                      timeout=10)
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    # the signed image's, yes (its manifest was allowed), on any worker
    allowed = signed.images["signed"].blobs[-1].digest
    for _ in range(4):
        r = httpx.get(f"{mirror.url}/v2/acme/signed/blobs/{allowed}", trust_env=False,
                      timeout=10)
        assert r.status_code == 200
    denials = [e for e in mirror.log_entries() if e.get("msg") == "refused by signature policy"]
    assert {e["repository"] for e in denials} >= {f"acme/{n}" for n in REFUSALS}
    page = httpx.get(f"{mirror.url}/", trust_env=False, timeout=10).text
    assert "Signature policies" in page and page.count('class="denial"') == len(REFUSALS)
    for name in REFUSALS:
        digest = signed.images[name].manifest.digest
        assert f"{blackhole.host}/acme/{name}@{digest}" in page


@pytest.mark.timeout(300)
def test_policy_check_says_what_is_decided_and_why_without_pulling_layers(
        tmp_path: Path, blackhole: ClosedPort, signed: Signed,
        started: list[MirrorProcess]) -> None:
    mirror = policy_mirror(started, tmp_path / "m", blackhole, signed)
    names = ["signed", "unsigned", "free", "multi", "other"]
    result = mirror_cli(mirror, "policy", "check",
                        *(f"{blackhole.host}/{repo(n)}:v1" for n in names))
    assert result.returncode == 1, result
    lines = dict(zip(names, result.stdout.splitlines(), strict=True))
    assert "allowed by [[policy]] 'acme'" in lines["signed"]
    assert "denied by [[policy]] 'acme': no cosign signature" in lines["unsigned"]
    assert "no [[policy]] matches" in lines["free"]
    assert "covers the index's 2 platform manifests" in lines["multi"]
    assert "no key of the policy verifies" in lines["other"]
    mark = signed.upstream.registry.mark()
    again = mirror_cli(mirror, "policy", "check", f"{blackhole.host}/acme/tampered:v1")
    assert "no key of the policy verifies" in again.stdout
    fetched = set(signed.upstream.registry.blob_gets(mark))
    tampered = signed.images["tampered"]
    assert fetched and not fetched & {b.digest for b in tampered.blobs}  # only its payload


@pytest.mark.timeout(300)
def test_an_index_signed_at_the_top_pulls_every_platform_and_verifies_once(
        tmp_path: Path, blackhole: ClosedPort, signed: Signed, started: list[MirrorProcess],
        ctd: Containerd) -> None:
    mirror = policy_mirror(started, tmp_path / "m", blackhole, signed, workers=2)
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    result = pull(conf, blackhole.host, "multi", tmp_path / "multi", all_platforms=True)
    assert result.returncode == 0, result.stderr
    index = signed.images["multi"]
    assert isinstance(index, oci.ImageIndex)
    assert verify_dir(tmp_path / "multi").instance_manifests == {
        i.manifest.digest: i.manifest_bytes for i in index.images}
    hosts = write_hosts_toml(tmp_path / "hosts", blackhole.host, mirror.url)
    ctd.pull(f"{blackhole.host}/acme/multi:v1", hosts_dir=hosts, all_platforms=True)
    ctd.pull(f"{blackhole.host}/acme/signed:v1", hosts_dir=hosts)
    refused = ctd.pull(f"{blackhole.host}/acme/unsigned:v1", hosts_dir=hosts, check=False)
    # containerd resolves with HEAD, which has no body: it shows the status, the log the why
    assert refused.returncode != 0 and "403 Forbidden" in refused.stderr, refused.stderr
    # the verdicts were kept: two images verified, each once whatever the worker
    assert metric(mirror, "mirror_signature_lookups_total") <= 2 + 2  # + unsigned per worker
    assert metric(mirror, "mirror_policy_decisions_total", decision="allowed") == 2


@pytest.mark.timeout(300)
def test_warn_mode_serves_and_counts(tmp_path: Path, blackhole: ClosedPort, signed: Signed,
                                     started: list[MirrorProcess]) -> None:
    mirror = policy_mirror(started, tmp_path / "m", blackhole, signed, mode="warn")
    conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [mirror.host])
    for name in REFUSALS:
        result = pull(conf, blackhole.host, name, tmp_path / name)
        assert result.returncode == 0, result.stderr
    assert metric(mirror, "mirror_policy_decisions_total", decision="warned") >= len(REFUSALS)
    assert metric(mirror, "mirror_policy_decisions_total", decision="denied") == 0
    warned = {e["repository"] for e in mirror.log_entries()
              if e.get("msg") == "signature policy (warn): served anyway"}
    assert warned >= {f"acme/{n}" for n in REFUSALS}


def mirror_cli(mirror: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config",
                           str(mirror.config_path)], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_signatures_travel_with_export_and_an_offline_mirror_still_enforces(
        tmp_path: Path, blackhole: ClosedPort, signed: Signed,
        started: list[MirrorProcess]) -> None:
    online = policy_mirror(started, tmp_path / "online", blackhole, signed)
    images = [f"{blackhole.host}/{repo(n)}:v1" for n in ("signed", "unsigned")]
    assert (r := mirror_cli(online, "warm", *images)).returncode == 0, r.stderr
    archive = tmp_path / "images.tar"
    assert (r := mirror_cli(online, "export", "-o", str(archive), *images)).returncode == 0, r
    bare = tmp_path / "bare.tar"
    assert mirror_cli(online, "export", "--no-referrers", "-o", str(bare),
                      images[0]).returncode == 0

    closed = ClosedPort()
    try:
        offline = policy_mirror(started, tmp_path / "offline", blackhole, signed,
                                url=f"http://{closed.host}", cache_extra={"offline": True})
        assert (r := mirror_cli(offline, "import", str(archive))).returncode == 0, r.stderr
        conf = write_registries_conf(tmp_path / "r.conf", blackhole.host, [offline.host])
        pulled = skopeo_pull(conf, blackhole.host, "acme/signed", "v1", tmp_path / "out")
        assert pulled.manifest == signed.images["signed"].manifest_bytes
        refused = pull(conf, blackhole.host, "unsigned", tmp_path / "unsigned")
        assert refused.returncode != 0 and "no cosign signature" in refused.stderr
        # without the signatures, the signed image cannot be shown to be signed
        bare_mirror = policy_mirror(started, tmp_path / "bare", blackhole, signed,
                                    url=f"http://{closed.host}", cache_extra={"offline": True})
        assert mirror_cli(bare_mirror, "import", str(bare)).returncode == 0
        conf = write_registries_conf(tmp_path / "b.conf", blackhole.host, [bare_mirror.host])
        result = pull(conf, blackhole.host, "signed", tmp_path / "bare-out")
        assert result.returncode != 0 and "no cosign signature" in result.stderr
    finally:
        closed.close()
