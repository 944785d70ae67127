"""`GET /v2/_catalog`, with `[server] catalog = true`: the repositories this mirror has cached
(at least one manifest stored), as clients pull them through it (oci/routing.py
`catalog_name`: the default upstream's plainly, the others' under their name), sorted, as
distribution answers it: `{"repositories": [...]}`, at most `n` (default and bound 1000)
after `last`, and a `Link: </v2/_catalog?last=…&n=…>; rel="next"` while more follow.

Each page reads only what it lists: per upstream, the repositories after `last` from the
index's tags and held records (one indexed lookup each, cache/index.py `repositories`), a
repository listed once a manifest it names is in the store; the upstreams' lists merged.
With `[auth]`, only an authenticated user gets it (http/access.py `check_catalog`), and it lists
only the repositories that user may pull (http/grants.py), so no client learns the names of
repositories it may not read.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlencode

from aiohttp import web

from mirror.cache.index import Index
from mirror.http.responses import API_VERSION
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest
from mirror.oci.routing import catalog_name
from mirror.runtime import Mirror

PAGE = 1000  # names per page when `n` is absent, and at most


Listed = Callable[[str, str], bool]  # (upstream, repository): may the client see it?


def page(index: Index, stored: Callable[[Digest], bool], upstreams: Sequence[str],
         last: str | None, n: int, listed: Listed = lambda u, r: True
         ) -> tuple[list[str], bool]:
    """Up to `n` cached repositories' names after `last`, sorted, and whether more follow."""
    streams = [_names(index, stored, upstreams, u, last, listed) for u in upstreams]
    names: list[str] = []
    for name in heapq.merge(*streams):
        if names and names[-1] == name:
            continue
        if len(names) >= n:
            return names, True
        names.append(name)
    return names, False


_NONE_AFTER = "\0"  # every name of an upstream sorts before `last`


def _names(index: Index, stored: Callable[[Digest], bool], upstreams: Sequence[str],
           upstream: str, last: str | None, listed: Listed) -> Iterator[str]:
    prefix = catalog_name(upstream, "", upstreams)
    after = _repository_after(prefix, last)
    if after == _NONE_AFTER:
        return
    for repository in index.repositories(upstream, after):
        digests = index.repository_digests(upstream, repository)
        if listed(upstream, repository) and any(stored(d) for d in digests):
            name = catalog_name(upstream, repository, upstreams)
            if last is None or name > last:
                yield name


def _repository_after(prefix: str, last: str | None) -> str | None:
    """The repository of the upstream whose names are `prefix + repository` after which its
    names sort after `last` (None: from its first)."""
    if last is None or prefix > last:
        return None
    if last.startswith(prefix):
        return last[len(prefix):]
    return _NONE_AFTER


def _count(value: str | None) -> int:
    if value is None:
        return PAGE
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise RegistryError(ErrorCode.UNSUPPORTED, f"n must be a number of repositories, got "
                            f"{value!r}", status=400)
    return min(n, PAGE)


async def catalog(request: web.Request, mirror: Mirror, listed: Listed) -> web.Response:
    n = _count(request.query.get("n"))
    last = request.query.get("last") or None
    names, more = await asyncio.to_thread(page, mirror.index, mirror.store.has,
                                          list(mirror.upstreams), last, n, listed
                                          ) if n else ([], False)
    headers = {**API_VERSION, "Content-Type": "application/json"}
    if more:
        headers["Link"] = (f'</v2/_catalog?{urlencode({"last": names[-1], "n": n})}>; '
                           'rel="next"')
    return web.Response(body=json.dumps({"repositories": names}).encode(), headers=headers)
