"""The cache browser (issue 16) under attack, against real `mirror serve` processes (1 and 2
workers) in front of a docker-registry upstream of this module's own: forged, replayed,
cross-site and malformed admin posts; reflected names; path tricks and what they tell of the
cache; robots, anonymous and non-admin users; purges of what must stay; thousands of tags;
pin and purge at once on two workers; sync-now spam; the browser with `[auth] status =
"public"` and with no [auth] at all.

Rules: ops and ops2 are admins (everything); other may pull test/small; anonymous clients
test/small. `[cache] pin` holds conf/pinned:v1, the `small` sync rule (pin = true) test/small:v1;
test/docker holds the same image as test/small (content shared). Bugs found are marked
xfail(strict=True) with what goes wrong; the attacks that are refused pass.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from mirror.cache.cachedir import token_secret
from mirror.cache.index import Index
from mirror.http import csrf
from mirror.oci.reference import parse_digest
from tests.support import oci
from tests.support.clients import push_direct
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import Registry, env_without_proxies, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

UP = "localhost"
USERS = ("ops", "ops2", "other")
RULES: list[dict[str, Any]] = [
    {"users": ["ops", "ops2"], "admin": True, "allow": ["localhost/**"]},
    {"users": ["other"], "allow": ["localhost/test/small"]},
    {"anonymous": True, "allow": ["localhost/test/small"]},
]
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
TOKEN = re.compile(r'name="csrf" value="([^"]+)"')
RESULT = re.compile(r'id="result">([^<]*)<')


# --- the module's upstream and mirrors ------------------------------------------------------

@dataclass
class World:
    registry: Registry
    blobs: Path
    shared: oci.Image  # test/small:v1 and test/docker:v1
    secret: oci.Image  # secret/app:v1
    pinned: oci.Image  # conf/pinned:v1 ([cache] pin)
    htpasswd: Path

    def push(self, repo: str, image: oci.Image, tag: str = "v1") -> None:
        push_direct(self.registry.url, repo, tag, image)

    def fresh(self, repo: str, size: int = 700) -> oci.Image:
        """An image of its own (content no other repository has), pushed as repo:v1."""
        image = oci.build_image(self.blobs, (size,), docker=True)
        self.push(repo, image)
        return image


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("browser-adversary")
    registry = Registry(root / "upstream").start()
    try:
        blobs = root / "blobs"
        blobs.mkdir()
        shared = oci.build_image(blobs, (1000, 2000), docker=True)
        secret = oci.build_image(blobs, (1500,), docker=True)
        pinned = oci.build_image(blobs, (1700,), docker=True)
        htpasswd = root / "htpasswd"
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text("".join(f"{u}:{hashed}\n" for u in USERS))
        w = World(registry, blobs, shared, secret, pinned, htpasswd)
        w.push("test/small", shared)
        w.push("test/docker", shared)
        w.push("secret/app", secret)
        w.push("conf/pinned", pinned)
        yield w
    finally:
        registry.stop()


class AdvMirror(MirrorProcess):
    def __init__(self, *args: Any, htpasswd: Path | None, status: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.htpasswd, self.status = htpasswd, status

    def config_text(self) -> str:
        if self.htpasswd is None:
            return super().config_text()
        rules = "".join("\n[[auth.rule]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in rule.items()) for rule in RULES)
        status = f'status = "{self.status}"\n' if self.status else ""
        return (super().config_text() + f'\n[auth]\nhtpasswd = "{self.htpasswd}"\n{status}'
                + rules)

    @property
    def workers(self) -> int:
        return int(self.server_extra.get("workers", 1))


def _start(world: World, workdir: Path, workers: int, *, auth: bool = True,
           status: str | None = None) -> AdvMirror:
    m = AdvMirror(workdir, [Upstream(name=UP, url=world.registry.url)],
                  htpasswd=world.htpasswd if auth else None, status=status,
                  server_extra={"workers": workers},
                  cache_extra={"pin": [f"{UP}/conf/pinned:v1"]})
    m.arrays["sync"] = [{"name": "small", "upstream": UP, "repositories": ["test/small"],
                         "tags": "^v1$", "interval": "24h", "pin": True}]
    m.start()
    return m


@pytest.fixture(scope="module", params=[1, 2], ids=["1worker", "2workers"])
def mirror(request: pytest.FixtureRequest, world: World,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdvMirror]:
    m = _start(world, tmp_path_factory.mktemp("adv-mirror"), request.param)
    try:
        wait_until(lambda: _synced(m), 60, interval=0.1, what="the pinning sync rule's run")
        for repo, image in (("test/small", world.shared), ("test/docker", world.shared),
                            ("secret/app", world.secret), ("conf/pinned", world.pinned)):
            _pull(m, repo, image)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def public(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdvMirror]:
    """`[auth] status = "public"`: anyone reads the pages, only admins act."""
    m = _start(world, tmp_path_factory.mktemp("adv-public"), 1, status="public")
    try:
        for repo, image in (("test/small", world.shared), ("secret/app", world.secret)):
            _pull(m, repo, image)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def open_mirror(world: World, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[AdvMirror]:
    """No [auth] at all: nobody is an admin, the browser is read-only."""
    m = _start(world, tmp_path_factory.mktemp("adv-open"), 2, auth=False)
    try:
        for repo, image in (("test/small", world.shared), ("secret/app", world.secret)):
            _pull(m, repo, image)
        yield m
    finally:
        m.stop()


# --- helpers ---------------------------------------------------------------------------------

def _auth(user: str | None) -> httpx.BasicAuth | None:
    return httpx.BasicAuth(user, "pw") if user else None


def _client_auth(user: str | None) -> httpx.BasicAuth | httpx._client.UseClientDefault:
    return httpx.BasicAuth(user, "pw") if user else httpx.USE_CLIENT_DEFAULT


def _get(m: MirrorProcess, path: str, user: str | None = "ops", **kw: Any) -> httpx.Response:
    return httpx.get(f"{m.url}{path}", auth=_auth(user), trust_env=False, timeout=60, **kw)


def _pull(m: MirrorProcess, repo: str, image: oci.Image,
          client: httpx.Client | None = None) -> None:
    get = client.get if client is not None else (
        lambda url, **kw: httpx.get(url, trust_env=False, timeout=60, **kw))
    r = get(f"{m.url}/v2/{UP}/{repo}/manifests/v1", headers=ACCEPT, auth=("ops", "pw"))
    assert r.status_code == 200 and r.content == image.manifest_bytes, r.text
    for blob in image.blobs:
        assert get(f"{m.url}/v2/{UP}/{repo}/blobs/{blob.digest}",
                   auth=("ops", "pw")).status_code == 200


def _synced(m: MirrorProcess) -> bool:
    """The sync rule has finished a run (the cache browser's table says ok)."""
    return bool(re.search(r'<tr class="sync-rule" data-name="small">.*?'
                          r'<td class="state">ok</td>', _get(m, "/cache").text))


def _token(m: MirrorProcess, user: str = "ops") -> str:
    found = TOKEN.search(_get(m, "/cache", user).text)
    assert found, "no admin form on the page"
    return found.group(1)


def _post(m: MirrorProcess, data: Any = None, user: str | None = "ops",
          headers: dict[str, Any] | None = None, client: httpx.Client | None = None,
          **kw: Any) -> httpx.Response:
    sent = {"Origin": m.url, **(headers or {})}
    sent = {k: v for k, v in sent.items() if v is not None}
    if client is not None:
        return client.post(f"{m.url}/cache/actions", data=data, headers=sent,
                           auth=_client_auth(user), **kw)
    with httpx.Client(trust_env=False, timeout=60) as c:
        return c.post(f"{m.url}/cache/actions", data=data, headers=sent,
                      auth=_client_auth(user), **kw)


def _title(r: httpx.Response) -> str:
    found = RESULT.search(r.text)
    return found.group(1) if found else f"<{r.status_code}: {r.text[:200]}>"


def _code(r: httpx.Response) -> str:
    return str(r.json()["errors"][0]["code"])


def _rows(m: MirrorProcess, repo: str, user: str = "ops") -> dict[str, str]:
    """reference -> data-pinned of the repository's page."""
    text = _get(m, f"/cache/{UP}/{repo}", user).text
    return dict(re.findall(r'<tr class="image" data-reference="([^"]*)"[^>]*'
                           r'data-pinned="([^"]*)"', text))


def _runtime_pins(m: MirrorProcess) -> dict[str, tuple[str, float]]:
    index = Index(m.cache_dir / "index")
    try:
        return index.runtime_pins()
    finally:
        index.close()


def _secret(m: MirrorProcess) -> bytes:
    return token_secret(m.cache_dir)


def _per_worker(m: AdvMirror) -> list[httpx.Client]:
    """One keep-alive connection to each worker (which one answers: /healthz's pid)."""
    clients: dict[int, httpx.Client] = {}
    deadline = time.monotonic() + 30
    while len(clients) < m.workers and time.monotonic() < deadline:
        c = httpx.Client(trust_env=False, timeout=60)
        pid = int(c.get(f"{m.url}/healthz").json()["pid"])
        if pid in clients:
            c.close()
        else:
            clients[pid] = c
    assert len(clients) == m.workers, "not every worker answered"
    return list(clients.values())


# --- CSRF ------------------------------------------------------------------------------------

def test_forged_replayed_and_cross_site_posts_change_nothing(mirror: AdvMirror) -> None:
    target = f"{UP}/test/docker:v1"
    pin = {"action": "pin", "target": target}
    token = _token(mirror)
    secret = _secret(mirror)
    now = time.time()
    old = csrf.issue(secret, "ops", now - 2 * csrf.WINDOW_SECONDS)  # two windows ago
    future = csrf.issue(secret, "ops", now + 2 * csrf.WINDOW_SECONDS)
    window, _, mac = token.partition(".")
    host = mirror.host
    refused: list[tuple[str, Any, dict[str, Any]]] = [
        ("no token", pin, {}),
        ("empty token", {**pin, "csrf": ""}, {}),
        ("another admin's token", {**pin, "csrf": _token(mirror, "ops2")}, {}),
        ("two windows old", {**pin, "csrf": old}, {}),
        ("from the future", {**pin, "csrf": future}, {}),
        ("next window's number, this mac", {**pin, "csrf": f"{int(window) + 1}.{mac}"}, {}),
        ("mac only", {**pin, "csrf": mac}, {}),
        ("mac upper-cased", {**pin, "csrf": f"{window}.{mac.upper()}"}, {}),
        ("a valid token then a forged one", {**pin, "csrf": [token, "1.x"]}, {}),
        ("origin null", {**pin, "csrf": token}, {"Origin": "null"}),
        ("origin null, good referer", {**pin, "csrf": token},
         {"Origin": "null", "Referer": f"{mirror.url}/cache"}),
        ("other site", {**pin, "csrf": token}, {"Origin": "http://evil.test"}),
        ("other port", {**pin, "csrf": token}, {"Origin": "http://127.0.0.1:1"}),
        ("suffix host", {**pin, "csrf": token}, {"Origin": f"http://{host}.evil.test"}),
        ("userinfo host", {**pin, "csrf": token}, {"Origin": f"http://{host}@evil.test"}),
        ("evil origin, good referer", {**pin, "csrf": token},
         {"Origin": "http://evil.test", "Referer": f"{mirror.url}/cache"}),
        ("no origin, evil referer", {**pin, "csrf": token},
         {"Origin": None, "Referer": f"http://evil.test/?{mirror.url}/cache"}),
        ("neither header", {**pin, "csrf": token}, {"Origin": None}),
    ]
    for what, data, headers in refused:
        r = _post(mirror, data, headers=headers)
        assert r.status_code == 403 and _code(r) == "DENIED", (what, r.status_code, r.text)

    body = f"csrf={token}&action=pin&target={target}"
    for content_type in ("text/plain", "application/json", "application/octet-stream"):
        r = _post(mirror, content=body if content_type != "application/json" else json.dumps(
            {**pin, "csrf": token}), headers={"Content-Type": content_type})
        assert r.status_code == 403, (content_type, r.text)
    # the token as a file part of a multipart form is no form field
    r = _post(mirror, data=pin, files={"csrf": ("csrf", token.encode())})
    assert r.status_code == 403, r.text
    with httpx.Client(trust_env=False, timeout=60) as c:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = c.request(method, f"{mirror.url}/cache/actions",
                          params={**pin, "csrf": token}, auth=("ops", "pw"),
                          headers={"Origin": mirror.url})
            assert r.status_code in (404, 405), (method, r.status_code)
        r = c.options(f"{mirror.url}/cache/actions", headers={
            "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    assert _rows(mirror, "test/docker")["v1"] == ""
    assert f"{UP}/test/docker:v1" not in _runtime_pins(mirror)


def test_roles_robots_and_anonymous_tokens_may_not_act(mirror: AdvMirror) -> None:
    pin = {"action": "pin", "target": f"{UP}/test/docker:v1"}
    secret = _secret(mirror)
    token = _token(mirror)
    # a token made for a non-admin with the real key: the role is still checked
    r = _post(mirror, {**pin, "csrf": csrf.issue(secret, "other", time.time())}, user="other")
    assert r.status_code == 403 and _code(r) == "DENIED"
    assert "<form" not in _get(mirror, "/cache", "other").text
    r = _post(mirror, {**pin, "csrf": token}, user=None)
    assert r.status_code == 401
    r = _post(mirror, {**pin, "csrf": token}, user=None,
              headers={"Authorization": "Basic b3BzOndyb25n"})  # ops:wrong, once
    assert r.status_code == 401

    name = f"robot{mirror.workers}"
    made = subprocess.run([sys.executable, "-m", "mirror", "token", "create", "--name", name,
                           "--allow", f"{UP}/**", "--config", str(mirror.config_path)],
                          capture_output=True, text=True, timeout=60,
                          env=env_without_proxies(), cwd=mirror.workdir)
    assert made.returncode == 0, made.stderr
    robot = made.stdout.strip().splitlines()[-1]
    page = httpx.get(f"{mirror.url}/cache", auth=(name, robot), trust_env=False, timeout=60)
    assert page.status_code == 200 and "<form" not in page.text
    robot_csrf = csrf.issue(secret, name, time.time())
    with httpx.Client(trust_env=False, timeout=60) as c:
        r = c.post(f"{mirror.url}/cache/actions", data={**pin, "csrf": robot_csrf},
                   auth=(name, robot), headers={"Origin": mirror.url})
        assert r.status_code == 403 and _code(r) == "DENIED"
        bearer = c.get(f"{mirror.url}/token", params={"service": "x"},
                       auth=(name, robot)).json()["token"]
        r = c.post(f"{mirror.url}/cache/actions", data={**pin, "csrf": robot_csrf},
                   headers={"Origin": mirror.url, "Authorization": f"Bearer {bearer}"})
        assert r.status_code == 403 and _code(r) == "DENIED"
        anonymous = c.get(f"{mirror.url}/token", params={"service": "x"}).json()["token"]
        for path in ("/cache", "/cache/localhost/test/small"):
            r = c.get(f"{mirror.url}{path}", headers={"Authorization": f"Bearer {anonymous}"})
            assert r.status_code == 401, path
        r = c.post(f"{mirror.url}/cache/actions", data={**pin, "csrf": token},
                   headers={"Origin": mirror.url, "Authorization": f"Bearer {anonymous}"})
        assert r.status_code == 401
        for junk in ("Bearer x.y.z", "Bearer " + "A" * 5000, "Basic !!!", "Negotiate abc"):
            r = c.post(f"{mirror.url}/cache/actions", data={**pin, "csrf": token},
                       headers={"Origin": mirror.url, "Authorization": junk})
            assert r.status_code == 401, (junk[:20], r.status_code)
    assert _rows(mirror, "test/docker")["v1"] == ""


MALFORMED: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "a non-ASCII mac": ({"csrf": "{window}.é"}, {}),
    "a superscript window": ({"csrf": "²."}, {}),
    "an Origin that is no URL": ({}, {"Origin": "http://[::1"}),
    "a Referer that is no URL": ({}, {"Origin": None, "Referer": "http://[bad/"}),
    "an Origin of non-UTF-8 bytes": ({}, {"Origin": b"http://\xff"}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_tokens_and_origins_are_refused_not_500(mirror: AdvMirror, case: str) -> None:
    fields, headers = MALFORMED[case]
    window = _token(mirror).partition(".")[0]
    data = {"action": "pin", "target": f"{UP}/test/docker:v1",
            **{k: v.format(window=window) for k, v in fields.items()}}
    r = _post(mirror, data, headers=headers)
    assert r.status_code == 403, (r.status_code, r.text)


def test_oversized_and_odd_forms_are_refused_cleanly(mirror: AdvMirror) -> None:
    token = _token(mirror)
    r = _post(mirror, content=b"a=" + b"x" * 20_000,
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    chunks = (b"a=" + b"x" * 65536 for _ in range(40))  # 2.5 MiB, no Content-Length
    r = _post(mirror, content=chunks,
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code in (403, 413), r.status_code
    r = _post(mirror, {"action": "purge", "target": f"{UP}/" + "a" * 15000, "csrf": token})
    assert r.status_code == 409 and _title(r) == "purge refused"
    for fields, status in ((900, 409), (1500, 413)):  # aiohttp's bound: 1000 fields
        r = _post(mirror, content="&".join(f"f{n}=1" for n in range(fields)).encode()
                  + f"&csrf={token}".encode(),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == status, (fields, r.status_code)  # no action: refused
    odd = ["", "localhost", "localhost/", "/", "@", ":", "localhost/test/small@",
           "localhost/test/small:", "localhost/test/small@sha256:zz", "elsewhere.test/x:v1",
           "localhost/test/small:v1\x00", "localhost/../secret/app", "localhost/Test/Small:v1",
           "localhost/test/small@sha512:" + "a" * 128]
    for action in ("pin", "unpin", "purge", "bogus"):
        for target in odd:
            r = _post(mirror, {"action": action, "target": target, "csrf": token})
            assert r.status_code == 409, (action, target, r.status_code, r.text[:300])
    for rule in ("", "nope", "small\x00", "../small"):
        r = _post(mirror, {"action": "sync", "rule": rule, "csrf": token})
        assert r.status_code == 409 and _title(r) == "not started", (rule, r.text[:300])


# --- XSS -------------------------------------------------------------------------------------

def test_reflected_names_are_escaped_on_every_page(mirror: AdvMirror) -> None:
    token = _token(mirror)
    for path in ("/cache", f"/cache/{UP}/test/small"):  # no framing, no caching of the token
        headers = _get(mirror, path).headers
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    for data in ({"action": evil, "target": f"{UP}/test/small:v1"},
                 {"action": "pin", "target": f"{UP}/{evil}"},
                 {"action": "unpin", "target": f"{UP}/test/small:{evil}"},
                 {"action": "purge", "target": f"{UP}/test/small@{evil}"},
                 {"action": "sync", "rule": evil}):
        r = _post(mirror, {**data, "csrf": token})
        assert r.status_code == 409, data
        assert "<script" not in r.text and "<img" not in r.text, data
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    # what a laxer upstream (or a damaged index) could hold: names the pages must escape
    index = Index(mirror.cache_dir / "index")
    digest = parse_digest(mirror_manifest_digest(mirror))
    try:
        index.set_tag(UP, f"xss{mirror.workers}/repo", evil, digest, "x")
        index.set_tag(UP, f"xss{mirror.workers}/{evil}", "v1", digest, "x")
        index.flush()
        for path in ("/cache", f"/cache/{UP}/xss{mirror.workers}/repo"):
            for user in ("ops", "other"):
                r = _get(mirror, path, user)
                assert r.status_code in (200, 404) and "<script" not in r.text, (path, user)
                assert "<img" not in r.text, (path, user)
        assert "&lt;script&gt;" in _get(mirror, "/cache").text
    finally:
        index.delete_tag(UP, f"xss{mirror.workers}/repo", evil)
        index.delete_tag(UP, f"xss{mirror.workers}/{evil}", "v1")
        index.close()
    for user in ("ops", "other"):  # an admin sees a page for any name, others a 404
        r = _get(mirror, f"/cache/{UP}/{evil}", user)
        assert r.status_code in (200, 404), (user, r.status_code)
        if r.status_code == 200:
            assert "<script" not in r.text and "<img" not in r.text
        else:  # the name is echoed, as JSON (not drawn by a browser)
            assert r.headers["Content-Type"].startswith("application/json")


def mirror_manifest_digest(m: MirrorProcess) -> str:
    """test/small:v1's digest as the browser shows it."""
    found = re.search(r'data-reference="v1" data-digest="([^"]+)"',
                      _get(m, f"/cache/{UP}/test/small").text)
    assert found
    return found.group(1)


# --- paths and what they tell ----------------------------------------------------------------

def test_path_tricks_show_nothing_the_user_may_not_pull(mirror: AdvMirror) -> None:
    def shape(r: httpx.Response) -> tuple[int, str]:
        return r.status_code, re.sub(r"\S+ is not in the cache browser", "X", r.text)

    cached = _get(mirror, f"/cache/{UP}/secret/app", "other")
    absent = _get(mirror, f"/cache/{UP}/secret/never-cached", "other")
    assert cached.status_code == 404 and shape(cached) == shape(absent)
    assert shape(_get(mirror, "/cache/nowhere.test/secret/app", "other")) == shape(absent)
    for path in ("/cache/localhost/test/small/../../localhost/secret/app",
                 "/cache/localhost/test/small/%2E%2E/%2E%2E/localhost/secret/app",
                 "/cache/localhost/test%2Fsmall/..%2F..%2Fsecret%2Fapp",
                 "/cache/localhost/secret%2Fapp", "/cache/localhost//secret/app",
                 "/cache/localhost/secret/app/", "/cache/localhost/SECRET/app",
                 "/cache/localhost/test/small%00/../secret/app", "/cache/localhost/%ff",
                 "/cache/%2e%2e/localhost/secret/app", "/cache/localhost/secret/app?page=1"):
        with httpx.Client(trust_env=False, timeout=60) as c:
            request = c.build_request("GET", f"{mirror.url}{path}")
            request.url = request.url.copy_with(raw_path=path.encode())
            r = c.send(request, auth=("other", "pw"))
        assert r.status_code == 404 or (r.status_code == 200
                                        and 'class="image"' not in r.text), (path, r.text[:300])
    listing = _get(mirror, "/cache", "other").text
    assert "secret" not in listing and "test/docker" not in listing
    assert "conf/pinned" not in listing
    assert set(_rows(mirror, "test/small", "other")) == {"v1"}


def test_the_status_page_does_not_name_what_the_browser_hides(mirror: AdvMirror) -> None:
    page = _get(mirror, "/", "other")
    assert page.status_code == 200
    assert "secret/app" not in page.text and "test/docker" not in page.text


@pytest.mark.parametrize("path", ["/cache?page=%C2%B2", "/cache/localhost/test/small?page=%C2%B2"])
def test_a_unicode_digit_page_number_is_not_a_500(public: AdvMirror, path: str) -> None:
    assert _get(public, path, None).status_code == 200


# --- purges of what must stay ----------------------------------------------------------------

def test_purge_keeps_pinned_and_shared_content(mirror: AdvMirror, world: World) -> None:
    token = _token(mirror)

    def act(**fields: str) -> httpx.Response:
        return _post(mirror, {**fields, "csrf": token})

    pinned = world.pinned
    for target in (f"{UP}/conf/pinned:v1", f"{UP}/conf/pinned@{pinned.manifest.digest}",
                   f"{UP}/test/docker@{pinned.manifest.digest}",  # another repo's name
                   f"{UP}/conf/pinned@{pinned.layers[0].digest}",  # a layer of it
                   f"{UP}/test/small:v1",  # the sync rule's pin
                   f"{UP}/test/docker@{world.shared.manifest.digest}",
                   f"{UP}/secret/app@{world.shared.layers[0].digest}"):
        r = act(action="purge", target=target, confirm="yes")
        assert r.status_code == 409 and _title(r) == "not purged", (target, r.text[:400])
        assert "pinned" in r.text
    r = act(action="purge", target=f"{UP}/test/small")  # asks first: the plan
    assert _title(r) == f"purge {UP}/test/small?" and "pinned tags kept: v1" in r.text
    for target in (f"{UP}/conf/pinned:v1", f"{UP}/test/small:v1"):
        r = act(action="unpin", target=target)
        assert r.status_code == 409 and "mirror.toml" in r.text, target

    repo = f"keep{mirror.workers}/copy"
    world.push(repo, world.shared)
    _pull(mirror, repo, world.shared)
    r = act(action="purge", target=f"{UP}/{repo}", confirm="yes")
    assert _title(r) == "purged" and "0 blob(s)" in r.text, r.text[:400]
    every = [*world.shared.all_blobs, *world.pinned.all_blobs]
    assert all(mirror.blob_path(b.digest).exists() for b in every)
    _pull(mirror, "test/small", world.shared)
    assert set(_rows(mirror, "conf/pinned")) == {"v1"}


@pytest.mark.xfail(strict=True, reason="a tag purged while its content stays (shared) is "
                   "still served from the worker's in-memory tag answers (proxy._tags, for "
                   "tag_ttl) without being recorded again: the browser says nothing is "
                   "cached and pin answers 'pull it first' right after a pull")
def test_a_pull_after_purging_a_shared_tag_shows_again(mirror: AdvMirror, world: World
                                                       ) -> None:
    repo = f"again{mirror.workers}/copy"
    world.push(repo, world.shared)
    token = _token(mirror)
    with httpx.Client(trust_env=False, timeout=60) as c:  # one connection: one worker
        _pull(mirror, repo, world.shared, client=c)
        r = _post(mirror, {"action": "purge", "target": f"{UP}/{repo}:v1", "confirm": "yes",
                           "csrf": token}, client=c)
        assert _title(r) == "purged"
        _pull(mirror, repo, world.shared, client=c)
        r = _post(mirror, {"action": "pin", "target": f"{UP}/{repo}:v1", "csrf": token},
                  client=c)
    assert _title(r) == "pinned", r.text[:400]
    assert set(_rows(mirror, repo)) == {"v1"}


def test_a_pin_names_an_image_the_repository_holds(mirror: AdvMirror, world: World) -> None:
    token = _token(mirror)
    target = f"{UP}/ghost{mirror.workers}/none@{world.secret.layers[0].digest}"
    r = _post(mirror, {"action": "pin", "target": target, "csrf": token})
    try:
        assert r.status_code == 409 and _title(r) == "not pinned", r.text[:400]
    finally:
        _post(mirror, {"action": "unpin", "target": target, "csrf": token})


# --- concurrency -----------------------------------------------------------------------------

def _pin_while_purging(mirror: AdvMirror, target: str, token: str, pinner: httpx.Client,
                       purger: httpx.Client) -> dict[str, str]:
    said: dict[str, str] = {}

    def pin() -> None:
        said["pin"] = _title(_post(mirror, {"action": "pin", "target": target, "csrf": token},
                                   client=pinner))

    def purge() -> None:
        said["purge"] = _title(_post(mirror, {"action": "purge", "target": target,
                                              "confirm": "yes", "csrf": token}, client=purger))

    threads = [threading.Thread(target=purge), threading.Thread(target=pin)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return said


def _race_pin_and_purge(mirror: AdvMirror, world: World, rounds: int) -> list[str]:
    """Pin on one worker while purging on the other (or the same, with one worker): the
    rounds where both were told they succeeded."""
    token = _token(mirror)
    clients = _per_worker(mirror)
    pinner, purger = clients[0], clients[-1]
    both = []
    try:
        for n in range(rounds):
            repo = f"race{mirror.workers}/r{n}"
            image = world.fresh(repo, 200 + n)
            _pull(mirror, repo, image, client=pinner)
            said = _pin_while_purging(mirror, f"{UP}/{repo}:v1", token, pinner, purger)
            if said == {"pin": "pinned", "purge": "purged"}:
                both.append(f"{repo}: pinned, then purged (gone: "
                            f"{not mirror.blob_path(image.layers[0].digest).exists()})")
                break
    finally:
        for c in clients:
            c.close()
    return both


def test_pin_and_purge_at_once_never_both_succeed(mirror: AdvMirror, world: World) -> None:
    if mirror.workers == 1:  # the purge holds the event loop from pins() to the deletion:
        # only the pin's thread (get_tag, then add_pin) can interleave, too rarely to show
        pytest.skip("one worker: the race is real but too narrow to show in bounded time")
    assert _race_pin_and_purge(mirror, world, 40) == []


def _finished_runs(m: MirrorProcess) -> list[dict[str, Any]]:
    return [e for e in m.log_entries()
            if e.get("msg") == "sync: run finished" and e.get("rule") == "small"]


def test_sync_now_spam_never_runs_a_rule_twice_at_once(mirror: AdvMirror) -> None:
    """And every "sync started" is a run (the lock is taken before the answer): the others
    are told it is running."""
    token = _token(mirror)
    clients = [httpx.Client(trust_env=False, timeout=60) for _ in range(12)]
    statuses: list[int] = []
    titles: list[str] = []
    before = len(_finished_runs(mirror))

    def spam(c: httpx.Client) -> None:
        for _ in range(3):
            r = _post(mirror, {"action": "sync", "rule": "small", "csrf": token}, client=c)
            statuses.append(r.status_code)
            titles.append(_title(r) if r.status_code == 200 or "it is running now" in r.text
                          else r.text)

    try:
        threads = [threading.Thread(target=spam, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    assert len(statuses) == 36 and set(statuses) <= {200, 409}, statuses
    assert 200 in statuses
    wait_until(lambda: not _running(mirror), 30, interval=0.05, what="the sync runs to end")
    started = titles.count("sync started")
    assert started == statuses.count(200), titles
    assert titles.count("not started") == statuses.count(409), titles  # told it runs
    wait_until(lambda: len(_finished_runs(mirror)) >= before + started, 30, interval=0.05,
               what=f"{started} runs finished")
    assert len(_finished_runs(mirror)) == before + started, "a run told started never ran"
    runs = sorted((_when(e["time"]) - float(e["seconds"]), _when(e["time"]))
                  for e in _finished_runs(mirror))
    overlaps = [(a, b) for a, b in itertools.pairwise(runs) if b[0] < a[1] - 0.005]
    assert not overlaps, overlaps


def _running(m: MirrorProcess) -> bool:
    row = re.search(r'<tr class="sync-rule" data-name="small">(.*?)</tr>', _get(m, "/cache").text)
    assert row
    return '<td class="state">running</td>' in row.group(1)


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- many repositories and tags --------------------------------------------------------------

def test_thousands_of_tags_and_repositories_stay_paged_and_quick(mirror: AdvMirror) -> None:
    digest = parse_digest(mirror_manifest_digest(mirror))
    many = f"many{mirror.workers}/tags"
    tags = [(many, f"t{n:05}") for n in range(3000)]
    tags += [(f"many{mirror.workers}/r{n:04}", "v1") for n in range(400)]
    index = Index(mirror.cache_dir / "index")
    try:
        for repo, tag in tags:
            index.set_tag(UP, repo, tag, digest, "x")
        index.flush()
        _pages_of_many(mirror, many)
    finally:
        for repo, tag in tags:
            index.delete_tag(UP, repo, tag)
        index.close()


def _pages_of_many(mirror: AdvMirror, many: str) -> None:
    for path, rows, pages in ((f"/cache/{UP}/{many}", 'class="image"', 30),
                              (f"/cache/{UP}/{many}?page=30", 'class="image"', 30),
                              (f"/cache/{UP}/{many}?page=99999", 'class="image"', 30),
                              ("/cache", 'class="repository"', 0),
                              ("/cache?page=3", 'class="repository"', 0)):
        started = time.monotonic()
        r = _get(mirror, path)
        took = time.monotonic() - started
        assert r.status_code == 200 and took < 5, (path, took)
        assert r.text.count(rows) == 100, (path, r.text.count(rows))
        if pages:
            assert f"?page={pages}" in r.text and f"?page={pages + 1}" not in r.text
    assert len(r.text) < 500_000


def _fill_store(m: MirrorProcess, count: int) -> list[Path]:
    """Files named as content (not in the index), as a large cache holds."""
    made = []
    for shard in range(256):
        (m.blobs_dir / "sha256" / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
    for n in range(count):
        data = os.urandom(16) + str(n).encode()
        hexd = hashlib.sha256(data).hexdigest()
        path = m.blobs_dir / "sha256" / hexd[:2] / hexd
        path.write_bytes(data)
        made.append(path)
    return made


def test_a_purge_does_not_stall_the_worker(public: AdvMirror) -> None:
    made = _fill_store(public, 20000)
    token = _token(public)
    took: list[float] = []

    def purge() -> None:
        started = time.monotonic()
        r = _post(public, {"action": "purge", "target": f"{UP}/test/small", "csrf": token})
        took.append(time.monotonic() - started)
        assert r.status_code == 200

    try:
        thread = threading.Thread(target=purge)
        thread.start()
        slowest = 0.0
        with httpx.Client(trust_env=False, timeout=120) as c:  # one worker: the same one
            while thread.is_alive():
                started = time.monotonic()
                assert c.get(f"{public.url}/healthz").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
        thread.join(120)
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    assert took, "the purge did not answer"
    if took[0] < 0.5:
        pytest.skip(f"the plan took {took[0]:.2f}s: too quick to tell")
    # a plan on the loop holds /healthz for the whole purge; a busy machine, for a slice
    assert slowest < max(0.25, took[0] / 4), \
        f"/healthz took {slowest:.2f}s during a {took[0]:.2f}s purge"


# --- status = "public", and no [auth] at all --------------------------------------------------

def test_public_pages_show_anonymous_only_what_it_may_pull(public: AdvMirror) -> None:
    page = _get(public, "/cache", None)
    assert page.status_code == 200 and "<form" not in page.text
    assert 'data-name="localhost/test/small"' in page.text and "secret" not in page.text
    assert _get(public, f"/cache/{UP}/secret/app", None).status_code == 404
    small = _get(public, f"/cache/{UP}/test/small", None)
    assert small.status_code == 200 and "<form" not in small.text
    r = _post(public, {"action": "pin", "target": f"{UP}/test/small:v1", "csrf": "x"},
              user=None)
    assert r.status_code == 401
    token = _token(public)  # an admin who logs in still acts
    r = _post(public, {"action": "pin", "target": f"{UP}/secret/app:v1", "csrf": token})
    assert _title(r) == "pinned"
    r = _post(public, {"action": "unpin", "target": f"{UP}/secret/app:v1", "csrf": token})
    assert _title(r) == "unpinned"
    r = _post(public, {"action": "pin", "target": f"{UP}/secret/app:v1", "csrf": token},
              user="other")
    assert r.status_code == 403


def test_without_auth_the_browser_is_read_only(open_mirror: AdvMirror) -> None:
    for user in (None, "ops"):
        page = _get(open_mirror, "/cache", user)
        assert page.status_code == 200 and "<form" not in page.text
        assert 'data-name="localhost/secret/app"' in page.text  # everyone may pull all
        repo = _get(open_mirror, f"/cache/{UP}/secret/app", user)
        assert repo.status_code == 200 and "<form" not in repo.text
    forged = csrf.issue(_secret(open_mirror), "ops", time.time())
    for user in (None, "ops"):
        for action, target in (("pin", f"{UP}/secret/app:v1"), ("purge", f"{UP}/secret/app"),
                               ("sync", "")):
            r = _post(open_mirror, {"action": action, "target": target, "rule": "small",
                                    "csrf": forged, "confirm": "yes"}, user=user)
            assert r.status_code == 403, (user, action, r.status_code)  # no login helps
            assert _code(r) == "DENIED" and "without [auth]" in r.text, r.text
            assert "WWW-Authenticate" not in r.headers
    assert _runtime_pins(open_mirror) == {}
    assert set(_rows(open_mirror, "secret/app", "ops")) == {"v1"}

