"""The pull-through policy (pull/proxy.py) against a counting fake Source and a real filesystem
store, with no HTTP: what the proxy asks its source, and how often (as distribution's proxy
tests count the calls on both of its stores)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.index import Index, TagEntry
from mirror.cache.store import BlobStore
from mirror.config import Config, parse_config
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError
from mirror.oci.reference import Digest, digest_of, parse_digest
from mirror.pull.downloads import Downloads
from mirror.pull.proxy import Proxy
from mirror.pull.source import Kind

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = (OCI_MANIFEST,)


def image_manifest(*layers: Digest) -> bytes:
    config = digest_of(b"{}")
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(config), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": str(d), "size": 1} for d in layers],
    }).encode()


@dataclass(frozen=True)
class Reply:
    digest: str | None
    media_type: str
    size: int | None
    data: bytes | None
    fresh_for: float | None = None


@dataclass(frozen=True)
class Relayed:
    status: int
    body: bytes
    headers: dict[str, str]


class FakeBlob:
    def __init__(self, data: bytes, offset: int, break_at: int | None) -> None:
        self.total: int | None = len(data)
        self._data, self._pos, self._break_at = data, offset, break_at

    async def read(self) -> bytes:
        if self._break_at is not None and self._pos >= self._break_at:
            raise ConnectionError("the fake body broke off")
        end = len(self._data) if self._break_at is None else self._break_at
        chunk, self._pos = self._data[self._pos:end], end
        return chunk

    def close(self) -> None:
        pass

    def reject(self) -> None:
        pass


class FakeSource:
    """A Source that counts every call; `down` makes it unreachable, `gate` holds calls."""

    def __init__(self, name: str = "fake.test", private: bool = False) -> None:
        self.name = name
        self.private = private
        self.resume_attempts = 3
        self.prefetches = True
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, ref) -> ...
        self.blobs: dict[Digest, bytes] = {}
        self.holds: set[tuple[str, Digest]] = set()  # what confirm() says yes to
        self.calls: collections.Counter[str] = collections.Counter()
        self.entered: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event)  # set at a call's first arrival
        self.offsets: list[int] = []
        self.manifest_gets: list[str] = []  # the references GET asked for
        self.down = False
        self.break_first_body_at: int | None = None
        self.gate: asyncio.Event | None = None
        self.fresh_for: float | None = None  # as a peer answers a tag it has trusted a while
        self.referrers_headers: dict[str, str] = {}
        self.referrers_body: bytes | None = None

    def add_manifest(self, repository: str, tag: str, data: bytes) -> Digest:
        digest = digest_of(data)
        self.manifests[(repository, tag)] = self.manifests[(repository, str(digest))] = (
            data, OCI_MANIFEST)
        self.holds.add((repository, digest))
        return digest

    async def _enter(self, call: str) -> None:
        self.calls[call] += 1
        self.entered[call].set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise UpstreamError(ErrorCode.UPSTREAM_UNREACHABLE, f"{self.name} is down")

    def _manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        found = self.manifests.get((repository, reference))
        if found is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, "not found")
        return found

    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> Reply:
        await self._enter("get_manifest")
        self.manifest_gets.append(reference)
        data, media_type = self._manifest(repository, reference)
        return Reply(str(digest_of(data)), media_type, len(data), data, self.fresh_for)

    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> Reply:
        await self._enter("head_manifest")
        data, media_type = self._manifest(repository, reference)
        return Reply(str(digest_of(data)), media_type, len(data), None, self.fresh_for)

    async def open_blob(self, repository: str, digest: Digest, offset: int) -> FakeBlob:
        await self._enter("open_blob")
        self.offsets.append(offset)
        if digest not in self.blobs or (self.private and (repository, digest) not in self.holds):
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, "not found")
        break_at, self.break_first_body_at = self.break_first_body_at, None
        return FakeBlob(self.blobs[digest], offset, break_at)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        await self._enter("head_blob")
        if digest not in self.blobs:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, "not found")
        return len(self.blobs[digest])

    async def confirm(self, repository: str, digest: Digest, kind: Kind) -> None:
        await self._enter("confirm")
        if (repository, digest) not in self.holds:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN if kind == "blobs"
                                else ErrorCode.MANIFEST_UNKNOWN, "not here")

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        await self._enter("relay")
        if suffix.startswith("referrers/"):
            return self.referrers(repository, suffix, query)
        return Relayed(200, b'{"tags": []}', {"Content-Type": "application/json"})

    def referrers(self, repository: str, suffix: str, query: Mapping[str, str]) -> Relayed:
        """An index naming the query, so each answer shows what it was for."""
        headers = {"Content-Type": OCI_INDEX, **self.referrers_headers}
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                           "for": [repository, suffix, dict(query)]}).encode()
        return Relayed(200, self.referrers_body or body, headers)


def make_config(cache_dir: Path, **cache: Any) -> Config:
    return parse_config({
        "cache": {"dir": str(cache_dir), "prefetch": False, "tag_ttl": "60s", **cache},
        "upstream": [{"name": "fake.test", "url": "http://fake.invalid"}],
    })


@dataclass
class World:
    proxy: Proxy
    source: FakeSource
    store: BlobStore
    index: Index


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Any]:
    """make(**cache settings, private=) -> a World over a fresh store in tmp_path."""
    opened: list[Index] = []

    def make(private: bool = False, name: str = "cache", **cache: Any) -> World:
        config = make_config(tmp_path / name, **cache)
        store = BlobStore(config.cache.dir)
        index = Index(store.index_dir)
        downloads = Downloads(store, config.cache.finish_abandoned)
        source = FakeSource(private=private)
        opened.append(index)
        proxy = Proxy(config, store, index, downloads, any_private=private)
        return World(proxy, source, store, index)

    yield make  # every test lets the downloads it started finish
    for index in opened:
        index.close()


def stored(w: World, data: bytes) -> Digest:
    digest = digest_of(data)
    w.store.put_bytes(digest, data)
    return digest


# manifests ----------------------------------------------------------------------------------
async def test_a_digest_in_the_store_asks_the_source_nothing(world: Any) -> None:
    w = world()
    data = image_manifest()
    digest = stored(w, data)
    m = await w.proxy.manifest(w.source, "app", digest, ACCEPT, head=False)
    assert (m.data, m.cache) == (data, "hit")
    assert sum(w.source.calls.values()) == 0


async def test_a_tag_within_its_ttl_asks_nothing_after_it_one_head(world: Any) -> None:
    w = world()
    digest = w.source.add_manifest("app", "v1", image_manifest())
    first = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert (first.digest, first.cache) == (digest, "miss")
    again = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert again.cache == "hit"
    assert w.source.calls == {"get_manifest": 1}

    w.index.set_tag("fake.test", "app", "v2", digest, OCI_MANIFEST,
                    fetched_at=time.time() - 3600)  # a tag older than its TTL
    w.source.manifests[("app", "v2")] = w.source.manifests[("app", "v1")]
    revalidated = await w.proxy.manifest(w.source, "app", "v2", ACCEPT, head=False)
    assert revalidated.cache == "revalidated"
    assert w.source.calls == {"get_manifest": 1, "head_manifest": 1}


async def test_a_tag_moved_upstream_is_fetched_after_its_head(world: Any) -> None:
    w = world()
    old = stored(w, image_manifest())
    w.index.set_tag("fake.test", "app", "v1", old, OCI_MANIFEST, fetched_at=time.time() - 3600)
    new = w.source.add_manifest("app", "v1", image_manifest(digest_of(b"layer")))
    m = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert (m.digest, m.cache) == (new, "miss")
    assert w.source.calls == {"head_manifest": 1, "get_manifest": 1}


@pytest.mark.parametrize("head", [False, True])
async def test_a_tag_a_peer_trusted_a_while_is_trusted_only_for_what_is_left(
        world: Any, monkeypatch: pytest.MonkeyPatch, head: bool) -> None:
    """A tag's owner answers with max-age=10 of its 60 s: asked again 11 s later, not 60."""
    w = world()
    w.source.add_manifest("app", "v1", image_manifest())
    if head:  # a HEAD is answered from the store only when the manifest is there
        stored(w, image_manifest())
    w.source.fresh_for = 10.0
    first = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=head)
    assert first.tag_max_age is not None and first.tag_max_age <= 10.0
    asked = sum(w.source.calls.values())
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 5)
    await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=head)
    assert sum(w.source.calls.values()) == asked  # still trusted
    monkeypatch.setattr(time, "time", lambda: now + 11)
    again = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=head)
    assert w.source.calls["head_manifest"] == (2 if head else 1)
    assert again.tag_max_age is not None and again.tag_max_age <= 10.0


