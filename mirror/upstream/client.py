"""The client for one upstream registry: auth challenges, redirects, timeouts, error mapping.

`Upstream` is a `pull.source.Source`: it alone speaks the registry's wire format (paths,
Accept, Range, status codes) for the proxy and the download engine. Redirects are followed by
hand so that `Authorization` never leaves for another host (Docker Hub sends blob GETs to a
CDN whose signed URL is the credential).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp

from mirror import metrics
from mirror.config import UpstreamConfig
from mirror.oci.challenge import CATALOG_SCOPE, parse_all, pull_scope
from mirror.oci.errors import ErrorCode, RegistryError, UpstreamError
from mirror.oci.mediatypes import upstream_accept
from mirror.oci.reference import Digest
from mirror.oci.routing import tier_ns
from mirror.upstream.egress import Egress, environment_proxies
from mirror.upstream.tokens import Credentials, TokenError

log = logging.getLogger("mirror.upstream")
STALE_CONNECTION_RETRIES = 4  # pooled connections tried before a fresh timeout counts

MAX_REDIRECTS = 5
FALLBACK_HOLD = 30.0  # seconds a URL that failed is tried after the upstream's other URLs
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's bound for manifests
MAX_RELAYED_BYTES = 8 * 1024 * 1024  # a tags list or referrers index (thousands of entries)


def redact_url(url: str) -> str:
    """The URL without its user:password@ part, for pages, logs and error messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


