"""Allow / deny rules against a real upstream (docker-registry) and a real client (skopeo),
with one worker and with two.

The mirror's upstreams all point at one registry of this module's own:
  [0] named after the registry's host (the default; a registries.conf mirror location without
      a path reaches it): allow = ["vetted/**", "library/*"], deny = ["vetted/bad*"]
  [1] "alias.test": no rules of its own, but it reaches [0]'s registry, so [0]'s rules apply
  [2] "docker.io": deny = ["nginx"] (a single name: library/nginx), and [0]'s rules too
  [rules] deny_digests: the manifest of `tainted` and the first layer of `layered`

Checked: an allowed repository pulls byte for byte; a denied one (by deny, outside allow,
through the alias) gets 403 DENIED with the rule in skopeo's error and the upstream's access
log holds no request for it; every spelling of a denied name is denied (path prefix, ?ns=,
library/, Docker Hub's aliases) or refused as malformed, never fetched; a denied manifest is
refused by digest through another repository and upstream name and by a tag that resolves to
it (the upstream sees one HEAD for the tag, no GET), a denied layer through any repository
(never fetched, not even by the prefetch); each denial is one log line and one count in
mirror_denied_total; `mirror warm` refuses denied images the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import oci
from tests.support.clients import (
    UpstreamRegistry,
    assert_pulled,
    http_request,
    skopeo_copy,
    skopeo_pull,
    write_registries_conf,
)
from tests.support.mirror import REPO_ROOT, MirrorProcess, Upstream
from tests.support.mirrorfixtures import call_failed
from tests.support.registry import ClosedPort, Registry, env_without_proxies

pytestmark = pytest.mark.integration

KB = 1024
ACCEPT = [("Accept", "application/vnd.oci.image.manifest.v1+json"),
          ("Accept", "application/vnd.oci.image.index.v1+json")]


@dataclass(frozen=True)
class Images:
    app: oci.Image  # pushed as vetted/app, vetted/bad-app, other/app, library/nginx
    tainted: oci.Image  # its manifest digest is denied; pushed as vetted/tagged, vetted/other
    layered: oci.Image  # its first layer is denied; pushed as vetted/layered

    @property
    def bad_layer(self) -> str:
        return self.layered.layers[0].digest


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    blobs = tmp_path_factory.mktemp("rules-images")
    return Images(oci.build_image(blobs, (64 * KB, 128 * KB), labels={"image": "app"}),
                  oci.build_image(blobs, (32 * KB,), labels={"image": "tainted"}),
                  oci.build_image(blobs, (48 * KB, 16 * KB), labels={"image": "layered"}))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, images: Images
             ) -> Iterator[UpstreamRegistry]:
    """This module's own registry (it overrides the session's for `blackhole` users too)."""
    reg = Registry(tmp_path_factory.mktemp("rules-upstream")).start()
    up = UpstreamRegistry(reg)
    try:
        for repo in ("vetted/app", "vetted/bad-app", "other/app", "library/nginx"):
            up.push_direct(images.app, repo, "v1")
        for repo in ("vetted/tagged", "vetted/other"):
            up.push_direct(images.tainted, repo, "v1")
        up.push_direct(images.layered, "vetted/layered", "v1")
        yield up
    finally:
        reg.stop()


@pytest.fixture(params=[1, 2], ids=["workers=1", "workers=2"])
def guarded(request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamRegistry,
            images: Images) -> Iterator[MirrorProcess]:
    m = MirrorProcess(tmp_path / "mirror", [
        Upstream(name=upstream.host, url=upstream.url,
                 extra={"allow": ["vetted/**", "library/*"], "deny": ["vetted/bad*"]}),
        Upstream(name="alias.test", url=upstream.url),
        Upstream(name="docker.io", url=upstream.url, extra={"deny": ["nginx"]}),
    ], server_extra={"workers": request.param})
    m.sections["rules"] = {"deny_digests": [images.tainted.manifest.digest, images.bad_layer]}
    m.start()
    yield m
    m.stop()
    if call_failed(request):
        print(f"--- mirror stderr ({m.stderr_path}) ---\n{m.stderr_tail()}")


def repo_subject(host: str, registries: Path, alias: Path, repo: str) -> str:
    return f"{'alias.test' if registries == alias else host}/{repo}"


def conf(tmp_path: Path, blackhole: ClosedPort, location: str, name: str = "r.conf") -> Path:
    return write_registries_conf(tmp_path / name, registry=blackhole.host, mirrors=[location])


def requests_for(up: UpstreamRegistry, mark: int, repo: str) -> list[str]:
    """`METHOD path` of the upstream's requests for `repo` since `mark`."""
    return [f"{e.method} {e.path}" for e in up.registry.entries_since(mark)
            if e.path.startswith(f"/v2/{repo}/")]


