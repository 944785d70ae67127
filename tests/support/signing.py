"""cosign signatures for the fixtures, written as cosign writes them (its tag scheme).

Debian's skopeo cannot sign or verify sigstore signatures ("Debian-local change: sigstore
disabled"), and cosign is not packaged, so the fixtures sign with `cryptography` and push the
signature over the registry API: a simple-signing payload naming the image's digest, signed
with the key (ECDSA P-256 with SHA-256, as cosign does), as the one layer of an OCI manifest
at the tag `sha256-<hex>.sig`, with the base64 signature in the layer's
`dev.cosignproject.cosign/signature` annotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


@dataclass(frozen=True)
class Key:
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    public: Path  # PEM SubjectPublicKeyInfo: what a [[policy]] names

    def sign(self, payload: bytes) -> bytes:
        if isinstance(self.private, ec.EllipticCurvePrivateKey):
            return self.private.sign(payload, ec.ECDSA(hashes.SHA256()))
        return self.private.sign(payload)


def make_key(directory: Path, name: str, ed: bool = False) -> Key:
    directory.mkdir(parents=True, exist_ok=True)
    private = ed25519.Ed25519PrivateKey.generate() if ed else ec.generate_private_key(
        ec.SECP256R1())
    public = directory / f"{name}.pub"
    public.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Key(private, public)


def payload_for(digest: str, reference: str) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}).encode()


def _upload(c: httpx.Client, repo: str, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    r = c.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, (r.status_code, r.text)
    location = r.headers["Location"]
    sep = "&" if "?" in location else "?"
    r = c.put(f"{location}{sep}digest={digest}", content=data,
              headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, (r.status_code, r.text)
    return digest


def signature_manifest(c: httpx.Client, repo: str, payload: bytes, signature: bytes) -> bytes:
    """Upload the payload and a config; the manifest cosign writes around them."""
    payload_digest = _upload(c, repo, payload)
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [payload_digest]}}).encode()
    config_digest = _upload(c, repo, config)
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": PAYLOAD_TYPE, "size": len(payload), "digest": payload_digest,
                    "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}],
    }).encode()


def put_signature(registry_url: str, repo: str, subject: str, manifest: bytes) -> None:
    """Store `manifest` as the cosign signature of `subject` (tag sha256-<hex>.sig)."""
    tag = subject.replace(":", "-") + ".sig"
    with httpx.Client(base_url=registry_url, timeout=30, trust_env=False) as c:
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201, (r.status_code, r.text)


def sign(registry_url: str, host: str, repo: str, digest: str, key: Key,
         names: str | None = None, tamper: bool = False) -> None:
    """Sign `digest` in `repo` with `key`, as cosign would; `names`: the payload names that
    digest instead; `tamper`: the signature is altered after signing."""
    payload = payload_for(names or digest, f"{host}/{repo}")
    signature = key.sign(payload)
    if tamper:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    with httpx.Client(base_url=registry_url, timeout=30, trust_env=False) as c:
        manifest = signature_manifest(c, repo, payload, signature)
    put_signature(registry_url, repo, digest, manifest)
