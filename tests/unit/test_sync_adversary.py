"""Sync rules (pull/sync.py, pull/images.py) against a hostile or broken upstream and an
unlucky operator, over the real proxy, store and index with a fake source and no HTTP.

Each case was tried by an adversary review; those that were bugs then (a failed list
unpinning, odd tags breaking eviction, dot segments past the deny rules, a looping Link, the
tag schema's referrers, a changed rule waiting an interval) are regression tests now."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.eviction import evict_to_watermark, pins, pins_over_bounds
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import ConfigError, parse_config
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import digest_of
from mirror.pull.downloads import Downloads
from mirror.pull.images import Counter
from mirror.pull.proxy import Proxy
from mirror.pull.sync import RuleRun, Scheduler, run_locked
from tests.unit.test_proxy_policy import (
    OCI_INDEX,
    OCI_MANIFEST,
    FakeSource,
    Relayed,
    World,
    image_manifest,
    world,
)
from tests.unit.test_sync_rules import UPSTREAM, TagSource, add_image, rule_config

__all__ = ["world"]
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _run(rule: Any, w: World, source: FakeSource, **kw: Any) -> Any:
    return RuleRun(rule, w.proxy, source, w.store, w.index, Counter(), **kw).run()


# --- a failed list must not unpin what the rule held ---------------------------------------

class BrokenLists(TagSource):
    """A TagSource whose tags lists (and catalog) can be made to fail, as an upstream that
    is down, overloaded or answering an HTML error page with 200 does."""

    def __init__(self) -> None:
        super().__init__(page=100)
        self.lists: str = "ok"  # ok | down | html

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        if self.lists == "down":
            self.calls["relay"] += 1
            raise RegistryError(ErrorCode.UPSTREAM_UNAVAILABLE, "upstream answered 503")
        if self.lists == "html":
            self.calls["relay"] += 1
            return Relayed(200, b"<html>Service Unavailable</html>", {})
        return await super().relay(repository, suffix, query, unknown)


@pytest.mark.parametrize("failure", ["down", "html"])
async def test_a_tags_list_that_fails_keeps_what_the_rule_held_pinned(
        world: Any, tmp_path: Path, failure: str) -> None:
    w, source = world(), BrokenLists()
    add_image(w, source, "v1", b"one")
    config = rule_config(tmp_path, pin=True)
    rule = config.syncs[0]
    first = await _run(rule, w, source)
    assert first.ok
    held = w.index.synced(rule.name)
    assert list(held) == ["fake.test/app:v1"]

    source.lists = failure
    second = await _run(rule, w, source)
    assert not second.ok  # the failure is reported
    assert second.dropped == []  # nothing was deselected: the list could not be read
    assert w.index.synced(rule.name) == held
    assert "fake.test/app:v1" in pins(config, w.index)


# --- names and tags the upstream lists are not checked -----------------------------------

class OddTags(TagSource):
    """Lists `extra` tags besides those it holds, and serves a manifest for any of them (a
    hostile upstream, or one with laxer tag rules than OCI's)."""

    def __init__(self, extra: list[str]) -> None:
        super().__init__(page=100)
        self.extra = extra

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        answer = await super().relay(repository, suffix, query, unknown)
        tags = json.loads(answer.body)["tags"] + self.extra
        return Relayed(200, json.dumps({"name": repository, "tags": tags}).encode(), {})


async def test_a_listed_tag_that_is_not_an_oci_tag_is_skipped_and_eviction_still_runs(
        world: Any, tmp_path: Path) -> None:
    w = world()
    odd = ["v" + "9" * 200, "v1 2", "v1:x"]  # too long, a space, a colon
    source = OddTags(odd)
    add_image(w, source, "v1", b"one")
    for tag in odd:
        add_image(w, source, tag, tag.encode())
    config = rule_config(tmp_path, pin=True, tags="^v")
    rule = config.syncs[0]
    await _run(rule, w, source)
    assert pins_over_bounds(config, w.store, w.index) == []  # raises RegistryError today
    evict_to_watermark(config, w.store, w.index)
    assert list(w.index.synced(rule.name)) == ["fake.test/app:v1"]


class Catalog(TagSource):
    """An upstream whose /v2/_catalog lists `names` (any strings: a hostile catalog)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(page=100)
        self.names = names
        self.listed: list[str] = []  # the repositories whose tags list was asked for

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        if suffix == "_catalog":
            self.calls["relay"] += 1
            return Relayed(200, json.dumps({"repositories": self.names}).encode(), {})
        self.listed.append(repository)
        return await super().relay(repository, suffix, query, unknown)


def _world_with_deny(tmp_path: Path, deny: list[str]) -> tuple[Any, World]:
    config = parse_config({
        "cache": {"dir": str(tmp_path / "cache"), "prefetch": False},
        "upstream": [{**UPSTREAM, "deny": deny}],
        "sync": [{"upstream": "fake.test", "repositories": ["team/**"], "tags": r"^v\d$",
                  "platforms": "all"}]})
    store = BlobStore(config.cache.dir)
    index = Index(store.index_dir)
    proxy = Proxy(config, store, index, Downloads(store, config.cache.finish_abandoned),
                  any_private=False)
    return config, World(proxy, FakeSource(), store, index)


async def test_a_catalog_name_with_dot_segments_is_not_synced(tmp_path: Path) -> None:
    config, w = _world_with_deny(tmp_path, ["secret/**"])
    source = Catalog(["team/app", "team/../secret/app", "team/Upper", "team//x"])
    for repo in ("team/app", "team/../secret/app"):
        layer = digest_of(repo.encode())
        source.blobs[layer] = repo.encode()
        source.blobs[digest_of(b"{}")] = b"{}"
        source.add_manifest(repo, "v1", image_manifest(layer))
    try:
        result = await _run(config.syncs[0], w, source)
    finally:
        w.index.close()
    assert source.listed == ["team/app"], source.listed
    assert result.cached == ["fake.test/team/app:v1"]


class LoopingLink(TagSource):
    """Every tags list page is the same one, with a Link back to itself."""

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        self.calls["relay"] += 1
        self.queries.append(dict(query))
        return Relayed(200, json.dumps({"name": repository, "tags": ["v1"]}).encode(), {
            "Link": f'</v2/{repository}/tags/list?last=v1&n=1000>; rel="next"'})


async def test_a_link_back_to_a_page_already_read_ends_the_list(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), LoopingLink()
    add_image(w, source, "v1", b"one")
    result = await _run(rule_config(tmp_path).syncs[0], w, source)
    assert result.cached == ["fake.test/app:v1"]
    assert len(source.queries) <= 2, f"{len(source.queries)} pages asked for"


# --- referrers through the tag schema -------------------------------------------------------

def _put(source: FakeSource, repository: str, reference: str, data: bytes,
         media_type: str) -> None:
    source.manifests[(repository, reference)] = (data, media_type)
    source.manifests[(repository, str(digest_of(data)))] = (data, media_type)
    source.holds.add((repository, digest_of(data)))


async def test_referrers_listed_by_the_tag_schema_index_are_cached(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"one")
    subject = digest_of(source.manifests[("app", "v1")][0])
    signature_layer = b"a signature"
    source.blobs[digest_of(signature_layer)] = signature_layer
    signature = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": str(digest_of(b"{}")), "size": 2},
        "layers": [{"mediaType": "application/octet-stream",
                    "digest": str(digest_of(signature_layer)), "size": len(signature_layer)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 1},
    }).encode()
    _put(source, "app", str(digest_of(signature)), signature, OCI_MANIFEST)
    fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": str(digest_of(signature)),
         "size": len(signature)}]}).encode()
    _put(source, "app", f"sha256-{subject.hex}", fallback, OCI_INDEX)

    result = await _run(rule_config(tmp_path, referrers=True).syncs[0], w, source)
    assert result.ok, result.failed
    assert w.store.has(digest_of(fallback))
    assert w.store.has(digest_of(signature)), "the signature manifest was not cached"
    assert w.store.has(digest_of(signature_layer))


# --- a reload that changes a rule -------------------------------------------------------

async def test_a_rule_changed_by_a_reload_is_run_at_the_next_check(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    for tag in ("v1", "v2"):
        add_image(w, source, tag, tag.encode())
    config = rule_config(tmp_path, pin=True, interval="1h")
    rules = [config.syncs[0]]
    scheduler = Scheduler(lambda: rules, lambda r: RuleRun(
        r, w.proxy, source, w.store, w.index, Counter()), w.index, w.store.lock_path)
    first = await scheduler.tick(rules[0])
    assert first is not None and len(first.cached) == 2

    narrowed = rule_config(tmp_path, pin=True, interval="1h", tags="^v1$")
    rules[:] = [narrowed.syncs[0]]
    again = await scheduler.tick(rules[0])
    assert again is not None, "the changed rule was not run"
    assert "fake.test/app:v2" not in pins(narrowed, w.index)


# --- properties that hold -----------------------------------------------------------------

class MovesAfterHead(TagSource):
    """The tag moves to `later` right after it is HEADed (a push between HEAD and GET)."""

    def __init__(self, later: bytes) -> None:
        super().__init__()
        self.later = later

    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> Any:
        answer = await super().head_manifest(repository, reference, accept)
        if not reference.startswith("sha256:"):
            layer = digest_of(self.later)
            self.blobs[layer] = self.later
            self.add_manifest(repository, reference, image_manifest(layer))
        return answer


async def test_a_tag_that_moves_between_head_and_get_caches_the_digest_the_head_named(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), MovesAfterHead(b"new")
    add_image(w, source, "v1", b"old")
    old = digest_of(source.manifests[("app", "v1")][0])
    rule = rule_config(tmp_path, pin=True).syncs[0]
    result = await _run(rule, w, source)
    assert result.ok
    assert w.index.synced(rule.name) == {"fake.test/app:v1": str(old)}
    assert w.store.has(old) and w.store.has(digest_of(b"old"))
    assert not w.store.has(digest_of(b"new"))  # nothing of an image it did not resolve
    assert source.manifest_gets == [str(old)]  # fetched by digest, never by the tag


async def test_an_index_of_300_platforms_fetches_only_the_rules_platform(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    source.blobs[digest_of(b"{}")] = b"{}"
    children = []
    for i in range(300):
        layer = f"layer {i}".encode()
        source.blobs[digest_of(layer)] = layer
        data = image_manifest(digest_of(layer))
        _put(source, "app", str(digest_of(data)), data, OCI_MANIFEST)
        arch = "amd64" if i == 150 else f"arch{i}"
        children.append({"mediaType": OCI_MANIFEST, "digest": str(digest_of(data)),
                         "size": len(data), "platform": {"os": "linux", "architecture": arch}})
    top = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                      "manifests": children}).encode()
    _put(source, "app", "v1", top, OCI_INDEX)
    rule = rule_config(tmp_path, platforms=["linux/amd64"]).syncs[0]
    result = await _run(rule, w, source)
    assert result.ok and result.blobs == 2, result
    assert source.calls["get_manifest"] == 2 and source.calls["open_blob"] == 2
    again = await _run(rule, w, source)
    assert again.cached == [] and source.calls["get_manifest"] == 2


@pytest.mark.parametrize("interval", ["0s", "-1h", 0, -5, "0"])
def test_an_interval_of_zero_or_below_is_refused(tmp_path: Path, interval: object) -> None:
    with pytest.raises(ConfigError, match=re.escape("sync[0].interval:")):
        rule_config(tmp_path, interval=interval)


async def test_an_upstream_that_always_answers_429_fails_the_step_after_bounded_waits(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"one")
    source.limited = 10 ** 6
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    result = await _run(rule_config(tmp_path).syncs[0], w, source, sleep=sleep)
    assert not result.ok and waits == [7.0] * 4


class DeepJson(TagSource):
    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        self.calls["relay"] += 1
        return Relayed(200, b"[" * 100_000 + b"]" * 100_000, {})


async def test_a_tags_list_nested_past_the_parsers_depth_fails_the_run_cleanly(
        world: Any, tmp_path: Path) -> None:
    """RecursionError from json.loads: recorded as the run's failure, nothing raised, and
    (the run aborting) the rule's record untouched."""
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"one")
    rule = rule_config(tmp_path, pin=True).syncs[0]
    await _run(rule, w, source)
    held = w.index.synced(rule.name)
    deep = DeepJson()
    result = await run_locked(rule, RuleRun(rule, w.proxy, deep, w.store, w.index, Counter()),
                              w.index, w.store.lock_path("sync-deep"))
    assert result is not None and not result.ok
    assert w.index.sync_state(rule.name)["ok"] is False
    assert w.index.synced(rule.name) == held