def denied_counts(m: MirrorProcess) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{m.url}/metrics", timeout=10, trust_env=False).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mirror_denied_total":
                out[(s.labels["upstream"], s.labels["reason"])] = s.value
    return out


def denials_logged(m: MirrorProcess) -> list[dict[str, object]]:
    return [e for e in m.log_entries() if e.get("msg") == "denied by the rules"]


def said(message: str, stderr: str) -> bool:
    """Whether skopeo's error output holds `message` (logrus escapes its quotes)."""
    return message.replace('"', '\\"') in stderr


def error_of(resp: object) -> tuple[str, str]:
    body = json.loads(resp.body)  # type: ignore[attr-defined]
    return body["errors"][0]["code"], body["errors"][0]["message"]


@pytest.mark.timeout(300)
def test_allowed_repositories_pull_denied_ones_are_refused_before_the_upstream(
        guarded: MirrorProcess, upstream: UpstreamRegistry, images: Images,
        blackhole: ClosedPort, tmp_path: Path) -> None:
    host = upstream.host
    mark = upstream.registry.mark()
    direct = conf(tmp_path, blackhole, guarded.host)
    assert_pulled(skopeo_pull(direct, blackhole.host, "vetted/app", "v1", tmp_path / "ok"),
                  images.app)
    # an allowed repository through the alias works too
    alias = conf(tmp_path, blackhole, f"{guarded.host}/alias.test", "alias.conf")
    assert_pulled(skopeo_pull(alias, blackhole.host, "vetted/app", "v1", tmp_path / "ok2"),
                  images.app)

    refused = [
        (direct, "vetted/bad-app", f'denied by [[upstream]] {host} deny "vetted/bad*"'),
        (direct, "other/app", f'denied by [[upstream]] {host} allow: it matches none of '
                              '"vetted/**", "library/*"'),
        (alias, "vetted/bad-app", f'denied by [[upstream]] {host} deny "vetted/bad*" '
                                  "(alias.test reaches the same registry)"),
    ]
    for registries, repo, rule in refused:
        res = skopeo_copy(f"docker://{blackhole.host}/{repo}:v1", f"dir:{tmp_path / 'no'}",
                          registries_conf=registries, check=False)
        assert res.returncode != 0
        assert said(f"denied: {repo_subject(host, registries, alias, repo)}: {rule}", res.stderr), \
            res.stderr

    assert requests_for(upstream, mark, "vetted/bad-app") == []
    assert requests_for(upstream, mark, "other/app") == []
    assert requests_for(upstream, mark, "vetted/app")  # the allowed pulls did reach it
    statuses = {e["status"] for e in guarded.request_log()
                if "/bad-app/" in str(e["path"]) or "/other/app/" in str(e["path"])}
    assert statuses == {403}
    logged = denials_logged(guarded)
    assert {(e["upstream"], e["repository"], e["reason"]) for e in logged} == {
        (host, "vetted/bad-app", "deny"), (host, "other/app", "allow"),
        ("alias.test", "vetted/bad-app", "deny")}
    counts = denied_counts(guarded)
    assert counts[(host, "deny")] >= 1 and counts[(host, "allow")] >= 1
    assert counts[("alias.test", "deny")] >= 1
    assert sum(counts.values()) == len(logged)  # one count per line, across workers


