"""Access rules and robot tokens with real clients (issue 16): skopeo through the mirror's
token flow as anonymous, as users in and out of rules and groups, and as a CI robot whose
token is revoked while the server runs — with one worker and with two."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.integration.test_client_access import conf, pull
from tests.support import oci
from tests.support.clients import UpstreamRegistry, env_without_proxies, verify_dir
from tests.support.mirror import MirrorProcess, RulesMirror, Upstream
from tests.support.registry import wait_until

pytestmark = pytest.mark.integration

USERS = ("runner", "ops", "other")
RULES = [
    {"anonymous": True, "allow": ["localhost/test/small"]},
    {"groups": ["ci"], "allow": ["localhost/test/docker*"]},
    {"users": ["ops"], "admin": True, "allow": ["localhost/**"]},
]
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.docker.distribution.manifest.v2+json"}


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def mirror(request: pytest.FixtureRequest, upstream: UpstreamRegistry, tmp_path: Path
           ) -> Iterator[MirrorProcess]:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text("".join(f"{u}:{hashed}\n" for u in USERS))
    m = RulesMirror(tmp_path / "mirror", [Upstream(name="localhost", url=upstream.url)],
                    htpasswd=htpasswd, rules=RULES, groups={"ci": ["runner"]},
                    server_extra={"workers": request.param, "catalog": True})
    m.start()
    try:
        yield m
    finally:
        m.stop()


def _authfile(path: Path, host: str, user: str, password: str) -> Path:
    path.write_text(json.dumps({"auths": {host: {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return path


def _token(m: MirrorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", "token", *args, "--config", str(m.config_path)],
        capture_output=True, text=True, timeout=60, env=env_without_proxies(), cwd=m.workdir)


def _bearer(m: MirrorProcess, user: str, password: str) -> str:
    r = httpx.get(f"{m.url}/token", auth=(user, password), trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def _statuses_per_worker(m: MirrorProcess, path: str, headers: dict[str, str],
                         workers: int) -> dict[int, int]:
    """On new connections until every worker has answered: pid -> status of GET `path`."""
    seen: dict[int, int] = {}
    for _ in range(100):
        with httpx.Client(trust_env=False, timeout=30) as client:
            pid = int(client.get(f"{m.url}/healthz").json()["pid"])
            seen[pid] = client.get(f"{m.url}{path}", headers={**ACCEPT, **headers}).status_code
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered")


@pytest.mark.timeout(300)
def test_rules_decide_who_pulls_what_with_skopeo(
        mirror: MirrorProcess, test_images: oci.ImageSet, tmp_path: Path) -> None:
    registries = conf(tmp_path / "registries.conf", "localhost", f"{mirror.host}/localhost")
    # anonymous: what the anonymous rule allows, and nothing else
    pull(registries, "localhost/test/small:v1", tmp_path / "anon")
    assert verify_dir(tmp_path / "anon").manifest == test_images.small.manifest_bytes
    refused = pull(registries, "localhost/test/docker:v1", tmp_path / "anon2", check=False)
    assert refused.returncode != 0
    # a group member: the group's repositories and the anonymous ones
    runner = _authfile(tmp_path / "runner.json", mirror.host, "runner", "pw")
    pull(registries, "localhost/test/docker:v1", tmp_path / "runner", authfile=runner)
    pull(registries, "localhost/test/small:v2", tmp_path / "runner2", authfile=runner)
    denied = pull(registries, "localhost/test/big:v1", tmp_path / "runner3", authfile=runner,
                  check=False)
    assert denied.returncode != 0
    assert "'runner' may not pull localhost/test/big: no [[auth.rule]] allows it" in \
        denied.stderr, denied.stderr  # skopeo shows the registry's message
    # a user no rule names gets what anonymous clients get
    other = _authfile(tmp_path / "other.json", mirror.host, "other", "pw")
    pull(registries, "localhost/test/small:v3", tmp_path / "other", authfile=other)
    assert pull(registries, "localhost/test/docker:v1", tmp_path / "other2", authfile=other,
                check=False).returncode != 0
    # every denial is in the access log with the user
    denials = [e for e in mirror.request_log() if e["status"] == 403]
    assert {e["user"] for e in denials} >= {"runner", "other"}, denials
    assert all("/manifests/" in str(e["path"]) for e in denials), denials


@pytest.mark.timeout(120)
def test_denials_challenge_anonymous_clients_and_refuse_users(mirror: MirrorProcess) -> None:
    path = "/v2/localhost/test/docker/manifests/v1"
    r = httpx.get(f"{mirror.url}{path}", headers=ACCEPT, trust_env=False)
    assert r.status_code == 401, r.text
    assert 'scope="repository:test/docker:pull"' in r.headers["WWW-Authenticate"]
    anonymous = httpx.get(f"{mirror.url}/token", trust_env=False).json()["token"]
    r = httpx.get(f"{mirror.url}{path}", headers={**ACCEPT, "Authorization":
                                                  f"Bearer {anonymous}"}, trust_env=False)
    assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    user = _bearer(mirror, "other", "pw")
    r = httpx.get(f"{mirror.url}{path}", headers={**ACCEPT, "Authorization": f"Bearer {user}"},
                  trust_env=False)
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED", r.text
    assert "WWW-Authenticate" not in r.headers


@pytest.mark.timeout(180)
def test_the_catalog_lists_only_what_the_user_may_pull(mirror: MirrorProcess) -> None:
    ops = {"Authorization": f"Bearer {_bearer(mirror, 'ops', 'pw')}"}
    for repository in ("test/small", "test/docker", "test/big"):
        r = httpx.get(f"{mirror.url}/v2/localhost/{repository}/manifests/v1",
                      headers={**ACCEPT, **ops}, trust_env=False, timeout=60)
        assert r.status_code == 200, r.text

    def listed(headers: dict[str, str]) -> list[str]:
        r = httpx.get(f"{mirror.url}/v2/_catalog", headers=headers, trust_env=False)
        assert r.status_code == 200, r.text
        return list(r.json()["repositories"])

    assert listed(ops) == ["test/big", "test/docker", "test/small"]
    runner = {"Authorization": f"Bearer {_bearer(mirror, 'runner', 'pw')}"}
    assert listed(runner) == ["test/docker", "test/small"]
    assert listed({"Authorization": f"Bearer {_bearer(mirror, 'other', 'pw')}"}) == [
        "test/small"]


@pytest.mark.timeout(300)
def test_a_robot_token_pulls_what_it_allows_until_revoked(
        mirror: MirrorProcess, test_images: oci.ImageSet, tmp_path: Path) -> None:
    created = _token(mirror, "create", "--name", "ci-bot", "--allow", "localhost/test/big",
                     "--expires", "1h")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("mrt_") and token not in (mirror.cache_dir / "robots.json"
                                                      ).read_text()
    listing = _token(mirror, "list")
    assert listing.stdout.startswith("ci-bot\tallow localhost/test/big\t"), listing.stdout
    # as the password in an auth file, through the /token flow
    registries = conf(tmp_path / "registries.conf", "localhost", f"{mirror.host}/localhost")
    bot = _authfile(tmp_path / "bot.json", mirror.host, "ci-bot", token)
    pull(registries, "localhost/test/big:v1", tmp_path / "big", authfile=bot)
    assert verify_dir(tmp_path / "big").manifest == test_images.big.manifest_bytes
    refused = pull(registries, "localhost/test/docker:v1", tmp_path / "docker", authfile=bot,
                   check=False)
    assert "the robot's token allows localhost/test/big" in refused.stderr, refused.stderr
    assert _token(mirror, "create", "--name", "ci-bot", "--allow", "localhost/**"
                  ).returncode == 2  # a name is not silently replaced
    # a bearer token issued before the revocation, and Basic with the token, stop working on
    # every worker without a restart
    workers = int(mirror.server_extra["workers"])
    bearer = {"Authorization": f"Bearer {_bearer(mirror, 'ci-bot', token)}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"ci-bot:{token}".encode()).decode()}
    path = "/v2/localhost/test/big/manifests/v1"
    assert set(_statuses_per_worker(mirror, path, bearer, workers).values()) == {200}
    assert _token(mirror, "revoke", "--name", "ci-bot").returncode == 0
    wait_until(lambda: set(_statuses_per_worker(mirror, path, bearer, workers).values())
               == {401}, timeout=10, what="the revoked robot's bearer token refused")
    assert set(_statuses_per_worker(mirror, path, basic, workers).values()) == {401}
    r = httpx.get(f"{mirror.url}/token", headers=basic, trust_env=False)
    assert r.status_code == 401
    assert _token(mirror, "list").stdout == ""
    assert _token(mirror, "revoke", "--name", "ci-bot").returncode == 1
