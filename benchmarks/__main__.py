"""``python -m benchmarks``: run the benchmark groups, print one table, write
benchmarks/results.json. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .cluster import bench_cluster
from .cluster_ring import bench_ring
from .container import bench_container
from .harness import log, sigterm_as_exit, stop_all
from .object_store import bench_object_store
from .policy import bench_policy
from .report import render_table, write_results
from .scenarios import GROUPS as BENCH_GROUPS
from .scenarios import Ctx, Options
from .soak import bench_soak
from .webhooks import bench_webhooks

# the soak last: it runs longest
GROUPS = {**BENCH_GROUPS, "policy": bench_policy, "webhooks": bench_webhooks, "ring": bench_ring,
          "cluster": bench_cluster, "object_store": bench_object_store,
          "container": bench_container, "soak": bench_soak}

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("groups", nargs="*", metavar="GROUP",
                   help="groups to run, like --only (e.g. `python -m benchmarks soak`)")
    p.add_argument("--only", default="",
                   help=f"comma-separated groups to run (default all): {','.join(GROUPS)}")
    p.add_argument("--quick", action="store_true",
                   help="smaller blobs and images, shorter wrk runs (for iterating)")
    p.add_argument("--workers", default="1,2",
                   help="mirror [server] workers values to run (default 1,2)")
    p.add_argument("--rate", default="400mbit", help="tbf rate of the upstream link")
    p.add_argument("--wrk-seconds", type=int, default=10)
    p.add_argument("--latency-ms", type=float, default=100.0,
                   help="per-request upstream latency of the second prefetch run (0: skip)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--soak-seconds", type=float, default=None,
                   help="length of the soak's load (default 600, 120 with --quick; also "
                        "MIRROR_SOAK_SECONDS)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [g.strip() for g in args.only.split(",") if g.strip()] + list(args.groups)
    groups = selected or list(GROUPS)
    if args.soak_seconds is not None:
        os.environ["MIRROR_SOAK_SECONDS"] = str(args.soak_seconds)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown group(s) {unknown}; choose from {list(GROUPS)}", file=sys.stderr)
        return 2
    needs_root = {"fanin", "prefetch", "ttfb", "cluster"}
    if os.geteuid() != 0 and needs_root & set(groups):
        if selected:
            print("fanin/prefetch/ttfb need root (network namespace + tc)", file=sys.stderr)
            return 2
        log("not root: skipping fanin, prefetch and ttfb (network namespace + tc)")
        groups = [g for g in groups if g not in needs_root]
    opts = Options(
        quick=args.quick,
        workers=[int(w) for w in args.workers.split(",") if w.strip()],
        rate=args.rate,
        wrk_seconds=args.wrk_seconds,
        latency_ms=args.latency_ms,
    )
    root = Path(tempfile.mkdtemp(prefix="regbench-", dir="/tmp"))
    ctx = Ctx(opts, root)
    meta: dict[str, object] = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": opts.quick,
        "workers": opts.workers,
        "rate": opts.rate,
        "latency_ms": opts.latency_ms,
        "groups": groups,
        "loadavg_at_start": os.getloadavg(),
    }
    failed: dict[str, str] = {}
    t0 = time.monotonic()
    interrupted = False
    try:
        with sigterm_as_exit():
            for g in groups:
                log(f"=== {g} ===")
                tg = time.monotonic()
                try:
                    GROUPS[g](ctx)
                except Exception as exc:
                    failed[g] = f"{type(exc).__name__}: {exc}"
                    log(f"group {g} failed:\n{traceback.format_exc()}")
                meta["seconds"] = round(time.monotonic() - t0, 1)
                meta.setdefault("group_seconds", {})[g] = round(time.monotonic() - tg, 1)  # type: ignore[index]
                meta["failed_groups"] = failed
                meta["problems"] = ctx.problems
                meta["loadavg_at_end"] = os.getloadavg()
                write_results(args.out, ctx.rows, meta)
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        ctx.close()
        stop_all()
        if args.keep_temp:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(render_table(ctx.rows))
    if ctx.problems:
        print("\nproblems observed:")
        for text in ctx.problems:
            print(f"  - {text}")
    if failed:
        print(f"\nfailed groups: {failed}")
    print(f"\n{len(ctx.rows)} rows in {time.monotonic() - t0:.0f}s; results in {args.out}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
