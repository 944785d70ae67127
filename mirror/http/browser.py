"""The cache browser: what is cached, by repository and tag, and the admin's actions on it.

    GET  /cache                              repositories (those the user may pull; admins
                                             see all), the sync rules
    GET  /cache/<upstream>/<repository>      its tags and manifests held by digest
    POST /cache/actions                      action=pin|unpin|purge|sync, target or rule

Reading needs what the status page needs (access.check_status). Acting needs the admin role
(access.check_admin: 401 asking a browser for a user, 403 for a user without it), a form token
issued to that user (http/csrf.py) and a request from this host (Origin/Referer); otherwise
403 DENIED and nothing is done. A purge first shows what it would remove and asks again.
Pins made here are kept in the index (Index.add_pin), shared by the workers and used by
eviction of both tiers like `[cache] pin`; `[cache] pin` and sync rules' pins are changed in
the configuration, not here. Every action is logged with the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiohttp import web

from mirror.cache import browse
from mirror.cache.eviction import pins
from mirror.cache.locks import exclusive, is_locked, lock_problem, try_exclusive
from mirror.cache.purge import Busy, NotCached, Outcome, Pinned, Target, purge_target
from mirror.http import access, cachepage, csrf
from mirror.http.cachepage import Admin
from mirror.http.clientauth import Identity
from mirror.http.keys import MIRROR, ROUTE
from mirror.http.ops import sync_view
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest
from mirror.oci.routing import ImageRef, parse_target
from mirror.pull.sync import lock_name, run_held
from mirror.runtime import Mirror

log = logging.getLogger("mirror.browser")

PURGE_WAIT = 5.0  # seconds a purge waits for an eviction or another purge to finish
MAX_FORM = 16 * 1024
RUNS: web.AppKey[set[asyncio.Task[object]]] = web.AppKey("sync-now runs")


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body.encode(), headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "form-action 'self'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY"})


async def _viewer(request: web.Request) -> tuple[Mirror, Identity | None, Admin | None]:
    mirror = request.app[MIRROR]
    request[ROUTE] = "cache"
    await access.check_status(request, mirror.config.auth)
    who = await access.identity(request)
    if who is None or not request.app[access.GRANTS].is_admin(who):
        return mirror, who, None
    return mirror, who, Admin(csrf.issue(_secret(request), who.user, time.time()))


def _secret(request: web.Request) -> bytes:
    """The token-signing key (an admin exists only with [auth] on, so with an Authenticator)."""
    auth = request.app[access.AUTHENTICATOR]
    assert auth is not None
    return auth.secret


def _visible(request: web.Request, who: Identity | None, admin: Admin | None
             ) -> Callable[[str, str], bool]:
    if request.app[access.AUTHENTICATOR] is None or admin is not None:
        return lambda upstream, repository: True
    grants = request.app[access.GRANTS]
    return lambda upstream, repository: grants.decide(who, upstream, repository)  # a thread's


def _page_number(request: web.Request) -> int:
    text = request.query.get("page", "1")
    return int(text) if text.isascii() and text.isdecimal() and len(text) < 7 else 1


async def repositories_page(request: web.Request) -> web.Response:
    mirror, who, admin = await _viewer(request)
    page = await asyncio.to_thread(browse.repositories, mirror.config, mirror.store,
                                   mirror.index, _visible(request, who, admin),
                                   _page_number(request))
    rules = [sync_view(rule, mirror) for rule in mirror.config.syncs]
    return _html(cachepage.repositories(page, rules, admin))


async def repository_page(request: web.Request) -> web.Response:
    mirror, who, admin = await _viewer(request)
    upstream, repository = request.match_info["upstream"], request.match_info["repository"]
    if upstream not in mirror.upstreams or not _visible(request, who, admin)(upstream,
                                                                                repository):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, f"{upstream}/{repository} is not in the "
                            "cache browser: no such upstream, or not yours to see", status=404)
    page = await asyncio.to_thread(browse.images, mirror.config, mirror.store, mirror.index,
                                   upstream, repository, _page_number(request))
    return _html(cachepage.images(upstream, repository, page, admin))


async def action(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    request[ROUTE] = "cache-action"
    if request.app[access.AUTHENTICATOR] is None:  # no user could ever be let in: not a 401
        raise RegistryError(ErrorCode.DENIED, "the cache browser is read-only without [auth]: "
                            "set [auth] htpasswd and an [[auth.rule]] with admin = true")
    who = await access.check_admin(request)
    if not csrf.same_origin(request.headers, request.host):
        raise RegistryError(ErrorCode.DENIED, "cross-site request refused: admin actions are "
                            "accepted only from the mirror's own pages (Origin/Referer)")
    if (request.content_length or 0) > MAX_FORM:
        raise RegistryError(ErrorCode.UNSUPPORTED, "the form is too large", status=413)
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not csrf.valid(_secret(request), who.user, fields.get("csrf", ""), time.time()):
        raise RegistryError(ErrorCode.DENIED, "the form's token is missing, expired or another "
                            "user's: reload the page and try again")
    kind, target = fields.get("action", ""), fields.get("target", "")
    admin = Admin(csrf.issue(_secret(request), who.user, time.time()))
    try:
        title, lines, ok, back, confirm = await _act(request.app, mirror, who, kind, target,
                                                     fields)
    except RegistryError as exc:  # a target that names no configured upstream, a bad tag
        title, lines, ok, back, confirm = f"{kind} refused", [exc.message], False, "/cache", None
    log.info("cache action", extra={"user": who.user, "action": kind, "target": target or
                                    fields.get("rule", ""), "result": title})
    return _html(cachepage.result(title, lines, ok, back, confirm, admin), 200 if ok else 409)


# (title, lines, ok, the page to go back to, the target a purge asks to confirm)
_Done = tuple[str, list[str], bool, str, str | None]
_Said = tuple[str, list[str], bool]


async def _act(app: web.Application, mirror: Mirror, who: Identity, kind: str, target: str,
               fields: dict[str, str]) -> _Done:
    if kind == "sync":
        return (*_sync_now(app, mirror, fields.get("rule", "")), "/cache", None)
    upstream, repository, reference = parse_target(target, list(mirror.upstreams))
    back = cachepage.repository_url(upstream, repository)
    if kind == "purge":
        return await _purge(mirror, Target(upstream, repository, reference),
                            fields.get("confirm") == "yes", back)
    if kind not in ("pin", "unpin") or reference is None:
        raise RegistryError(ErrorCode.UNSUPPORTED, f"unknown action {kind!r} for {target!r}: "
                            "pin and unpin name an image (a tag or a digest)")
    image = ImageRef(upstream, repository, reference)
    if kind == "unpin":
        return (*_unpin(mirror, str(image)), back, None)
    # under the lock purges plan under: a purge either sees the pin or ran before it
    async with exclusive(str(mirror.store.lock_path("evict")), PURGE_WAIT) as locked:
        said = (await asyncio.to_thread(_pin, mirror, who, image) if locked else (
            "not pinned", ["the cache is being evicted or purged: try again shortly"], False))
    return (*said, back, None)


def _pin(mirror: Mirror, who: Identity, image: ImageRef) -> _Said:
    """Only an image the repository has: a tag it knows, or a manifest digest it tags or
    holds (a pin no page shows could never be unpinned)."""
    ref, index = image.reference, mirror.index
    if isinstance(ref, Digest):
        cached = mirror.store.has(ref) and index.is_manifest(ref) and (
            ref in index.repository_held(image.upstream, image.repository)
            or any(e.digest == str(ref) for e in index.repository_tags(
                image.upstream, image.repository).values()))
    else:
        cached = index.get_tag(image.upstream, image.repository, ref) is not None
    if not cached:
        return "not pinned", [f"{image} is not in the cache: pull it first"], False
    mirror.index.add_pin(str(image), who.user)
    return "pinned", [f"{image} is pinned: eviction keeps it and what it references "
                      "(in both tiers) until an admin unpins it"], True


def _unpin(mirror: Mirror, image: str) -> _Said:
    if mirror.index.remove_pin(image):
        return "unpinned", [f"{image} is no longer pinned here"], True
    others = browse.pin_sources(mirror.config, mirror.index).get(image, [])
    why = (f"it is pinned by {', '.join(others)}: change mirror.toml ([cache] pin or the "
           "[[sync]] rule) and reload" if others else "it was not pinned")
    return "not unpinned", [f"{image}: {why}"], False


async def _purge(mirror: Mirror, target: Target, confirmed: bool, back: str) -> _Done:
    delete = mirror.bucket.delete if mirror.bucket is not None else None
    try:
        outcome = await purge_target(mirror.store, mirror.index, target,
                                     lambda: pins(mirror.config, mirror.index),
                                     list(mirror.upstreams), PURGE_WAIT, not confirmed, delete)
    except (Busy, NotCached, Pinned) as exc:
        return "not purged", [str(exc)], False, back, None
    if not confirmed:
        return f"purge {target}?", _plan_lines(outcome), True, back, str(target)
    return "purged", _done_lines(outcome), True, back if target.reference else "/cache", None


def _plan_lines(outcome: Outcome) -> list[str]:
    plan = outcome.plan
    return [f"would remove {len(plan.tags)} tag(s), {len(plan.manifests)} manifest(s) and "
            f"{len(plan.blobs)} blob(s): {plan.bytes} bytes",
            f"kept: {len(plan.shared)} shared with other images, {len(plan.pinned)} pinned, "
            f"{len(plan.in_flight)} downloading now"
            + (f"; pinned tags kept: {', '.join(sorted(plan.kept_tags))}"
               if plan.kept_tags else "")]


def _done_lines(outcome: Outcome) -> list[str]:
    result = outcome.result
    assert result is not None
    lines = [f"removed {result.tags} tag(s), {result.manifests} manifest(s), {result.blobs} "
             f"blob(s): {result.bytes} bytes"]
    if outcome.deleted or outcome.failed:
        lines.append(f"bucket: {outcome.deleted} object(s) deleted"
                     + (f", {outcome.failed} failed: try `mirror gc` later"
                        if outcome.failed else ""))
    return lines


def _sync_now(app: web.Application, mirror: Mirror, name: str) -> _Said:
    rule = next((r for r in mirror.config.syncs if r.name == name), None)
    if rule is None:
        return "not started", [f"no [[sync]] rule is named {name!r}"], False
    held = contextlib.ExitStack()  # the rule's lock, taken before answering: of two requests
    # at once (in one worker or two), one only starts a run; the other is told it runs
    lock = mirror.store.lock_path(lock_name(rule))
    mine = held.enter_context(try_exclusive(str(lock)))
    run = mirror.sync.make_run(rule) if mine and mirror.sync is not None else None
    if run is None:
        held.close()
        why = ("it is running now" if is_locked(lock) else
               f"its lock file cannot be made ({problem}): the cache dir is read-only or full"
               if (problem := lock_problem(lock)) is not None else
               "its upstream is not reachable in offline mode, or not configured")
        return "not started", [f"sync rule {name}: {why}"], False
    task: asyncio.Task[object] = asyncio.ensure_future(run_held(rule, run, mirror.index))
    app[RUNS].add(task)
    task.add_done_callback(app[RUNS].discard)
    task.add_done_callback(lambda _task: held.close())
    return "sync started", [f"sync rule {name} is running: its state is on the status page"], \
        True


async def _stop_runs(app: web.Application) -> None:
    """At shutdown: a run started here is stopped between steps (tried again at start)."""
    runs = app[RUNS]
    for task in list(runs):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def install(app: web.Application) -> None:
    app[RUNS] = set()
    app.router.add_get("/cache", repositories_page)
    app.router.add_post("/cache/actions", action)
    app.router.add_get("/cache/{upstream}/{repository:.+}", repository_page)
    app.on_shutdown.append(_stop_runs)
