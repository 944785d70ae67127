"""Attacks on the signature policy (pull/trust.py) with no HTTP, against the counting fake
source of test_proxy_policy.py: what an attacker who can push to the upstream tries (images
dressed as attachments, payloads of another kind or size, several signatures, verdicts
borrowed from another policy), and transient failures that must not become remembered
verdicts. The same attacks through the real registry: tests/integration/test_policy_adversary.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mirror.config import PolicyConfig
from mirror.oci import cosign
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.pull.proxy import Manifest
from mirror.pull.trust import Trust
from tests.unit.test_proxy_policy import OCI_MANIFEST, World, image_manifest, world
from tests.unit.test_trust import (
    pem,
    reason,
    sig_manifest,
    signature_of,
    signed_image,
    trust_with,
)

__all__ = ["world"]


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def unsigned(w: World, layer_type: str | None, repo: str = "app") -> Manifest:
    layer: dict[str, Any] = {"digest": str(digest_of(b"rootfs")), "size": 6}
    if layer_type is not None:
        layer["mediaType"] = layer_type
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": str(digest_of(b"{}")), "size": 2},
                       "layers": [layer]}).encode()
    digest = w.source.add_manifest(repo, "v1", data)
    return Manifest(digest, OCI_MANIFEST, len(data), data, "miss")


@pytest.mark.parametrize("layer_type", [
    "application/octet-stream",  # moby pulls and unpacks these (its supportedMediaTypes)
    "application/json",
    "",
    None,  # no mediaType at all
    "APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR+GZIP",  # moby lowercases
    "application/vnd.docker.container.image.rootfs.diff+x-gtar",  # pre-schema2 docker
    "application/vnd.oci.image.config.v1+json",
])
async def test_a_layer_a_runtime_unpacks_under_an_odd_media_type_makes_it_an_image(
        world: Any, layer_type: str | None) -> None:
    """An unsigned image is not waved through as a signature/SBOM because its filesystem
    layer carries a media type the mirror did not list but a container runtime accepts."""
    w = world()
    message = await reason(trust_with(w, p256()), w, unsigned(w, layer_type))
    assert "no cosign signature" in message


@pytest.mark.parametrize("layer_type", [
    cosign.PAYLOAD_TYPE, "application/vnd.dsse.envelope.v1+json", "text/spdx",
    "application/vnd.cyclonedx+json", "application/spdx+json"])
async def test_real_attachments_stay_attachments(world: Any, layer_type: str) -> None:
    w = world()
    m = unsigned(w, layer_type)
    await trust_with(w, p256()).check_manifest(w.source, "app", m)


async def test_a_payload_of_another_kind_naming_the_digest_is_refused(world: Any) -> None:
    """A key that also signs other JSON (cosign sign-blob, in-toto) must not make any JSON
    naming the digest an image signature: containers/image requires the type too."""
    w = world()
    key = p256()
    data = image_manifest(digest_of(b"layer"))
    digest = w.source.add_manifest("app", "v1", data)
    for kind in ("cosign sign-blob note", None):
        critical: dict[str, Any] = {"identity": {"docker-reference": "x"},
                                    "image": {"docker-manifest-digest": str(digest)}}
        if kind is not None:
            critical["type"] = kind
        payload = json.dumps({"critical": critical}).encode()
        w.source.blobs[digest_of(payload)] = payload
        w.source.add_manifest("app", f"sha256-{digest.hex}.sig", sig_manifest(
            str(digest_of(payload)), len(payload), signature_of(key, payload)))
        image = image_with_layer(w, digest, data)
        trust = trust_with(w, key)
        assert "not a cosign container image signature" in await reason(trust, w, image)


def image_with_layer(w: World, digest: Digest, data: bytes) -> Manifest:
    return Manifest(digest, OCI_MANIFEST, len(data), data, "miss")


async def test_a_payload_blob_bigger_than_it_says_is_never_downloaded(world: Any) -> None:
    w = world()
    key = p256()
    m = signed_image(w, key)
    sig_tag = ("app", f"sha256-{m.digest.hex}.sig")
    huge = b'{"critical": {}}' + b" " * (8 << 20)
    w.source.blobs[digest_of(huge)] = huge
    w.source.add_manifest(*sig_tag, sig_manifest(str(digest_of(huge)), 100, b"sig"))
    message = await reason(trust_with(w, key), w, m)
    assert f"{len(huge)} bytes (at most" in message
    assert "open_blob" not in w.source.calls
    assert not w.store.has(digest_of(huge))


async def test_one_valid_signature_among_bad_ones_suffices(world: Any) -> None:
    w = world()
    key, other = p256(), p256()
    m = signed_image(w, key)
    good = json.loads(w.source.manifests[("app", f"sha256-{m.digest.hex}.sig")][0])
    bad = json.loads(sig_manifest(good["layers"][0]["digest"], good["layers"][0]["size"],
                                  signature_of(other, b"whatever")))
    doc = {**good, "layers": [*bad["layers"] * 3, *good["layers"]]}
    w.source.add_manifest("app", f"sha256-{m.digest.hex}.sig", json.dumps(doc).encode())
    await trust_with(w, key).check_manifest(w.source, "app", m)


async def test_a_verdict_under_one_policy_is_not_another_policys(world: Any) -> None:
    """The same digest in two repositories under two policies: a signature valid for A's
    policy in A does not let it through B's (B's repository holds no signature)."""
    w = world()
    key_a, key_b = p256(), p256()
    m = signed_image(w, key_a, repo="a/app")
    w.source.add_manifest("b/app", "v1", m.data or b"")
    trust = Trust([PolicyConfig("A", ("fake.test/a/**",), (("a.pub", pem(key_a)),)),
                   PolicyConfig("B", ("fake.test/b/**",), (("b.pub", pem(key_b)),))],
                  ["fake.test"], w.proxy, w.index, tag_ttl=60)
    await trust.check_manifest(w.source, "a/app", m)
    trust.check_blob(w.source, "a/app", digest_of(b"layer"))
    with pytest.raises(RegistryError) as caught:
        await trust.check_manifest(w.source, "b/app", m)
    assert "[[policy]] 'B'" in caught.value.message and "no cosign signature" in \
        caught.value.message
    with pytest.raises(RegistryError):
        trust.check_blob(w.source, "b/app", digest_of(b"layer"))


async def test_a_payload_that_could_not_be_read_is_not_a_remembered_denial(
        world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream failing (or the disk filling) while the payload is read is asked again
    at the next request, not denied for tag_ttl."""
    w = world()
    key = p256()
    m = signed_image(w, key)
    real = w.source.open_blob

    async def failing(repository: str, digest: Digest, offset: int) -> Any:
        raise UpstreamError(ErrorCode.UPSTREAM_UNREACHABLE, "the upstream went away")

    monkeypatch.setattr(w.source, "open_blob", failing)
    trust = trust_with(w, key)
    assert "cannot be read" in await reason(trust, w, m)
    monkeypatch.setattr(w.source, "open_blob", real)
    await trust.check_manifest(w.source, "app", m)  # allowed now


