"""`mirror export` / `mirror import`: move cached images to a site with no network as an OCI
image layout in a tar archive.

The archive's index.json lists each image with the standard `org.opencontainers.image.ref.name`
annotation (the tag) and `io.github.registry-mirror.ref` (the full reference, e.g.
`docker.io/library/nginx:1.27`), which import uses to restore the tag in the mirror's index.
Import verifies every file against its digest before it enters the store.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mirror.cache.eviction import image_digests
from mirror.cache.index import Index
from mirror.cache.store import BlobStore, DigestMismatch
from mirror.oci import mediatypes as mt
from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.referrers import fallback_tags
from mirror.oci.routing import ImageRef, parse_image

REF_ANNOTATION = "io.github.registry-mirror.ref"
OCI_REF_NAME = "org.opencontainers.image.ref.name"
# On a signature, attestation or SBOM (found by tag) and on a referrers index: the image
# digest it is attached to; a referrers index is restored as the referrers API's answer.
ATTACHED_ANNOTATION = "io.github.registry-mirror.attached-to"
REFERRERS_ANNOTATION = "io.github.registry-mirror.referrers-of"


class ArchiveError(ValueError):
    """A bad archive or an image not in the cache (the CLI prints it as one line)."""


@dataclass(frozen=True)
class Resolved:
    ref: ImageRef
    digest: Digest
    media_type: str
    size: int
    attached_to: Digest | None = None  # a signature, attestation or SBOM of that image
    referrers_of: bool = False  # the referrers API's answer for `attached_to`

    def annotations(self) -> dict[str, str]:
        found = {REF_ANNOTATION: str(self.ref)}
        if isinstance(self.ref.reference, str):
            found[OCI_REF_NAME] = self.ref.reference
        if self.attached_to is not None:
            key = REFERRERS_ANNOTATION if self.referrers_of else ATTACHED_ANNOTATION
            found[key] = str(self.attached_to)
        return found


def resolve_cached(store: BlobStore, index: Index, ref: ImageRef) -> Resolved:
    if isinstance(ref.reference, Digest):
        digest = ref.reference
    else:
        entry = index.get_tag(ref.upstream, ref.repository, ref.reference)
        if entry is None:
            raise ArchiveError(f"{ref} is not in the cache: pull or `mirror warm` it first")
        digest = parse_digest(entry.digest)
    data = store.read_bytes(digest)
    if data is None:
        raise ArchiveError(f"{ref}: manifest {digest} is not in the cache")
    return Resolved(ref, digest, index.media_type(digest, data), len(data))


def attached(store: BlobStore, index: Index, image: Resolved) -> list[Resolved]:
    """The cached signatures, attestations and SBOMs of an image (and of each platform's
    manifest in it): its tag-schema tags, and its referrers index."""
    data = store.read_bytes(image.digest) or b""
    subjects = [image.digest, *_child_digests(data)]
    up, repo = image.ref.upstream, image.ref.repository
    found = []
    for subject in subjects:
        for tag in fallback_tags(subject):
            entry = index.get_tag(up, repo, tag)
            if entry is not None and (size := store.size(parse_digest(entry.digest))):
                found.append(Resolved(ImageRef(up, repo, tag), parse_digest(entry.digest),
                                      entry.media_type, size, subject))
        kept = index.get_referrers(up, repo, subject, "")
        if kept is not None and (size := store.size(parse_digest(kept[0].digest))):
            digest = parse_digest(kept[0].digest)
            found.append(Resolved(ImageRef(up, repo, digest), digest, kept[0].media_type,
                                  size, subject, referrers_of=True))
    return found


def _child_digests(data: bytes) -> list[Digest]:
    children = []
    for child in mt.child_manifests(data):
        with contextlib.suppress(RegistryError):
            children.append(parse_digest(str(child["digest"])))
    return children


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def missing_blobs(store: BlobStore, index: Index, upstreams: list[str],
                  images: Sequence[str], referrers: bool = True) -> set[Digest]:
    """What the images reference that the local dir lacks (with [s3], fetched from the
    bucket before `export`)."""
    digests: set[Digest] = set()
    for image in _with_attached(store, index, upstreams, images, referrers):
        digests |= image_digests(store, image.digest)
    return {d for d in digests if store.size(d) is None}


def _with_attached(store: BlobStore, index: Index, upstreams: list[str],
                   images: Sequence[str], referrers: bool) -> list[Resolved]:
    resolved = [resolve_cached(store, index, parse_image(i, upstreams)) for i in images]
    if referrers:
        resolved += [a for r in list(resolved) for a in attached(store, index, r)]
    return resolved


def export(store: BlobStore, index: Index, upstreams: list[str], images: Sequence[str],
           output: Path, referrers: bool = True) -> int:
    """Write the archive (with `referrers`, what is attached to the images too); returns the
    number of blobs in it."""
    resolved = _with_attached(store, index, upstreams, images, referrers)
    digests: set[Digest] = set()
    for r in resolved:
        digests |= image_digests(store, r.digest)
    present = [d for d in sorted(digests, key=str) if store.size(d) is not None]
    manifests = [{"mediaType": r.media_type, "digest": str(r.digest), "size": r.size,
                  "annotations": r.annotations()} for r in resolved]
    tmp = output.with_name(output.name + ".tmp")
    total = sum(store.size(d) or 0 for d in present)
    with tarfile.open(tmp, "w") as tar, tqdm(total=total, unit="B", unit_scale=True,
                                             desc="exporting",
                                             disable=not sys.stderr.isatty()) as bar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", json.dumps(
            {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}).encode())
        for d in present:
            tar.add(store.path(d), arcname=f"blobs/{d.algorithm}/{d.hex}", recursive=False)
            bar.update(store.size(d) or 0)
    tmp.replace(output)
    return len(present)


def _media_types(store: BlobStore, index: Index, descriptor: dict[str, object],
                 owner: tuple[str, str] | None) -> None:
    """Record the media type of a manifest and, for an index, of its children; and that the
    image's (upstream, repository) holds all of it, so private content stays servable
    offline under the name it was exported with (and under no other)."""
    digest = parse_digest(str(descriptor["digest"]))
    media_type = descriptor.get("mediaType")
    data = store.read_bytes(digest)
    if data is None:
        return
    index.set_media_type(digest, media_type if isinstance(media_type, str)
                         else mt.sniff_media_type(data))
    index.add_entry(digest, len(data), "manifest")
    if owner is not None:
        index.hold(*owner, digest)
        for held in [str(digest), *mt.referenced_blobs(data)[0]]:
            with contextlib.suppress(RegistryError):
                index.remember_access(*owner, parse_digest(held))
    for child in mt.child_manifests(data):
        _media_types(store, index, child, owner)


def import_archive(store: BlobStore, index: Index, upstreams: list[str], archive: Path,
                   referrers: bool = True) -> tuple[int, list[str]]:
    """Import every verified file and restore the tags (with `referrers`, those of what is
    attached to the images and their referrers answers too); returns (files, images)."""
    files = 0
    try:
        tar = tarfile.open(archive, "r")  # noqa: SIM115 (closed by `with tar` below)
    except tarfile.TarError:
        raise ArchiveError(f"{archive} is not a tar archive (write one with `mirror export`)"
                           ) from None
    with tar:
        members = tar.getmembers()
        names = {m.name.removeprefix("./"): m for m in members}
        if "oci-layout" not in names or "index.json" not in names:
            raise ArchiveError(f"{archive} is not an OCI image layout archive")
        blobs = [m for m in members if m.isfile() and m.name.removeprefix("./").startswith(
            "blobs/")]
        with tqdm(total=sum(m.size for m in blobs), unit="B", unit_scale=True,
                  desc="importing", disable=not sys.stderr.isatty()) as bar:
            for member in blobs:
                _, algorithm, encoded = member.name.removeprefix("./").split("/", 2)
                try:
                    digest = parse_digest(f"{algorithm}:{encoded}")
                except RegistryError as exc:
                    raise ArchiveError(f"{member.name}: {exc.message}") from None
                f = tar.extractfile(member)
                assert f is not None
                try:
                    store.put_stream(digest, f.read)
                except DigestMismatch as exc:
                    raise ArchiveError(f"{member.name}: {exc}; nothing more imported") from None
                files += 1
                bar.update(member.size)
        top = tar.extractfile(names["index.json"])
        assert top is not None
        descriptors = mt.child_manifests(top.read())
    refs = []
    for descriptor in descriptors:
        annotations = descriptor.get("annotations")
        notes = annotations if isinstance(annotations, dict) else {}
        ref_name = notes.get(REF_ANNOTATION)
        if not isinstance(ref_name, str):
            _media_types(store, index, descriptor, None)
            continue
        subject = notes.get(ATTACHED_ANNOTATION) or notes.get(REFERRERS_ANNOTATION)
        if subject is not None and not referrers:
            continue
        ref = parse_image(ref_name, upstreams)
        _media_types(store, index, descriptor, (ref.upstream, ref.repository))
        digest = parse_digest(str(descriptor["digest"]))
        media_type = str(descriptor.get("mediaType", ""))
        if isinstance(ref.reference, str):
            index.set_tag(ref.upstream, ref.repository, ref.reference, digest, media_type)
        if REFERRERS_ANNOTATION in notes:
            index.set_referrers(ref.upstream, ref.repository, parse_digest(str(subject)), "",
                                digest, media_type or mt.OCI_INDEX, "")
        if subject is None:
            refs.append(str(ref))
    return files, refs