async def test_stale_if_error_when_the_source_is_down(world: Any) -> None:
    w = world()
    data = image_manifest()
    digest = stored(w, data)
    w.index.set_tag("fake.test", "app", "v1", digest, OCI_MANIFEST,
                    fetched_at=time.time() - 3600)
    w.source.down = True
    m = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert (m.data, m.cache) == (data, "stale")
    assert w.source.calls == {"head_manifest": 1}


async def test_a_refusal_is_not_covered_by_stale_if_error(world: Any) -> None:
    w = world()
    digest = stored(w, image_manifest())
    w.index.set_tag("fake.test", "app", "v1", digest, OCI_MANIFEST,
                    fetched_at=time.time() - 3600)
    with pytest.raises(RegistryError) as caught:  # the tag is gone upstream
        await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert caught.value.code == ErrorCode.MANIFEST_UNKNOWN


async def test_offline_asks_nothing(world: Any) -> None:
    w = world(offline=True)
    data = image_manifest()
    digest = stored(w, data)
    w.index.set_tag("fake.test", "app", "v1", digest, OCI_MANIFEST,
                    fetched_at=time.time() - 3600)
    m = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert m.data == data  # however old the tag
    with pytest.raises(RegistryError) as caught:
        await w.proxy.manifest(w.source, "app", "other", ACCEPT, head=False)
    assert caught.value.code == ErrorCode.MANIFEST_UNKNOWN
    with pytest.raises(RegistryError) as caught:
        await w.proxy.blob(w.source, "app", digest_of(b"layer"), head=False)
    assert caught.value.code == ErrorCode.BLOB_UNKNOWN
    with pytest.raises(RegistryError):
        await w.proxy.relay(w.source, "app", "tags/list", {}, ErrorCode.NAME_UNKNOWN)
    assert sum(w.source.calls.values()) == 0


