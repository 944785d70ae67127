"""The soak: a mixed load for a long time through a real 2-worker mirror whose cache is
small enough that eviction runs all the time, against the docker-registry upstream.

Mixed load (bounded in count and time): manifests by tag (hot images, within and past
`tag_ttl`) and by digest, whole blobs, single ranges, tags lists; hot images are asked
again and again, cold ones cycle through a cache too small to hold them (so they are
evicted and fetched again: cold and warm). Every body is checked: manifests and blobs
against their digests, ranges against the bytes on this side, tags lists as JSON.

Reported (rows of the `soak` group): errors (must be 0; HTTP errors, short or wrong bodies,
500s in the mirror's log), RSS and open file descriptors of the mirror's process tree after
the warm-up and at the end (flat), upstream re-fetches (proof that eviction ran),
`mirror verify` on the cache afterwards (clean), and whether every hot manifest is still in
the store at the end.

    .venv/bin/python -m benchmarks soak                       # 10 minutes
    .venv/bin/python -m benchmarks soak --soak-seconds 120    # a short run
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fetch import MANIFEST_ACCEPT, http_get
from .harness import REPO_ROOT, Proc, log, process_tree, pss_bytes, rss_bytes, wait_http
from .oci import Blob, Image, MiB, make_image, push_image
from .report import Row
from .scenarios import Ctx
from .servers import free_port

DEFAULT_SECONDS = 600.0  # `make bench`: at least 10 minutes
QUICK_SECONDS = 120.0
WORKERS = 2
CLIENTS = 6
MAX_OPS = 2_000_000  # a bound on the loop besides time
OP_TIMEOUT = 60.0
HOT_IMAGES = 4  # asked all the time: must never lose their disk copy
COLD_IMAGES = 16  # cycle through the cache: evicted and fetched again
HOT_LAYERS = [2 * MiB, 1 * MiB]
COLD_LAYERS = [3 * MiB, 1 * MiB]
MAX_SIZE = "40MiB"  # hot ~12 MiB + cold ~64 MiB: eviction runs continuously
LOW_WATERMARK = "30MiB"
TAG_TTL = "2s"  # tags are revalidated (HEAD upstream) every few seconds
SAMPLE_EVERY = 10.0
# Flat: the end may exceed the post-warm-up figure by this much at most.
RSS_GROWTH_RATIO = 1.25
RSS_GROWTH_SLACK = 24 * MiB
FD_GROWTH_SLACK = 24

OPS = [  # (name, weight)
    ("manifest_tag_hot", 30),
    ("manifest_tag_cold", 8),
    ("manifest_digest", 10),
    ("blob_hot", 12),
    ("blob_cold", 12),
    ("range", 18),
    ("tags", 5),
    ("missing", 5),
]


def soak_seconds(ctx: Ctx) -> float:
    env = os.environ.get("MIRROR_SOAK_SECONDS")
    if env:
        return float(env)
    return QUICK_SECONDS if ctx.opts.quick else DEFAULT_SECONDS


@dataclass
class Sample:
    t: float
    procs: int
    rss: int
    pss: int
    fds: int

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 1), "procs": self.procs, "rss_mib": self.rss / MiB,
                "pss_mib": self.pss / MiB, "fds": self.fds}


def sample(pid: int, t0: float) -> Sample:
    pids = process_tree(pid)
    fds = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{p}/fd"))
    return Sample(time.monotonic() - t0, len(pids), sum(rss_bytes(p) for p in pids),
                  sum(pss_bytes(p) for p in pids), fds)


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, op: str, nbytes: int) -> None:
        with self.lock:
            self.ops[op] += 1
            self.bytes += nbytes

    def fail(self, op: str, what: str) -> None:
        with self.lock:
            self.ops[op] += 1
            self.errors[op] += 1
            if len(self.samples) < 20:
                self.samples.append(f"{op}: {what}")


class SoakMirror:
    """The mirror under soak: 2 workers, a small cache, short tag_ttl."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.cache = workdir / "cache"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.upstream_name = upstream.split("://", 1)[1].rstrip("/")
        self.config = workdir / "soak.toml"
        self.config.write_text(
            f"""[server]
listen = "127.0.0.1:{port}"
workers = {WORKERS}

[cache]
dir = "{self.cache}"
max_size = "{MAX_SIZE}"
low_watermark = "{LOW_WATERMARK}"
tag_ttl = "{TAG_TTL}"
prefetch = true

[[upstream]]
name = "{self.upstream_name}"
url = "{upstream}"
""")
        self.log_path = workdir / "soak-mirror.log"
        self.env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.python = str(REPO_ROOT / ".venv" / "bin" / "python")
        self.proc = Proc("soak-mirror", [self.python, "-m", "mirror", "serve", "--config",
                                         str(self.config)],
                         log_path=self.log_path, cwd=REPO_ROOT, env=self.env)
        wait_http(self.base + "/v2/", 30.0, self.proc)

    def stop(self) -> None:
        self.proc.stop(grace=30)

    def verify(self) -> tuple[int, str]:
        done = subprocess.run([self.python, "-m", "mirror", "verify", "--config",
                               str(self.config)], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=600, check=False)
        return done.returncode, (done.stdout + done.stderr).strip()[-2000:]

    def stored(self, digest: str) -> bool:
        algo, hexd = digest.split(":", 1)
        return (self.cache / "blobs" / algo / hexd[:2] / hexd).is_file()

    def logged_500s(self) -> list[str]:
        bad = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ["the mirror's log is unreadable"]
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("status") == 500 or (
                    entry.get("level") in ("error", "critical") and "exception" in entry):
                bad.append(line[:300])
        return bad


