"""Exceptions to wire errors: the one place where a domain error (the store's, the download
engine's, aiohttp's) becomes the registry error a client sees; see mirror/oci/errors.py for
the whole exception tree."""

from __future__ import annotations

from aiohttp import web

from mirror.cache.store import DigestMismatch
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError


def wire_error(exc: Exception) -> RegistryError | None:
    """The registry error a client sees for `exc`; None for an exception nobody expected (a
    bug: the caller logs it and answers UNKNOWN)."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, web.HTTPException):  # aiohttp's router: no such path, or method
        code = ErrorCode.UNSUPPORTED if exc.status == 405 else ErrorCode.NAME_UNKNOWN
        return RegistryError(code, exc.reason, status=exc.status)
    if isinstance(exc, DigestMismatch):  # only the upstream supplies bytes to the store
        return UpstreamError(ErrorCode.DIGEST_INVALID, str(exc))
    return None