async def test_concurrent_requests_for_a_manifest_make_one_get(world: Any) -> None:
    w = world()
    data = image_manifest()
    w.source.add_manifest("app", "v1", data)
    w.source.gate = asyncio.Event()
    asks = [asyncio.ensure_future(w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False))
            for _ in range(10)]
    await asyncio.sleep(0.05)
    w.source.gate.set()
    answers = await asyncio.gather(*asks)
    assert {a.data for a in answers} == {data}
    assert w.source.calls == {"get_manifest": 1}


async def test_a_manifest_failing_verification_is_not_cached(world: Any) -> None:
    w = world()
    data = image_manifest()
    wrong = digest_of(b"something else")
    w.source.manifests[("app", str(wrong))] = (data, OCI_MANIFEST)
    for _ in range(2):
        with pytest.raises(UpstreamError) as caught:
            await w.proxy.manifest(w.source, "app", wrong, ACCEPT, head=False)
        assert (caught.value.code, caught.value.status) == (ErrorCode.DIGEST_INVALID, 502)
    assert w.store.size(wrong) is None and w.store.size(digest_of(data)) is None
    assert w.source.calls == {"get_manifest": 2}  # nothing cached: asked again


async def test_an_invalid_manifest_is_not_cached(world: Any) -> None:
    w = world()
    w.source.manifests[("app", "v1")] = (b"<html>not a manifest</html>", OCI_MANIFEST)
    with pytest.raises(UpstreamError) as caught:
        await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert caught.value.code == ErrorCode.MANIFEST_INVALID
    assert w.index.get_tag("fake.test", "app", "v1") is None


# blobs --------------------------------------------------------------------------------------
async def test_a_stored_blob_asks_nothing(world: Any) -> None:
    w = world()
    digest = stored(w, b"layer bytes")
    body, cache = await w.proxy.blob(w.source, "app", digest, head=False)
    try:
        assert (body.size, body.seekable, cache) == (len(b"layer bytes"), True, "hit")
    finally:
        body.close()
    assert sum(w.source.calls.values()) == 0


async def test_concurrent_blob_requests_make_one_download(world: Any) -> None:
    w = world()
    data = bytes(range(256)) * 1000
    digest = digest_of(data)
    w.source.blobs[digest] = data
    answers = await asyncio.gather(*(w.proxy.blob(w.source, "app", digest, head=False)
                                     for _ in range(5)))
    assert sorted(cache for _, cache in answers) == ["inflight"] * 4 + ["miss"]
    await answers[0][0].stored()
    assert w.store.read_bytes(digest) == data
    assert w.source.calls == {"open_blob": 1}


