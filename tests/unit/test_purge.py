"""`mirror purge`'s selection (cache/purge.py) with a real BlobStore and Index in tmp_path, no
HTTP: what goes (the image's manifests, an index's platforms, its tags, what is attached to it,
blobs nothing else uses) and what stays (blobs and manifests other cached images use, in any
repository or upstream, pins, downloads in flight), and that the index's totals stay exact."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.cache.index import Index
from mirror.cache.locks import try_lock
from mirror.cache.purge import NotCached, Pinned, Plan, Target, execute, plan_purge
from mirror.cache.store import BlobStore
from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, digest_of
from mirror.oci.routing import parse_target

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UP = "registry.test"
OTHER = "other.test"
UPSTREAMS = [UP, OTHER]


class Cache:
    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root)
        self.index = Index(self.store.index_dir)
        self.store.on_commit = self.index.add_entry

    def blob(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.store.put_stream(digest, io.BytesIO(data).read)
        return digest

    def manifest(self, data: bytes, media_type: str = OCI_MANIFEST) -> Digest:
        digest = digest_of(data)
        self.store.put_bytes(digest, data)
        self.index.set_media_type(digest, media_type)
        return digest

    def image(self, *layers: bytes, config: bytes = b'{"architecture": "amd64"}',
              subject: Digest | None = None, store_blobs: bool = True) -> Digest:
        if store_blobs:
            for data in (config, *layers):
                self.blob(data)
        return self.manifest(image_manifest(config, *layers, subject=subject))

    def index_of(self, *platforms: Digest) -> Digest:
        return self.manifest(json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(p), "size": 1,
                           "platform": {"os": "linux", "architecture": f"arch{i}"}}
                          for i, p in enumerate(platforms)]}).encode(), OCI_INDEX)

    def tag(self, repository: str, tag: str, digest: Digest, upstream: str = UP) -> None:
        self.index.set_tag(upstream, repository, tag, digest, OCI_MANIFEST)
        self.index.hold(upstream, repository, digest)

    def stored(self) -> set[Digest]:
        return {d for d, _, _ in self.store.iter_stored()}

    def assert_totals(self) -> None:
        """The index's totals are the store's (the cache size metrics read them)."""
        files = list(self.store.iter_stored())
        assert self.index.total_bytes() == sum(size for _, size, _ in files)
        assert self.index.entry_count() == len(files)
        assert {e.digest for e in self.index.entries()} == {d for d, _, _ in files}

    def plan(self, target: str, pins: tuple[str, ...] = ()) -> Plan:
        return plan_purge(self.store, self.index, Target(*parse_target(target, UPSTREAMS)),
                          pins, UPSTREAMS)

    def purge(self, target: str, pins: tuple[str, ...] = ()) -> Plan:
        plan = self.plan(target, pins)
        execute(self.store, self.index, plan)
        return plan


def image_manifest(config: bytes, *layers: bytes, subject: Digest | None = None) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(digest_of(config)), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": str(digest_of(x)), "size": len(x)} for x in layers]}
    if subject is not None:
        doc["subject"] = {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 1}
    return json.dumps(doc).encode()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "cache")
    yield c
    c.index.close()


SHARED = b"shared layer " * 100


def two_images(c: Cache) -> tuple[Digest, Digest]:
    a = c.image(SHARED, b"only a", config=b'{"image": "a"}')
    b = c.image(SHARED, b"only b", config=b'{"image": "b"}')
    c.tag("app/a", "v1", a)
    c.tag("app/b", "v1", b)
    return a, b


def test_blobs_another_image_uses_stay_and_the_rest_goes(cache: Cache) -> None:
    a, b = two_images(cache)
    plan = cache.purge(f"{UP}/app/a:v1")
    assert set(plan.manifests) == {a}
    assert set(plan.blobs) == {digest_of(b"only a"), digest_of(b'{"image": "a"}')}
    assert plan.shared == {digest_of(SHARED)}
    assert plan.bytes == sum(plan.manifests.values()) + sum(plan.blobs.values())
    assert cache.stored() == {b, digest_of(SHARED), digest_of(b"only b"),
                              digest_of(b'{"image": "b"}')}
    assert cache.index.get_tag(UP, "app/a", "v1") is None
    assert cache.index.get_tag(UP, "app/b", "v1") is not None
    assert cache.index.repository_held(UP, "app/a") == set()
    assert cache.index.was_purged(a) and not cache.index.was_purged(b)
    cache.assert_totals()


def test_a_blob_another_upstream_s_image_uses_stays(cache: Cache) -> None:
    a = cache.image(SHARED, b"only a")
    cache.tag("app/a", "v1", a)
    other = cache.image(SHARED, config=b'{"other": 1}')
    cache.tag("mirror/app", "v9", other, upstream=OTHER)
    plan = cache.purge(f"{UP}/app/a:v1")
    assert digest_of(SHARED) in plan.shared and digest_of(SHARED) in cache.stored()
    assert digest_of(b"only a") not in cache.stored()
    cache.assert_totals()


def test_a_stored_manifest_the_index_knows_nothing_of_still_protects(cache: Cache) -> None:
    """A lost or rebuilt index: the other image's manifest has no tag, no held record and
    no media type, but it is read from the store; a config blob (JSON, not a manifest)
    protects nothing and goes."""
    a = cache.image(SHARED, b"only a")
    cache.tag("app/a", "v1", a)
    orphan = digest_of(image_manifest(b"{}", SHARED))
    cache.store.put_stream(orphan, io.BytesIO(image_manifest(b"{}", SHARED)).read)
    plan = cache.purge(f"{UP}/app/a:v1")
    assert plan.shared == {digest_of(SHARED)}
    assert digest_of(b'{"architecture": "amd64"}') in plan.blobs
    assert orphan in cache.stored()


def test_an_index_takes_its_platforms_but_not_one_another_index_shares(cache: Cache) -> None:
    p1 = cache.image(b"p1 layer", config=b'{"p": 1}')
    p2 = cache.image(b"p2 layer", config=b'{"p": 2}')
    p3 = cache.image(b"p3 layer", config=b'{"p": 3}')
    first, second = cache.index_of(p1, p2), cache.index_of(p2, p3)
    cache.tag("multi", "v1", first)
    cache.tag("multi", "v2", second)
    for platform in (p1, p2):  # clients pull the platforms by digest
        cache.index.hold(UP, "multi", platform)
    plan = cache.purge(f"{UP}/multi:v1")
    assert set(plan.manifests) == {first, p1}
    assert set(plan.blobs) == {digest_of(b"p1 layer"), digest_of(b'{"p": 1}')}
    assert p2 in plan.shared and digest_of(b"p2 layer") in plan.shared
    assert {second, p2, p3} <= cache.stored()
    assert cache.index.repository_held(UP, "multi") == {second, p2}
    cache.assert_totals()


def attach(c: Cache, repository: str, image: Digest, platform: Digest) -> tuple[Digest, ...]:
    """A cosign signature by tag on the image, and an SBOM by the referrers API on one of its
    platforms; returns the signature's and the SBOM's manifests and the referrers index."""
    sig = c.image(b"signature payload", config=b'{"sig": 1}')
    c.tag(repository, f"sha256-{image.hex}.sig", sig)
    sbom = c.image(b"sbom", config=b'{"sbom": 1}', subject=platform)
    answer = c.manifest(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(sbom), "size": 1,
                       "artifactType": "application/spdx+json"}]}).encode(), OCI_INDEX)
    c.index.set_referrers(UP, repository, platform, "", answer, OCI_INDEX, "")
    return sig, sbom, answer


def test_signatures_attestations_and_sboms_go_with_their_image(cache: Cache) -> None:
    platform = cache.image(b"layer")
    top = cache.index_of(platform)
    cache.tag("app", "v1", top)
    sig, sbom, answer = attach(cache, "app", top, platform)
    plan = cache.purge(f"{UP}/app:v1")
    assert plan.tags == {"v1", f"sha256-{top.hex}.sig"}
    assert plan.referrers == {(platform, "")}
    assert set(plan.manifests) == {top, platform, sig, sbom, answer}
    assert {digest_of(b"signature payload"), digest_of(b"sbom")} <= set(plan.blobs)
    assert cache.stored() == set()
    assert cache.index.repository_tags(UP, "app") == {}
    assert cache.index.repository_referrers(UP, "app") == []
    cache.assert_totals()


def test_a_digest_takes_the_repository_s_tags_for_it_not_another_repository_s(
        cache: Cache) -> None:
    a = cache.image(b"layer")
    cache.tag("app", "v1", a)
    cache.tag("app", "latest", a)
    cache.tag("fork", "v1", a)
    plan = cache.purge(f"{UP}/app@{a}")
    assert plan.tags == {"v1", "latest"}
    assert plan.manifests == {} and a in plan.shared  # fork:v1 still names it
    assert cache.index.repository_tags(UP, "app") == {}
    assert cache.index.repository_held(UP, "app") == set()
    assert set(cache.index.repository_tags(UP, "fork")) == {"v1"}
    # then the other repository: nothing uses it any more
    plan = cache.purge(f"{UP}/fork")
    assert set(plan.manifests) == {a} and cache.stored() == set()
    cache.assert_totals()


def test_a_tag_shares_its_content_with_another_tag_of_the_repository(cache: Cache) -> None:
    a = cache.image(b"layer")
    cache.tag("app", "v1", a)
    cache.tag("app", "v2", a)
    plan = cache.purge(f"{UP}/app:v1")
    assert plan.tags == {"v1"} and plan.manifests == {} and plan.blobs == {}
    assert cache.index.repository_held(UP, "app") == {a}  # the repository still holds it
    assert a in cache.stored()


def test_a_repository_goes_whole_with_what_it_pulled_by_digest(cache: Cache) -> None:
    a, b = two_images(cache)
    v2 = cache.image(b"v2 layer", config=b'{"v": 2}')
    cache.tag("app/a", "v2", v2)
    by_digest = cache.image(b"pulled by digest", config=b'{"d": 1}')
    cache.index.hold(UP, "app/a", by_digest)
    cache.index.remember_access(UP, "app/a", digest_of(b"only a"))
    cache.index.mark_public(digest_of(b"only a"))
    plan = cache.purge(f"{UP}/app/a")
    assert plan.tags == {"v1", "v2"}
    assert set(plan.manifests) == {a, v2, by_digest}
    assert plan.forgotten == {digest_of(b"only a")}
    assert not cache.index.has_access(UP, "app/a", digest_of(b"only a"))
    assert cache.index.provenance(digest_of(b"only a")) is None
    assert cache.index.repository_held(UP, "app/a") == set()
    assert cache.stored() == {b, digest_of(SHARED), digest_of(b"only b"),
                              digest_of(b'{"image": "b"}')}
    cache.assert_totals()


@pytest.mark.parametrize("target", [
    f"{UP}/app:v9", f"{UP}/nothing", f"{UP}/app@sha256:" + "a" * 64])
def test_what_is_not_cached_is_said(cache: Cache, target: str) -> None:
    cache.tag("app", "v1", cache.image(b"layer"))
    with pytest.raises(NotCached):
        cache.plan(target)


def test_naming_a_pinned_image_refuses(cache: Cache) -> None:
    platform = cache.image(b"layer")
    top = cache.index_of(platform)
    cache.tag("app", "v1", top)
    pins = (f"{UP}/app:v1",)
    with pytest.raises(Pinned):
        cache.plan(f"{UP}/app:v1", pins)
    with pytest.raises(Pinned):
        cache.plan(f"{UP}/app@{top}", pins)
    with pytest.raises(Pinned):  # a platform of a pinned index
        cache.plan(f"{UP}/app@{platform}", pins)
    assert cache.stored() >= {top, platform}


def test_a_repository_purge_keeps_its_pinned_images_and_what_is_attached_to_them(
        cache: Cache) -> None:
    pinned = cache.image(SHARED, b"pinned layer", config=b'{"pinned": 1}')
    cache.tag("app", "stable", pinned)
    sig = cache.image(b"pinned signature", config=b'{"sig": 2}')
    cache.tag("app", f"sha256-{pinned.hex}.sig", sig)
    other = cache.image(SHARED, b"other layer", config=b'{"other": 2}')
    cache.tag("app", "edge", other)
    plan = cache.purge(f"{UP}/app", pins=(f"{UP}/app:stable",))
    assert plan.tags == {"edge"}
    assert set(plan.manifests) == {other}
    assert set(plan.blobs) == {digest_of(b"other layer"), digest_of(b'{"other": 2}')}
    assert digest_of(SHARED) in plan.pinned and {pinned, sig} <= plan.pinned
    assert plan.kept_tags == {"stable", f"sha256-{pinned.hex}.sig"}
    assert set(cache.index.repository_tags(UP, "app")) == {"stable", f"sha256-{pinned.hex}.sig"}
    assert {pinned, sig, digest_of(SHARED)} <= cache.stored()
    assert cache.index.repository_held(UP, "app") == {pinned, sig}
    cache.assert_totals()


def test_a_tag_naming_pinned_content_goes_but_the_content_stays(cache: Cache) -> None:
    a = cache.image(b"layer")
    cache.tag("app", "v1", a)
    cache.tag("app", "stable", a)
    plan = cache.purge(f"{UP}/app:v1", pins=(f"{UP}/app:stable",))
    assert plan.tags == {"v1"} and plan.manifests == {} and a in plan.pinned


def test_a_blob_being_downloaded_stays(cache: Cache) -> None:
    """A layer still downloading (its partial file in tmp/, written by any worker) is not
    touched; one that starts downloading between the plan and the deletion neither."""
    a = cache.image(b"stored layer", b"downloading layer", store_blobs=False)
    cache.blob(b'{"architecture": "amd64"}')
    cache.blob(b"stored layer")
    cache.tag("app", "v1", a)
    downloading = digest_of(b"downloading layer")
    fd = cache.store.open_partial(downloading)
    try:
        assert try_lock(fd)
        os.write(fd, b"down")
        plan = cache.plan(f"{UP}/app:v1")
        assert downloading in plan.in_flight and downloading not in plan.blobs
        late = digest_of(b"stored layer")
        assert late in plan.blobs
        late_fd = cache.store.open_partial(late)  # a download starts before the deletion
        try:
            result = execute(cache.store, cache.index, plan)
        finally:
            os.close(late_fd)
        assert result.in_flight == {late} and late in cache.stored()
        assert a not in cache.stored()
        assert cache.store.partial_path(downloading).exists()
    finally:
        os.close(fd)
    cache.assert_totals()


def test_a_dry_run_changes_nothing(cache: Cache) -> None:
    two_images(cache)
    keys = sorted(k for k in cache.index.db.iterkeys() if isinstance(k, str))
    before = cache.stored()
    plan = cache.plan(f"{UP}/app/a")
    assert plan.manifests and plan.blobs
    assert cache.stored() == before
    assert sorted(k for k in cache.index.db.iterkeys() if isinstance(k, str)) == keys


def test_content_stored_again_is_no_longer_purged(cache: Cache) -> None:
    a = cache.image(b"layer")
    cache.tag("app", "v1", a)
    cache.purge(f"{UP}/app:v1")
    assert cache.index.was_purged(a)
    cache.image(b"layer")
    assert not cache.index.was_purged(a)


@pytest.mark.parametrize(("ref", "expected"), [
    (f"{UP}/app:v1", (UP, "app", "v1")),
    (f"{OTHER}/team/app", (OTHER, "team/app", None)),
    ("team/app", (UP, "team/app", None)),
    (f"{UP}/app@sha256:" + "b" * 64, (UP, "app", Digest("sha256", "b" * 64))),
])
def test_a_target_is_an_image_or_without_a_tag_a_repository(
        ref: str, expected: tuple[object, ...]) -> None:
    assert parse_target(ref, UPSTREAMS) == expected


def test_a_target_on_an_unconfigured_registry_is_refused() -> None:
    with pytest.raises(RegistryError):
        parse_target("quay.io/app", UPSTREAMS)
