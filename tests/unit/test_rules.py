"""Allow / deny rules: the pure matcher (mirror/oci/rules.py) with the routing it follows,
bypass attempts, config validation (exit 2 naming the key), and the proxy refusing before it
asks its source anything (a counting fake source)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mirror import metrics
from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.config import Config, ConfigError, parse_config
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, digest_of
from mirror.oci.routing import select_upstream
from mirror.oci.rules import PatternError, Rules, UpstreamRules, parse_pattern, url_registry
from mirror.pull.downloads import Downloads
from mirror.pull.proxy import Denied, Proxy
from tests.unit.test_proxy_policy import ACCEPT, FakeSource, image_manifest

HUB = "docker.io"
HUB_URL = "https://registry-1.docker.io"


def rules(*upstreams: dict[str, Any], deny_digests: tuple[str, ...] = ()) -> Rules:
    return parse_config({"upstream": list(upstreams),
                         "rules": {"deny_digests": list(deny_digests)}}).rules


def matches(pattern: str, name: str, upstream: str = "ghcr.io") -> bool:
    return parse_pattern(pattern, upstream).matches(name)


# the pattern syntax ---------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("acme/app", "acme/app", True),
    ("acme/app", "acme/app2", False),
    ("acme/app", "acme/app/sub", False),
    ("acme/*", "acme/app", True),
    ("acme/*", "acme/app/sub", False),  # * stays within one component
    ("acme/*", "acme", False),
    ("acme/app-*", "acme/app-slim", True),
    ("acme/app-*", "acme/app", False),
    ("acme/*-slim", "acme/app-slim", True),
    ("*/app", "acme/app", True),
    ("*/app", "a/b/app", False),
    ("acme/**", "acme/app", True),
    ("acme/**", "acme/a/b/c", True),
    ("acme/**", "acme", True),  # zero components
    ("acme/**", "acmeco/app", False),  # whole components, not a prefix of one
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/x/y/c", False),
    ("**", "anything/at/all", True),
    ("**/app", "x/y/app", True),
    ("acme.io/x", "acmexio/x", False),  # a dot is a dot, not "any character"
    ("acme/a.b", "acme/a.b", True),
])
def test_pattern_syntax(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


@pytest.mark.parametrize(("pattern", "problem"), [
    ("", "empty pattern"),
    ("/acme/app", "empty path component"),
    ("acme/app/", "empty path component"),
    ("acme//app", "empty path component"),
    ("Acme/App", "lowercase"),
    ("acme/app?", "nothing else"),
    ("acme/[ab]pp", "nothing else"),
    ("acme/ app", "nothing else"),
    ("acme/app**", "whole path components"),
    ("acme/.*", "matches no repository name"),
    ("acme/*_", "matches no repository name"),
    ("ghcr.io/acme/**", "without a registry part"),  # its own upstream's name
])
def test_bad_patterns_say_why(pattern: str, problem: str) -> None:
    with pytest.raises(PatternError, match=problem.replace("?", r"\?")):
        parse_pattern(pattern, "ghcr.io")


def test_a_registry_prefix_is_refused_only_when_it_is_one() -> None:
    with pytest.raises(PatternError, match="without a registry part"):
        parse_pattern("quay.io/x/*", "ghcr.io", ["ghcr.io", "quay.io"])
    with pytest.raises(PatternError, match="without a registry part"):
        parse_pattern("ghcr.io/acme/*", HUB)  # Docker Hub names have no host-like part
    # a first component named like an upstream that does not look like a host is a namespace
    assert parse_pattern("acme/*", "ghcr.io", ["acme"]).matches("acme/x")
    assert parse_pattern("registry.corp/x", "other.corp").matches("registry.corp/x")


def test_docker_hub_single_names_are_official_images_in_patterns_too() -> None:
    assert matches("nginx", "library/nginx", HUB)
    assert matches("nginx*", "library/nginx-slim", HUB)
    assert matches("*", "library/busybox", HUB)
    assert not matches("*", "someone/busybox", HUB)
    assert matches("**", "someone/busybox", HUB)
    assert not matches("nginx", "library/nginx", "ghcr.io")  # elsewhere a name is a name


# the rules, with routing in front: bypass attempts ----------------------------------------
UPSTREAMS = ["docker.io", "ghcr.io"]


@pytest.mark.parametrize(("raw", "ns"), [
    ("nginx", None),
    ("library/nginx", None),
    ("docker.io/nginx", None),
    ("docker.io/library/nginx", None),
    ("index.docker.io/library/nginx", None),
    ("registry-1.docker.io/nginx", None),
    ("nginx", "docker.io"),
    ("library/nginx", "docker.io"),
    ("docker.io/library/nginx", "docker.io"),
    ("library/nginx", "index.docker.io"),
])
def test_every_spelling_of_a_denied_repository_is_denied(raw: str, ns: str | None) -> None:
    r = rules({"name": HUB, "url": HUB_URL, "deny": ["nginx"]},
              {"name": "ghcr.io", "url": "https://ghcr.io"})
    upstream, repository = select_upstream(raw, ns, UPSTREAMS)
    denial = r.repository(upstream, repository)
    assert denial is not None and denial.reason == "deny"
    assert str(denial) == 'docker.io/library/nginx: denied by [[upstream]] docker.io deny "nginx"'


@pytest.mark.parametrize("raw", ["Nginx", "LIBRARY/nginx", "library//nginx", "library/nginx/",
                                 "/library/nginx", "library/./nginx", "library/../nginx",
                                 "library/nginx%2f"])
def test_spellings_routing_refuses_never_reach_the_rules(raw: str) -> None:
    """Case, empty or dot components: no other repository, a 400 before any rule."""
    with pytest.raises(RegistryError) as exc:
        select_upstream(raw, None, UPSTREAMS)
    assert exc.value.code is ErrorCode.NAME_INVALID


def test_an_ns_in_another_case_is_no_upstream_at_all() -> None:
    with pytest.raises(RegistryError) as exc:
        select_upstream("library/nginx", "DOCKER.IO", UPSTREAMS)
    assert exc.value.code is ErrorCode.NAME_UNKNOWN


def test_allow_empty_allows_everything_and_deny_wins_over_allow() -> None:
    open_ = rules({"name": "ghcr.io", "url": "https://ghcr.io"})
    assert not open_ and open_.repository("ghcr.io", "any/thing") is None
    r = rules({"name": "ghcr.io", "url": "https://ghcr.io",
               "allow": ["acme/**", "tools/*"], "deny": ["acme/bad*"]})
    assert r.repository("ghcr.io", "acme/app") is None
    assert r.repository("ghcr.io", "acme/team/app") is None
    assert r.repository("ghcr.io", "tools/jq") is None
    denied = r.repository("ghcr.io", "acme/bad-app")
    assert denied is not None and denied.reason == "deny"
    assert denied.rule == 'denied by [[upstream]] ghcr.io deny "acme/bad*"'
    outside = r.repository("ghcr.io", "other/app")
    assert outside is not None and outside.reason == "allow"
    assert outside.rule == ('denied by [[upstream]] ghcr.io allow: it matches none of '
                            '"acme/**", "tools/*"')


def test_a_long_allow_list_is_named_not_dumped() -> None:
    r = rules({"name": "ghcr.io", "url": "https://ghcr.io",
               "allow": [f"team{i}/*" for i in range(10)]})
    denial = r.repository("ghcr.io", "x/y")
    assert denial is not None and denial.rule.endswith('"team3/*" and 6 more')


def test_another_name_for_the_same_registry_carries_its_rules() -> None:
    r = rules({"name": HUB, "url": HUB_URL, "allow": ["library/*"], "deny": ["library/bad*"]},
              {"name": "hub2", "url": "https://index.docker.io"},  # an alias of the host
              {"name": "hub3", "url": "https://REGISTRY-1.docker.io:443/"},
              {"name": "edge", "url": "http://regional:5000",
               "fallback_urls": ["https://registry-1.docker.io"]},
              {"name": "ghcr.io", "url": "https://ghcr.io"})
    for door in ("hub2", "hub3", "edge"):
        denied = r.repository(door, "library/bad-image")
        assert denied is not None and denied.rule == (
            f'denied by [[upstream]] docker.io deny "library/bad*" ({door} reaches the same '
            "registry)")
        outside = r.repository(door, "someone/image")
        assert outside is not None and outside.reason == "allow"
        # a single name through a door that is not called docker.io: still library/
        assert r.repository(door, "bad-image") is not None
        assert r.repository(door, "library/alpine") is None
    assert r.repository("ghcr.io", "someone/image") is None


def test_a_door_adds_its_own_rules_to_the_registrys() -> None:
    r = rules({"name": HUB, "url": HUB_URL, "deny": ["library/bad*"]},
              {"name": "hub2", "url": HUB_URL, "allow": ["library/*alpine"]})
    assert r.repository("hub2", "library/alpine") is None
    registrys = r.repository("hub2", "library/bad-alpine")  # its allow takes it, not the deny
    assert registrys is not None and registrys.owner == HUB and registrys.reason == "deny"
    own = r.repository("hub2", "library/nginx")
    assert own is not None and own.owner == "hub2" and own.reason == "allow"
    assert r.repository(HUB, "library/nginx") is None  # the door's rules stay its own


def test_names_a_shared_tier_serves_keep_their_own_rules() -> None:
    """An edge node reaching docker.io and quay.io through one regional mirror (sent ?ns=)."""
    r = rules({"name": HUB, "url": "http://regional:5000", "allow": ["library/*"]},
              {"name": "quay.io", "url": "http://regional:5000", "allow": ["acme/*"]})
    assert r.repository("quay.io", "acme/app") is None
    assert r.repository(HUB, "library/nginx") is None
    assert r.repository(HUB, "acme/app") is not None


def test_url_registry() -> None:
    assert url_registry("https://registry-1.docker.io") == "docker.io"
    assert url_registry("https://GHCR.io:443") == "ghcr.io"
    assert url_registry("http://r.example:80/") == "r.example"
    assert url_registry("https://r.example:5000") == "r.example:5000"


def test_denied_digests_whatever_they_are_asked_through() -> None:
    bad = digest_of(b"bad")
    r = rules({"name": HUB, "url": HUB_URL}, deny_digests=(str(bad),))
    assert r.repository(HUB, "library/nginx") is None  # digests do not deny repositories
    denial = r.digest(bad)
    assert denial is not None and denial.reason == "digest"
    assert str(denial) == f"{bad}: denied by [rules] deny_digests"
    assert r.digest(digest_of(b"good")) is None
    assert Rules([UpstreamRules("x")]).repository("x", "a") is None


# config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("upstream", "rules_table", "key", "problem"), [
    ({"deny": ["ok/*", "Bad/*"]}, {}, "upstream[0].deny[1]", "lowercase"),
    ({"allow": ["acme/x**"]}, {}, "upstream[0].allow[0]", "whole path components"),
    ({"allow": ["docker.io/library/*"]}, {}, "upstream[0].allow[0]", "without a registry"),
    ({"allow": "acme/*"}, {}, "upstream[0].allow", "expected a list of strings"),
    ({"deny": [1]}, {}, "upstream[0].deny", "expected a list of strings"),
    ({}, {"deny_digests": ["sha256:abc"]}, "rules.deny_digests[0]", "needs 64 lowercase hex"),
    ({}, {"deny_digests": ["sha256:" + "A" * 64]}, "rules.deny_digests[0]", "lowercase hex"),
    ({}, {"deny_digests": ["md5:" + "a" * 32]}, "rules.deny_digests[0]", "unsupported"),
    ({}, {"deny_digests": "sha256:x"}, "rules.deny_digests", "expected a list of strings"),
    ({}, {"deny": ["x"]}, "rules.deny", "unknown key"),
])
def test_bad_rules_name_the_key(upstream: dict[str, Any], rules_table: dict[str, Any],
                                key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"upstream": [{"name": HUB, "url": HUB_URL, **upstream}],
                      "rules": rules_table}, "my.toml")
    assert str(exc.value).startswith(f"my.toml: {key}: ")
    assert problem in str(exc.value)


def test_rules_parse() -> None:
    bad = str(digest_of(b"bad"))
    c = parse_config({"upstream": [{"name": HUB, "url": HUB_URL, "allow": ["library/*"],
                                    "deny": ["library/bad*"]}],
                      "rules": {"deny_digests": [bad, bad]}})
    assert c.upstreams[0].allow == ("library/*",) and c.upstreams[0].deny == ("library/bad*",)
    assert [str(d) for d in c.deny_digests] == [bad]
    assert c.rules and c.rules.repository(HUB, "library/bad1") is not None
    assert not parse_config({"upstream": [{"name": HUB, "url": HUB_URL}]}).rules


def test_a_bad_pattern_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[upstream]]\nname = "docker.io"\nurl = "https://registry-1.docker.io"\n'
                   'deny = ["library/bad*", "library/[x]"]\n')
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert f"{cfg}: upstream[0].deny[1]: 'library/[x]': a pattern holds" in proc.stderr
    assert "Traceback" not in proc.stderr


# the proxy: refused before the source is asked -------------------------------------------
def rules_config(cache_dir: Path, **upstream: Any) -> Config:
    deny_digests = upstream.pop("deny_digests", [])
    return parse_config({
        "cache": {"dir": str(cache_dir), "prefetch": upstream.pop("prefetch", False)},
        "upstream": [{"name": "fake.test", "url": "http://fake.invalid", **upstream}],
        "rules": {"deny_digests": deny_digests},
    })


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    indexes: list[Index] = []
    downloads: list[Downloads] = []

    def make(**upstream: Any) -> Proxy:
        config = rules_config(tmp_path / "cache", **upstream)
        store = BlobStore(config.cache.dir)
        index = Index(store.index_dir)
        indexes.append(index)
        downloads.append(Downloads(store, config.cache.finish_abandoned))
        return Proxy(config, store, index, downloads[-1], any_private=False)

    yield make
    for d in downloads:
        await d.drain(5.0)
    for index in indexes:
        index.close()


def denied_count(upstream: str, reason: str) -> float:
    return metrics.total(metrics.samples(), "mirror_denied_total", upstream=upstream,
                         reason=reason)


async def test_a_denied_repository_asks_the_source_nothing(make_proxy: Any) -> None:
    proxy = make_proxy(allow=["acme/*"], deny=["acme/bad*"])
    source = FakeSource()
    digest = source.add_manifest("acme/bad-app", "v1", image_manifest())
    before = denied_count("fake.test", "deny")
    for call in (proxy.manifest(source, "acme/bad-app", "v1", ACCEPT, head=False),
                 proxy.manifest(source, "acme/bad-app", digest, ACCEPT, head=True),
                 proxy.blob(source, "acme/bad-app", digest, head=False),
                 proxy.relay(source, "acme/bad-app", "tags/list", {}, ErrorCode.NAME_UNKNOWN)):
        with pytest.raises(Denied) as exc:
            await call
        assert exc.value.code is ErrorCode.DENIED and exc.value.status == 403
        assert exc.value.message == ('fake.test/acme/bad-app: denied by [[upstream]] '
                                     'fake.test deny "acme/bad*"')
    with pytest.raises(Denied, match="allow: it matches none of"):
        await proxy.manifest(source, "other/app", "v1", ACCEPT, head=False)
    assert sum(source.calls.values()) == 0
    assert denied_count("fake.test", "deny") == before + 4


async def test_a_tag_resolving_to_a_denied_digest_costs_one_head_and_no_get(
        make_proxy: Any) -> None:
    source = FakeSource()
    layer = b"layer bytes"
    source.blobs[digest_of(layer)] = layer
    bad = source.add_manifest("acme/app", "v1", image_manifest(digest_of(layer)))
    source.add_manifest("acme/copy", "latest", image_manifest(digest_of(layer)))
    proxy = make_proxy(deny_digests=[str(bad)], prefetch=True)
    with pytest.raises(Denied) as exc:
        await proxy.manifest(source, "acme/copy", "latest", ACCEPT, head=False)
    assert exc.value.message == (f"{bad}: denied by [rules] deny_digests "
                                 "(fake.test/acme/copy:latest resolves to it)")
    assert source.calls == {"head_manifest": 1}  # resolved, not fetched, nothing prefetched
    with pytest.raises(Denied):  # the tag is known now: not even a HEAD
        await proxy.manifest(source, "acme/copy", "latest", ACCEPT, head=False)
    with pytest.raises(Denied, match=r"\(asked as fake.test/acme/other\)"):
        await proxy.manifest(source, "acme/other", bad, ACCEPT, head=False)
    assert source.calls == {"head_manifest": 1}
    assert proxy.store.read_bytes(bad) is None


async def test_a_tag_that_moved_to_a_denied_digest_is_caught_before_it_is_stored(
        make_proxy: Any) -> None:
    """No HEAD first (no answer to it has a digest): the GET's manifest is judged before it
    is stored or its layers prefetched."""
    source = FakeSource()
    bad = source.add_manifest("acme/app", "v1", image_manifest(digest_of(b"x")))

    async def no_digest(repository: str, reference: str, accept: tuple[str, ...]) -> Any:
        reply = await FakeSource.head_manifest(source, repository, reference, accept)
        return type(reply)(None, reply.media_type, reply.size, None)

    source.head_manifest = no_digest  # type: ignore[method-assign]
    proxy = make_proxy(deny_digests=[str(bad)], prefetch=True)
    with pytest.raises(Denied):
        await proxy.manifest(source, "acme/app", "v1", ACCEPT, head=False)
    assert source.calls == {"head_manifest": 1, "get_manifest": 1}
    assert proxy.store.read_bytes(bad) is None
    assert proxy.downloads.get(digest_of(b"x")) is None


async def test_denied_content_already_cached_is_denied_and_prefetch_skips_it(
        make_proxy: Any) -> None:
    source = FakeSource()
    good_layer, bad_layer = b"good layer", b"bad layer"
    for data in (good_layer, bad_layer):
        source.blobs[digest_of(data)] = data
    manifest = image_manifest(digest_of(bad_layer), digest_of(good_layer))
    digest = source.add_manifest("acme/app", "v1", manifest)
    open_proxy = make_proxy()
    await open_proxy.manifest(source, "acme/app", "v1", ACCEPT, head=False)  # cached now
    body, _ = await open_proxy.blob(source, "acme/app", digest_of(good_layer), head=False)
    await body.stored()
    body.close()

    proxy = make_proxy(deny_digests=[str(digest), str(digest_of(bad_layer))], prefetch=True)
    source.calls.clear()
    with pytest.raises(Denied):  # cached by digest, and by a tag fresh in the index
        await proxy.manifest(source, "acme/app", digest, ACCEPT, head=False)
    with pytest.raises(Denied):
        await proxy.manifest(source, "acme/app", "v1", ACCEPT, head=True)
    with pytest.raises(Denied):
        await proxy.blob(source, "acme/elsewhere", digest_of(bad_layer), head=True)
    assert sum(source.calls.values()) == 0

    # an allowed image referencing a denied layer: the prefetch leaves that layer alone
    source.blobs[digest_of(b"{}")] = b"{}"  # the config
    asked: list[Digest] = []
    open_blob = source.open_blob

    async def recording(repository: str, digest: Digest, offset: int) -> Any:
        asked.append(digest)
        return await open_blob(repository, digest, offset)

    source.open_blob = recording  # type: ignore[method-assign]
    source.add_manifest("acme/app", "v2", image_manifest(digest_of(good_layer),
                                                         digest_of(bad_layer)))
    await proxy.manifest(source, "acme/app", "v2", ACCEPT, head=False)
    config_download = proxy.downloads.get(digest_of(b"{}"))
    assert config_download is not None  # the prefetch ran
    await config_download.wait_done()
    assert proxy.downloads.get(digest_of(bad_layer)) is None
    assert asked == [digest_of(b"{}")]


def test_the_documented_keys_parse() -> None:
    """The shipped mirror.toml's commented allow and deny, uncommented, are valid rules."""
    text = (Path(__file__).parents[2] / "mirror.toml").read_text()
    lines = [line[2:] if line.startswith(("# allow = ", "# deny = ")) else line
             for line in text.splitlines()]
    r = parse_config(tomllib.loads("\n".join(lines))).rules
    assert r.repository(HUB, "library/nginx") is None
    assert r.repository(HUB, "acme/team/app") is None
    assert r.repository(HUB, "library/bad-app") is not None
    assert r.repository(HUB, "someone/app") is not None