CREDENTIAL_KEYS = "username and password (or password_file), or credential_helper"


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class Upstream:
    """One configured upstream registry, reached through a shared aiohttp session."""

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession,
                 environment: Mapping[str, str] | None = None) -> None:
        """`environment`: the proxy variables (egress.py), read once at start."""
        self.config = config
        self.name = config.name
        self.session = session
        self.proxy = Egress(config.proxy, environment_proxies() if environment is None
                            else environment)
        self.credentials = Credentials(config.username, config.password,
                                       config.credential_helper,
                                       urlsplit(config.url).netloc, proxy=self.proxy)
        if (proxy := self.proxy(config.url)) is not None:
            log.info("upstream reached through a proxy", extra={
                "upstream": self.name, "proxy": redact_url(proxy)})
        self.urls = (config.url, *config.fallback_urls)
        self._held_until: dict[str, float] = {}  # a URL that failed: tried last until then
        self.slots = asyncio.Semaphore(config.max_connections)
        self.ratelimit_limit: str | None = None
        self.ratelimit_remaining: str | None = None
        self._rate_limited_until = 0.0
        # Reachability, from the last request or probe: when it answered, when it failed.
        self.last_answer: float | None = None  # time.time()
        self.last_failure: float | None = None
        self.last_error: str | None = None
        self._up: bool | None = None
        self.down_since: float | None = None  # the first failure after the last answer
        # Told when this worker's view of reachability changes: (name, up, error).
        self.on_health: Callable[[str, bool, str], None] | None = None
        # No total timeout (it would kill large layers) and no bound on waiting for a pooled
        # connection (prefetch queues many downloads behind max_connections): only the TCP
        # connect and each read are bounded.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )

    def bases(self) -> list[str]:
        """The URLs to try, in order: `url` then `fallback_urls`, those that failed in the
        last FALLBACK_HOLD seconds last (still tried: they may be all there is)."""
        now = time.monotonic()
        return sorted(self.urls, key=lambda u: self._held_until.get(u, 0.0) > now)

    async def request(
        self,
        method: str,
        repository: str,
        suffix: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request for `repository`, answering one auth challenge and following redirects.

        The caller must release the response. Network failures (and a 5xx from a URL with
        another behind it) move on to the next of `bases()`; from the last, they become
        registry errors (502 unreachable, 504 timeout) naming this upstream.
        """
        self._refuse_while_rate_limited()
        bases = self.bases()
        for base in bases[:-1]:
            try:
                resp = await self._request_at(base, method, repository, suffix, headers,
                                              params)
            except UpstreamError as exc:  # unreachable, silent, or redirecting in circles
                self._fall_back(base, str(exc))
                continue
            if resp.status not in (502, 503, 504):
                return resp
            resp.release()
            self._fall_back(base, f"HTTP {resp.status}")
        return await self._request_at(bases[-1], method, repository, suffix, headers, params)

    def _fall_back(self, base: str, why: str) -> None:
        self._held_until[base] = time.monotonic() + FALLBACK_HOLD
        log.warning("upstream URL failed: trying the next", extra={
            "upstream": self.name, "url": redact_url(base), "error": _redacted(why, base)})

    async def _request_at(self, base: str, method: str, repository: str, suffix: str,
                          headers: Mapping[str, str] | None,
                          params: Mapping[str, str] | None) -> aiohttp.ClientResponse:
        # "" names no repository: the registry's own /v2/_catalog
        scope = pull_scope(repository) if repository else CATALOG_SCOPE
        url = f"{base}/v2/{repository}/{suffix}" if repository else f"{base}/v2/{suffix}"
        if (ns := tier_ns(self.name, base)) is not None:
            params = {**(params or {}), "ns": ns}
        started = time.perf_counter()
        try:
            resp = await self._send(method, url, dict(headers or {}), params, scope)
            if resp.status == 401:
                retry_auth = await self._answer_challenge(resp, scope)
                if retry_auth is not None:
                    resp.release()
                    resp = await self._send(method, url, dict(headers or {}), params, scope,
                                            auth=retry_auth)
                    if resp.status == 401:
                        self.credentials.rejected()
        except TimeoutError:
            self._note_failure(method, started, "timeout")
            raise UpstreamError(
                ErrorCode.UPSTREAM_TIMEOUT, f"upstream {self.name} did not answer in time"
            ) from None
        except aiohttp.ClientError as exc:
            self._note_failure(method, started, str(exc))
            raise UpstreamError(
                ErrorCode.UPSTREAM_UNREACHABLE,
                f"upstream {self.name} ({redact_url(base)}) is unreachable: "
                f"{_redacted(str(exc), base)}",
            ) from None
        except RegistryError:  # a token service refusal or a redirect loop: not reachability
            metrics.UPSTREAM_REQUESTS.labels(self.name, method, "error").inc()
            raise
        self._held_until.pop(base, None)
        self._note_answer(method, started, resp.status)
        self._note_ratelimit(resp)
        return resp

    async def probe(self) -> bool:
        """Whether the upstream answers `GET /v2/` at all (401 included: it is there)."""
        started = time.perf_counter()
        try:
            url = f"{self.bases()[0]}/v2/"
            async with self.session.get(url, allow_redirects=False, proxy=self.proxy(url),
                                        timeout=aiohttp.ClientTimeout(
                                            total=self.config.connect_timeout)) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._note_failure("GET", started, str(exc) or type(exc).__name__)
            return False
        self._note_answer("GET", started, status)
        return status < 500

    @property
    def reachable(self) -> bool | None:
        """None until the first request or probe."""
        if self.last_answer is None and self.last_failure is None:
            return None
        return (self.last_failure or 0.0) <= (self.last_answer or 0.0)

    # the Source protocol (pull/source.py) ------------------------------------------------
    @property
    def private(self) -> bool:
        """Content from here entered with credentials (its own, or its clients')."""
        return self.credentials.configured or self.config.access == "authenticated"

    prefetches = True

    @property
    def resume_attempts(self) -> int:
        return self.config.resume_attempts

    async def get_manifest(self, repository: str, reference: str,
                           accept: tuple[str, ...]) -> UpstreamManifest:
        resp = await self._manifest_response("GET", repository, reference, accept)
        try:
            data = await read_bounded(self, resp, MAX_MANIFEST_BYTES, "a manifest",
                                      ErrorCode.MANIFEST_INVALID,
                                      "pull it from the upstream directly")
        finally:
            resp.release()
        return _manifest_reply(resp, data)

    async def head_manifest(self, repository: str, reference: str,
                            accept: tuple[str, ...]) -> UpstreamManifest:
        resp = await self._manifest_response("HEAD", repository, reference, accept)
        resp.release()
        return _manifest_reply(resp, None)

    async def _manifest_response(self, method: str, repository: str, reference: str,
                                 accept: tuple[str, ...]) -> aiohttp.ClientResponse:
        resp = await self.request(method, repository, f"manifests/{reference}",
                                  headers={"Accept": upstream_accept(accept)})
        if resp.status != 200:
            raise await error_from_response(self, resp, ErrorCode.MANIFEST_UNKNOWN)
        return resp

    async def open_blob(self, repository: str, digest: Digest, offset: int) -> UpstreamBlob:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = await self.request("GET", repository, f"blobs/{digest}", headers=headers)
        if resp.status not in (200, 206):
            raise await error_from_response(self, resp, ErrorCode.BLOB_UNKNOWN)
        if resp.status == 206 and not range_starts_at(resp, offset):
            resp.close()
            raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, f"upstream {self.name} sent "
                                f"the wrong range for {digest}")
        # A 200 to a Range request: the upstream ignored it; the bytes before are skipped.
        return UpstreamBlob(resp, total_size(resp), offset if resp.status == 200 else 0,
                            self.name)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        resp = await self.request("HEAD", repository, f"blobs/{digest}")
        if resp.status != 200:
            raise await error_from_response(self, resp, ErrorCode.BLOB_UNKNOWN)
        length = resp.headers.get("Content-Length")
        resp.release()
        return int(length) if length and length.isdigit() else None

    async def confirm(self, repository: str, digest: Digest, kind: str) -> None:
        code = ErrorCode.BLOB_UNKNOWN if kind == "blobs" else ErrorCode.MANIFEST_UNKNOWN
        resp = await self.request("HEAD", repository, f"{kind}/{digest}",
                                  headers={"Accept": upstream_accept(())})
        if resp.status != 200:
            raise await error_from_response(self, resp, code)
        resp.release()

    async def relay(self, repository: str, suffix: str, query: Mapping[str, str],
                    unknown: ErrorCode) -> Relayed:
        resp = await self.request("GET", repository, suffix, params=query)
        if resp.status != 200:
            raise await error_from_response(self, resp, unknown)
        what = ("a tags list" if suffix.startswith("tags/") else
                "a catalog page" if not repository else "a referrers index")
        try:
            body = await read_bounded(self, resp, MAX_RELAYED_BYTES, what,
                                      ErrorCode.UPSTREAM_UNAVAILABLE,
                                      "page through it with ?n=")
        finally:
            resp.release()
        headers = {k: resp.headers[k] for k in ("Content-Type", "Link", "OCI-Filters-Applied")
                   if k in resp.headers}
        return Relayed(resp.status, body, headers)

    def _note_answer(self, method: str, started: float, status: int) -> None:
        metrics.UPSTREAM_REQUESTS.labels(self.name, method, str(status)).inc()
        metrics.UPSTREAM_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        if status < 500:
            self.last_answer = time.time()
            metrics.UPSTREAM_UP.labels(self.name).set(1)
            self._changed(True, "")
        else:
            self._set_failure(f"HTTP {status}")

    def _note_failure(self, method: str, started: float, error: str) -> None:
        metrics.UPSTREAM_REQUESTS.labels(self.name, method, "error").inc()
        metrics.UPSTREAM_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        self._set_failure(error)

    def _set_failure(self, error: str) -> None:
        self.last_failure = time.time()
        self.last_error = error
        metrics.UPSTREAM_UP.labels(self.name).set(0)
        self._changed(False, error)

    def _changed(self, up: bool, error: str) -> None:
        if self._up is not up:
            self._up = up
            self.down_since = None if up else time.time()
            if self.on_health is not None:
                self.on_health(self.name, up, error)

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        scope: str,
        auth: str | None = None,
    ) -> aiohttp.ClientResponse:
        auth = auth or self.credentials.header_for(scope)
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if auth and _origin(url) == origin:
                sent["Authorization"] = auth
            resp = await self._session_request(method, url, sent, params)
            location = resp.headers.get("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return resp
            resp.release()
            url = urljoin(url, location)
            params = None  # the Location carries its own query
        raise UpstreamError(ErrorCode.UPSTREAM_UNREACHABLE,
                            f"upstream {self.name}: too many redirects")

    async def _session_request(self, method: str, url: str, headers: dict[str, str],
                               params: Mapping[str, str] | None) -> aiohttp.ClientResponse:
        """aiohttp re-arms a connection's read timer when a body it already released to the
        pool is read on after its end was received (a slow reader draining its buffer): the
        timer then fires on the idle connection, and the next request on it fails at once
        with a read "timeout". One that fails sooner than `read_timeout` is that stale
        connection (it is closed), never the upstream: try again on another."""
        for attempt in range(STALE_CONNECTION_RETRIES, -1, -1):
            started = time.monotonic()
            try:
                return await self.session.request(
                    method, url, headers=headers, params=params, allow_redirects=False,
                    timeout=self.timeout, auto_decompress=False, proxy=self.proxy(url))
            except aiohttp.SocketTimeoutError:
                if not attempt or time.monotonic() - started >= self.config.read_timeout:
                    raise
                log.debug("a pooled upstream connection held a stale read timeout: retrying",
                          extra={"upstream": self.name})
        raise AssertionError("unreachable")

    async def _answer_challenge(self, resp: aiohttp.ClientResponse, scope: str) -> str | None:
        challenges = parse_all(resp.headers.getall("WWW-Authenticate", []))
        for challenge in challenges:
            try:
                header = await self.credentials.authorize(self.session, challenge, scope)
            except (TokenError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("token fetch failed", extra={"upstream": self.name, "error": str(exc)})
                raise self._token_error(exc) from None
            if header is not None:
                return header
        return None

    def _token_error(self, exc: Exception) -> RegistryError:
        """DENIED (403) when the token service refused or the mirror's own credentials failed
        (a credential helper): a 401 would send the client to log in to the mirror, which
        cannot help. An absent or failing token service is a 502/504 like the registry."""
        if isinstance(exc, TokenError) and exc.status in (401, 403):
            return RegistryError(ErrorCode.DENIED, self.denied_message())
        if isinstance(exc, TokenError) and exc.status is None:
            return RegistryError(ErrorCode.DENIED,
                                 f"upstream {self.name}: could not get a token: {exc}")
        if isinstance(exc, TimeoutError):
            return UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, f"upstream {self.name}: the token "
                                 "service did not answer in time")
        return UpstreamError(ErrorCode.UPSTREAM_UNREACHABLE, f"upstream {self.name}: could not "
                             f"get a token: {exc}")

    def denied_message(self) -> str:
        """Why the upstream said no, as far as the mirror's configuration explains it."""
        if not self.credentials.configured:
            return (f"upstream {self.name} wants credentials (or the repository does not "
                    f"exist there) and the mirror has no credentials configured for it: set "
                    f"{CREDENTIAL_KEYS} in the [[upstream]] table named {self.name!r}")
        return (f"upstream {self.name} refused the credentials configured for it (the "
                f"[[upstream]] table named {self.name!r}): check them, and that they may pull "
                "this repository")

    def _refuse_while_rate_limited(self) -> None:
        """After a 429, ask nothing more until its Retry-After has passed: retrying into a
        rate limit only extends it. Callers answer from cache where they can."""
        wait = self._rate_limited_until - time.monotonic()
        if wait > 0:
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                f"upstream {self.name} is rate limiting; not asking it again for {wait:.0f}s",
                headers={"Retry-After": str(math.ceil(wait))})

    def _note_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 429:
            self._rate_limited_until = time.monotonic() + retry_after_seconds(
                resp.headers.get("Retry-After"))
        limit = resp.headers.get("ratelimit-limit")
        if limit is not None:
            self.ratelimit_limit = limit
            self.ratelimit_remaining = resp.headers.get("ratelimit-remaining")
            for gauge, value in ((metrics.RATELIMIT_LIMIT, limit),
                                 (metrics.RATELIMIT_REMAINING, self.ratelimit_remaining)):
                number = ratelimit_number(value)
                if number is not None:
                    gauge.labels(self.name).set(number)


