"""Access rules and robot tokens as pure policy (http/grants.py, cache/robots.py), and the
configuration errors a bad [[auth.rule]] gets."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from mirror.cache.robots import Robots
from mirror.config import ConfigError, parse_config
from mirror.http.clientauth import Authenticator, Identity
from mirror.http.grants import Grants

UPSTREAMS = [{"name": "docker.io", "url": "https://registry-1.docker.io"},
             {"name": "ghcr.io", "url": "https://ghcr.io", "access": "authenticated"}]


def _config(tmp_path: Path, auth: dict[str, Any]) -> Any:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    return parse_config({"upstream": UPSTREAMS, "auth": {"htpasswd": str(htpasswd), **auth}})


def _grants(tmp_path: Path, **auth: Any) -> Grants:
    config = _config(tmp_path, auth)
    return Grants(config.auth, config.upstreams)


ANON, ALICE, BOB, CAROL = Identity(""), Identity("alice"), Identity("bob"), Identity("carol")


def test_without_rules_anonymous_reads_public_upstreams_and_users_everything(
        tmp_path: Path) -> None:
    g = _grants(tmp_path)
    assert g.may_pull(None, "docker.io", "library/nginx")
    assert g.may_pull(ANON, "docker.io", "library/nginx")
    assert not g.may_pull(ANON, "ghcr.io", "acme/app")
    assert g.may_pull(ALICE, "ghcr.io", "acme/app")
    assert not g.is_admin(ALICE)


def test_rules_users_groups_anonymous_and_admin(tmp_path: Path) -> None:
    g = _grants(tmp_path, groups={"dev": ["bob"]}, rule=[
        {"anonymous": True, "allow": ["docker.io/library/*"]},
        {"users": ["alice"], "allow": ["ghcr.io/acme/**"], "admin": True},
        {"groups": ["dev"], "allow": ["docker.io/dev/*", "ghcr.io/acme/tools"]},
    ])
    assert g.may_pull(None, "docker.io", "library/nginx")
    assert not g.may_pull(None, "docker.io", "dev/x")
    assert not g.may_pull(ANON, "docker.io", "someone/else")
    assert g.may_pull(ALICE, "ghcr.io", "acme/app/sub") and g.may_pull(ALICE, "ghcr.io", "acme")
    assert g.may_pull(ALICE, "docker.io", "library/nginx")  # what anonymous may, anyone may
    assert not g.may_pull(ALICE, "docker.io", "dev/x")
    assert g.may_pull(BOB, "docker.io", "dev/x") and g.may_pull(BOB, "ghcr.io", "acme/tools")
    assert not g.may_pull(BOB, "ghcr.io", "acme/app")
    assert not g.may_pull(CAROL, "ghcr.io", "acme/app")  # no rule names carol
    assert g.is_admin(ALICE) and not g.is_admin(BOB) and not g.is_admin(None)


def test_an_anonymous_rule_never_opens_an_authenticated_upstream(tmp_path: Path) -> None:
    g = _grants(tmp_path, rule=[{"anonymous": True, "allow": ["ghcr.io/**", "docker.io/**"]}])
    assert not g.may_pull(None, "ghcr.io", "acme/app")
    assert g.may_pull(None, "docker.io", "library/nginx")


def test_every_user_and_robots(tmp_path: Path) -> None:
    g = _grants(tmp_path, rule=[{"users": ["*"], "allow": ["ghcr.io/**"], "admin": True},
                                {"anonymous": True, "allow": ["docker.io/library/*"]}])
    assert g.may_pull(CAROL, "ghcr.io", "x") and g.is_admin(CAROL)
    robot = Identity("carol", ("docker.io/acme/*", "quay.io/gone/*"))  # an upstream removed
    assert g.may_pull(robot, "docker.io", "acme/app")
    assert g.may_pull(robot, "docker.io", "library/nginx")  # anonymous's
    assert not g.may_pull(robot, "ghcr.io", "x")  # "*" is htpasswd users, not robots
    assert not g.is_admin(robot)


@pytest.mark.parametrize(("rule", "key"), [
    ({"allow": ["docker.io/x"]}, r"auth\.rule\[0\]: names nobody"),
    ({"users": ["a"]}, r"auth\.rule\[0\]: grants nothing"),
    ({"users": ["a"], "allow": ["quay.io/x"]}, r"auth\.rule\[0\]\.allow"),
    ({"users": ["a"], "allow": ["docker.io/X"]}, r"auth\.rule\[0\]\.allow"),
    ({"groups": ["nope"], "allow": ["docker.io/x"]}, r"auth\.rule\[0\]\.groups"),
    ({"anonymous": True, "admin": True}, r"auth\.rule\[0\]\.admin"),
    ({"users": ["a"], "allow": ["docker.io/x"], "colour": 1}, r"auth\.rule\[0\]\.colour"),
    ({"users": "a", "allow": ["docker.io/x"]}, r"auth\.rule\[0\]\.users"),
])
def test_bad_rules_name_the_key(tmp_path: Path, rule: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _config(tmp_path, {"rule": [rule]})


def test_groups_file_merges_with_the_table(tmp_path: Path) -> None:
    groups = tmp_path / "groups"
    groups.write_text("# comment\ndev: bob carol\nops: dave\n")
    config = _config(tmp_path, {"groups_file": str(groups), "groups": {"dev": ["erin"]}})
    assert config.auth.groups == {"dev": {"bob", "carol", "erin"}, "ops": {"dave"}}
    groups.write_text("no colon here\n")
    with pytest.raises(ConfigError, match=r"auth\.groups_file.*:1: expected"):
        _config(tmp_path, {"groups_file": str(groups)})


def test_robots_create_verify_expire_revoke(tmp_path: Path) -> None:
    robots = Robots(tmp_path / "robots.json")
    token = robots.create("ci", ("docker.io/**",), 3600, now=1000)
    assert robots.verify("ci", token, now=2000) is not None
    assert robots.verify("ci", token, now=4600) is None  # expired
    assert robots.verify("ci", token + "x", now=2000) is None
    assert robots.verify("other", token, now=2000) is None
    assert token not in (tmp_path / "robots.json").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "robots.json").st_mode) == 0o600
    other = Robots(tmp_path / "robots.json")  # another worker
    assert other.verify("ci", token, now=2000) is not None
    robots.revoke("ci")
    other._checked = float("-inf")  # its next check (RELOAD_SECONDS) has come
    assert other.verify("ci", token, now=2000) is None


def test_a_damaged_robots_file_grants_nothing(tmp_path: Path) -> None:
    (tmp_path / "robots.json").write_text("{not json")
    assert Robots(tmp_path / "robots.json").get("ci") is None


async def test_robot_tokens_and_passwords_do_not_cross(tmp_path: Path) -> None:
    robots = Robots(tmp_path / "robots.json")
    token = robots.create("ci", ("docker.io/**",), None)
    hashed = bcrypt.hashpw(token.encode(), bcrypt.gensalt(rounds=4))
    auth = Authenticator({"ci": hashed}, b"k" * 32, 300, robots)
    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    who = await auth.identify(basic("ci", token))
    assert who == Identity("ci", ("docker.io/**",))  # a robot, never the htpasswd user
    bearer = auth.issue(who)
    assert auth.verify_token(bearer) == who
    robots.revoke("ci")
    robots._checked = float("-inf")
    assert auth.verify_token(bearer) is None  # the robot's bearer ends with it
    assert await auth.identify(basic("ci", token)) is None
