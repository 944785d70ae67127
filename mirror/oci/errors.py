"""Registry errors: the spec's error codes, their HTTP statuses and the JSON body.

Codes clients see are the OCI distribution spec's (BLOB_UNKNOWN … TOOMANYREQUESTS) plus
UNKNOWN, RANGE_INVALID and the UPSTREAM_* codes of a mirror's own failures."""

from __future__ import annotations

import json
from typing import Any

STATUS_BY_CODE: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "NAME_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "DIGEST_INVALID": 400,
    "MANIFEST_INVALID": 400,
    "RANGE_INVALID": 416,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNKNOWN": 500,
    "UPSTREAM_UNREACHABLE": 502,
    "UPSTREAM_UNAVAILABLE": 503,
    "UPSTREAM_TIMEOUT": 504,
}


class RegistryError(Exception):
    """An error the client sees as `{"errors": [{"code", "message", "detail"}]}`."""

    def __init__(
        self,
        code: str,
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
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)
        self.detail = detail
        self.headers = headers or {}
        self.challenges = challenges  # WWW-Authenticate values, one header line each

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()

