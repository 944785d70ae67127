"""A damaged index is replaced once, even when every worker opens it at the same moment."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from mirror.cache.index import Index
from mirror.oci.reference import parse_digest

WORKERS = 8
WRITE_TRIES = 50
DIGEST = parse_digest("sha256:" + "ab" * 32)


def _damage(directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            with open(p, "r+b") as f:
                f.write(os.urandom(min(4096, max(p.stat().st_size, 100))))


def _open_and_write(directory: str, start: object, results: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    try:
        index = Index(Path(directory))
        tag = f"t{os.getpid()}"
        # The index may lose a write to a busy SQLite (_GuardedCache: the tag is asked again),
        # so a worker writes until it reads its tag back; one that wrote to a replaced index
        # reads it back too, and the final check below finds it missing.
        for _ in range(WRITE_TRIES):
            index.set_tag("up", "repo", tag, DIGEST, "application/x")
            if index.get_tag("up", "repo", tag) is not None:
                results.put("ok" if index._temporary is None  # type: ignore[attr-defined]
                            else f"{tag}: on a temporary copy, not the shared index")
                return
        results.put(f"{tag}: never read its write back")  # type: ignore[attr-defined]
    except Exception as exc:  # the test reports what a worker hit
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_workers_opening_a_damaged_index_together_all_start(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    Index(directory).set_tag("up", "repo", "old", DIGEST, "application/x")
    _damage(directory)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_and_write, args=(str(directory), start, results))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * WORKERS, outcomes
    tags = {t for _, _, t, _ in Index(directory).tags()}
    assert len(tags) == WORKERS and "old" not in tags, tags  # every worker writes to one index
