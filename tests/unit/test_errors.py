"""The error code table: every code a client can see, its default status, and the JSON body."""

from __future__ import annotations

import errno
import json

import pytest
from aiohttp import web

from mirror.cache.store import DigestMismatch, StorageFailed
from mirror.http.wire import wire_error
from mirror.oci.errors import STATUS_BY_CODE, ErrorCode, RegistryError, UpstreamError
from mirror.oci.reference import digest_of

SPEC_CODES = {  # the OCI distribution spec's error codes
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}
MIRROR_CODES = {"UNKNOWN", "RANGE_INVALID", "UPSTREAM_UNREACHABLE", "UPSTREAM_UNAVAILABLE",
                "UPSTREAM_TIMEOUT"}


def test_every_code_has_a_status() -> None:
    assert set(STATUS_BY_CODE) == set(ErrorCode)
    assert all(STATUS_BY_CODE[code] == code.status for code in ErrorCode)


def test_codes_are_the_spec_s_or_the_mirror_s_own() -> None:
    assert set(ErrorCode) <= SPEC_CODES | MIRROR_CODES
    assert set(ErrorCode) >= MIRROR_CODES
    assert all(code.value == code.name for code in ErrorCode)


@pytest.mark.parametrize(("code", "status"), [
    (ErrorCode.BLOB_UNKNOWN, 404), (ErrorCode.MANIFEST_UNKNOWN, 404),
    (ErrorCode.NAME_UNKNOWN, 404), (ErrorCode.NAME_INVALID, 400),
    (ErrorCode.DIGEST_INVALID, 400), (ErrorCode.MANIFEST_INVALID, 400),
    (ErrorCode.RANGE_INVALID, 416), (ErrorCode.UNAUTHORIZED, 401), (ErrorCode.DENIED, 403),
    (ErrorCode.UNSUPPORTED, 405), (ErrorCode.TOOMANYREQUESTS, 429), (ErrorCode.UNKNOWN, 500),
    (ErrorCode.UPSTREAM_UNREACHABLE, 502), (ErrorCode.UPSTREAM_UNAVAILABLE, 503),
    (ErrorCode.UPSTREAM_TIMEOUT, 504),
])
def test_default_status(code: ErrorCode, status: int) -> None:
    assert RegistryError(code, "m").status == status


def test_an_explicit_status_wins() -> None:
    assert RegistryError(ErrorCode.UNSUPPORTED, "m", status=404).status == 404


@pytest.mark.parametrize(("code", "status"), [
    (ErrorCode.DIGEST_INVALID, 502), (ErrorCode.MANIFEST_INVALID, 502),
    (ErrorCode.UPSTREAM_UNREACHABLE, 502), (ErrorCode.UPSTREAM_UNAVAILABLE, 502),
    (ErrorCode.UPSTREAM_TIMEOUT, 504),
])
def test_an_upstream_error_is_a_gateway_error(code: ErrorCode, status: int) -> None:
    error = UpstreamError(code, "m")
    assert isinstance(error, RegistryError)
    assert (error.code, error.status) == (code, status)
    assert UpstreamError(code, "m", status=503).status == 503


def test_the_body_carries_the_code_as_a_plain_string() -> None:
    body = json.loads(RegistryError(ErrorCode.BLOB_UNKNOWN, "gone", detail={"d": 1}).body())
    assert body == {"errors": [{"code": "BLOB_UNKNOWN", "message": "gone", "detail": {"d": 1}}]}


def test_wire_error_maps_domain_errors() -> None:
    error = RegistryError(ErrorCode.DENIED, "no")
    assert wire_error(error) is error
    digest = digest_of(b"a")
    mismatch = wire_error(DigestMismatch(digest, str(digest_of(b"b"))))
    assert isinstance(mismatch, UpstreamError)
    assert (mismatch.code, mismatch.status) == (ErrorCode.DIGEST_INVALID, 502)
    assert wire_error(RuntimeError("bug")) is None


@pytest.mark.parametrize("exc", [
    StorageFailed("could not write sha256:ab to the cache: No space left on device"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system"),
    OSError(errno.EIO, "Input/output error"),
])
def test_the_mirror_s_own_disk_failing_is_507_saying_so(exc: Exception) -> None:
    error = wire_error(exc)
    assert error is not None and error.status == 507
    assert "disk" in error.message and "operator" in error.message


def test_other_os_errors_stay_unexpected() -> None:
    assert wire_error(OSError(errno.EBADF, "Bad file descriptor")) is None


@pytest.mark.parametrize(("exc", "code"), [
    (web.HTTPNotFound(), ErrorCode.NAME_UNKNOWN),
    (web.HTTPMethodNotAllowed("PUT", ["GET"]), ErrorCode.UNSUPPORTED),
])
def test_wire_error_maps_the_router_s_refusals(exc: web.HTTPException, code: ErrorCode) -> None:
    error = wire_error(exc)
    assert error is not None and (error.code, error.status) == (code, exc.status)
