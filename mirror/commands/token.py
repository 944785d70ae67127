"""`mirror token create|list|revoke`: robot accounts for CI (cache/robots.py). A token is
printed once, on create; the file keeps only its hash. Changes reach a running server within
a second, without a restart."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from mirror.cache.robots import Robot, RobotError, Robots
from mirror.config import Config, parse_duration
from mirror.http.access import robots_file
from mirror.http.clientauth import load_htpasswd
from mirror.oci.rules import PatternError, policy_pattern

NEVER = "never"


def _robots(config: Config) -> Robots | None:
    if config.auth.htpasswd is None:
        print("mirror: token: robot tokens need access control on ([auth] htpasswd)",
              file=sys.stderr)
        return None
    return Robots(robots_file(config))


def create(config: Config, name: str, allow: Sequence[str], expires: str) -> int:
    robots = _robots(config)
    if robots is None:
        return 2
    if not allow:
        print("mirror: token create: give what it may pull: --allow 'docker.io/library/*' "
              "(repeatable)", file=sys.stderr)
        return 2
    try:
        names = [u.name for u in config.upstreams]
        for pattern in allow:
            policy_pattern(pattern, names)
        lifetime = None if expires == NEVER else parse_duration(expires)
        assert config.auth.htpasswd is not None
        if name in load_htpasswd(config.auth.htpasswd):
            raise RobotError(f"{name!r} is a user in {config.auth.htpasswd}: give the robot "
                             "another name")
        token = robots.create(name, tuple(allow), lifetime)
    except (PatternError, RobotError, ValueError) as exc:
        print(f"mirror: token create: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(f"# shown once; log in with: docker login -u {name} --password-stdin <mirror>",
          file=sys.stderr)
    return 0


def revoke(config: Config, name: str) -> int:
    robots = _robots(config)
    if robots is None:
        return 2
    try:
        robots.revoke(name)
    except RobotError as exc:
        print(f"mirror: token revoke: {exc}", file=sys.stderr)
        return 1
    return 0


def listing(config: Config) -> int:
    robots = _robots(config)
    if robots is None:
        return 2
    now = time.time()
    for robot in robots.list():
        print(_line(robot, now))
    return 0


def _line(robot: Robot, now: float) -> str:
    if robot.expires is None:
        expires = "never expires"
    else:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(robot.expires))
        expires = f"expired {when}" if robot.expired(now) else f"expires {when}"
    created = time.strftime("%Y-%m-%d", time.gmtime(robot.created))
    return f"{robot.name}\tallow {' '.join(robot.allow) or '-'}\tcreated {created}\t{expires}"
