"""Repository patterns (pure), as operators write them in policies and rules:
`docker.io/library/*` (`*`: any characters within one path component) and
`ghcr.io/acme/**` (`**`: any number of components, also none after a `/`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_COMPONENT = re.compile(r"[a-z0-9*._:-]+")  # a host (with a port) or a repository component


def compile_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regular expression whose fullmatch() is any of `patterns`; ValueError names a bad
    one."""
    if not patterns:
        raise ValueError("expected at least one pattern")
    return re.compile("|".join(f"(?:{_translate(p)})" for p in patterns))


def _translate(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern or pattern != pattern.strip():
        raise ValueError(f"{pattern!r}: expected a pattern like docker.io/library/*")
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        if part == "**":
            # `a/**` matches `a/x`, `a/x/y`; `**/b` matches `b`, `x/b`
            out.append(".+" if i == len(parts) - 1 else "(?:[^/]+/)*")
            continue
        if "**" in part or not _COMPONENT.fullmatch(part):
            raise ValueError(f"{pattern!r}: {part!r} is not a name component (lowercase "
                             "letters, digits, . _ - and * within it, or ** alone)")
        out.append("[^/]*".join(map(re.escape, part.split("*"))))
        if i < len(parts) - 1:
            out.append("/")
    return "".join(out)
