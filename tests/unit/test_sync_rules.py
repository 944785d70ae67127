"""Sync rules (pull/sync.py) over the real proxy, store and index with a counting fake source
and no HTTP: paging through a tags list, a 429 waited out, an image that fails keeping what
the rule held, a rule's lock and schedule; and the [[sync]] configuration's errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.eviction import pins
from mirror.cache.locks import try_exclusive
from mirror.config import ConfigError, parse_config
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import digest_of
from mirror.pull.images import Counter
from mirror.pull.sync import RuleRun, is_due, next_page, run_locked
from tests.unit.test_proxy_policy import FakeSource, Relayed, World, image_manifest, world

__all__ = ["world"]
UPSTREAM = {"name": "fake.test", "url": "http://fake.invalid"}


class TagSource(FakeSource):
    """Tags lists in pages of `page` with a Link to the next; `limited` 429s first."""

    def __init__(self, page: int = 2) -> None:
        super().__init__()
        self.page, self.limited, self.queries = page, 0, list[dict[str, str]]()

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        await self._enter("relay")
        if self.limited:
            self.limited -= 1
            raise RegistryError(ErrorCode.TOOMANYREQUESTS, "slow down",
                                headers={"Retry-After": "7"})
        if suffix == "_catalog":
            raise RegistryError(ErrorCode.UNSUPPORTED, "no catalog here", status=404)
        self.queries.append(dict(query))
        tags = sorted({tag for repo, tag in self.manifests
                       if repo == repository and not tag.startswith("sha256:")})
        after = [t for t in tags if t > query.get("last", "")][: self.page]
        headers = {}
        if after and after[-1] != tags[-1]:
            headers["Link"] = f'</v2/{repository}/tags/list?last={after[-1]}&n=2>; rel="next"'
        return Relayed(200, json.dumps({"name": repository, "tags": after}).encode(), headers)


def rule_config(tmp_path: Path, **rule: Any) -> Any:
    return parse_config({
        "cache": {"dir": str(tmp_path / "cache"), "prefetch": False},
        "upstream": [UPSTREAM],
        "sync": [{"upstream": "fake.test", "repositories": ["app"], "tags": r"^v\d$",
                  "platforms": "all", **rule}]})


def add_image(w: World, source: FakeSource, tag: str, content: bytes) -> None:
    layer = digest_of(content)
    source.blobs[layer] = content
    source.add_manifest("app", tag, image_manifest(layer))
    source.blobs[digest_of(b"{}")] = b"{}"


async def test_a_run_pages_through_the_tags_and_selects_by_the_regex(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource(page=2)
    for tag in ("v1", "v2", "v3", "latest", "v10"):
        add_image(w, source, tag, tag.encode())
    rule = rule_config(tmp_path).syncs[0]
    result = await RuleRun(rule, w.proxy, source, w.store, w.index, Counter()).run()
    assert [q.get("last") for q in source.queries] == [None, "v1", "v2"]
    assert result.selected == 3 and sorted(result.cached) == [
        "fake.test/app:v1", "fake.test/app:v2", "fake.test/app:v3"]
    assert source.calls["head_manifest"] == 3

    again = await RuleRun(rule, w.proxy, source, w.store, w.index, Counter()).run()
    assert again.cached == [] and source.calls["get_manifest"] == 3  # nothing fetched again


async def test_a_429_is_waited_out_for_its_retry_after(world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"one")
    source.limited = 2
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    rule = rule_config(tmp_path).syncs[0]
    result = await RuleRun(rule, w.proxy, source, w.store, w.index, Counter(),
                           sleep=sleep).run()
    assert waits == [7.0, 7.0] and result.ok and result.cached == ["fake.test/app:v1"]


async def test_an_image_that_fails_keeps_what_the_rule_held_pinned(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"old")
    config = rule_config(tmp_path, pin=True)
    rule = config.syncs[0]
    await RuleRun(rule, w.proxy, source, w.store, w.index, Counter()).run()
    held = w.index.synced(rule.name)
    old = held["fake.test/app:v1"]
    assert f"fake.test/app@{old}" in pins(config, w.index)

    add_image(w, source, "v1", b"new")  # the tag moves; its new layer cannot be fetched
    del source.blobs[digest_of(b"new")]
    result = await RuleRun(rule, w.proxy, source, w.store, w.index, Counter()).run()
    assert not result.ok and result.failed[0][0] == "fake.test/app:v1"
    assert w.index.synced(rule.name) == {"fake.test/app:v1": old}


async def test_a_tag_no_longer_selected_is_dropped_and_a_dry_run_changes_nothing(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"1")
    add_image(w, source, "v2", b"2")
    await RuleRun(rule_config(tmp_path).syncs[0], w.proxy, source, w.store, w.index,
                  Counter()).run()
    narrow = rule_config(tmp_path, tags="^v1$").syncs[0]
    dry = await RuleRun(narrow, w.proxy, source, w.store, w.index, Counter(), dry_run=True).run()
    assert dry.dropped == ["fake.test/app:v2"] and len(w.index.synced(narrow.name)) == 2
    real = await RuleRun(narrow, w.proxy, source, w.store, w.index, Counter()).run()
    assert real.dropped == ["fake.test/app:v2"]
    assert list(w.index.synced(narrow.name)) == ["fake.test/app:v1"]


async def test_a_rule_whose_lock_is_held_does_not_run(world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"1")
    rule = rule_config(tmp_path).syncs[0]
    lock = w.store.lock_path("sync-test")
    with try_exclusive(str(lock)) as mine:
        assert mine
        run = RuleRun(rule, w.proxy, source, w.store, w.index, Counter())
        assert await run_locked(rule, run, w.index, lock) is None
    assert source.calls == {}
    done = await run_locked(rule, RuleRun(rule, w.proxy, source, w.store, w.index, Counter()),
                            w.index, lock)
    assert done is not None and done.ok
    state = w.index.sync_state(rule.name)
    assert state["ok"] is True and state["finished"] >= state["started"]
    assert not is_due(state, rule, state["started"] + rule.interval - 1)
    assert is_due(state, rule, state["started"] + rule.interval)
    assert is_due({}, rule, 0.0)


async def test_a_pattern_without_a_catalog_fails_the_run_and_names_what_to_do(
        world: Any, tmp_path: Path) -> None:
    w, source = world(), TagSource()
    add_image(w, source, "v1", b"1")
    rule = rule_config(tmp_path, repositories=["app", "team/*"]).syncs[0]
    result = await RuleRun(rule, w.proxy, source, w.store, w.index, Counter()).run()
    assert result.cached == ["fake.test/app:v1"]  # the named repository is still synced
    assert result.failed == [("team/*", "the upstream's catalog: no catalog here (patterns "
                              "need /v2/_catalog: name the repositories)")]


def test_next_page_reads_the_link_header() -> None:
    assert next_page('</v2/a/tags/list?last=v9&n=1000>; rel="next"') == "v9"
    assert next_page(None) is None and next_page('</v2/a/tags/list?n=1>; rel="prev"') is None


@pytest.mark.parametrize(("rule", "key"), [
    ({"tags": "[a-"}, "sync[0].tags"),
    ({"upstream": "elsewhere"}, "sync[0].upstream"),
    ({"repositories": []}, "sync[0].repositories"),
    ({"repositories": ["Bad/Name"]}, "sync[0].repositories"),
    ({"platforms": ["linux"]}, "sync[0].platforms"),
    ({"interval": "soon"}, "sync[0].interval"),
    ({"pin": "yes"}, "sync[0].pin"),
    ({"name": "a b"}, "sync[0].name"),
    ({"unknown": 1}, "sync[0].unknown"),
])
def test_a_bad_rule_names_its_key(tmp_path: Path, rule: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key}:")):
        rule_config(tmp_path, **rule)


def test_two_rules_of_one_name_are_refused(tmp_path: Path) -> None:
    one = {"name": "same", "upstream": "fake.test", "repositories": ["a"], "tags": "."}
    with pytest.raises(ConfigError, match="duplicate sync rule names"):
        parse_config({"upstream": [UPSTREAM], "sync": [one, one]})
