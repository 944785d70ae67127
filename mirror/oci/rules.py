"""Pure allow / deny rules: which repositories of an upstream may be pulled through the mirror,
and which content (by digest) never is.

Patterns (`[[upstream]] allow` and `deny`) name repositories of their upstream, without the
registry part, compared with the name the mirror asks the upstream for (`select_upstream`'s:
validated, so lowercase with no empty component, and `library/` for a single name on Docker
Hub), so that `nginx`, `library/nginx`, `docker.io/library/nginx`, `?ns=docker.io` and
`/v2/docker.io/nginx` are one repository to the rules as they are to the upstream:

    *      any run of characters within one path component (`library/*`, `acme/app-*`)
    **     a whole component: zero or more components (`acme/**` is `acme` and everything
           under it; `a/**/b` is `a/b`, `a/x/b`, `a/x/y/b`; `**` alone is every repository)

Everything else is literal and must be what a repository name may hold (`[a-z0-9]` joined by
`.`, `_`, `__`, `-`). On a Docker Hub upstream a single-component pattern is an official image
as a single name is (`nginx`, `*`: `library/nginx`, `library/*`). A repository is denied when a
`deny` pattern matches it, or when `allow` is not empty and no `allow` pattern does (deny wins).

Rules belong to a registry, not only to the [[upstream]] name a client says: an upstream whose
`url` (or one of its `fallback_urls`) is the host another upstream is named after reaches that
registry too, and that registry's rules apply to it as well as its own (a second name for
Docker Hub cannot pull what `docker.io`'s rules refuse). Two upstreams pointing at a host
neither is named after may be two names a mirror in front serves differently (a regional tier
sent `?ns=`): each keeps its own rules.

`deny_digests` is global: content is its digest, whatever repository or registry it is asked
through, and a tag is judged by the digest it resolves to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from mirror.oci.reference import Digest
from mirror.oci.routing import DOCKER_HUB, DOCKER_HUB_ALIASES, looks_like_host

Reason = Literal["deny", "allow", "digest"]
REASONS: tuple[Reason, ...] = ("deny", "allow", "digest")

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_PATTERN_CHARS = re.compile(r"[a-z0-9._*-]+")
_LISTED = 4  # allow patterns a denial message names before "and N more"


class PatternError(ValueError):
    """A pattern that cannot be used; the message says why (config.py adds file and key)."""


def registry_name(name: str) -> str:
    """A registry host as the rules compare it: lowercase, Docker Hub's aliases as docker.io."""
    name = name.lower()
    return DOCKER_HUB if name in DOCKER_HUB_ALIASES else name


def url_registry(url: str) -> str:
    """The registry host a URL reaches (`https://registry-1.docker.io` → docker.io; the
    scheme's default port dropped)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2].lower()
    default = {"https": ":443", "http": ":80"}.get(parts.scheme.lower())
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return registry_name(netloc)


@dataclass(frozen=True, slots=True)
class Pattern:
    text: str  # as the operator wrote it (messages name it so)
    regex: re.Pattern[str] = field(compare=False, repr=False)

    def matches(self, repository: str) -> bool:
        # Each component is matched with its trailing "/", so that `**` is whole components.
        return self.regex.fullmatch(repository + "/") is not None


def parse_pattern(text: object, upstream: str, registries: Iterable[str] = ()) -> Pattern:
    """A repository pattern of `upstream`, validated. `registries`: the configured upstream
    names, refused as a first component (a pattern names repositories of its own upstream)."""
    if not isinstance(text, str):
        raise PatternError(f"expected a string, got {text!r}")
    if not text:
        raise PatternError("empty pattern")
    components = text.split("/")
    if "" in components:
        raise PatternError(f"{text!r}: empty path component (a leading, trailing or double /)")
    first = components[0]
    hub = registry_name(upstream) == DOCKER_HUB
    known = {registry_name(r) for r in (upstream, *registries)}
    if len(components) > 1 and looks_like_host(first) and (hub or registry_name(first) in known):
        raise PatternError(f"{text!r}: a pattern names repositories of [[upstream]] {upstream} "
                           f"without a registry part (write {'/'.join(components[1:])!r}; "
                           "another registry's repositories go in its own [[upstream]])")
    for c in components:
        _check_component(text, c)
    if hub and len(components) == 1 and first != "**":
        components = ["library", first]  # as routing names a single name on Docker Hub
    regex = "".join("(?:[^/]+/)*" if c == "**" else
                    re.escape(c).replace(r"\*", "[^/]*") + "/" for c in components)
    return Pattern(text, re.compile(regex))


def policy_pattern(text: str, upstreams: Iterable[str]) -> tuple[str, Pattern]:
    """A `[[policy]] match` entry, `<upstream>/<repository pattern>` (`docker.io/library/*`):
    the configured upstream it names and the pattern over that upstream's repositories."""
    host, _, repository = text.partition("/")
    names = {registry_name(u): u for u in upstreams}
    if registry_name(host) not in names or not repository:
        configured = ", ".join(names.values())
        raise PatternError(f"{text!r}: expected <upstream>/<repository pattern>, the upstream "
                           f"one of the configured [[upstream]] names ({configured})")
    upstream = names[registry_name(host)]
    return upstream, parse_pattern(repository, upstream)