async def test_a_signature_manifest_bigger_than_registries_take_is_not_parsed(
        world: Any) -> None:
    """distribution refuses a manifest over 4 MiB; one from another upstream is a denial
    with its size, not parsed."""
    w = world()
    key = p256()
    m = signed_image(w, key)
    tag = ("app", f"sha256-{m.digest.hex}.sig")
    doc = json.loads(w.source.manifests[tag][0])
    doc["annotations"] = {"padding": "p" * (5 << 20)}
    w.source.add_manifest(*tag, json.dumps(doc).encode())
    assert "bytes (at most 4194304" in await reason(trust_with(w, key), w, m)


async def test_a_payload_whose_bytes_are_not_its_digest_is_a_denial(world: Any) -> None:
    """The upstream serves other bytes under the payload's digest (a tampered store): the
    download's digest check refuses them, the image is denied and nothing is kept."""
    w = world()
    key = p256()
    m = signed_image(w, key)
    doc = json.loads(w.source.manifests[("app", f"sha256-{m.digest.hex}.sig")][0])
    payload = parse_digest(doc["layers"][0]["digest"])
    w.source.blobs[payload] = w.source.blobs[payload].replace(b"cosign", b"COSIGN")
    assert "cannot be read" in await reason(trust_with(w, key), w, m)
    assert not w.store.has(payload)
