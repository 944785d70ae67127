"""Access rules and robot tokens under attack (issue 16), with real worker processes (1 and 2)
in front of the real docker-registry upstream: a denied repository asked for under other
names, its content asked for by digest under an allowed one, its tags, referrers and catalog
entries; malformed, forged and oversized credentials (never a 500); robot tokens guessed at
/token (rate limited as passwords are); a robot's bearer token after its name is re-created.

Rules: anonymous clients may pull test/small, alice test/docker*, ops everything (admin).
Denied to alice and to anonymous clients: test/multi and test/big. Bugs found are marked
xfail(strict=True) with what goes wrong.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import quote

import bcrypt
import httpx
import pytest

from mirror.http.clientauth import FAILED_LOGINS_PER_WINDOW, FAILURE_WINDOW
from tests.support import oci
from tests.support.clients import UpstreamRegistry, env_without_proxies
from tests.support.mirror import MirrorProcess, RulesMirror, Upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RULES = [
    {"anonymous": True, "allow": ["localhost/test/small"]},
    {"users": ["alice"], "allow": ["localhost/test/docker*"]},
    {"users": ["ops"], "admin": True, "allow": ["localhost/**"]},
]
ACCEPT = ("application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")


def basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


@pytest.fixture(scope="module", params=[1, 2], ids=["1worker", "2workers"])
def mirror(request: pytest.FixtureRequest, upstream: UpstreamRegistry,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RulesMirror]:
    workdir = tmp_path_factory.mktemp("adversary")
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\nops:{hashed}\n")
    m = RulesMirror(workdir / "mirror", [Upstream(name="localhost", url=upstream.url)],
                    rules=RULES, htpasswd=htpasswd, server_extra={"workers": request.param,
                                                         "catalog": True,
                                                         "trusted_proxies": ["127.0.0.1/32"]})
    m.start()
    try:
        yield m
    finally:
        m.stop()


def _raw_status(m: MirrorProcess, path: str, authorization: bytes, client: str) -> int:
    """The status of a GET sent byte for byte (httpx refuses malformed header values)."""
    host, port = m.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode()
                     + b"\r\nConnection: close\r\nX-Forwarded-For: " + client.encode()
                     + b"\r\nAuthorization: " + authorization + b"\r\n\r\n")
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


def _get(m: MirrorProcess, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> httpx.Response:
    """On a new connection (so that with 2 workers either may answer)."""
    with httpx.Client(trust_env=False, timeout=60) as client:
        return client.request(method, f"{m.url}{path}",
                              headers={"Accept": ACCEPT, **(headers or {})})


def _bearer(m: MirrorProcess, user: str, password: str) -> dict[str, str]:
    r = _get(m, "/token", {"Authorization": basic(user, password)})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _secret(m: MirrorProcess, images: oci.ImageSet) -> oci.Image:
    """test/multi's amd64 image, cached through the mirror by ops (who may pull it)."""
    ops = _bearer(m, "ops", "pw")
    image = images.multi.image_for("amd64")
    for path in ("/v2/localhost/test/multi/manifests/v1",
                 f"/v2/localhost/test/multi/manifests/{image.manifest.digest}",
                 *(f"/v2/localhost/test/multi/blobs/{b.digest}" for b in image.blobs)):
        assert _get(m, path, ops).status_code == 200, path
    m.wait_cached([b.digest for b in image.blobs])
    return image


def _refused(r: httpx.Response) -> bool:
    return r.status_code in (400, 401, 403, 404) and "errors" in r.json()


# --- a denied repository under other names -----------------------------------------------