async def test_a_broken_blob_body_resumes_from_its_offset(world: Any) -> None:
    w = world()
    data = b"x" * 10_000
    digest = digest_of(data)
    w.source.blobs[digest] = data
    w.source.break_first_body_at = 4000
    body, _ = await w.proxy.blob(w.source, "app", digest, head=False)
    await body.stored()
    assert w.store.read_bytes(digest) == data
    assert w.source.offsets == [0, 4000]


async def test_a_blob_head_miss_asks_head_only(world: Any) -> None:
    w = world()
    digest = digest_of(b"layer")
    w.source.blobs[digest] = b"layer"
    body, cache = await w.proxy.blob(w.source, "app", digest, head=True)
    assert (body.sendable, body.size, cache) == (False, 5, "miss")
    assert w.source.calls == {"head_blob": 1}


# private content ----------------------------------------------------------------------------
async def test_private_content_under_another_repository_is_confirmed_once(
        world: Any) -> None:
    w = world(private=True)
    digest = stored(w, b"secret layer")
    w.index.mark_private(digest)
    w.index.remember_access("fake.test", "team/a", digest)
    w.source.holds.add(("team/b", digest))
    for repository in ("team/a", "team/b", "team/b"):
        body, _ = await w.proxy.blob(w.source, repository, digest, head=False)
        body.close()
    assert w.source.calls == {"confirm": 1}  # team/a was known, team/b asked once


async def test_a_download_refused_for_another_name_is_not_the_answer_for_ours(
        world: Any) -> None:
    """A client joining a download that an intruder's request started (for a repository the
    upstream says lacks the blob) gets the blob fetched under its own name, not a 404."""
    w = world(private=True)
    data = b"private layer" * 1000
    digest = digest_of(data)
    w.source.blobs[digest] = data
    w.source.holds.add(("team/app", digest))
    w.source.gate = asyncio.Event()
    intruder = asyncio.ensure_future(w.proxy.blob(w.source, "intruder/repo", digest,
                                                  head=False))
    await w.source.entered["open_blob"].wait()  # the intruder's download is at the gate
    legit = asyncio.ensure_future(w.proxy.blob(w.source, "team/app", digest, head=False))
    await w.source.entered["confirm"].wait()  # the client joined; its name is being confirmed
    w.source.gate.set()
    with pytest.raises(RegistryError) as refused:
        await intruder
    assert refused.value.code is ErrorCode.BLOB_UNKNOWN
    body, _ = await legit
    await body.stored()
    assert w.store.read_bytes(digest) == data
    assert w.source.calls["open_blob"] == 2


async def test_private_content_is_refused_when_the_source_says_no(world: Any) -> None:
    w = world(private=True)
    data = image_manifest()
    digest = stored(w, data)
    w.index.mark_private(digest)
    w.index.remember_access("fake.test", "team/a", digest)
    with pytest.raises(RegistryError) as caught:
        await w.proxy.manifest(w.source, "other/repo", digest, ACCEPT, head=False)
    assert caught.value.code == ErrorCode.MANIFEST_UNKNOWN
    assert w.source.calls == {"confirm": 1}


async def test_public_content_needs_no_confirmation(world: Any) -> None:
    w = world()
    digest = stored(w, b"public layer")
    w.index.mark_public(digest)
    body, _ = await w.proxy.blob(w.source, "any/repo", digest, head=False)
    body.close()
    assert sum(w.source.calls.values()) == 0


async def test_content_from_a_private_source_enters_as_private(world: Any) -> None:
    w = world(private=True)
    digest = w.source.add_manifest("team/a", "v1", image_manifest())
    await w.proxy.manifest(w.source, "team/a", "v1", ACCEPT, head=False)
    assert w.index.provenance(digest) == "private"
    assert w.index.has_access("fake.test", "team/a", digest)


# relays, prefetch ---------------------------------------------------------------------------
async def test_a_relay_is_passed_through_uncached(world: Any) -> None:
    w = world()
    for _ in range(2):
        relayed = await w.proxy.relay(w.source, "app", "tags/list", {},
                                      ErrorCode.NAME_UNKNOWN)
        assert relayed.status == 200
    assert w.source.calls == {"relay": 2}


SUBJECT = digest_of(b"an image manifest")


