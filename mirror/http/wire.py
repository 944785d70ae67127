"""Exceptions to wire errors: the one place where a domain error (the store's, the download
engine's, aiohttp's) becomes the registry error a client sees; see mirror/oci/errors.py for
the whole exception tree."""

from __future__ import annotations

import errno

from aiohttp import web

from mirror.cache.store import DigestMismatch, StorageFailed
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
    if isinstance(exc, StorageFailed):
        return RegistryError(ErrorCode.UNKNOWN, f"{exc}; the mirror's operator should check "
                             "its cache disk", status=507)
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return RegistryError(ErrorCode.UNKNOWN, f"the mirror's disk failed: {exc.strerror}; "
                             "its operator should check the cache disk", status=507)
    return None


# The disk (not the client, not the network) refused: 507 Insufficient Storage.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