def _check_component(text: str, c: str) -> None:
    if c == "**":
        return
    if "**" in c:
        raise PatternError(f"{text!r}: ** stands for whole path components (as in 'acme/**'); "
                           "use * within one")
    if c.lower() != c:
        raise PatternError(f"{text!r}: repository names are lowercase (write {text.lower()!r})")
    if not _PATTERN_CHARS.fullmatch(c):
        raise PatternError(f"{text!r}: a pattern holds [a-z0-9], the separators . _ __ -, and "
                           "* or ** (nothing else: no ?, [...], spaces)")
    if not _COMPONENT.fullmatch(c.replace("*", "x")):
        raise PatternError(f"{text!r}: component {c!r} matches no repository name (a "
                           "component is [a-z0-9] runs joined by . _ __ -)")


@dataclass(frozen=True)
class UpstreamRules:
    """One [[upstream]]'s rules, and the URLs it is reached at (url, fallback_urls)."""

    name: str
    urls: tuple[str, ...] = ()
    allow: tuple[Pattern, ...] = ()
    deny: tuple[Pattern, ...] = ()

    @property
    def hub(self) -> bool:
        return registry_name(self.name) == DOCKER_HUB


@dataclass(frozen=True, slots=True)
class Denial:
    reason: Reason  # deny (a deny pattern), allow (not in a non-empty allow), digest
    subject: str  # what was refused: upstream/repository, or the digest
    rule: str  # 'denied by [[upstream]] docker.io deny "library/bad*"'
    owner: str | None = None  # the [[upstream]] whose rule it is (None: [rules])

    def __str__(self) -> str:
        return f"{self.subject}: {self.rule}"


class Rules:
    """Every upstream's allow and deny patterns and the global deny_digests, compiled once at
    start (config.py); `repository` and `digest` answer a request's question."""

    def __init__(self, upstreams: Sequence[UpstreamRules] = (),
                 deny_digests: Iterable[Digest] = ()) -> None:
        self.upstreams = tuple(upstreams)
        self.deny_digests = frozenset(deny_digests)
        # For each upstream name: the rule sets that apply to a request through it, its own
        # first, then those of the registries it reaches under another name.
        self._applying: dict[str, tuple[UpstreamRules, ...]] = {}
        for door in self.upstreams:
            reached = {registry_name(door.name), *(url_registry(u) for u in door.urls)}
            sets = [door, *(u for u in self.upstreams
                            if u is not door and registry_name(u.name) in reached)]
            applying = tuple(s for s in sets if s.allow or s.deny)
            if applying:
                self._applying[door.name] = applying
        self._any = bool(self._applying or self.deny_digests)

    def __bool__(self) -> bool:
        """Whether any rule is configured (none: a request costs no lookup)."""
        return self._any

    def repository(self, upstream: str, repository: str) -> Denial | None:
        """Why `repository` (as routing named it for `upstream`) may not be pulled, or None."""
        applying = self._applying.get(upstream)
        if applying is None:
            return None
        subject = f"{upstream}/{repository}"
        for rules in applying:
            name = _as_named_by(rules, repository)
            for pattern in rules.deny:
                if pattern.matches(name):
                    return Denial("deny", subject, f"denied by [[upstream]] {rules.name} deny "
                                  f'"{pattern.text}"{_through(rules, upstream)}', rules.name)
        for rules in applying:
            name = _as_named_by(rules, repository)
            if rules.allow and not any(p.matches(name) for p in rules.allow):
                listed = ", ".join(f'"{p.text}"' for p in rules.allow[:_LISTED])
                if len(rules.allow) > _LISTED:
                    listed += f" and {len(rules.allow) - _LISTED} more"
                return Denial("allow", subject, f"denied by [[upstream]] {rules.name} allow: "
                              f"it matches none of {listed}{_through(rules, upstream)}",
                              rules.name)
        return None

    def digest(self, digest: Digest) -> Denial | None:
        """Why content with this digest may not be served, or None."""
        if digest not in self.deny_digests:
            return None
        return Denial("digest", str(digest), "denied by [rules] deny_digests")


def _as_named_by(rules: UpstreamRules, repository: str) -> str:
    """The repository as the rules' own registry names it (`library/` on Docker Hub)."""
    return f"library/{repository}" if rules.hub and "/" not in repository else repository


def _through(rules: UpstreamRules, upstream: str) -> str:
    return "" if rules.name == upstream else f" ({upstream} reaches the same registry)"