async def test_referrers_are_trusted_for_tag_ttl_then_asked_again(
        world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world()
    first = await w.proxy.referrers(w.source, "app", SUBJECT, "")
    again = await w.proxy.referrers(w.source, "app", SUBJECT, "")
    assert (first.cache, again.cache, again.body) == ("miss", "hit", first.body)
    assert again.headers["Content-Type"] == OCI_INDEX
    assert w.source.calls == {"relay": 1}
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)  # tag_ttl is 60 s
    assert (await w.proxy.referrers(w.source, "app", SUBJECT, "")).cache == "miss"
    assert w.source.calls == {"relay": 2}


async def test_referrers_are_kept_per_repository_and_artifact_type(world: Any) -> None:
    """Another repository (or filter) never gets the answer asked for one."""
    w = world()
    answers = [await w.proxy.referrers(w.source, repo, SUBJECT, artifact_type)
               for repo, artifact_type in [("app", ""), ("other", ""), ("app", "x/sig")]]
    assert len({a.body for a in answers}) == 3
    assert w.source.calls == {"relay": 3}
    assert json.loads(answers[1].body)["for"][0] == "other"
    assert json.loads(answers[2].body)["for"][2] == {"artifactType": "x/sig"}


async def test_stale_referrers_answer_when_the_source_is_down_and_offline(
        world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world()
    w.source.referrers_headers = {"OCI-Filters-Applied": "artifactType"}
    first = await w.proxy.referrers(w.source, "app", SUBJECT, "x/sig")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3600)
    w.source.down = True
    stale = await w.proxy.referrers(w.source, "app", SUBJECT, "x/sig")
    assert (stale.cache, stale.body) == ("stale", first.body)
    assert stale.headers["OCI-Filters-Applied"] == "artifactType"
    w.proxy.offline = True
    asked = w.source.calls["relay"]
    assert (await w.proxy.referrers(w.source, "app", SUBJECT, "x/sig")).body == first.body
    with pytest.raises(RegistryError) as caught:
        await w.proxy.referrers(w.source, "app", digest_of(b"unknown"), "")
    assert caught.value.code == ErrorCode.MANIFEST_UNKNOWN  # a client falls back to tags
    assert w.source.calls["relay"] == asked


@pytest.mark.parametrize("headers,body", [
    ({"Link": '</v2/app/referrers/x?last=y>; rel="next"'}, None),  # one page of several
    ({}, b"<html>a captive portal</html>"),
    ({}, b'{"manifests": "not a list"}'),
])
async def test_referrers_not_one_whole_index_are_relayed_not_kept(
        world: Any, headers: dict[str, str], body: bytes | None) -> None:
    w = world()
    w.source.referrers_headers, w.source.referrers_body = headers, body
    for _ in range(2):
        assert (await w.proxy.referrers(w.source, "app", SUBJECT, "")).cache == "relayed"
    assert w.source.calls == {"relay": 2}


async def test_referrers_of_a_private_source_are_private_content(world: Any) -> None:
    w = world(private=True)
    answer = await w.proxy.referrers(w.source, "team/a", SUBJECT, "")
    digest = digest_of(answer.body)
    assert w.index.provenance(digest) == "private"
    assert w.index.has_access("fake.test", "team/a", digest)
    assert not w.index.has_access("fake.test", "team/b", digest)


async def test_prefetch_starts_the_layers_of_a_manifest_miss(world: Any) -> None:
    w = world(prefetch=True)
    layers = [b"one", b"two"]
    for layer in layers:
        w.source.blobs[digest_of(layer)] = layer
    w.source.blobs[digest_of(b"{}")] = b"{}"
    w.source.add_manifest("app", "v1", image_manifest(*map(digest_of, layers)))
    await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    for _ in range(100):
        if all(w.store.size(digest_of(x)) is not None for x in [b"{}", *layers]):
            break
        await asyncio.sleep(0.01)
    assert w.source.calls == {"get_manifest": 1, "open_blob": 3}
    assert parse_digest(str(digest_of(b"one"))) in {d for d, _, _ in w.store.iter_stored()}


