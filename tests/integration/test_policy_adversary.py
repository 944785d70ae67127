"""Attacks on the signature policy and the rules (issue 14) through the real upstream
(docker-registry) and the real mirror, with one worker and with two.

Someone who can push to the upstream tries: an unsigned image dressed as an attachment (its
filesystem layer typed application/octet-stream, which moby unpacks), a payload of another
kind naming the digest, a payload blob far bigger than its descriptor says (never
downloaded), a signature manifest of ~3.5 MiB, a `.sig` tag that is an index, several
signature layers of which one is valid (allowed, as cosign), a digest signed under one
policy asked through a repository of another policy (refused), an index's platform manifest
asked in another policy's repository (refused), a denied image's blobs by digest (refused),
HEAD as GET. Then: a cached "no signature" is revalidated after tag_ttl on every worker; the
signatures verify from cache with the upstream gone; a full disk during verification is a
denial or a registry error, never an "allowed" nor a traceback; a missing or malformed key
file is exit 2 and one line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import oci
from tests.support.clients import RawResponse, http_request, push_direct
from tests.support.disk import fill
from tests.support.mirror import REPO_ROOT, MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry, env_without_proxies
from tests.support.signing import (
    OCI_MANIFEST,
    PAYLOAD_TYPE,
    SIGNATURE_ANNOTATION,
    Key,
    make_key,
    payload_for,
    put_signature,
    sign,
)

pytestmark = pytest.mark.integration

ACCEPT = [("Accept", OCI_MANIFEST), ("Accept", "application/vnd.oci.image.index.v1+json")]


@dataclass
class World:
    registry: Registry
    url: str
    host: str  # the upstream's name in the mirror
    good: Key  # policy "acme" (acme/**)
    other: Key  # policy "other" (other/**)
    images: dict[str, oci.Image | oci.ImageIndex]
    big_payload: str  # the digest of the huge payload blob

    def digest(self, name: str) -> str:
        return self.images[name].manifest.digest


def _upload(c: httpx.Client, repo: str, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    r = c.post(f"/v2/{repo}/blobs/uploads/")
    location = r.headers["Location"]
    r = c.put(f"{location}{'&' if '?' in location else '?'}digest={digest}", content=data)
    assert r.status_code == 201, r.text
    return digest


def _put(c: httpx.Client, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
    r = c.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
              headers={"Content-Type": media_type})
    assert r.status_code == 201, (r.status_code, r.text)
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"


def _odd_layered(c: httpx.Client, repo: str, image: oci.Image) -> str:
    """`image` as an OCI manifest whose filesystem layers say application/octet-stream."""
    doc = json.loads(image.manifest_bytes)
    for layer in doc["layers"]:
        layer["mediaType"] = "application/octet-stream"
    return _put(c, repo, "v1", json.dumps(doc).encode(), OCI_MANIFEST)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, blackhole: ClosedPort) -> Iterator[World]:
    d = tmp_path_factory.mktemp("adversary")
    blobs = d / "blobs"
    images: dict[str, oci.Image | oci.ImageIndex] = {
        n: oci.build_image(blobs, (16 * 1024,), labels={"image": n})
        for n in ("signed", "odd", "kind", "big", "huge", "sigindex", "several", "late")}
    images["multi"] = oci.build_index(blobs, [
        oci.build_image(blobs, (8 * 1024,), arch=a, labels={"image": "multi"})
        for a in ("amd64", "arm64")])
    registry = Registry(d / "registry").start()
    good, other = make_key(d / "keys", "acme"), make_key(d / "keys", "other")
    host = blackhole.host
    try:
        for name, image in images.items():
            push_direct(registry.url, f"acme/{name}", "v1", image)
        for name in ("signed", "multi"):  # the same content where the other policy rules
            push_direct(registry.url, f"other/{name}", "v1", images[name])
            sign(registry.url, host, f"acme/{name}", images[name].manifest.digest, good)
        with httpx.Client(base_url=registry.url, timeout=60, trust_env=False) as c:
            odd = images["odd"]
            assert isinstance(odd, oci.Image)
            _odd_layered(c, "acme/odd", odd)  # its tag v1 now
            big = _attack_signatures(c, registry.url, host, images, good)
        yield World(registry, registry.url, host, good, other, images, big)
    finally:
        registry.stop()


def _attack_signatures(c: httpx.Client, url: str, host: str,
                       images: dict[str, oci.Image | oci.ImageIndex], good: Key) -> str:
    def signed_layer(payload: bytes, key: Key = good, size: int | None = None,
                     **notes: str) -> dict[str, Any]:
        signature = base64.b64encode(key.sign(payload)).decode()
        return {"mediaType": PAYLOAD_TYPE, "digest": _upload(c, repo, payload),
                "size": len(payload) if size is None else size,
                "annotations": {SIGNATURE_ANNOTATION: signature, **notes}}

    def manifest(*layers: dict[str, Any]) -> bytes:
        config = _upload(c, repo, b"{}")
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config, "size": 2},
                           "layers": list(layers)}).encode()

    digest = {n: i.manifest.digest for n, i in images.items()}
    repo = "acme/kind"  # a payload naming the digest, of another critical.type
    odd_kind = json.loads(payload_for(digest["kind"], f"{host}/{repo}"))
    odd_kind["critical"]["type"] = "cosign sign-blob note"
    put_signature(url, repo, digest["kind"], manifest(signed_layer(
        json.dumps(odd_kind).encode())))
    repo = "acme/big"  # a payload blob of 2 MiB said to be 300 bytes
    huge = payload_for(digest["big"], f"{host}/{repo}") + b" " * (2 << 20)
    put_signature(url, repo, digest["big"], manifest(signed_layer(huge, size=300)))
    repo = "acme/huge"  # a signature manifest of ~3.5 MiB of annotations, none valid
    put_signature(url, repo, digest["huge"], manifest(*(
        signed_layer(payload_for(digest["signed"], "x"), padding="p" * (350 << 10))
        for _ in range(10))))
    repo = "acme/several"  # three bad signature layers, then a valid one
    valid = payload_for(digest["several"], f"{host}/{repo}")
    put_signature(url, repo, digest["several"], manifest(
        signed_layer(payload_for(digest["signed"], "x")),
        {**signed_layer(valid), "annotations": {SIGNATURE_ANNOTATION: "bm9wZQ=="}},
        signed_layer(b"{not json"), signed_layer(valid)))
    repo = "acme/sigindex"  # the .sig tag is an index (of the signed image's manifest)
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": []}).encode()
    _put(c, repo, digest["sigindex"].replace(":", "-") + ".sig", index,
         "application/vnd.oci.image.index.v1+json")
    return f"sha256:{hashlib.sha256(huge).hexdigest()}"


def mirror_for(world: World, workdir: Path, workers: int = 1, url: str | None = None,
               keys: tuple[Key, ...] = (), rules: dict[str, Any] | None = None,
               **kwargs: Any) -> MirrorProcess:
    m = MirrorProcess(workdir, [Upstream(name=world.host, url=url or world.url,
                                         extra=rules or {})],
                      server_extra={"workers": workers}, **kwargs)
    m.arrays["policy"] = [
        {"name": "acme", "match": [f"{world.host}/acme/**"],
         "keys": [str(k.public) for k in (world.good, *keys)]},
        {"name": "other", "match": [f"{world.host}/other/**"], "keys": [str(world.other.public)]},
    ]
    return m


def get(m: MirrorProcess, path: str, method: str = "GET") -> RawResponse:
    return http_request(m.host, method, f"/v2/{path}", ACCEPT)


def refusal(resp: RawResponse) -> str:
    assert resp.status == 403, (resp.status, resp.body[:300])
    error = json.loads(resp.body)["errors"][0] if resp.body else {"code": "DENIED",
                                                                  "message": ""}
    assert error["code"] == "DENIED"
    return str(error["message"])


ATTACKS = {  # repository under acme/ -> what the denial says
    "odd": "no cosign signature",
    "kind": "not a cosign container image signature",
    "big": f"bytes (at most {64 * 1024})",
    "huge": "a signed payload for another digest",
    "sigindex": "no cosign signature",  # not an image manifest: not a signature
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_attacker_pushed_images_and_signatures_are_refused_with_a_reason(
        tmp_path: Path, world: World, started: list[MirrorProcess], workers: int) -> None:
    m = mirror_for(world, tmp_path / "m", workers)
    started.append(m.start())
    for name, why in ATTACKS.items():
        for method in ("HEAD", "GET"):
            resp = get(m, f"acme/{name}/manifests/v1", method)
            if method == "GET":
                assert why in refusal(resp), name
            else:
                assert resp.status == 403, (name, resp.status)
        layer = world.images[name].blobs[-1].digest
        assert "references this blob" in refusal(get(m, f"acme/{name}/blobs/{layer}"))
    assert world.big_payload not in m.cached_digests()  # the 2 MiB payload never downloaded
    assert get(m, "acme/several/manifests/v1").status == 200  # one valid layer suffices
    signed = world.images["signed"]
    assert get(m, f"acme/signed/manifests/{signed.manifest.digest}").status == 200
    for blob in signed.blobs:
        assert get(m, f"acme/signed/blobs/{blob.digest}").status == 200
    # the same digests under the other policy, whose repositories hold no signature
    for name in ("signed", "multi"):
        assert "[[policy]] 'other'" in refusal(get(m, f"other/{name}/manifests/v1"))
    multi = world.images["multi"]
    assert isinstance(multi, oci.ImageIndex)
    assert get(m, "acme/multi/manifests/v1").status == 200
    child = multi.images[0].manifest.digest
    assert get(m, f"acme/multi/manifests/{child}").status == 200
    assert "no cosign signature" in refusal(get(m, f"other/multi/manifests/{child}"))
    assert "Traceback" not in m.stderr_text()


def allowed_everywhere(m: MirrorProcess, path: str, deadline: float) -> bool:
    """Whether GET `path` answers 200 ten times in a row (both workers) before `deadline`."""
    run = 0
    while time.monotonic() < deadline and run < 10:
        run = run + 1 if get(m, path).status == 200 else 0
        if run == 0:
            time.sleep(0.2)
    return run >= 10


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_other_spellings_reach_the_same_rule_and_policy(
        tmp_path: Path, world: World, started: list[MirrorProcess], workers: int) -> None:
    """Percent-escapes, `..`, `?ns=` and the registry in the path name one repository to the
    rules and the policies; a deny_digests manifest is refused by tag and by digest, but
    its layers (which other images may share) are not content the rule names."""
    signed = world.images["signed"]
    m = mirror_for(world, tmp_path / "m", workers, rules={"deny": ["acme/big*"]})
    m.sections["rules"] = {"deny_digests": [signed.manifest.digest]}
    started.append(m.start())
    host, quoted = world.host, world.host.replace(":", "%3A")
    denied_rule = ["/v2/acme/big/manifests/v1", "/v2/acme/%62ig/manifests/v1",
                   f"/v2/{host}/acme/big/manifests/v1", f"/v2/acme/big/manifests/v1?ns={quoted}",
                   f"/v2/acme/big/blobs/{world.images['big'].blobs[-1].digest}"]
    refused_policy = ["/v2/acme/odd/manifests/v1", "/v2/acme/%6Fdd/manifests/v1",
                      f"/v2/{host}/acme/odd/manifests/v1", f"/v2/acme/odd/manifests/v1?ns={host}",
                      f"/v2/acme/odd/blobs/{world.images['odd'].blobs[-1].digest}"]
    denied_digest = ["/v2/acme/signed/manifests/v1",
                     f"/v2/acme/signed/manifests/{signed.manifest.digest}",
                     f"/v2/other/signed/manifests/{signed.manifest.digest}"]
    for method in ("GET", "HEAD"):
        for target in denied_rule + refused_policy + denied_digest:
            resp = http_request(m.host, method, target, ACCEPT)
            assert resp.status == 403, (method, target, resp.status, resp.body[:200])
            if method == "GET":
                message = refusal(resp)
                why = ('deny "acme/big*"' if target in denied_rule else "[[policy]] 'acme'"
                       if target in refused_policy else "deny_digests")
                assert why in message, (target, message)
    for target in ("/v2/acme/x/../odd/manifests/v1", "/v2/acme//odd/manifests/v1",
                   "/v2/Acme/Odd/manifests/v1", "/v2/acme/odd%2F/manifests/v1"):
        assert http_request(m.host, "GET", target, ACCEPT).status in (400, 404), target
    # the layers of a denied manifest: served where a policy allows them (the same content
    # as another, signed image), as the operator denied that manifest, not these bytes
    several = world.images["several"]
    assert get(m, "acme/several/manifests/v1").status == 200
    assert get(m, f"acme/several/blobs/{several.blobs[-1].digest}").status == 200


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_what_warn_served_is_refused_once_the_policy_is_enforced(
        tmp_path: Path, world: World, started: list[MirrorProcess], workers: int) -> None:
    m = mirror_for(world, tmp_path / "m", workers)
    m.arrays["policy"][0]["mode"] = "warn"
    started.append(m.start())
    layer = world.images["odd"].blobs[-1].digest
    for _ in range(4):
        assert get(m, "acme/odd/manifests/v1").status == 200
        assert get(m, f"acme/odd/blobs/{layer}").status == 200
    m.arrays["policy"][0]["mode"] = "enforce"
    m.write_config()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    for path in ("acme/odd/manifests/v1", f"acme/odd/blobs/{layer}"):
        run = 0
        while run < 10:
            assert time.monotonic() < deadline, f"{path} still served after the reload"
            run = run + 1 if get(m, path).status == 403 else 0
            if run == 0:
                time.sleep(0.2)


@pytest.mark.timeout(180)
def test_no_signature_is_asked_again_after_tag_ttl_and_signatures_verify_from_cache(
        tmp_path: Path, world: World, started: list[MirrorProcess]) -> None:
    m = mirror_for(world, tmp_path / "m", 2, tag_ttl="2s")
    started.append(m.start())
    for _ in range(6):  # both workers now remember "no signature"
        assert "no cosign signature" in refusal(get(m, "acme/late/manifests/v1"))
    sign(world.url, world.host, "acme/late", world.digest("late"), world.good)
    assert allowed_everywhere(m, "acme/late/manifests/v1", time.monotonic() + 30)
    # A new key in the policy (a new fingerprint: every verdict taken again) with the
    # upstream gone: the signatures come from the cache.
    m.stop()
    closed = ClosedPort()
    try:
        again = mirror_for(world, tmp_path / "m", 2, url=f"http://{closed.host}",
                           keys=(world.other,), cache_extra={"offline": True})
        started.append(again.start())
        assert allowed_everywhere(again, "acme/late/manifests/v1", time.monotonic() + 20)
        assert again.metric("mirror_signature_lookups_total") >= 1
    finally:
        closed.close()


@pytest.mark.timeout(120)
def test_a_full_disk_during_verification_is_never_an_allowed_nor_a_traceback(
        tmp_path: Path, world: World, started: list[MirrorProcess], tiny_disk: Path) -> None:
    """The images are cached (by a mirror without the policy), their signatures are not:
    verifying on a full disk cannot store a signature or a payload."""
    names = ("signed", "odd", "big")
    plain = mirror_for(world, tmp_path / "plain", 1, cache_dir=tiny_disk / "cache")
    plain.arrays = {}
    started.append(plain.start())
    for name in names:
        assert get(plain, f"acme/{name}/manifests/v1").status == 200
    plain.stop()
    m = mirror_for(world, tmp_path / "m", 1, cache_dir=tiny_disk / "cache")
    started.append(m.start())
    fill(tiny_disk)
    for name in names:
        resp = get(m, f"acme/{name}/manifests/v1")
        assert resp.status == 403 or 500 <= resp.status < 600, (name, resp.status)
        assert json.loads(resp.body)["errors"][0]["code"], resp.body
    (tiny_disk / "filler").unlink()
    # room again: the signed image is allowed at once (no denial was remembered)
    assert get(m, "acme/signed/manifests/v1").status == 200
    assert "no cosign signature" in refusal(get(m, "acme/odd/manifests/v1"))
    assert "Traceback" not in m.stderr_text() + plain.stderr_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("problem", ["missing", "malformed", "pattern"])
def test_a_bad_key_file_or_pattern_stops_the_start_with_one_line(
        tmp_path: Path, world: World, problem: str) -> None:
    m = mirror_for(world, tmp_path / "m")
    bad = tmp_path / "bad.pub"
    if problem == "malformed":
        bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    if problem == "pattern":
        m.arrays["policy"][0]["match"] = [f"{world.host}/acme/[a-z]*"]
    else:
        m.arrays["policy"][1]["keys"] = [str(bad)]
    m.write_config()
    env = {**env_without_proxies(), "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config",
                        str(m.config_path)], capture_output=True, text=True, timeout=30,
                       env=env)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    key = "policy[0].match" if problem == "pattern" else "policy[1].keys"
    assert "mirror.toml" in lines[0] and key in lines[0], lines
    assert problem == "pattern" or str(bad) in lines[0]
