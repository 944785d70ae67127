"""Property-based tests at the HTTP level: hypothesis generates requests (paths with `..`,
`%2e%2e`, long and unicode names, NUL; methods; Range, If-Range, Accept, Authorization
garbage, `ns=`) and sends them as raw bytes to the mirror's app, in process, served on
127.0.0.1 from a thread. Every answer: no 500; every error a registry JSON error; no byte
of a file outside the cache dir in any body; and after the run, no file created outside the
cache dir and nothing but verified content in it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mirror.config import parse_config
from mirror.http.app import build_app
from tests.support.faultmatrix import (
    OCI_MANIFEST,
    PASSWORD,
    USER,
    LoopThread,
    Upstreams,
    image_manifest,
)
from tests.support.oci import sha256_digest
from tests.support.registry import HOST, free_port
from tests.support.store import assert_store_verified

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 150  # per app (open and with [auth]): 300 in all
CANARY = b"CANARY-" + os.urandom(16).hex().encode()
CACHE_TOP = {"blobs", "tmp", "index", "locks", "auth.secret"}  # cache/store.py SECRET_FILE
CLIENT_USER, CLIENT_PASSWORD = "alice", "secret"
BLOB = os.urandom(5000)
BLOB_DIGEST = sha256_digest(BLOB)
CONFIG_BLOB = os.urandom(300)
MANIFEST = image_manifest((sha256_digest(CONFIG_BLOB), len(CONFIG_BLOB)),
                          [(BLOB_DIGEST, len(BLOB))])
MANIFEST_DIGEST = sha256_digest(MANIFEST)


@dataclass
class App:
    host: str
    root: Path  # holds parent/ (the cache dir's parent) and the canaries
    cache: Path
    auth: bool


def _tree(root: Path, skip: Path) -> dict[str, bytes]:
    """Every file under root except those under `skip`, with its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and skip not in p.parents:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="module", params=["open", "auth"])
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        upstreams: Upstreams) -> Iterator[App]:
    for up in (upstreams.public, upstreams.private):
        up.add_blob(BLOB)
        up.add_blob(CONFIG_BLOB)
        up.add_manifest("team/app", "v1", MANIFEST, OCI_MANIFEST)
    root = tmp_path_factory.mktemp(f"props-{request.param}")
    parent = root / "parent"
    cache = parent / "cache"
    parent.mkdir()
    # Files a path traversal would reach: next to the cache dir, above it, and shaped like
    # store paths (blobs/sha256/<2>/<hex>) outside it.
    for p in (root / "canary", parent / "canary", parent / "blobs" / "sha256" / "00" / ("0" * 64)):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(CANARY)
    auth: dict[str, Any] = {}
    if request.param == "auth":
        htpasswd = root / "htpasswd"
        hashed = bcrypt.hashpw(CLIENT_PASSWORD.encode(), bcrypt.gensalt(rounds=4))
        htpasswd.write_bytes(CLIENT_USER.encode() + b":" + hashed + b"\n")
        auth = {"htpasswd": str(htpasswd)}
    config = parse_config({
        "cache": {"dir": str(cache)},
        "auth": auth,
        "upstream": [
            {"name": "pub.test", "url": upstreams.public.url, "read_timeout": "2s"},
            {"name": "priv.test", "url": upstreams.private.url, "username": USER,
             "password": PASSWORD, "read_timeout": "2s"},
        ],
    })
    port = free_port()
    lt = LoopThread()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(build_app(config))
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        return runner

    runner = lt.run(start())
    try:
        yield App(f"{HOST}:{port}", root, cache, request.param == "auth")
    finally:
        with contextlib.suppress(Exception):
            lt.run(runner.cleanup())
        lt.stop()


# --- strategies ------------------------------------------------------------------------

SPECIAL_SEGMENTS = [
    "team", "app", "library", "nginx", "..", ".", "%2e%2e", "%2E%2e", "%2e", ".%2e", "",
    "priv.test", "pub.test", "docker.io", "quay.io", "manifests", "blobs", "tags", "list",
    "referrers", "_catalog", "uploads", "%2f", "%2F..%2F..", "%00", "a%00b", "%5c..%5c",
    "..;", "%252e%252e", "~root", "parent", "canary", "sha256", "00", "0" * 64,
]
SEGMENT = st.one_of(
    st.sampled_from(SPECIAL_SEGMENTS),
    st.text(string.ascii_lowercase + string.digits + "._-", min_size=1, max_size=16),
    st.text(min_size=1, max_size=8).map(lambda t: quote(t, safe="")),  # unicode, NUL
    st.integers(100, 400).map(lambda n: "a" * n),  # long names
)
REFERENCE = st.one_of(
    st.sampled_from([
        BLOB_DIGEST, MANIFEST_DIGEST, "v1", "latest", "sha256:" + "0" * 64, "sha256:xyz",
        "sha512:" + "a" * 128, "md5:abc", ".INVALID_MANIFEST_NAME", "..", "%2e%2e",
        "sha256:..%2f..%2fcanary", "sha256%3A" + BLOB_DIGEST[7:], BLOB_DIGEST.upper(),
        BLOB_DIGEST + "/..", "a" * 200,
    ]),
    SEGMENT,
)
QUERY_VALUE = st.one_of(
    st.sampled_from(["docker.io", "priv.test", "pub.test", "127.0.0.1%3A5001", "..", "%00",
                     "", "quay.io", "1", "-1", "99999999999999999999", "v1"]),
    st.text(max_size=8).map(lambda t: quote(t, safe="")),
)
MEDIA_TYPES = [
    OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws", "*/*", "text/html",
    "application/json;q=0", "garbage;;;q=x", "", "application/*;q=0.5, */*;q=0.1",
]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


