"""Robot accounts for CI (`mirror token create|list|revoke`): a name, the patterns it may pull,
an expiry, and the SHA-256 of its token. The token itself is printed once and never stored.

The file (`[auth] robots_file`, default `<cache dir>/robots.json`, mode 0600) is rewritten
whole under a lock and replaced atomically; every worker re-reads it when it changed (checked
at most every RELOAD_SECONDS), so a revoked token stops working within that time without a
restart. A token is 32 random bytes: a plain hash is enough to keep it (nothing to guess), and
it is compared in constant time.

Used by: http/clientauth.py (verify: a password or a robot's bearer token), commands/token.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "mrt_"  # every robot token starts so: a password that does not is never one
RELOAD_SECONDS = 1.0
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

log = logging.getLogger("mirror.robots")


class RobotError(ValueError):
    """A robot that cannot be created or found; the message says why."""


@dataclass(frozen=True)
class Robot:
    name: str
    allow: tuple[str, ...]  # `<upstream>/<repository pattern>`, as [[auth.rule]] allow
    sha256: str  # of the token
    created: float
    expires: float | None  # None: never

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS or name[0] in "-_.":
        raise RobotError(f"robot name {name!r}: lowercase letters, digits and - _ . (at most "
                         "64, starting with a letter or digit)")
    return name


class Robots:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._robots: dict[str, Robot] = {}
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) read
        self._checked = float("-inf")

    # reading ---------------------------------------------------------------------------
    def _current(self) -> dict[str, Robot]:
        now = time.monotonic()
        if now - self._checked < RELOAD_SECONDS:
            return self._robots
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._robots, self._seen = {}, None
            return self._robots
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._robots = self._read()
            except RobotError as exc:  # grants nothing, and says so
                log.error("robot tokens unreadable: none is accepted", extra={"error": str(exc)})
                self._robots = {}
            self._seen = seen
        return self._robots

    def _read(self) -> dict[str, Robot]:
        try:
            data = json.loads(self.path.read_text())
            return {r["name"]: Robot(r["name"], tuple(r["allow"]), r["sha256"],
                                     float(r["created"]), r["expires"])
                    for r in data["robots"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RobotError(f"{self.path}: unreadable ({exc}); move it away and create the "
                             "tokens again with mirror token create") from None

    def get(self, name: str, now: float | None = None) -> Robot | None:
        """The robot of that name, if it exists and has not expired."""
        robot = self._current().get(name)
        if robot is None or robot.expired(time.time() if now is None else now):
            return None
        return robot

    def verify(self, name: str, token: str, now: float | None = None) -> Robot | None:
        robot = self.get(name, now)
        if robot is None or not hmac.compare_digest(robot.sha256, _hash(token)):
            return None
        return robot

    def list(self) -> list[Robot]:
        self._checked = float("-inf")
        return sorted(self._current().values(), key=lambda r: r.name)

    # writing (the command line) --------------------------------------------------------
    def create(self, name: str, allow: tuple[str, ...], lifetime: float | None,
               now: float | None = None) -> str:
        """A new robot; its token (returned) is shown once. An existing name is refused:
        revoke it first (a rotation is revoke + create)."""
        check_name(name)
        token = PREFIX + secrets.token_urlsafe(32)
        now = time.time() if now is None else now
        with self._rewriting() as robots:
            if name in robots:
                raise RobotError(f"robot {name!r} exists: revoke it first (mirror token revoke "
                                 f"{name})")
            robots[name] = Robot(name, allow, _hash(token), now,
                                 None if lifetime is None else now + lifetime)
        return token

    def revoke(self, name: str) -> None:
        with self._rewriting() as robots:
            if robots.pop(name, None) is None:
                raise RobotError(f"no robot {name!r} (mirror token list shows them)")

    @contextlib.contextmanager
    def _rewriting(self) -> Iterator[dict[str, Robot]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            robots = self._read()
            yield robots
            body = json.dumps({"robots": [asdict(r) for r in robots.values()]}, indent=1)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".robots-")
            try:
                with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        self._checked = float("-inf")
