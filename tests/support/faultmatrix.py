"""The fault matrix's support (tests/faults): a fault-injecting upstream served from a thread
(so real mirror processes, one or two workers, can reach it), a raw-socket client that
reports every outcome, and the checks every row makes.

    up = upstreams.private                    # MatrixUpstream, Basic auth user:pass
    up.set_actions(digest, [Act("reset", at=1000, gate=True)])
    out = fetch(mirror.host, f"/v2/priv.test/team/app/blobs/{digest}")
    check_outcome(out, data)                  # exact bytes, a clean error, or a broken body

`MatrixUpstream` extends tests/support/faultupstream.py's FaultUpstream: instead of one
Behaviour per blob it takes a list of actions per digest (blob or manifest), one consumed by
each request (GETs for blobs, GETs and HEADs for manifests), each optionally paused at a
gate mid-body so concurrent clients can join a download in flight. It also serves a redirect
loop and streamed tags lists of any size (generated, never held in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .faultupstream import FaultUpstream
from .mirror import MirrorProcess
from .oci import sha256_digest
from .registry import HOST, stop_loop_thread, wait_until
from .store import assert_store_verified

USER, PASSWORD = "user", "pass"  # what FaultUpstream's Basic challenge accepts
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
PIECE = 64 * 1024  # the upstream writes bodies in pieces this big (several TCP segments)


# --- the upstream --------------------------------------------------------------------------


@dataclass
class Act:
    """What the upstream does to one request.

    kind: ok | reset (abort the connection after `at` body bytes) | stall (send `at` bytes,
    then nothing) | short (chunked, ends cleanly after `at` bytes) | long (Content-Length and
    body 25 % longer than the content) | corrupt (byte `at` flipped) | ignore_range (a full
    200 answer to a Range request) | status (answer `at`, e.g. 503) | redirect_loop.
    gate: pause after `at` body bytes until `MatrixUpstream.release(key)`.
    """

    kind: str = "ok"
    at: int = 0
    gate: bool = False


class MatrixUpstream(FaultUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.actions: dict[str, list[Act]] = {}
        self.reached: dict[str, threading.Event] = {}
        self._released: set[str] = set()
        self._gates: dict[str, asyncio.Event] = {}
        self.loop_hops = 0
        # repository -> (bytes, chunked): a tags list streamed from generated pieces
        self.huge_tags: dict[str, tuple[int, bool]] = {}
        self.tags_bytes_sent = 0
        self.chunked_manifests = False
        self.manifest_digest_header = True

    # --- set-up, called from the test's thread (dict operations are atomic) ---------------

    def set_actions(self, key: str, actions: list[Act]) -> threading.Event:
        """Actions for the next requests of a blob or manifest (by digest); returns the
        event set when a gated action reaches its gate."""
        self._released.discard(key)
        self.reached[key] = threading.Event()
        self.actions[key] = list(actions)
        return self.reached[key]

    def clear_actions(self, key: str) -> None:
        self.actions.pop(key, None)

    def release(self, key: str) -> None:
        """Open the gate of `key` (call it in the upstream's loop: LoopThread.call)."""
        self._released.add(key)
        if key in self._gates:
            self._gates[key].set()

    def _gate(self, key: str) -> asyncio.Event:
        ev = self._gates.setdefault(key, asyncio.Event())
        if key in self._released:
            ev.set()
        return ev

    def _take(self, key: str) -> Act:
        pending = self.actions.get(key)
        if not pending:
            return Act()
        return pending.pop(0)

    # --- routes ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/loop/{n}", self.loop)
        app.router.add_get(r"/v2/{name:.+}/tags/list", self.tags)
        return app

    async def loop(self, request: web.Request) -> web.Response:
        self._record(request)
        self.loop_hops += 1
        n = int(request.match_info["n"])
        raise web.HTTPTemporaryRedirect(f"/loop/{n + 1}")

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (challenge := self._challenge(request)) is not None:
            return challenge
        digest = request.match_info["digest"]
        data = self.held_blob(request)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        act = self._take(digest) if request.method == "GET" else Act()
        return await self._send(request, digest, data, act, {"Docker-Content-Digest": digest},
                                chunked=False)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (challenge := self._challenge(request)) is not None:
            return challenge
        self.manifest_reached.set()
        entry = self.manifests.get((request.match_info["name"], request.match_info["ref"]))
        if entry is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        data, media_type = entry
        digest = sha256_digest(data)
        headers = {"Content-Type": media_type}
        if self.manifest_digest_header:
            headers["Docker-Content-Digest"] = digest
        return await self._send(request, digest, data, self._take(digest), headers,
                                chunked=self.chunked_manifests)

    async def tags(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (challenge := self._challenge(request)) is not None:
            return challenge
        name = request.match_info["name"]
        if name not in self.huge_tags:
            return web.json_response({"name": name, "tags": ["v1", "v2"]})
        size, chunked = self.huge_tags[name]
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, OSError):
            for piece in huge_tags_pieces(name, size):
                await resp.write(piece)
                self.tags_bytes_sent += len(piece)
            await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, body: bytes) -> None:
        for i in range(0, len(body), PIECE):
            await resp.write(body[i:i + PIECE])

    async def _send(self, request: web.Request, key: str, data: bytes, act: Act,
                    headers: dict[str, str], chunked: bool) -> web.StreamResponse:
        if act.kind == "status":
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "injected"}]},
                                     status=act.at or 503)
        if act.kind == "redirect_loop":
            raise web.HTTPTemporaryRedirect("/loop/0")
        if request.method == "HEAD":
            if act.kind == "stall":
                await self.never.wait()
            if act.kind == "reset":
                assert request.transport is not None
                request.transport.abort()
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = 0
        rng = request.headers.get("Range")
        if rng and act.kind != "ignore_range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        if act.kind == "corrupt" and body:
            i = min(act.at, len(body) - 1)
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        if act.kind == "long":
            body = body + os.urandom(max(1024, len(body) // 4))
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if chunked or act.kind == "short":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(body)
        await resp.prepare(request)
        cut = len(body)
        if act.gate or act.kind in ("reset", "stall", "short"):
            cut = min(act.at, len(body))
        await self._write(resp, body[:cut])
        if act.gate:
            self.reached.setdefault(key, threading.Event()).set()
            await self._gate(key).wait()
        if act.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return resp
        if act.kind == "stall":
            await self.never.wait()
            return resp
        if act.kind != "short":
            await self._write(resp, body[cut:])
        await resp.write_eof()
        return resp


def huge_tags_pieces(name: str, size: int, piece: int = 1 << 20) -> Iterator[bytes]:
    """A syntactically valid tags list of exactly `size` bytes, in pieces of `piece` bytes
    (one piece object reused: nothing of `size` is ever allocated)."""
    head = f'{{"name": {json.dumps(name)}, "tags": ["t"'.encode()
    tail = b"]}"
    filler = b', "t"'  # 5 bytes: ["t", "t", ...
    middle = size - len(head) - len(tail)
    assert middle >= 0
    body_piece = filler * (piece // len(filler))
    yield head
    left = middle
    while left >= len(body_piece):
        yield body_piece
        left -= len(body_piece)
    n, rest = divmod(left, len(filler))
    yield filler * n + b" " * rest + tail


def huge_tags_sha256(name: str, size: int) -> str:
    h = hashlib.sha256()
    for piece in huge_tags_pieces(name, size):
        h.update(piece)
    return "sha256:" + h.hexdigest()


class LoopThread:
    """An asyncio loop in a daemon thread, for aiohttp servers that real mirror processes
    reach; stopped with tests/support/registry.py's stop_loop_thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        stop_loop_thread(self.loop, self.thread, None)


@dataclass
class Upstreams:
    """Two upstreams on one loop thread: `public` (no credentials, the mirror's default) and
    `private` (Basic auth; its content must never be served under another name)."""

    thread: LoopThread
    public: MatrixUpstream
    private: MatrixUpstream

    def release(self, up: MatrixUpstream, key: str) -> None:
        self.thread.call(up.release, key)


# --- a raw-socket client -----------------------------------------------------------------


@dataclass
class Outcome:
    """What one client saw. `complete` is False when the connection broke before the body
    its headers announced was read (or timed out)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False
    error: str | None = None
    header_seconds: float | None = None
    seconds: float = 0.0
    ended: float = 0.0  # time.monotonic() when the client finished

    def __repr__(self) -> str:
        return (f"Outcome(status={self.status}, complete={self.complete}, "
                f"body={len(self.body)} bytes, error={self.error!r}, "
                f"headers={ {k: v for k, v in self.headers.items() if k != 'date'} })")


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes, deadline: float) -> int:
    while (i := buf.find(marker)) < 0:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the end of the headers")
        buf += data
    return i


def fetch(host: str, target: str, method: str = "GET",
          headers: list[tuple[str, str]] | None = None, timeout: float = 20.0,
          sent: threading.Event | None = None, got_headers: threading.Event | None = None,
          rate: float | None = None, leave_after: int | None = None,
          half_close: bool = False, source: str = HOST, keep_body: bool = True,
          digest_only: bool = False, rcvbuf: int | None = None) -> Outcome:
    """One HTTP/1.1 request on a fresh connection (`Connection: close`), every failure
    captured in the Outcome. rate: read the body at most this many bytes/s; leave_after:
    close after this many body bytes; half_close: shutdown(SHUT_WR) after the request;
    digest_only: keep a running sha256 of the body in headers["x-body-sha256"] instead of
    the bytes (for bodies of hundreds of MB); rcvbuf: a small SO_RCVBUF, so that a slow
    reader pushes back on the server instead of the kernel buffering the whole body."""
    out = Outcome()
    started = time.monotonic()
    deadline = started + timeout
    h, _, p = host.rpartition(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hasher = hashlib.sha256() if digest_only else None
    try:
        sock.settimeout(timeout)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.connect((h, int(p)))
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        if sent is not None:
            sent.set()
        buf = bytearray()
        end = _read_until(sock, buf, b"\r\n\r\n", deadline)
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        rest = bytes(buf[end + 4:])
        out.status = int(head[0].split(" ", 2)[1])
        for line in head[1:]:
            k, _, v = line.partition(":")
            out.headers[k.strip().lower()] = v.strip()
        out.header_seconds = time.monotonic() - started
        if got_headers is not None:
            got_headers.set()
        if method == "HEAD" or out.status in (204, 304):
            out.complete = True
            return out
        if "chunked" in out.headers.get("transfer-encoding", "").lower():
            body = _read_chunked(sock, rest, deadline)
            out.body = body
            out.complete = True
            if hasher is not None:
                hasher.update(body)
            return out
        length = out.headers.get("content-length")
        want = int(length) if length is not None else None
        got = 0
        parts: list[bytes] = []

        def take(data: bytes) -> None:
            nonlocal got
            got += len(data)
            if hasher is not None:
                hasher.update(data)
            elif keep_body:
                parts.append(data)

        take(rest)
        while want is None or got < want:
            if leave_after is not None and got >= leave_after:
                out.error = "left mid-body"
                return out
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536 if rate is None else max(1024, int(rate / 20)))
            if not data:
                break
            take(data)
            if rate is not None:
                # pacing a deliberately slow reader, not synchronisation
                time.sleep(len(data) / rate)
        out.complete = want is None or got == want
        if not out.complete:
            out.error = f"connection closed after {got} of {want} body bytes"
        out.body = b"".join(parts)
        if hasher is not None:
            out.headers["x-body-sha256"] = "sha256:" + hasher.hexdigest()
            out.headers["x-body-length"] = str(got)
    except (OSError, ValueError, IndexError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended = time.monotonic()
        out.seconds = out.ended - started
        with contextlib.suppress(OSError):
            sock.close()
    return out


def _read_chunked(sock: socket.socket, rest: bytes, deadline: float) -> bytes:
    buf = bytearray(rest)
    out = bytearray()
    while True:
        i = _read_until(sock, buf, b"\r\n", deadline)
        size = int(bytes(buf[:i]).split(b";")[0], 16)
        del buf[:i + 2]
        while len(buf) < size + 2:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed inside a chunk")
            buf += data
        if size == 0:
            return bytes(out)
        out += buf[:size]
        del buf[:size + 2]


# --- the checks every row makes --------------------------------------------------------------

ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS", "TAG_INVALID", "RANGE_INVALID",
}


def check_error_body(out: Outcome) -> None:
    """A registry error: JSON `{"errors": [{"code": …, "message": …}]}`."""
    assert out.headers.get("content-type", "").startswith("application/json"), out
    doc = json.loads(out.body)
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], doc
    for e in doc["errors"]:
        assert isinstance(e, dict) and isinstance(e.get("code"), str) and e["code"], doc
        assert isinstance(e.get("message", ""), str), doc


def check_outcome(out: Outcome, good: bytes | set[bytes], what: str = "") -> bool:
    """The row's first promise: a client gets the exact bytes, a clean registry error (never
    500), or a broken connection; never a complete wrong body. Returns whether it got the
    exact bytes."""
    goods = good if isinstance(good, set) else {good}
    assert out.status != 500, f"{what}: 500 {out.body[:300]!r}"
    # a broken connection is an answer; silence until the client gives up is not
    assert not (out.error or "").startswith(("TimeoutError", "timeout")), (
        f"{what}: the client hung for {out.seconds:.0f}s: {out}")
    if out.status is None or not out.complete:
        return False  # a broken connection: the client knows it failed
    if out.status in (200, 206):
        if out.status == 200:
            assert out.body in goods, (
                f"{what}: a complete 200 with wrong bytes: {len(out.body)} bytes, sha256 "
                f"{sha256_digest(out.body)}, expected one of {[sha256_digest(g) for g in goods]}")
        else:
            rng = out.headers.get("content-range", "")
            first, _, last = rng.removeprefix("bytes ").partition("/")[0].partition("-")
            assert any(out.body == g[int(first):int(last) + 1] for g in goods), (
                f"{what}: a complete 206 ({rng}) with wrong bytes")
        if "docker-content-digest" in out.headers and out.status == 200:
            assert out.headers["docker-content-digest"] == sha256_digest(out.body), (
                f"{what}: Docker-Content-Digest does not match the body")
        return True
    assert 400 <= out.status < 600, f"{what}: unexpected status {out}"
    check_error_body(out)
    return False


def assert_not_leaked(out: Outcome, private: bytes, what: str) -> None:
    """No private content under another name: anything but a 200 with those bytes."""
    assert out.status != 500, f"{what}: 500"
    leaked = out.status == 200 and bool(out.body) and out.body == private[:len(out.body)]
    assert not leaked, f"{what}: private content served under a name that does not hold it: {out}"


def assert_no_500_logged(m: MirrorProcess) -> None:
    """After the mirror stopped (its log lines flushed): no request logged 500, nothing
    logged as an unhandled error."""
    bad = [e for e in m.request_log() if e.get("status") == 500]
    assert not bad, f"requests logged with status 500: {bad[:5]}"
    unhandled = [e for e in m.log_entries()
                 if e.get("level") in ("error", "critical") and "exception" in e]
    assert not unhandled, "unhandled errors logged: " + "\n".join(
        f"{e.get('msg')}: {str(e.get('exception'))[-1500:]}" for e in unhandled[:3])


def assert_store_clean(cache: Path) -> None:
    """Nothing wrong cached: every file in blobs/ hashes to its name."""
    assert_store_verified(cache)


def tmp_leftovers(cache: Path, timeout: float = 10.0) -> list[str]:
    """What is still in tmp/ after waiting (bounded) for it to empty: partial files and
    their .meta siblings must not outlive their downloads. Call it while the mirror runs
    (a start empties tmp/) and assert on the result at the end of the row."""

    def names() -> list[str]:
        tmp = cache / "tmp"
        try:
            return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
        except FileNotFoundError:
            return []

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not names(), timeout, interval=0.05, what="tmp/ to empty")
    return names()


def image_manifest(config: tuple[str, int], layers: list[tuple[str, int]],
                   pad: int = 0) -> bytes:
    """An OCI image manifest referencing (digest, size) pairs; `pad` bytes of annotation
    make it as big as wanted."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    if pad:
        doc["annotations"] = {"org.example.pad": "x" * pad}
    return json.dumps(doc, indent=1).encode()


def proc_tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of a process and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class RssPeak:
    """Samples a process tree's RSS in a thread (every 20 ms) while in the `with` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = proc_tree_rss(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, proc_tree_rss(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
