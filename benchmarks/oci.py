"""Minimal OCI content: generate blobs on disk and push blobs and manifests to a
registry through the distribution HTTP API."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Blob:
    path: Path
    digest: str
    size: int
    media_type: str = OCI_LAYER
    crc32: int = 0

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Image:
    repo: str
    tag: str
    config: Blob
    layers: list[Blob]
    manifest: bytes = b""
    digest: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def size(self) -> int:
        """Bytes a pull transfers: manifest, config and layers."""
        return len(self.manifest) + sum(b.size for b in self.blobs)


def make_blob(path: Path, size: int, media_type: str = OCI_LAYER) -> Blob:
    """Write ``size`` incompressible bytes: a random 1 MiB block repeated (the repeat
    distance is beyond any compressor's window), with a random prefix making it unique."""
    block = os.urandom(MiB)
    h = hashlib.sha256()
    crc = 0
    with open(path, "wb") as f:
        head = os.urandom(min(64, size))
        f.write(head)
        h.update(head)
        crc = zlib.crc32(head, crc)
        left = size - len(head)
        while left > 0:
            chunk = block if left >= MiB else block[:left]
            f.write(chunk)
            h.update(chunk)
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return Blob(path, "sha256:" + h.hexdigest(), size, media_type, crc)


def make_bytes_blob(path: Path, data: bytes, media_type: str) -> Blob:
    path.write_bytes(data)
    return Blob(path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), media_type,
                zlib.crc32(data))


def make_image(workdir: Path, repo: str, tag: str, layer_sizes: list[int]) -> Image:
    workdir.mkdir(parents=True, exist_ok=True)
    safe = repo.replace("/", "_")
    layers = [
        make_blob(workdir / f"{safe}-layer{i}", size) for i, size in enumerate(layer_sizes)
    ]
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
    }
    config = make_bytes_blob(
        workdir / f"{safe}-config", json.dumps(config_doc).encode(), OCI_CONFIG
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [b.descriptor() for b in layers],
        },
        indent=2,
    ).encode()
    return Image(
        repo, tag, config, layers, manifest, "sha256:" + hashlib.sha256(manifest).hexdigest()
    )


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            yield chunk


def push_blob(client: httpx.Client, base: str, repo: str, blob: Blob) -> None:
    head = client.head(f"{base}/v2/{repo}/blobs/{blob.digest}")
    if head.status_code == 200:
        return
    start = client.post(f"{base}/v2/{repo}/blobs/uploads/")
    if start.status_code != 202:
        raise RuntimeError(f"upload start: {start.status_code} {start.text}")
    location = httpx.URL(base).join(start.headers["Location"])
    done = client.put(
        location.copy_merge_params({"digest": blob.digest}),
        content=_file_chunks(blob.path),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
    )
    if done.status_code != 201:
        raise RuntimeError(f"upload {blob.digest}: {done.status_code} {done.text}")


def push_image(base: str, image: Image, extra_blobs: list[Blob] | None = None) -> None:
    with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
        for blob in image.blobs + (extra_blobs or []):
            push_blob(client, base, image.repo, blob)
        if image.layers:
            resp = client.put(
                f"{base}/v2/{image.repo}/manifests/{image.tag}",
                content=image.manifest,
                headers={"Content-Type": OCI_MANIFEST},
            )
            if resp.status_code != 201:
                raise RuntimeError(f"manifest push: {resp.status_code} {resp.text}")


def push_blobs(base: str, repo: str, blobs: list[Blob]) -> None:
    with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
        for blob in blobs:
            push_blob(client, base, repo, blob)


def storage_path(root: Path, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob's bytes."""
    algo, hexd = digest.split(":", 1)
    return root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"