# a cluster's shared tags ---------------------------------------------------------------------
class FakeSharedTags:
    """SharedTags (pull/source.py) in a dict, counting calls, as Redis would hold them."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str, str], TagEntry] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    async def get(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        self.calls["get"] += 1
        return self.entries.get((upstream, repository, tag))

    async def put(self, upstream: str, repository: str, tag: str, entry: TagEntry,
                  ttl: float) -> None:
        self.calls["put"] += 1
        self.entries[(upstream, repository, tag)] = entry


def two_nodes(world: Any, private: bool = False) -> tuple[World, World, FakeSharedTags]:
    a, b = world(private=private, name="a"), world(private=private, name="b")
    b.source = a.source  # one upstream: its calls counted once for both
    shared = FakeSharedTags()
    a.proxy.shared_tags = b.proxy.shared_tags = shared
    return a, b, shared


async def test_a_tag_another_node_looked_up_costs_no_tag_lookup(world: Any) -> None:
    a, b, shared = two_nodes(world)
    digest = a.source.add_manifest("app", "v1", image_manifest())
    first = await a.proxy.manifest(a.source, "app", "v1", ACCEPT, head=False)
    assert shared.calls["put"] == 1
    second = await b.proxy.manifest(b.source, "app", "v1", ACCEPT, head=True)
    assert first.digest == second.digest == digest
    assert second.tag_max_age is not None and 0 < second.tag_max_age <= 60
    # the second node did not look the tag up (no HEAD): it GETs the manifest, by tag, which
    # a cluster routes to the node holding it
    assert a.source.manifest_gets == ["v1", "v1"]
    assert a.source.calls["head_manifest"] == 0
    again = await b.proxy.manifest(b.source, "app", "v1", ACCEPT, head=False)
    assert again.cache == "hit" and a.source.calls["get_manifest"] == 2


async def test_a_shared_answer_past_its_ttl_is_not_trusted(world: Any) -> None:
    a, b, shared = two_nodes(world)
    digest = a.source.add_manifest("app", "v1", image_manifest())
    shared.entries[("fake.test", "app", "v1")] = TagEntry(
        str(digest), OCI_MANIFEST, time.time() - 61)
    await b.proxy.manifest(b.source, "app", "v1", ACCEPT, head=False)
    assert a.source.manifest_gets == ["v1"]


async def test_a_shared_answer_that_is_no_digest_is_not_trusted(world: Any) -> None:
    a, b, shared = two_nodes(world)
    a.source.add_manifest("app", "v1", image_manifest())
    shared.entries[("fake.test", "app", "v1")] = TagEntry(
        "sha256:../../etc", OCI_MANIFEST, time.time())
    m = await b.proxy.manifest(b.source, "app", "v1", ACCEPT, head=False)
    assert a.source.manifest_gets == ["v1"] and m.cache == "miss"


async def test_tags_of_a_private_source_are_never_shared(world: Any) -> None:
    a, b, shared = two_nodes(world, private=True)
    a.source.add_manifest("app", "v1", image_manifest())
    await a.proxy.manifest(a.source, "app", "v1", ACCEPT, head=False)
    await b.proxy.manifest(b.source, "app", "v1", ACCEPT, head=False)
    assert shared.calls == {}
    assert a.source.manifest_gets == ["v1", "v1"]


# `mirror purge` and the manifests a worker holds in memory ---------------------------------
async def test_a_purged_manifest_held_in_memory_is_fetched_again_an_evicted_one_restored(
        world: Any) -> None:
    """Eviction by another worker: the hot manifest in memory is stored again, the source
    asked nothing. `mirror purge`: it is dropped and fetched from the source again (the tag
    still trusted in memory, the content is not)."""
    from mirror.cache.purge import Target, execute, plan_purge

    w = world()
    w.store.on_commit = w.index.add_entry  # as runtime.py sets it
    digest = w.source.add_manifest("app", "v1", image_manifest())
    await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert w.index.repository_held("fake.test", "app") == {digest}

    w.store.delete(digest)  # evicted by another worker
    w.index.remove_entry(digest)
    again = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert again.cache == "hit" and w.store.has(digest)
    assert w.source.calls == {"get_manifest": 1}

    plan = plan_purge(w.store, w.index, Target("fake.test", "app", "v1"), (), ["fake.test"])
    assert set(plan.manifests) == {digest}
    execute(w.store, w.index, plan)
    fetched = await w.proxy.manifest(w.source, "app", "v1", ACCEPT, head=False)
    assert fetched.cache == "miss" and w.store.has(digest)
    assert w.source.calls == {"get_manifest": 2}
    assert not w.index.was_purged(digest)
    assert w.index.repository_held("fake.test", "app") == {digest}
    by_digest = await w.proxy.manifest(w.source, "app", digest, ACCEPT, head=False)
    assert by_digest.cache == "hit"