GOOD_AUTHORIZATION = "Basic " + _b64(f"{CLIENT_USER}:{CLIENT_PASSWORD}".encode())
AUTHORIZATION = st.one_of(
    st.sampled_from([
        "Basic !!!", "Basic ", "Bearer", "Bearer x.y.z", "Negotiate abc", "Basic =",
        "Basic " + _b64(f"{CLIENT_USER}:{CLIENT_PASSWORD}".encode()),
        "Basic " + _b64(f"{CLIENT_USER}:wrong".encode()), "Basic " + _b64(b"\x00:\x00"),
        "Basic " + _b64(b"no-colon"), "Bearer " + "a" * 2000, "basic " + _b64(b"a:b"),
    ]),
    st.binary(max_size=40).map(lambda b: "Basic " + _b64(b)),
    st.text(string.printable.strip(), max_size=40),
)
RANGE_SPECIALS = st.sampled_from([
    "bytes=0-", "bytes=0-0", "bytes=-1", "bytes=5-1", "bytes=0-,0-,0-,0-",
    "bytes=" + ",".join(["0-"] * 64), "bytes=" + ",".join(["0-"] * 200),
    "bytes=" + ",".join(f"{i}-{i + 4000}" for i in range(40)), "bytes=abc", "items=0-1",
    "bytes=99999999999-", "bytes=1-2,4-5", "bytes=-0", "bytes= 0 - 10",
    "bytes=0-1,1-2,2-3,0-4999", "bytes=-99999999999999999999", "bytes=",
])
RANGE = st.one_of(  # the hand-picked ones twice as often
    RANGE_SPECIALS, RANGE_SPECIALS,
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 6000), st.integers(0, 6000)),
    st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 6000)), min_size=2, max_size=30)
    .map(lambda rs: "bytes=" + ",".join(f"{a}-{b}" for a, b in rs)),
)
IF_RANGE = st.sampled_from([f'"{BLOB_DIGEST}"', f'W/"{BLOB_DIGEST}"', '"x"', "garbage",
                            "Wed, 21 Oct 2015 07:28:00 GMT", ""])
METHOD = st.sampled_from(["GET"] * 6 + ["HEAD"] * 3 + ["POST", "PUT", "DELETE", "PATCH",
                                                        "OPTIONS", "TRACE"])


@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[str, str]]
    wellformed: bool  # every target byte printable ASCII: the request reaches the app

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


@st.composite
def requests(draw: st.DrawFn) -> Req:
    shape = draw(st.integers(0, 9))
    if shape == 0:
        target = "/" + "/".join(draw(st.lists(SEGMENT, max_size=6)))
    elif shape <= 4:  # real content under real names: ranges, Accept and auth at work
        name = draw(st.sampled_from(["team/app", "priv.test/team/app", "pub.test/team/app",
                                     "docker.io/team/app", "team/app/../app"]))
        ref = draw(st.sampled_from([BLOB_DIGEST, MANIFEST_DIGEST, "v1"]))
        kind = draw(st.sampled_from(["blobs", "manifests"]))
        target = f"/v2/{name}/{kind}/{ref}"
    else:
        name = "/".join(draw(st.lists(SEGMENT, min_size=1, max_size=4)))
        kind = draw(st.sampled_from(["manifests", "blobs", "tags", "referrers",
                                     "blobs/uploads", "other"]))
        if kind == "tags":
            tail = "tags/list"
        elif kind == "other":
            tail = draw(SEGMENT)
        else:
            tail = f"{kind}/{draw(REFERENCE)}"
        target = f"/v2/{name}/{tail}"
    params = draw(st.lists(st.tuples(st.sampled_from(["ns", "n", "last", "artifactType", "x"]),
                                     QUERY_VALUE), max_size=3))
    if params:
        target += "?" + "&".join(f"{k}={v}" for k, v in params)
    if draw(st.integers(0, 14)) == 0:  # raw, unencoded bytes: NUL, unicode, controls
        raw = draw(st.sampled_from(["\x00", "é", "\u202e", "\x7f", "\t", "%", "%zz", "\\"]))
        at = draw(st.integers(0, len(target)))
        target = target[:at] + raw + target[at:]
    headers: list[tuple[str, str]] = []
    for accept in draw(st.lists(st.sampled_from(MEDIA_TYPES), max_size=4)):
        headers.append(("Accept", accept))  # several header lines, as dockerd sends
    if draw(st.booleans()):
        headers.append(("Authorization", GOOD_AUTHORIZATION))
    for key, strategy in (("Authorization", AUTHORIZATION), ("Range", RANGE),
                          ("If-Range", IF_RANGE)):
        if draw(st.booleans()):
            headers.append((key, draw(strategy)))
    headers = [(k, v.replace("\r", "").replace("\n", "")) for k, v in headers]
    return Req(draw(METHOD), target, headers, wellformed(target))


PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def wellformed(target: str) -> bool:
    """An origin-form target aiohttp's HTTP parser accepts, so that the request reaches the
    app (the parser answers the others itself, in text/plain, before any mirror code)."""
    return (target.startswith("/") and all(0x21 <= ord(ch) <= 0x7E for ch in target)
            and PERCENT_ESCAPE.search(target) is None)


# --- sending ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes


def send(host: str, req: Req, timeout: float = 20.0) -> Answer:
    h, _, p = host.rpartition(":")
    deadline = time.monotonic() + timeout
    data = bytearray()
    with socket.create_connection((h, int(p)), timeout=timeout) as sock:
        sock.sendall(req.encode(host))
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return Answer(None, {}, bytes(data))
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(int(lines[0].split(" ", 2)[1]), headers, body)


def check_answer(req: Req, ans: Answer) -> None:
    what = f"{req.method} {req.target!r} {req.headers!r}"
    assert CANARY not in ans.body, f"{what}: a file outside the cache dir was served"
    if not req.wellformed:
        assert ans.status != 500, f"{what}: 500"
        return
    assert ans.status is not None, f"{what}: no answer at all: {ans.body[:200]!r}"
    assert ans.status < 500 or ans.status in (502, 503, 504), (
        f"{what}: {ans.status} {ans.body[:300]!r}")
    if ans.status >= 400 and req.method != "HEAD":
        assert ans.headers.get("content-type", "").startswith("application/json"), (
            f"{what}: {ans.status} error with Content-Type "
            f"{ans.headers.get('content-type')!r}: {ans.body[:200]!r}")
        doc = json.loads(ans.body)
        assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], (
            f"{what}: not a registry error: {ans.body[:200]!r}")
        assert all(isinstance(e, dict) and isinstance(e.get("code"), str)
                   for e in doc["errors"]), f"{what}: {doc}"
    if ans.status in (200, 206) and "/blobs/" in req.target:
        # no amplification: however many (overlapping) ranges, about the blob's size at most
        assert len(ans.body) <= 2 * len(BLOB) + 8192, (
            f"{what}: {len(ans.body)} bytes for a {len(BLOB)}-byte blob")
    if ans.status in (200, 206) and req.method == "GET" and BLOB_DIGEST[7:] in req.target \
            and "/blobs/" in req.target:
        if ans.status == 200:
            assert ans.body == BLOB, f"{what}: 200 with wrong bytes"
        else:
            ctype = ans.headers.get("content-type", "")
            if not ctype.startswith("multipart/"):
                rng = ans.headers["content-range"].removeprefix("bytes ").split("/")[0]
                first, last = (int(x) for x in rng.split("-"))
                assert ans.body == BLOB[first:last + 1], f"{what}: 206 with wrong bytes"


def test_http_properties(app: App) -> None:
    # what exists before: the canaries (outside the cache dir) and the cache dir's top level
    before_outside = _tree(app.root, app.cache)
    assert sum(v == CANARY for v in before_outside.values()) == 3
    seen: list[int | None] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
              print_blob=True)
    @given(req=requests())
    # a request that succeeds with and without [auth] (the default upstream is public), so
    # the run always reaches a success path, however the generated examples fall
    @example(req=Req("GET", f"/v2/pub.test/team/app/blobs/{BLOB_DIGEST}", [], True))
    def run(req: Req) -> None:
        ans = send(app.host, req)
        seen.append(ans.status)
        check_answer(req, ans)

    run()
    # the run reached the app's routes, not only its error paths
    assert len(seen) >= EXAMPLES // 2
    assert any(s is not None and s < 300 for s in seen), f"no success at all: {set(seen)}"
    # nothing outside the cache dir was created, changed or removed
    assert _tree(app.root, app.cache) == before_outside
    # inside the cache dir: only its own directories, only verified content
    assert app.cache.is_dir()
    top = {p.name for p in app.cache.iterdir()}
    assert top <= CACHE_TOP, f"unexpected entries in the cache dir: {top - CACHE_TOP}"
    assert_store_verified(app.cache)
    for p in (app.cache / "blobs").rglob("*"):
        if p.is_file():
            rel = p.relative_to(app.cache / "blobs").parts
            assert len(rel) == 3 and rel[0] in ("sha256", "sha512") and rel[1] == rel[2][:2], p