@dataclass(frozen=True)
class UpstreamManifest:
    """A manifest answer as the upstream gave it; the proxy verifies it (a pull.source
    ManifestReply)."""

    digest: str | None  # Docker-Content-Digest, unchecked
    media_type: str  # Content-Type without parameters
    size: int | None  # Content-Length
    data: bytes | None  # None for a HEAD
    fresh_for: float | None = None  # a peer's remaining trust in a tag answer (seconds)


@dataclass(frozen=True)
class Relayed:
    status: int
    body: bytes
    headers: dict[str, str]


def _manifest_reply(resp: aiohttp.ClientResponse, data: bytes | None) -> UpstreamManifest:
    length = resp.headers.get("Content-Length", "")
    return UpstreamManifest(resp.headers.get("Docker-Content-Digest") or None,
                            resp.headers.get("Content-Type", "").split(";")[0].strip(),
                            int(length) if length.isdigit() else None, data)


class UpstreamBlob:
    """A blob body from the upstream from the offset asked for (a pull.source BlobStream).
    Network failures reading it are ConnectionErrors, which the download engine resumes."""

    def __init__(self, resp: aiohttp.ClientResponse, total: int | None, skip: int,
                 counted_as: str | None) -> None:
        self.resp = resp
        self.total = total
        self._skip = skip  # bytes before the offset, sent by an upstream that ignored Range
        # the upstream its bytes count for (None: not counted), looked up once, not per chunk
        self._counter = None if counted_as is None else metrics.UPSTREAM_BYTES.labels(counted_as)

    async def read(self) -> bytes:
        try:
            while self._skip > 0:
                chunk = await self.resp.content.read(min(self._skip, CHUNK))
                if not chunk:
                    raise ConnectionError("upstream body ended while skipping")
                self._skip -= len(chunk)
            chunk = await self.resp.content.readany()
        except aiohttp.ClientError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        if self._counter is not None:
            self._counter.inc(len(chunk))
        return chunk

    def close(self) -> None:
        self.resp.close()

    def reject(self) -> None:
        pass  # the upstream is the source of truth: nobody to ask instead


