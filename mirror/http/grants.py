"""Who may pull what, and who is an admin: `[[auth.rule]]`s over identities (clientauth.py).
Pure: no I/O, decided from the configuration and the identity alone.

- No rules: anonymous clients pull from `access = "public"` upstreams, every user from all
  (the behaviour before rules existed); nobody is an admin.
- With rules: a rule applies to the users it names (`"*"`: every htpasswd user), the members
  of its groups, and with `anonymous = true` to clients without a user. Whatever anonymous
  clients may pull, everyone may (logging in never loses access). An identity may pull a
  repository when a rule that applies to it allows `<upstream>/<repository>`, and never an
  `access = "authenticated"` upstream's without a user.
- A robot (mirror token) may pull what its own patterns allow, plus what anonymous clients
  may; rules never make it an admin.

Used by: http/access.py (check_pull, check_admin, the catalog's filter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cachetools import LRUCache

from mirror.config import AccessRule, AuthConfig, UpstreamConfig
from mirror.http.clientauth import Identity
from mirror.oci.rules import Pattern, PatternError, policy_pattern

EVERY_USER = "*"
Allowed = tuple[tuple[str, Pattern], ...]


class Grants:
    def __init__(self, auth: AuthConfig, upstreams: Sequence[UpstreamConfig]) -> None:
        self._names = [u.name for u in upstreams]
        self._public = {u.name for u in upstreams if u.access == "public"}
        self._rules = [(rule, self._parse(rule.allow)) for rule in auth.rules]
        self._groups = auth.groups
        self._anonymous = self._union(r for r in auth.rules if r.anonymous)
        self._decided: LRUCache[tuple[Identity | None, str, str], bool] = LRUCache(16384)
        self._robots: LRUCache[tuple[str, ...], Allowed] = LRUCache(1024)

    def _parse(self, patterns: Sequence[str]) -> Allowed:
        parsed = []
        for text in patterns:
            try:
                parsed.append(policy_pattern(text, self._names))
            except PatternError:  # a robot's pattern naming an upstream since removed
                continue
        return tuple(parsed)

    def _union(self, rules: Iterable[AccessRule]) -> Allowed:
        return tuple(p for rule in rules for p in self._parse(rule.allow))

    def _applies(self, rule: AccessRule, user: str) -> bool:
        return (EVERY_USER in rule.users or user in rule.users
                or any(user in self._groups.get(g, ()) for g in rule.groups))

    def may_pull(self, who: Identity | None, upstream: str, repository: str) -> bool:
        key = (who, upstream, repository)
        decided = self._decided.get(key)
        if decided is None:
            decided = self._decided[key] = self.decide(who, upstream, repository)
        return decided

    def decide(self, who: Identity | None, upstream: str, repository: str) -> bool:
        """may_pull without its memo (which is the event loop's: this one is for threads)."""
        anonymous_may = upstream in self._public and (
            not self._rules or _matches(self._anonymous, upstream, repository))
        if anonymous_may:
            return True
        if who is None or who.anonymous:
            return False
        if who.robot is not None:
            allowed = self._robots.get(who.robot)
            if allowed is None:
                allowed = self._robots[who.robot] = self._parse(who.robot)
            return _matches(allowed, upstream, repository)
        if not self._rules:
            return True
        return any(self._applies(rule, who.user) and _matches(allowed, upstream, repository)
                   for rule, allowed in self._rules)

    def is_admin(self, who: Identity | None) -> bool:
        if who is None or who.anonymous or who.robot is not None:
            return False
        return any(rule.admin and self._applies(rule, who.user) for rule, _ in self._rules)


def _matches(allowed: Allowed, upstream: str, repository: str) -> bool:
    return any(u == upstream and p.matches(repository) for u, p in allowed)
