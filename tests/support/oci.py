"""Build OCI images offline, in pure Python, and write them as an OCI image layout.

Layers are real (uncompressed) tar archives holding one file of random, incompressible
bytes, so containerd can unpack them and every byte of the blob is unpredictable.
Large layers are streamed to disk, never held in memory.

    img = build_image(layout_dir / "blobs", [1 << 20, 10 << 20], arch="amd64")
    layout = OCILayout(layout_dir)
    layout.add(img, tag="v1")
    layout.write_index()
    # skopeo copy --all --preserve-digests oci:<layout_dir>:v1 docker://127.0.0.1:PORT/repo:v1
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob stored as a file (under an OCI layout's blobs dir)."""

    digest: str
    size: int
    media_type: str
    path: Path

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def descriptor(self, **extra: object) -> dict[str, object]:
        d: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        d.update(extra)
        return d

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest, config and layers, all as Blobs."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    manifest_bytes: bytes
    arch: str
    os: str = "linux"

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config and layers (what a client GETs under /blobs/)."""
        return (self.config, *self.layers)

    @property
    def all_blobs(self) -> tuple[Blob, ...]:
        """Manifest, config and layers."""
        return (self.manifest, *self.blobs)

    @property
    def size(self) -> int:
        return sum(b.size for b in self.all_blobs)


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform OCI image index over several Images."""

    index: Blob
    index_bytes: bytes
    images: tuple[Image, ...]

    @property
    def manifest(self) -> Blob:
        return self.index

    @property
    def manifest_bytes(self) -> bytes:
        return self.index_bytes

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Every config and layer of every platform."""
        out: list[Blob] = []
        for img in self.images:
            out.extend(img.blobs)
        return tuple(out)

    @property
    def all_blobs(self) -> tuple[Blob, ...]:
        out: list[Blob] = [self.index]
        for img in self.images:
            out.extend(img.all_blobs)
        return tuple(out)

    def image_for(self, arch: str) -> Image:
        for img in self.images:
            if img.arch == arch:
                return img
        raise KeyError(arch)


def _blob_path(blobs_dir: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return blobs_dir / algo / hexd


def write_blob(blobs_dir: Path, data: bytes, media_type: str) -> Blob:
    """Store bytes under blobs_dir/sha256/<hex> and return their Blob."""
    digest = sha256_digest(data)
    path = _blob_path(blobs_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return Blob(digest, len(data), media_type, path)


def _random_tar_chunks(size: int, name: str) -> Iterator[bytes]:
    """A tar archive of exactly `size` bytes of random file content (plus tar framing)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = "root"
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    left = size
    while left > 0:
        n = min(_CHUNK, left)
        yield os.urandom(n)
        left -= n
    pad = (-size) % tarfile.BLOCKSIZE
    # The file's padding, then the two zero blocks that end the archive.
    yield b"\0" * (pad + 2 * tarfile.BLOCKSIZE)


def write_random_layer(blobs_dir: Path, size: int, name: str = "random.bin") -> Blob:
    """Write an uncompressed tar layer holding `size` random bytes; streamed, not in memory."""
    tmp_dir = blobs_dir / "sha256"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".layer-{os.getpid()}-{os.urandom(6).hex()}.tmp"
    h = hashlib.sha256()
    total = 0
    with tmp.open("wb") as f:
        for chunk in _random_tar_chunks(size, name):
            h.update(chunk)
            f.write(chunk)
            total += len(chunk)
    digest = "sha256:" + h.hexdigest()
    path = _blob_path(blobs_dir, digest)
    tmp.replace(path)
    return Blob(digest, total, OCI_LAYER_TAR, path)


def write_random_gzip_layer(
    blobs_dir: Path, size: int, name: str = "random.bin"
) -> tuple[Blob, str]:
    """A gzip-compressed tar layer of `size` random bytes; returns it and its diff_id."""
    tmp_dir = blobs_dir / "sha256"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".layer-{os.getpid()}-{os.urandom(6).hex()}.tmp"
    h_tar = hashlib.sha256()
    h_gz = hashlib.sha256()
    total = 0
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    with tmp.open("wb") as f:

        def put(data: bytes) -> None:
            nonlocal total
            if data:
                h_gz.update(data)
                f.write(data)
                total += len(data)

        for chunk in _random_tar_chunks(size, name):
            h_tar.update(chunk)
            put(comp.compress(chunk))
        put(comp.flush())
    digest = "sha256:" + h_gz.hexdigest()
    path = _blob_path(blobs_dir, digest)
    tmp.replace(path)
    return Blob(digest, total, DOCKER_LAYER_GZIP, path), "sha256:" + h_tar.hexdigest()