def test_a_denied_repository_is_refused_under_every_name(
        mirror: RulesMirror, test_images: oci.ImageSet) -> None:
    image = _secret(mirror, test_images)
    alice = _bearer(mirror, "alice", "pw")
    manifest, layer = image.manifest.digest, image.layers[0].digest
    names = ["test/multi", "localhost/test/multi", "localhost/localhost/test/multi",
             "TEST/multi", "localhost/TEST/multi", "test/Multi", "test//multi",
             "test/./multi", "test/docker/../multi", "localhost/test/docker/../multi",
             "test%2Fmulti", "localhost%2Ftest%2Fmulti", "test/%6dulti", "test/multi/",
             "./test/multi", "test/multi%00", "test/multi%2F", "test/multi?ns=localhost"]
    for headers in ({}, alice):
        for name in names:
            for what in ("manifests/v1", f"manifests/{manifest}", f"blobs/{layer}",
                         "tags/list", f"referrers/{manifest}"):
                path, _, query = f"/v2/{name}/{what}".partition("?")
                for q in ("", "?ns=localhost", "?ns=LOCALHOST", "?ns=localhost&ns=other"):
                    url = path + (q or ("?" + query if query else ""))
                    for method in ("GET", "HEAD"):
                        r = _get(mirror, url, headers, method)
                        assert r.status_code in (400, 401, 403, 404, 405), (url, r.status_code)
                        if method == "GET":
                            assert _refused(r), (url, r.status_code, r.text)


def test_a_denied_repository_gets_401_anonymously_and_403_with_a_user(
        mirror: RulesMirror) -> None:
    for what in ("manifests/v1", "tags/list"):
        r = _get(mirror, f"/v2/localhost/test/multi/{what}")
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers, r.text
        r = _get(mirror, f"/v2/localhost/test/multi/{what}", _bearer(mirror, "alice", "pw"))
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED", r.text


# --- content of a denied repository by digest under an allowed one -----------------------

def test_denied_content_is_not_served_by_digest_under_an_allowed_repository(
        mirror: RulesMirror, test_images: oci.ImageSet) -> None:
    image = _secret(mirror, test_images)
    alice = _bearer(mirror, "alice", "pw")
    served = []
    for headers, repository in ((alice, "test/docker"), ({}, "test/small")):
        for blob in image.all_blobs:
            kind = "manifests" if blob is image.manifest else "blobs"
            r = _get(mirror, f"/v2/localhost/{repository}/{kind}/{blob.digest}", headers)
            if r.status_code == 200:
                served.append(f"{repository}/{kind}/{blob.digest}")
    # the upstream registry itself refuses every one of them under those names
    assert served == []


# --- the catalog --------------------------------------------------------------------------

def test_the_catalog_never_names_a_denied_repository(
        mirror: RulesMirror, test_images: oci.ImageSet) -> None:
    _secret(mirror, test_images)
    alice = _bearer(mirror, "alice", "pw")
    assert _get(mirror, "/v2/localhost/test/docker/manifests/v1", alice).status_code == 200
    assert _get(mirror, "/v2/localhost/test/small/manifests/v1").status_code == 200
    for last in ("", "a", "test/d", "test/docker", "test/m", "test/multi", "test/mult",
                 "localhost/", "\x7f", "test/multi\x00"):
        for n in ("", "1", "2", "0", "1000"):
            query = "&".join(p for p in (f"last={quote(last, safe='')}" if last else "",
                                         f"n={n}" if n else "") if p)
            r = _get(mirror, f"/v2/_catalog?{query}", alice)
            assert r.status_code == 200, (query, r.text)
            listed = r.json()["repositories"]
            assert set(listed) <= {"test/docker", "test/small"}, (query, listed)
            assert "multi" not in r.headers.get("Link", ""), (query, r.headers["Link"])
    # the catalog is for users only, and a robot's lists only what it may pull
    assert _get(mirror, "/v2/_catalog").status_code == 401
    anonymous = _get(mirror, "/token").json()["token"]
    assert _get(mirror, "/v2/_catalog", {"Authorization": f"Bearer {anonymous}"}
                ).status_code == 401


# --- bad credentials ----------------------------------------------------------------------

