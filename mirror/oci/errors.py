"""Registry errors: the spec's error codes, their HTTP statuses and the JSON body.

Codes clients see are the OCI distribution spec's (BLOB_UNKNOWN … TOOMANYREQUESTS) plus
UNKNOWN, RANGE_INVALID and the UPSTREAM_* codes of a mirror's own failures.

The exceptions, who raises them, and where they become a wire error::

    RegistryError(code: ErrorCode, message)  the client's request is refused; a status
    │                                        defaults to the code's (STATUS_BY_CODE)
    │     raised by oci/ (a bad name, tag, digest or route), http/ (access, read-only,
    │     Range), upstream/client and pull/ (an upstream's refusal passed on: DENIED,
    │     MANIFEST_UNKNOWN, TOOMANYREQUESTS …; pull.proxy.Denied: the rules' 403 DENIED),
    │     pull/images (no image for a platform)
    └── UpstreamError                         the upstream answered something the mirror
                                              refuses, or broke off: 502 (504 for a timeout)
          raised by upstream/client (unreachable, timed out, a 5xx), pull/proxy and
          pull/downloads (a wrong digest, size or range; a body that broke off)

    Domain errors, which know nothing of HTTP:
      cache.store.DigestMismatch   bytes offered to the store do not match their digest
      cache.store.StorageFailed    the mirror's own disk could not take content and nothing
                                   else could serve the client (507)
      mediatypes.ManifestInvalid   a manifest the mirror refuses (pull/proxy wraps it)
      http.ranges.RangeNotSatisfiable    (http/app wraps it: RANGE_INVALID + Content-Range)
      pull.downloads.ClientAbort   a body already under way cannot be completed
      OSError                      the disk (full, read-only, EIO: 507) or the client's socket

    All of them become a response in one place, http/app's middleware, through
    http/wire.py's `wire_error`: a RegistryError as it is, a domain error mapped to its
    code, anything else UNKNOWN 500 (logged). A ClientAbort or an OSError after the
    headers were sent cannot become a response: the connection is cut (http/app's
    `_send_blob`). The CLI (cli.py, commands/) prints a RegistryError's message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every code a client can see; a StrEnum, so it is its own JSON string."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    RANGE_INVALID = "RANGE_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    UNKNOWN = "UNKNOWN"
    UPSTREAM_UNREACHABLE = "UPSTREAM_UNREACHABLE"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"

    @property
    def status(self) -> int:
        """The HTTP status a client gets for this code unless the raiser says otherwise."""
        return STATUS_BY_CODE[self]


STATUS_BY_CODE: Mapping[ErrorCode, int] = {
    ErrorCode.BLOB_UNKNOWN: 404,
    ErrorCode.BLOB_UPLOAD_UNKNOWN: 404,
    ErrorCode.MANIFEST_UNKNOWN: 404,
    ErrorCode.NAME_UNKNOWN: 404,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.DIGEST_INVALID: 400,
    ErrorCode.MANIFEST_INVALID: 400,
    ErrorCode.RANGE_INVALID: 416,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.DENIED: 403,
    ErrorCode.UNSUPPORTED: 405,
    ErrorCode.TOOMANYREQUESTS: 429,
    ErrorCode.UNKNOWN: 500,
    ErrorCode.UPSTREAM_UNREACHABLE: 502,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
}


class RegistryError(Exception):
    """An error the client sees as `{"errors": [{"code", "message", "detail"}]}`."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        challenges: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else self._status_for(code)
        self.detail = detail
        self.headers = headers or {}
        self.challenges = challenges  # WWW-Authenticate values, one header line each

    @staticmethod
    def _status_for(code: ErrorCode) -> int:
        return code.status

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()


class UpstreamError(RegistryError):
    """The upstream answered something the mirror refuses, or broke off: 502 Bad Gateway
    (504 Gateway Timeout for UPSTREAM_TIMEOUT) whatever the code — the client's request was
    fine, the upstream's answer was not. The code says what was wrong (DIGEST_INVALID: the
    upstream's bytes do not match their digest; UPSTREAM_UNAVAILABLE: its body broke off)."""

    @staticmethod
    def _status_for(code: ErrorCode) -> int:
        return 504 if code is ErrorCode.UPSTREAM_TIMEOUT else 502