def build_image(
    blobs_dir: Path,
    layer_sizes: Iterable[int],
    *,
    arch: str = "amd64",
    os_name: str = "linux",
    labels: dict[str, str] | None = None,
    docker: bool = False,
) -> Image:
    """An image whose layers hold the given numbers of random bytes: OCI (uncompressed tar
    layers) or, with docker=True, Docker schema 2 (gzip layers)."""
    diff_ids: list[str] = []
    layer_list: list[Blob] = []
    for i, size in enumerate(layer_sizes):
        name = f"layer{i}-{arch}.bin"
        if docker:
            blob, diff_id = write_random_gzip_layer(blobs_dir, size, name=name)
        else:
            blob = write_random_layer(blobs_dir, size, name=name)
            diff_id = blob.digest
        layer_list.append(blob)
        diff_ids.append(diff_id)
    return image_of(blobs_dir, layer_list, diff_ids, arch=arch, os_name=os_name, labels=labels,
                    docker=docker)


def image_of(
    blobs_dir: Path,
    layer_list: Iterable[Blob],
    diff_ids: Iterable[str] | None = None,
    *,
    arch: str = "amd64",
    os_name: str = "linux",
    labels: dict[str, str] | None = None,
    docker: bool = False,
) -> Image:
    """An image of layers written already (e.g. shared with another image: pass the same
    Blob); diff_ids default to the layers' digests (uncompressed tar layers)."""
    layers = tuple(layer_list)
    diff_ids = list(diff_ids) if diff_ids is not None else [b.digest for b in layers]
    config_obj = {
        "architecture": arch,
        "os": os_name,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": labels or {}, "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "tests"} for _ in layers],
    }
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config = write_blob(
        blobs_dir, canonical_json(config_obj), DOCKER_CONFIG if docker else OCI_CONFIG
    )
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    # Indented on purpose: a mirror that re-serializes the JSON changes the digest.
    manifest_bytes = json.dumps(manifest_obj, indent=3).encode() + b"\n"
    manifest = write_blob(blobs_dir, manifest_bytes, manifest_type)
    return Image(manifest, config, layers, manifest_bytes, arch, os_name)


def build_index(
    blobs_dir: Path, images: Iterable[Image], *, docker: bool = False
) -> ImageIndex:
    """An OCI image index (or, with docker=True, a Docker manifest list) over images."""
    images = tuple(images)
    index_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    index_obj = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            img.manifest.descriptor(platform={"architecture": img.arch, "os": img.os})
            for img in images
        ],
    }
    index_bytes = json.dumps(index_obj, indent=3).encode() + b"\n"
    index = write_blob(blobs_dir, index_bytes, index_type)
    return ImageIndex(index, index_bytes, images)


@dataclass
class OCILayout:
    """An OCI image layout directory (oci-layout, index.json, blobs/)."""

    root: Path
    entries: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    def add(self, artifact: Image | ImageIndex, tag: str) -> None:
        self.entries.append(artifact.manifest.descriptor(annotations={REF_NAME: tag}))

    def write_index(self) -> None:
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}
        (self.root / "index.json").write_text(json.dumps(index, indent=2))

    def ref(self, tag: str) -> str:
        """The skopeo transport reference for a tag in this layout."""
        return f"oci:{self.root}:{tag}"


@dataclass(frozen=True)
class ImageSet:
    """The session's test images. OCI ones in one OCI layout (tags "big", "multi", "small");
    the Docker schema 2 ones (pushed over HTTP, see clients.push_direct) are not in it."""

    layout: OCILayout
    big: Image
    multi: ImageIndex
    small: Image
    docker: Image
    docker_list: ImageIndex


def image_manifest_naming(*blobs: str) -> bytes:
    """A minimal OCI image manifest naming `blobs` (config first, then layers), sizes 1."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "x", "digest": blobs[0], "size": 1},
                       "layers": [{"mediaType": "y", "digest": b, "size": 1}
                                  for b in blobs[1:]]}).encode()