@pytest.mark.timeout(120)
def test_every_spelling_of_a_denied_repository_is_denied_or_malformed(
        guarded: MirrorProcess, upstream: UpstreamRegistry, images: Images) -> None:
    host, layer = upstream.host, images.app.layers[0].digest
    mark = upstream.registry.mark()
    before = sum(denied_counts(guarded).values())
    nginx = 'docker.io/library/nginx: denied by [[upstream]] docker.io deny "nginx"'
    bad = f'{host}/vetted/bad-app: denied by [[upstream]] {host} deny "vetted/bad*"'
    denied = {
        "/v2/docker.io/nginx/manifests/v1": nginx,
        "/v2/docker.io/library/nginx/manifests/v1": nginx,
        "/v2/index.docker.io/nginx/manifests/v1": nginx,
        "/v2/registry-1.docker.io/library/nginx/manifests/v1": nginx,
        "/v2/nginx/manifests/v1?ns=docker.io": nginx,
        "/v2/library/nginx/manifests/v1?ns=docker.io": nginx,
        "/v2/docker.io/library/nginx/manifests/v1?ns=docker.io": nginx,
        "/v2/library/nginx/manifests/v1?ns=index.docker.io": nginx,
        f"/v2/docker.io/nginx/blobs/{layer}": nginx,
        "/v2/docker.io/nginx/tags/list": nginx,
        "/v2/vetted/bad-app/manifests/v1": bad,
        f"/v2/{host}/vetted/bad-app/manifests/v1": bad,
        f"/v2/vetted/bad-app/manifests/v1?ns={quote(host, safe='')}": bad,
        f"/v2/vetted/bad-app/manifests/{images.app.manifest.digest}": bad,
        f"/v2/vetted/bad-app/blobs/{layer}": bad,
        "/v2/vetted/bad-app/tags/list": bad,
        f"/v2/vetted/bad-app/referrers/{images.app.manifest.digest}": bad,
        "/v2/alias.test/vetted/bad-app/manifests/v1":
            f"alias.test/vetted/bad-app: denied by [[upstream]] {host} deny \"vetted/bad*\" "
            "(alias.test reaches the same registry)",
        "/v2/vetted/bad-app/manifests/v1?ns=alias.test":
            f"alias.test/vetted/bad-app: denied by [[upstream]] {host} deny \"vetted/bad*\" "
            "(alias.test reaches the same registry)",
    }
    for method in ("GET", "HEAD"):
        for target, message in denied.items():
            resp = http_request(guarded.host, method, target, ACCEPT)
            assert resp.status == 403, (method, target, resp.status, resp.body)
            if method == "GET":
                assert error_of(resp) == ("DENIED", message), target
    for target in ("/v2/Vetted/Bad-App/manifests/v1", "/v2/vetted//bad-app/manifests/v1",
                   "/v2/vetted/bad-app/manifests/v1?ns=ALIAS.TEST",
                   "/v2/vetted/./bad-app/manifests/v1", "/v2/vetted/bad-app%2F/manifests/v1",
                   "/v2/DOCKER.IO/nginx/manifests/v1"):
        resp = http_request(guarded.host, "GET", target, ACCEPT)
        assert resp.status in (400, 404), (target, resp.status, resp.body)
    assert http_request(guarded.host, "GET", "/v2/alias.test/vetted/app/manifests/v1",
                        ACCEPT).status == 200

    for repo in ("vetted/bad-app", "library/nginx", "nginx", "vetted//bad-app",
                 "Vetted/Bad-App"):
        assert requests_for(upstream, mark, repo) == [], repo
    assert sum(denied_counts(guarded).values()) == before + 2 * len(denied)