def total_size(resp: aiohttp.ClientResponse) -> int | None:
    content_range = resp.headers.get("Content-Range", "")
    if resp.status == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def range_starts_at(resp: aiohttp.ClientResponse, offset: int) -> bool:
    spec = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("/")[0]
    return spec.split("-")[0] == str(offset)


async def read_bounded(upstream: Upstream, resp: aiohttp.ClientResponse, limit: int,
                       what: str, code: ErrorCode, advice: str) -> bytes:
    """The whole body, refused beyond `limit` bytes. (`content.read(n)` would return only
    what happens to be buffered: a large manifest arrived cut at a few tens of KB.)"""
    too_large = UpstreamError(code, f"upstream {upstream.name} sent {what} larger than "
                              f"{limit} bytes, more than the mirror relays; {advice}")
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE,
                            f"upstream {upstream.name} broke off {what}: {exc}") from None
    if resp.content_length is not None and len(body) != resp.content_length:
        raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, f"upstream {upstream.name} sent "
                            f"{what} of {len(body)} bytes, not the {resp.content_length} it "
                            "announced")
    return bytes(body)


def _redacted(text: str, url: str) -> str:
    return text.replace(url, redact_url(url)) if "@" in url else text


def retry_after_seconds(value: str | None, default: float = 30.0,
                        now: float | None = None) -> float:
    """Seconds a `Retry-After` header (delta-seconds or an HTTP date) asks to wait."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return default
    return max(0.0, when - (time.time() if now is None else now))


def ratelimit_number(value: str | None) -> int | None:
    """The count in a `ratelimit-*` header: `76;w=21600` → 76."""
    if value is None:
        return None
    head = value.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


async def error_from_response(
    upstream: Upstream, resp: aiohttp.ClientResponse, fallback_code: ErrorCode
) -> RegistryError:
    """A RegistryError relaying what the upstream said for a non-success answer."""
    status = resp.status
    try:
        body = await resp.read() if resp.method != "HEAD" else b""
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        resp.release()
    message = body[:512].decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status == 429:
        headers = {}
        if "Retry-After" in resp.headers:
            headers["Retry-After"] = resp.headers["Retry-After"]
        return RegistryError(ErrorCode.TOOMANYREQUESTS,
                             f"upstream {upstream.name} is rate limiting: {message}",
                             headers=headers)
    if status in (401, 403):
        # DENIED, never a bare 401: a 401 must carry a challenge, and answering the mirror's
        # would have docker and containerd log in to the mirror, which changes nothing here.
        return RegistryError(ErrorCode.DENIED, upstream.denied_message())
    if status == 404:
        return RegistryError(fallback_code, f"not found on upstream {upstream.name}")
    if status >= 500:
        return UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE,
                             f"upstream {upstream.name} answered {status}",
                             status=503 if status == 503 else 502)
    return RegistryError(fallback_code, f"upstream {upstream.name} answered {status}: {message}",
                         status=status if 400 <= status < 500 else 502)
