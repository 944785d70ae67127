"""Warnings about what clients do, rate-limited so that no client can flood the log with
them: a name that looks like an unconfigured registry, a connection limit reached."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from mirror.oci.routing import unconfigured_registry

log = logging.getLogger("mirror.notices")

INTERVAL = 10.0  # seconds between two lines of one kind


class Throttle:
    """At most one line per `interval` seconds; counts the ones held back in between."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.last = -interval
        self.held_back = 0

    def allow(self) -> int | None:
        """None: stay quiet. Otherwise log now, reporting this many held back since."""
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held_back += 1
            return None
        held, self.held_back, self.last = self.held_back, 0, now
        return held


_UNCONFIGURED = Throttle()


def warn_unconfigured_registry(name: str, ns: str | None, upstreams: Iterable[str]) -> None:
    """A request path `/v2/quay.io/foo/...` when quay.io is no upstream: it is served as the
    repository `quay.io/foo` of the default upstream, which is rarely what the client meant."""
    configured = list(upstreams)
    host = unconfigured_registry(name, ns, configured)
    if host is None or (held_back := _UNCONFIGURED.allow()) is None:
        return
    log.warning("a request names a registry that is not configured: it is asked of the "
                "default upstream as a repository name; add an [[upstream]] for that registry "
                "if it was meant", extra={
                    "registry": host, "repository": name, "default_upstream": configured[0],
                    "configured": configured, "similar_held_back": held_back})