BAD_AUTHORIZATION: list[str | bytes] = [
    "Bearer", "Bearer ", "Bearer .", "Bearer a.b", "Bearer " + "x" * 5000,
    "Bearer " + "e30." + "0" * 64, "bearer ..", "Basic", "Basic ", "Basic !!!!",
    "Basic " + base64.b64encode(b"no-colon").decode(), basic("alice", b"\xff\xfe"),
    basic("alice", "wrong"), basic("nobody", "mrt_" + "A" * 43), basic("", ""),
    "Basic " + "A" * 7000, "Digest username=alice", "Negotiate abc", " Bearer x",
    b"Bearer \xff\xfe", b"Basic \xc3\x28", "Bearer x\ty", "Basic =",
]


def test_bad_credentials_get_401_never_500(mirror: RulesMirror) -> None:
    paths = ["/v2/", "/v2/localhost/test/multi/manifests/v1", "/v2/localhost/test/small/tags/list",
             "/v2/_catalog", "/token", "/", "/metrics"]
    for i, header in enumerate(BAD_AUTHORIZATION):
        raw = header if isinstance(header, bytes) else header.encode()
        for path in paths:  # each header from its own address: the login budget not in play
            status = _raw_status(mirror, path, raw, f"10.9.{i}.1")
            assert status < 500, (header, path, status)
            if path not in ("/v2/localhost/test/small/tags/list", "/", "/metrics"):
                assert status in (400, 401), (header, path, status)


def test_a_huge_authorization_header_is_refused_cleanly(mirror: RulesMirror) -> None:
    for size in (8000, 9000, 64 * 1024):
        with httpx.Client(trust_env=False, timeout=30) as client:
            r = client.get(f"{mirror.url}/v2/", headers={"Authorization": "Bearer " + "a" * size})
        assert r.status_code in (400, 401, 431), (size, r.status_code)
    assert _get(mirror, "/healthz").status_code == 200


# --- robot tokens at /token ---------------------------------------------------------------

def _token(m: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", "token", *args, "--config", str(m.config_path)],
        capture_output=True, text=True, timeout=60, env=env_without_proxies(), cwd=m.workdir)


def _windows(started: float) -> int:
    """How many of the login budget's fixed windows (wall-clock minutes) a test's requests
    touched: the budget starts afresh in each."""
    return int(time.time() // FAILURE_WINDOW) - int(started // FAILURE_WINDOW) + 1


def test_guessing_a_robot_token_at_token_is_rate_limited(mirror: RulesMirror) -> None:
    created = _token(mirror, "create", "--name", "guessed", "--allow", "localhost/test/docker",
                     "--expires", "1h")
    assert created.returncode == 0, created.stderr
    try:
        statuses: list[int] = []
        started = time.time()
        for i in range(15):
            r = _get(mirror, "/token", {"Authorization": basic("guessed", f"mrt_guess{i}"),
                                        "X-Forwarded-For": "10.8.0.1"})
            statuses.append(r.status_code)
        if _windows(started) == 1:
            assert statuses == [401] * 10 + [429] * 5, statuses
        else:
            assert statuses.count(401) <= 20 and set(statuses) <= {401, 429}, statuses
    finally:
        assert _token(mirror, "revoke", "--name", "guessed").returncode == 0


def test_the_failed_login_budget_is_the_addresss_across_workers(
        mirror: RulesMirror) -> None:
    workers = int(mirror.server_extra["workers"])
    failures = 0
    started = time.time()
    for _ in range(20 * workers + 10):  # new connections: spread over the workers
        r = _get(mirror, "/token", {"Authorization": basic("alice", "guess"),
                                    "X-Forwarded-For": "10.8.0.2"})
        assert r.status_code in (401, 429), r.text
        failures += r.status_code == 401
    budget = FAILED_LOGINS_PER_WINDOW * _windows(started)
    assert failures <= budget, f"{failures} wrong passwords checked from one address"
    # a right password from elsewhere is not refused meanwhile
    assert _get(mirror, "/token", {"Authorization": basic("alice", "pw"),
                                   "X-Forwarded-For": "10.8.0.3"}).status_code == 200