class Load:
    """CLIENTS threads picking operations at random until the deadline or MAX_OPS."""

    def __init__(self, base: str, hot: list[Image], cold: list[Image], deadline: float
                 ) -> None:
        self.base = base
        self.hot, self.cold = hot, cold
        self.deadline = deadline
        self.tally = Tally()
        self.stop = threading.Event()
        self.names, self.weights = zip(*OPS, strict=True)
        self._data: dict[str, bytes] = {}

    def run(self) -> Tally:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, self.deadline - time.monotonic()) + OP_TIMEOUT + 30)
        self.stop.set()
        return self.tally

    def _client(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.tally.lock:
                if sum(self.tally.ops.values()) >= MAX_OPS:
                    return
            op = rnd.choices(self.names, self.weights)[0]
            try:
                getattr(self, f"_op_{op}")(rnd, op)
            except Exception as exc:  # a bug here must count, not kill the client
                self.tally.fail(op, f"{type(exc).__name__}: {exc}")

    def _bytes(self, blob: Blob) -> bytes:
        if blob.digest not in self._data:
            self._data[blob.digest] = blob.path.read_bytes()
        return self._data[blob.digest]

    def _get(self, path: str, op: str, headers: dict[str, str] | None = None,
             keep: bool = False) -> tuple[Any, bytes] | None:
        res, body = http_get(self.base + path, headers=headers, hash_body=not keep,
                             keep_body=keep, timeout=OP_TIMEOUT, deadline_s=OP_TIMEOUT)
        if res.error:
            self.tally.fail(op, f"{path}: {res.error}")
            return None
        return res, body

    def _manifest(self, op: str, image: Image, ref: str) -> None:
        path = f"/v2/{image.repo}/manifests/{ref}"
        got = self._get(path, op, {"Accept": MANIFEST_ACCEPT})
        if got is None:
            return
        res, _ = got
        if res.status != 200 or res.digest != image.digest:
            self.tally.fail(op, f"{path}: {res.status}, body {res.digest} != {image.digest}")
        elif res.headers.get("docker-content-digest") != image.digest:
            self.tally.fail(op, f"{path}: Docker-Content-Digest "
                                f"{res.headers.get('docker-content-digest')}")
        else:
            self.tally.ok(op, res.nbytes)

    def _op_manifest_tag_hot(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.hot)
        self._manifest(op, image, image.tag)

    def _op_manifest_tag_cold(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.cold)
        self._manifest(op, image, image.tag)

    def _op_manifest_digest(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.hot + self.cold)
        self._manifest(op, image, image.digest)

    def _blob(self, op: str, image: Image, blob: Blob) -> None:
        path = f"/v2/{image.repo}/blobs/{blob.digest}"
        got = self._get(path, op)
        if got is None:
            return
        res, _ = got
        if res.status != 200 or res.digest != blob.digest or res.nbytes != blob.size:
            self.tally.fail(op, f"{path}: {res.status}, {res.nbytes} bytes, {res.digest}")
        else:
            self.tally.ok(op, res.nbytes)

    def _op_blob_hot(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.hot)
        self._blob(op, image, rnd.choice(image.blobs))

    def _op_blob_cold(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.cold)
        self._blob(op, image, rnd.choice(image.blobs))

    def _op_range(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.hot + self.cold)
        blob = rnd.choice(image.layers)
        first = rnd.randrange(blob.size)
        last = min(blob.size - 1, first + rnd.randrange(1, 512 * 1024))
        path = f"/v2/{image.repo}/blobs/{blob.digest}"
        got = self._get(path, op, {"Range": f"bytes={first}-{last}"}, keep=True)
        if got is None:
            return
        res, body = got
        want = self._bytes(blob)[first:last + 1]
        if res.status != 206 or body != want:
            self.tally.fail(op, f"{path} bytes={first}-{last}: {res.status}, {len(body)} "
                                f"bytes, {'right' if body == want else 'wrong'} bytes")
        else:
            self.tally.ok(op, len(body))

    def _op_tags(self, rnd: random.Random, op: str) -> None:
        image = rnd.choice(self.hot + self.cold)
        path = f"/v2/{image.repo}/tags/list"
        got = self._get(path, op, keep=True)
        if got is None:
            return
        res, body = got
        try:
            tags = json.loads(body).get("tags") or []
        except ValueError:
            tags = []
        if res.status != 200 or image.tag not in tags:
            self.tally.fail(op, f"{path}: {res.status} {body[:200]!r}")
        else:
            self.tally.ok(op, len(body))

    def _op_missing(self, rnd: random.Random, op: str) -> None:
        """A digest nobody has: a clean 404 with a registry error, every time."""
        digest = f"sha256:{rnd.getrandbits(256):064x}"
        path = f"/v2/{rnd.choice(self.hot).repo}/blobs/{digest}"
        res, body = http_get(self.base + path, keep_body=True, timeout=OP_TIMEOUT,
                             deadline_s=OP_TIMEOUT)
        try:
            code = json.loads(body)["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            code = None
        if res.status != 404 or code != "BLOB_UNKNOWN":
            self.tally.fail(op, f"{path}: {res.status} {res.error} {body[:200]!r}")
        else:
            self.tally.ok(op, len(body))


def bench_soak(ctx: Ctx) -> None:
    seconds = soak_seconds(ctx)
    warmup = min(60.0, seconds * 0.2)
    data = ctx.root / "soak-data"
    hot = [make_image(data, f"soak/hot{i}", "v1", HOT_LAYERS) for i in range(HOT_IMAGES)]
    cold = [make_image(data, f"soak/cold{i}", "v1", COLD_LAYERS) for i in range(COLD_IMAGES)]
    for image in hot + cold:
        push_image(ctx.upstream.base, image)
    total = sum(i.size for i in hot + cold)
    log(f"soak: {len(hot)} hot + {len(cold)} cold images, {total / MiB:.0f} MiB, cache "
        f"max_size {MAX_SIZE}; {seconds:.0f}s of load ({warmup:.0f}s warm-up), "
        f"{CLIENTS} clients, {WORKERS} workers")
    mark = ctx.upstream.log_offset()
    m = SoakMirror(ctx.root / "soak", ctx.upstream.base)
    try:
        t0 = time.monotonic()
        load = Load(m.base, hot, cold, t0 + seconds)
        runner = threading.Thread(target=load.run, daemon=True)
        runner.start()
        series = [sample(m.proc.pid, t0)]
        start: Sample | None = None
        while runner.is_alive() and time.monotonic() < t0 + seconds + OP_TIMEOUT + 60:
            runner.join(timeout=SAMPLE_EVERY)
            s = sample(m.proc.pid, t0)
            series.append(s)
            if start is None and s.t >= warmup:
                start = s
            with load.tally.lock:
                n, errs = sum(load.tally.ops.values()), sum(load.tally.errors.values())
            log(f"soak t={s.t:.0f}s: {n} ops, {errs} errors, {s.procs} procs, "
                f"RSS {s.rss / MiB:.0f} MiB, PSS {s.pss / MiB:.0f} MiB, {s.fds} fds")
        load.stop.set()
        runner.join(timeout=OP_TIMEOUT + 10)
        elapsed = time.monotonic() - t0
        end = sample(m.proc.pid, t0)
        series.append(end)
        start = start or series[0]
        tally = load.tally
        missing_hot = [i.digest for i in hot if not m.stored(i.digest)]
        upstream_bytes, upstream_gets = ctx.upstream.blob_get_bytes(mark)
        blobs_total = sum(len(i.blobs) for i in hot + cold)
    finally:
        m.stop()
    verify_status, verify_out = m.verify()
    server_errors = m.logged_500s()
    ops = sum(tally.ops.values())
    errors = sum(tally.errors.values()) + len(server_errors)
    refetches = upstream_gets - blobs_total
    log(f"soak done: {ops} ops in {elapsed:.0f}s ({ops / elapsed:.0f}/s), "
        f"{tally.bytes / 1e9:.1f} GB, {errors} errors; upstream blob GETs {upstream_gets} "
        f"for {blobs_total} blobs; verify: {verify_out.splitlines()[-1:]}")
    for text in tally.samples[:5] + server_errors[:5]:
        log(f"  soak error: {text}")
    if errors:
        ctx.problem(f"soak: {errors} errors ({dict(tally.errors)}, {len(server_errors)} "
                    f"logged 500s/unhandled): {(tally.samples + server_errors)[:3]}")
    if refetches <= 0:
        ctx.problem(f"soak: no blob was fetched twice ({upstream_gets} upstream GETs for "
                    f"{blobs_total} blobs): eviction did not run")
    if missing_hot:
        ctx.problem(f"soak: hot manifests not on disk at the end: {missing_hot}")
    if verify_status != 0:
        ctx.problem(f"soak: mirror verify failed ({verify_status}): {verify_out[-300:]}")
    extra = {"seconds": round(elapsed, 1), "ops": dict(tally.ops), "errors": dict(tally.errors),
             "error_samples": tally.samples, "server_errors": server_errors[:20],
             "bytes": tally.bytes, "series": [s.as_dict() for s in series],
             "upstream_blob_gets": upstream_gets, "upstream_blob_bytes": upstream_bytes,
             "blobs": blobs_total, "verify": verify_out, "missing_hot": missing_hot}
    note = f"{seconds:.0f}s, {CLIENTS} clients, max_size {MAX_SIZE}"
    rows = [
        Row("soak", "errors (HTTP, bodies, logged 500s)", "count", float(errors), "-", None,
            WORKERS, ("mirror<=", 0.0), note, extra),
        Row("soak", "requests per second", "req/s", ops / elapsed, "-", None, WORKERS,
            None, f"{ops} requests"),
        Row("soak", "RSS end vs after warm-up", "MiB", end.rss / MiB, "after warm-up",
            start.rss / MiB, WORKERS,
            ("mirror<=", (start.rss * RSS_GROWTH_RATIO + RSS_GROWTH_SLACK) / MiB),
            f"PSS {start.pss / MiB:.0f} -> {end.pss / MiB:.0f} MiB"),
        Row("soak", "open fds end vs after warm-up", "fds", float(end.fds), "after warm-up",
            float(start.fds), WORKERS, ("mirror<=", float(start.fds + FD_GROWTH_SLACK)),
            f"{end.procs} processes"),
        Row("soak", "upstream re-fetches (eviction at work)", "GETs", float(refetches),
            "blobs", float(blobs_total), WORKERS, None,
            "must be > 0" if refetches > 0 else "eviction did not run"),
        Row("soak", "hot manifests missing from disk at end", "count", float(len(missing_hot)),
            "hot", float(len(hot)), WORKERS, ("mirror<=", 0.0)),
        Row("soak", "mirror verify: bad files", "count",
            0.0 if verify_status == 0 else 1.0, "-", None, WORKERS, ("mirror<=", 0.0),
            verify_out.splitlines()[-1] if verify_out else ""),
    ]
    ctx.rows.extend(rows)
