"""The signature policy (pull/trust.py) against the counting fake source of
test_proxy_policy.py, with no HTTP: what is allowed, what is refused and why, what is looked
up and how often; and oci/cosign.py's parsing and verification with every key type."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from mirror.config import ConfigError, PolicyConfig, parse_config
from mirror.oci import cosign
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import digest_of
from mirror.pull.proxy import Manifest
from mirror.pull.trust import Trust
from tests.unit.test_proxy_policy import ACCEPT, OCI_MANIFEST, World, image_manifest, world

__all__ = ["world"]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def signature_of(key: PrivateKey, payload: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload)


def payload_naming(digest: str) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": "fake.test/app"},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"}}).encode()


def sig_manifest(payload_digest: str, size: int, signature: bytes) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": str(digest_of(b"{}")), "size": 2},
                       "layers": [{"mediaType": cosign.PAYLOAD_TYPE, "digest": payload_digest,
                                   "size": size, "annotations": {
                                       cosign.SIGNATURE_ANNOTATION:
                                           base64.b64encode(signature).decode()}}]}).encode()


def signed_image(w: World, key: PrivateKey, repo: str = "app", names: str | None = None,
                 layer: bytes = b"layer") -> Manifest:
    """An image (tag v1) with its layer, signed with `key` at sha256-<hex>.sig."""
    data = image_manifest(digest_of(layer))
    digest = w.source.add_manifest(repo, "v1", data)
    w.source.blobs[digest_of(layer)] = layer
    payload = payload_naming(names or str(digest))
    w.source.blobs[digest_of(payload)] = payload
    w.source.add_manifest(repo, f"sha256-{digest.hex}.sig", sig_manifest(
        str(digest_of(payload)), len(payload), signature_of(key, payload)))
    return Manifest(digest, OCI_MANIFEST, len(data), data, "miss")


def trust_with(w: World, *keys: PrivateKey, mode: str = "enforce") -> Trust:
    policy = PolicyConfig("acme", ("fake.test/**",), tuple(
        (f"key{i}.pub", pem(k)) for i, k in enumerate(keys)), mode=mode)
    return Trust([policy], ["fake.test"], w.proxy, w.index, tag_ttl=60)


KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("kind", KEYS)
async def test_a_signature_by_any_key_type_is_allowed_and_remembered(
        world: Any, kind: str) -> None:
    w = world()
    key = KEYS[kind]()
    m = signed_image(w, key)
    trust = trust_with(w, ec.generate_private_key(ec.SECP256R1()), key)  # any one suffices
    await trust.check_manifest(w.source, "app", m)
    asked = sum(w.source.calls.values())
    assert asked > 0
    await trust.check_manifest(w.source, "app", m)
    assert sum(w.source.calls.values()) == asked  # the verdict is kept
    trust.check_blob(w.source, "app", digest_of(b"layer"))  # covered by its manifest
    again = trust_with(w, key)  # another worker, or a restart: the index remembers
    await again.check_manifest(w.source, "app", m)
    assert sum(w.source.calls.values()) == asked


async def reason(trust: Trust, w: World, m: Manifest) -> str:
    with pytest.raises(RegistryError) as caught:
        await trust.check_manifest(w.source, "app", m)
    assert caught.value.code == ErrorCode.DENIED
    return caught.value.message


async def test_each_refusal_says_why(world: Any) -> None:
    w = world()
    good, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    trust = trust_with(w, good)
    assert "signature no key of the policy verifies" in await reason(
        trust, w, signed_image(w, other, "app", layer=b"a"))
    w2 = world(name="two")
    assert "for another digest (sha256:" in await reason(
        trust_with(w2, good), w2, signed_image(w2, good, names=str(digest_of(b"x"))))
    w3 = world(name="three")
    data = image_manifest(digest_of(b"unsigned"))
    digest = w3.source.add_manifest("app", "v1", data)
    message = await reason(trust_with(w3, good), w3,
                           Manifest(digest, OCI_MANIFEST, len(data), data, "miss"))
    assert "no cosign signature" in message and "[[policy]] 'acme'" in message
    assert f"fake.test/app@{digest}" in message


@pytest.mark.parametrize("signature,why", [
    (b"not json at all", "not JSON"),
    (json.dumps({"layers": "no"}).encode(), "no layers"),
    (json.dumps({"layers": [{"mediaType": "x"}]}).encode(), "no signed simple-signing"),
    (sig_manifest(str(digest_of(b"gone")), 10, b"sig"), "cannot be read"),
    (sig_manifest(str(digest_of(b"big")), cosign.MAX_PAYLOAD + 1, b"sig"), "bytes (at most"),
    (sig_manifest(str(digest_of(b"x")), 1, b"sig").replace(
        base64.b64encode(b"sig"), "\u00e9t\u00e9".encode()), "no signed simple-signing"),
])
async def test_a_malformed_signature_is_a_denial_with_a_reason_never_a_crash(
        world: Any, signature: bytes, why: str) -> None:
    w = world()
    data = image_manifest(digest_of(b"layer"))
    digest = w.source.add_manifest("app", "v1", data)
    w.source.add_manifest("app", f"sha256-{digest.hex}.sig", signature)
    m = Manifest(digest, OCI_MANIFEST, len(data), data, "miss")
    assert why in await reason(trust_with(w, ec.generate_private_key(ec.SECP256R1())), w, m)
    assert w.source.calls["get_manifest"] <= 1  # a malformed manifest is not cached
    assert "open_blob" not in w.source.calls or why == "cannot be read"


async def test_a_denial_is_kept_for_tag_ttl_but_a_failed_lookup_is_not(world: Any) -> None:
    w = world()
    data = image_manifest(digest_of(b"layer"))
    digest = w.source.add_manifest("app", "v1", data)
    m = Manifest(digest, OCI_MANIFEST, len(data), data, "miss")
    trust = trust_with(w, ec.generate_private_key(ec.SECP256R1()))
    await reason(trust, w, m)
    asked = sum(w.source.calls.values())
    await reason(trust, w, m)
    assert sum(w.source.calls.values()) == asked  # not asked again within tag_ttl
    w2 = world(name="down")
    w2.source.add_manifest("app", "v1", data)
    w2.source.down = True
    trust2 = trust_with(w2, ec.generate_private_key(ec.SECP256R1()))
    assert "could not be looked up" in await reason(trust2, w2, m)
    w2.source.down = False
    assert "no cosign signature" in await reason(trust2, w2, m)  # asked again


async def test_an_index_signed_at_the_top_covers_its_platforms_and_their_blobs(
        world: Any) -> None:
    w = world()
    key = ec.generate_private_key(ec.SECP256R1())
    child = image_manifest(digest_of(b"child layer"))
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(digest_of(child)),
                                       "size": len(child)}]}).encode()
    digest = w.source.add_manifest("app", "v1", index)
    payload = payload_naming(str(digest))
    w.source.blobs[digest_of(payload)] = payload
    w.source.add_manifest("app", f"sha256-{digest.hex}.sig", sig_manifest(
        str(digest_of(payload)), len(payload), signature_of(key, payload)))
    trust = trust_with(w, key)
    await trust.check_manifest(w.source, "app", Manifest(
        digest, "application/vnd.oci.image.index.v1+json", len(index), index, "miss"))
    asked = sum(w.source.calls.values())
    await trust.check_manifest(w.source, "app", Manifest(
        digest_of(child), OCI_MANIFEST, len(child), child, "miss"))
    trust.check_blob(w.source, "app", digest_of(b"child layer"))
    assert sum(w.source.calls.values()) == asked  # no signature of their own needed


async def test_attached_artifacts_are_served_and_unmatched_names_are_free(world: Any) -> None:
    """An SBOM (no filesystem layer: nothing a runtime could run) is not an image."""
    w = world()
    trust = trust_with(w, ec.generate_private_key(ec.SECP256R1()))
    sbom = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [
        {"mediaType": "application/spdx+json", "digest": str(digest_of(b"s")), "size": 1}]}
    ).encode()
    await trust.check_manifest(w.source, "app", Manifest(
        digest_of(sbom), OCI_MANIFEST, len(sbom), sbom, "miss"))
    trust.check_blob(w.source, "app", digest_of(b"s"))  # the SBOM's own blob
    assert trust.policy_for("other.test", "app") is None
    with pytest.raises(RegistryError) as caught:  # a layer no allowed manifest references
        trust.check_blob(w.source, "app", digest_of(b"loose"))
    assert caught.value.code == ErrorCode.DENIED and "references this blob" in caught.value.message
    assert sum(w.source.calls.values()) == 0


async def test_warn_mode_serves(world: Any) -> None:
    w = world()
    data = image_manifest(digest_of(b"layer"))
    digest = w.source.add_manifest("app", "v1", data)
    trust = trust_with(w, ec.generate_private_key(ec.SECP256R1()), mode="warn")
    await trust.check_manifest(w.source, "app", Manifest(
        digest, OCI_MANIFEST, len(data), data, "miss"))
    trust.check_blob(w.source, "app", digest_of(b"any"))


# configuration ------------------------------------------------------------------------------
def config_with(tmp_path: Path, **policy: Any) -> None:
    parse_config({"upstream": [{"name": "docker.io", "url": "https://registry-1.docker.io"}],
                  "policy": [{"match": ["docker.io/library/*"], **policy}]},
                 path="m.toml", base=tmp_path)


@pytest.mark.parametrize("policy,key,problem", [
    ({"keys": ["/nonexistent.pub"]}, "policy[0].keys", "/nonexistent.pub: No such file"),
    ({"keys": ["KEYFILE"], "match": ["docker.io/Library/*"]}, "policy[0].match", "lowercase"),
    ({"keys": ["KEYFILE"], "match": ["quay.io/x/*"]}, "policy[0].match", "configured [[upst"),
    ({"keys": ["KEYFILE"], "match": ["docker.io"]}, "policy[0].match", "<upstream>/<repo"),
    ({"keys": ["KEYFILE"], "mode": "audit"}, "policy[0].mode", "expected enforce or warn"),
    ({"keys": ["KEYFILE"], "require": "notation"}, "policy[0].require", "expected cosign"),
    ({"keys": ["BADKEY"]}, "policy[0].keys", "not a PEM public key"),
    ({"keys": []}, "policy[0].keys", "expected a list of PEM"),
])
def test_a_bad_policy_names_the_file_key_and_problem(
        tmp_path: Path, policy: dict[str, Any], key: str, problem: str) -> None:
    good, bad = tmp_path / "k.pub", tmp_path / "bad.pub"
    good.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n")
    policy["keys"] = [str(good) if k == "KEYFILE" else str(bad) if k == "BADKEY" else k
                      for k in policy["keys"]]
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, **policy)
    assert str(caught.value).startswith(f"m.toml: {key}: ") and problem in str(caught.value)


def test_a_key_on_another_curve_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="expected P-256 or P-384"):
        cosign.load_public_key(pem(ec.generate_private_key(ec.SECP521R1())))


async def test_every_manifest_request_is_checked_after_the_proxy(world: Any) -> None:
    """The proxy answers the manifest; only then the trust decides (an unsigned HEAD too)."""
    w = world()
    w.source.add_manifest("app", "v1", image_manifest(digest_of(b"layer")))
    m = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=True)
    await reason(trust_with(w, ec.generate_private_key(ec.SECP256R1())), w, m)


async def test_a_refused_image_is_not_prefetched_an_allowed_one_is(world: Any) -> None:
    """The proxy holds back the prefetch of a policed name until the trust allows it."""
    w = world(prefetch=True)
    key = ec.generate_private_key(ec.SECP256R1())
    trust = trust_with(w, key)
    w.proxy.prefetch_held = trust.holds
    unsigned = image_manifest(digest_of(b"unsigned layer"))
    w.source.blobs[digest_of(b"unsigned layer")] = b"unsigned layer"
    w.source.add_manifest("app", "bad", unsigned)
    m = await w.proxy.manifest(w.source, "app", "bad", ACCEPT, head=False)
    await reason(trust, w, m)
    assert w.source.calls["open_blob"] == 0 and not w.proxy.downloads.in_flight()
    signed_image(w, key)
    m = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    await trust.check_manifest(w.source, "app", m)
    started = {f.digest for f in w.proxy.downloads.in_flight()} | {
        d for d, _, _ in w.store.iter_stored()}
    assert digest_of(b"layer") in started
