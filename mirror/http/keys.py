"""The application's keys, in a module of their own so that app.py (which builds the app) and
ops.py (the operator's routes it installs) both read them without importing each other."""

from __future__ import annotations

from aiohttp import web

from mirror.http.activity import Activity
from mirror.runtime import Mirror

MIRROR: web.AppKey[Mirror] = web.AppKey("mirror", Mirror)
ACTIVITY: web.AppKey[Activity] = web.AppKey("activity", Activity)

# Per-request facts for the access log line (http/app.py's middleware writes it).
CACHE = web.RequestKey("cache", str)
BYTES = web.RequestKey("bytes", int)
UPSTREAM = web.RequestKey("upstream", str)
ERROR = web.RequestKey("error", str)
ROUTE = web.RequestKey("route", str)  # a routes.Kind value or a page name, for metrics
CLIENT = web.RequestKey("client", str)  # the client address (http/clientaddr.py)
USER = web.RequestKey("user", str)  # who the request authenticated as
# What a /v2/ request named (upstream, repository, tag or digest), for the events it causes
TARGET = web.RequestKey("target", tuple)
CODE = web.RequestKey("code", str)  # the registry error code of an error response