@pytest.mark.timeout(300)
def test_denied_digests_are_refused_through_any_repository_and_by_tag(
        guarded: MirrorProcess, upstream: UpstreamRegistry, images: Images,
        blackhole: ClosedPort, tmp_path: Path) -> None:
    host, tainted = upstream.host, images.tainted.manifest.digest
    mark = upstream.registry.mark()
    direct = conf(tmp_path, blackhole, guarded.host)

    # a tag resolving to a denied manifest: resolved with one HEAD, never fetched
    res = skopeo_copy(f"docker://{blackhole.host}/vetted/tagged:v1", f"dir:{tmp_path / 'a'}",
                      registries_conf=direct, check=False)
    assert res.returncode != 0
    assert said(f"denied: {tainted}: denied by [rules] deny_digests ({host}/vetted/tagged:v1 "
                "resolves to it)", res.stderr), res.stderr
    assert set(requests_for(upstream, mark, "vetted/tagged")) == {
        "HEAD /v2/vetted/tagged/manifests/v1"}

    # the same manifest by digest through another repository and other upstream names, and
    # by the other repository's tag
    for target, asked_as in [
            (f"/v2/vetted/other/manifests/{tainted}", f"{host}/vetted/other"),
            (f"/v2/alias.test/vetted/app/manifests/{tainted}", "alias.test/vetted/app"),
            (f"/v2/docker.io/vetted/other/manifests/{tainted}", "docker.io/vetted/other")]:
        resp = http_request(guarded.host, "GET", target, ACCEPT)
        assert error_of(resp) == ("DENIED", f"{tainted}: denied by [rules] deny_digests "
                                            f"(asked as {asked_as})"), target
    resp = http_request(guarded.host, "GET", "/v2/alias.test/vetted/other/manifests/v1",
                        ACCEPT)
    assert resp.status == 403 and "alias.test/vetted/other:v1 resolves to it" in str(
        error_of(resp))

    # a denied layer: the image's manifest is served, the layer never fetched by anyone
    res = skopeo_copy(f"docker://{blackhole.host}/vetted/layered:v1", f"dir:{tmp_path / 'b'}",
                      registries_conf=direct, check=False)
    assert res.returncode != 0
    # skopeo 1.9 shows no error body for a blob (containers/image's httpResponseToError):
    # the digest and the 403 are what it says; the body names the rule
    assert f"reading blob {images.bad_layer}: Error fetching blob: invalid status code from " \
           "registry 403 (Forbidden)" in res.stderr, res.stderr
    resp = http_request(guarded.host, "GET", f"/v2/vetted/layered/blobs/{images.bad_layer}")
    assert error_of(resp) == ("DENIED", f"{images.bad_layer}: denied by [rules] deny_digests "
                                        f"(asked as {host}/vetted/layered)")
    for target in (f"/v2/vetted/app/blobs/{images.bad_layer}",
                   f"/v2/alias.test/vetted/app/blobs/{images.bad_layer}",
                   f"/v2/docker.io/library/nginx-ok/blobs/{images.bad_layer}"):
        for method in ("GET", "HEAD"):
            assert http_request(guarded.host, method, target).status == 403, target
    others = {images.layered.config.digest, images.layered.layers[1].digest}
    guarded.wait_cached(others)  # the prefetch (or skopeo) got the rest
    gets = upstream.registry.blob_gets(mark)
    assert images.bad_layer not in gets and others <= set(gets)
    assert not ({b.digest for b in images.tainted.blobs} & set(gets))
    assert images.bad_layer not in guarded.cached_digests()
    assert tainted not in guarded.cached_digests()
    manifests = {e.manifest_ref for e in upstream.registry.manifest_requests(mark)
                 if e.method == "GET"}
    assert tainted not in manifests and "v1" not in {
        e.manifest_ref for e in upstream.registry.manifest_requests(mark)
        if e.method == "GET" and e.path.startswith(("/v2/vetted/tagged/", "/v2/vetted/other/"))}

    counts = denied_counts(guarded)
    digest_denials = sum(v for (_, reason), v in counts.items() if reason == "digest")
    assert digest_denials >= 3 + 1 + 1 + 1 + 6
    assert {e["reason"] for e in denials_logged(guarded)} == {"digest"}


@pytest.mark.timeout(120)
def test_warm_refuses_denied_images(guarded: MirrorProcess, upstream: UpstreamRegistry,
                                    images: Images) -> None:
    mark = upstream.registry.mark()
    env = env_without_proxies()
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "mirror", "warm", "--config", str(guarded.config_path),
         "vetted/bad-app:v1", "vetted/tagged:v1", "vetted/app:v1"],
        capture_output=True, text=True, timeout=100, env=env, cwd=guarded.workdir)
    host = upstream.host
    assert proc.returncode == 1, proc.stderr
    assert f"{host}/vetted/app:v1: 3 blobs cached" in proc.stdout  # config, 2 layers
    assert (f"mirror: warm {host}/vetted/bad-app:v1: {host}/vetted/bad-app: denied by "
            f'[[upstream]] {host} deny "vetted/bad*"') in proc.stderr
    assert (f"mirror: warm {host}/vetted/tagged:v1: {images.tainted.manifest.digest}: denied "
            f"by [rules] deny_digests ({host}/vetted/tagged:v1 resolves to it)") in proc.stderr
    assert requests_for(upstream, mark, "vetted/bad-app") == []
    assert set(requests_for(upstream, mark, "vetted/tagged")) <= {
        "HEAD /v2/vetted/tagged/manifests/v1"}
