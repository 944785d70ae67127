"""Load-generating client processes, standard library only.

Run as ``python -m benchmarks.fetch SPEC_JSON``. The process imports, prints ``ready``,
waits for a line on stdin (the start barrier shared by all clients of one measurement),
runs, and prints one JSON line with its result. Times are ``time.monotonic()``, which on
Linux is one clock for all processes, so the parent can compute a common wall time.

A plain blocking socket with ``recv_into`` a 1 MiB buffer keeps the client cheap: it
reaches more than 3 GB/s against nginx on loopback, so the server, not the client,
is what gets measured.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

BUF_SIZE = 1 << 20
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass
class GetResult:
    url: str
    status: int = 0
    nbytes: int = 0
    t_start: float = 0.0
    t_headers: float = 0.0
    t_first_byte: float = 0.0
    t_end: float = 0.0
    digest: str = ""
    crc32: int = 0
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class HTTPError(Exception):
    pass


def _read_headers(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline:
            raise HTTPError("deadline waiting for headers")
        chunk = sock.recv(65536)
        if not chunk:
            raise HTTPError(f"connection closed before headers ({len(data)} bytes)")
        data += chunk
        if len(data) > 1 << 20:
            raise HTTPError("headers too large")
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HTTPError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def http_get(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    hash_body: bool = False,
    crc_body: bool = False,
    keep_body: bool = False,
    timeout: float = 30.0,
    deadline_s: float = 600.0,
    max_redirects: int = 3,
) -> tuple[GetResult, bytes]:
    """GET ``url``; discard (optionally hash or keep) the body. Never raises."""
    res = GetResult(url=url, t_start=time.monotonic())
    body = bytearray()
    deadline = res.t_start + deadline_s
    try:
        for _ in range(max_redirects + 1):
            u = urllib.parse.urlsplit(url)
            host = u.hostname or "127.0.0.1"
            port = u.port or 80
            path = u.path + (f"?{u.query}" if u.query else "")
            req = [f"GET {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close"]
            req += [f"{k}: {v}" for k, v in (headers or {}).items()]
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.sendall(("\r\n".join(req) + "\r\n\r\n").encode("latin-1"))
                status, hdrs, rest = _read_headers(sock, deadline)
                res.t_headers = time.monotonic()
                res.status = status
                res.headers = hdrs
                if status in (301, 302, 303, 307, 308) and "location" in hdrs:
                    url = urllib.parse.urljoin(url, hdrs["location"])
                    continue
                hasher = hashlib.sha256() if hash_body else None
                _read_body(sock, hdrs, rest, hasher, crc_body,
                           body if keep_body else None, res, deadline)
                if hasher is not None:
                    res.digest = "sha256:" + hasher.hexdigest()
                if status >= 400:
                    res.error = f"HTTP {status}"
                break
        else:
            res.error = "too many redirects"
    except (OSError, HTTPError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.t_end = time.monotonic()
    return res, bytes(body)


def _read_body(
    sock: socket.socket,
    hdrs: dict[str, str],
    rest: bytes,
    hasher: Any,
    crc: bool,
    keep: bytearray | None,
    res: GetResult,
    deadline: float,
) -> None:
    def consume(data: memoryview | bytes) -> None:
        if not data:
            return
        if res.nbytes == 0:
            res.t_first_byte = time.monotonic()
        res.nbytes += len(data)
        if hasher is not None:
            hasher.update(data)
        if crc:
            res.crc32 = zlib.crc32(data, res.crc32)
        if keep is not None:
            keep.extend(data)

    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        _read_chunked(sock, rest, consume, deadline)
        return
    length = int(hdrs["content-length"]) if "content-length" in hdrs else -1
    consume(rest[:length] if length >= 0 else rest)
    buf = bytearray(BUF_SIZE)
    mv = memoryview(buf)
    n_iter = 0
    while length < 0 or res.nbytes < length:
        n_iter += 1
        if n_iter % 256 == 0 and time.monotonic() > deadline:
            raise HTTPError("deadline reading body")
        want = BUF_SIZE if length < 0 else min(BUF_SIZE, length - res.nbytes)
        n = sock.recv_into(mv, want)
        if n == 0:
            if length >= 0:
                raise HTTPError(f"short body: {res.nbytes} of {length}")
            break
        consume(mv[:n])


def _read_chunked(sock: socket.socket, rest: bytes, consume: Any, deadline: float) -> None:
    buf = bytearray(rest)

    def fill(min_len: int) -> None:
        while len(buf) < min_len:
            if time.monotonic() > deadline:
                raise HTTPError("deadline reading chunked body")
            chunk = sock.recv(BUF_SIZE)
            if not chunk:
                raise HTTPError("connection closed inside chunked body")
            buf.extend(chunk)

    while True:
        while b"\r\n" not in buf:
            fill(len(buf) + 1)
        line, _, tail = bytes(buf).partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        del buf[: len(line) + 2]
        del tail
        if size == 0:
            return
        fill(size + 2)
        consume(bytes(buf[:size]))
        del buf[: size + 2]


def run_get(spec: dict[str, Any]) -> dict[str, Any]:
    results = []
    for _ in range(int(spec.get("repeat", 1))):
        res, _ = http_get(
            spec["url"],
            headers=spec.get("headers"),
            hash_body=bool(spec.get("hash", False)),
            timeout=float(spec.get("timeout", 30)),
            deadline_s=float(spec.get("deadline", 600)),
        )
        res.headers = {}
        results.append(asdict(res))
        if res.error:
            break
    return {"results": results}


def run_pull(spec: dict[str, Any]) -> dict[str, Any]:
    """Pull an image like a container runtime: manifest, then config and layers, at most
    ``concurrency`` blobs at a time, each verified against its digest and size."""
    base = spec["base"].rstrip("/")
    repo = spec["repo"]
    timeout = float(spec.get("timeout", 30))
    deadline = float(spec.get("deadline", 600))
    t0 = time.monotonic()
    out: dict[str, Any] = {"t_start": t0, "ok": False, "nbytes": 0, "errors": []}
    mres, mbody = http_get(
        f"{base}/v2/{repo}/manifests/{spec['ref']}",
        headers={"Accept": MANIFEST_ACCEPT},
        keep_body=True,
        timeout=timeout,
        deadline_s=deadline,
    )
    if mres.error:
        out["errors"].append(f"manifest: {mres.error}")
        out["t_end"] = time.monotonic()
        return out
    manifest = json.loads(mbody)
    descs = [manifest["config"], *manifest["layers"]]

    # Expected CRC-32 per digest, when given, replaces SHA-256 verification: it is 3.5x
    # cheaper, which matters with 32 clients and the server sharing 2 cores.
    crcs: dict[str, int] = spec.get("crc32") or {}

    def fetch(desc: dict[str, Any]) -> GetResult:
        digest = desc["digest"]
        res, _ = http_get(
            f"{base}/v2/{repo}/blobs/{digest}",
            hash_body=digest not in crcs,
            crc_body=digest in crcs,
            timeout=timeout,
            deadline_s=max(1.0, deadline - (time.monotonic() - t0)),
        )
        if res.error:
            return res
        if res.nbytes != desc["size"]:
            res.error = f"bad blob {digest[:19]}: {res.nbytes} bytes, want {desc['size']}"
        elif digest in crcs and res.crc32 != crcs[digest]:
            res.error = f"bad blob {digest[:19]}: CRC-32 mismatch"
        elif digest not in crcs and res.digest != digest:
            res.error = f"bad blob {digest[:19]}: got {res.digest[:19]}"
        return res

    with ThreadPoolExecutor(max_workers=int(spec.get("concurrency", 3))) as pool:
        blob_results = list(pool.map(fetch, descs))
    out["nbytes"] = sum(r.nbytes for r in blob_results)
    out["errors"] += [r.error for r in blob_results if r.error]
    out["ok"] = not out["errors"]
    out["blobs"] = [
        {"t_start": r.t_start, "t_first_byte": r.t_first_byte, "t_end": r.t_end, "n": r.nbytes}
        for r in blob_results
    ]
    out["t_end"] = time.monotonic()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    result = run_pull(spec) if spec["mode"] == "pull" else run_get(spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
