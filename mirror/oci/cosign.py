"""cosign signatures (pure): where they are, what they say, and whether a key made them.

A signature of the image `sha256:<hex>` is a manifest (tag `sha256-<hex>.sig`, or a referrer
of artifact type SIGNATURE_ARTIFACT) whose layers are simple-signing payloads
(PAYLOAD_TYPE), each with its base64 signature in the SIGNATURE_ANNOTATION. A payload is JSON
naming the signed digest at critical.image.docker-manifest-digest, of critical.type
IMAGE_SIGNATURE_TYPE. The signature is over the payload's bytes: ECDSA (P-256 with SHA-256,
P-384 with SHA-256 or SHA-384) in DER, RSA PKCS#1 v1.5 with SHA-256, or Ed25519.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
IMAGE_SIGNATURE_TYPE = "cosign container image signature"  # critical.type, as cosign writes
MAX_PAYLOAD = 64 * 1024  # a simple-signing payload is a few hundred bytes

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class BadSignature(ValueError):
    """A signature manifest or payload that cannot be what cosign writes (the reason)."""


@dataclass(frozen=True)
class SignedLayer:
    payload: str  # the payload blob's digest
    size: int
    signature: bytes


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key cosign can verify with; ValueError says why not."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in (
            "secp256r1", "secp384r1"):
        raise ValueError(f"ECDSA on {key.curve.name}: expected P-256 or P-384")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey
                      | ed25519.Ed25519PublicKey):
        raise ValueError(f"a {type(key).__name__}: expected ECDSA, RSA or Ed25519")
    return key


def signed_layers(manifest: bytes) -> list[SignedLayer]:
    """The signed payloads a signature manifest names (BadSignature if it names none)."""
    try:
        doc = json.loads(manifest)
    except (ValueError, RecursionError):
        raise BadSignature("the signature manifest is not JSON") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise BadSignature("the signature manifest has no layers")
    found = []
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") != PAYLOAD_TYPE:
            continue
        notes = layer.get("annotations")
        encoded = notes.get(SIGNATURE_ANNOTATION) if isinstance(notes, dict) else None
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(encoded, str) or not isinstance(digest, str) \
                or not isinstance(size, int) or isinstance(size, bool):
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except ValueError:  # not base64, or not even ASCII
            continue
        found.append(SignedLayer(digest, size, signature))
    if not found:
        raise BadSignature("the signature manifest holds no signed simple-signing payload")
    return found


def payload_digest(payload: bytes) -> str:
    """The digest a simple-signing payload says was signed (BadSignature if none, or if it
    is not of cosign's image-signature type: a key may sign other JSON naming a digest)."""
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        named, kind = critical["image"]["docker-manifest-digest"], critical.get("type")
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise BadSignature("the signed payload is not a simple-signing document") from None
    if kind != IMAGE_SIGNATURE_TYPE:
        raise BadSignature(f"the signed payload is not a cosign container image signature "
                           f"(its critical.type is {_shown(kind)})")
    if not isinstance(named, str):
        raise BadSignature("the signed payload names no digest")
    return named


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        # cosign hashes with SHA-256 whatever the curve; other sigstore signers match the
        # hash to P-384
        hashers: list[hashes.HashAlgorithm] = [hashes.SHA256()]
        if key.curve.name == "secp384r1":
            hashers.append(hashes.SHA384())
        return any(_verifies_ec(key, signature, payload, h) for h in hashers)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def _verifies_ec(key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes,
                 hasher: hashes.HashAlgorithm) -> bool:
    try:
        key.verify(signature, payload, ec.ECDSA(hasher))
    except (InvalidSignature, ValueError):
        return False
    return True
