"""The fault matrix, disk side: a full disk (a small tmpfs filled to the last byte), a cache
directory that turns read-only, a damaged index (the diskcache SQLite files overwritten);
each with one or two workers, for a cold blob and manifest, a download in flight and cached
content. A disk fault costs caching, never a client: every client gets the exact bytes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.disk import fill, mount_tmpfs, unmount
from tests.support.faultmatrix import Act, Outcome, Upstreams, check_outcome, fetch
from tests.support.mirror import MirrorProcess
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import wait_until

from .matrix import (
    SIZE,
    STATES,
    WORKERS,
    Content,
    check_rows,
    inflight,
    listening_sockets,
    make_content,
    start_mirror,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

DISK_FAULTS = ["disk_full", "read_only", "index_damaged"]
TMPFS_SIZE = "24m"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """mount() -> a fresh tmpfs of TMPFS_SIZE under tmp_path; unmounted at teardown (after
    the mirrors, which mirror_factory stops first when this fixture is requested first)."""
    mounts: list[Path] = []

    def mount() -> Path:
        mounts.append(mount_tmpfs(tmp_path / f"disk{len(mounts)}", TMPFS_SIZE))
        return mounts[-1]

    yield mount
    for d in reversed(mounts):
        unmount(d)


def damage_index(cache: Path) -> list[str]:
    """Overwrite the first 4 KiB (the SQLite header page) of every file in index/."""
    damaged = []
    for p in sorted((cache / "index").rglob("*")):
        if p.is_file():
            with open(p, "r+b") as f:
                f.write(os.urandom(min(4096, max(p.stat().st_size, 100))))
            damaged.append(p.name)
    assert damaged, f"no index files under {cache / 'index'}"
    return damaged


def client_fetches(m: MirrorProcess, c: Content) -> list[Outcome]:
    return [fetch(m.host, p, headers=c.headers) for p in c.paths]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("fault", DISK_FAULTS)
def test_disk_fault(fault: str, workers: int, state: str, tmpfs: Callable[[], Path],
                    mirror_factory: MirrorFactory, upstreams: Upstreams) -> None:
    priv = upstreams.private
    blob, manifest = make_content(priv, "blob"), make_content(priv, "manifest")
    disk = tmpfs() if fault in ("disk_full", "read_only") else None
    kwargs = {"cache_dir": disk / "cache"} if disk is not None else {}
    m = start_mirror(mirror_factory, upstreams, workers, **kwargs)
    if state == "cached":
        for c in (blob, manifest):
            for out in client_fetches(m, c):
                ok = check_outcome(out, c.good, "priming")
                assert ok, out
            m.wait_cached(c.stored)

    def inject() -> None:
        if fault == "disk_full":
            assert disk is not None
            fill(disk)
        elif fault == "read_only":
            # a mount with files open for writing cannot turn read-only: restart on it
            m.stop()
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=30)
            m.start()
        elif fault == "index_damaged" and state != "inflight":
            m.stop()
            damage_index(m.cache_dir)
            m.start()
        else:
            damage_index(m.cache_dir)

    intruders: list[Outcome] = []
    if state == "inflight":
        if fault == "read_only":  # read-only from the start; the clients share a download
            inject()
        reached = priv.set_actions(blob.key, [Act("ok", SIZE // 2, gate=True)])
        # the fault strikes while the first client's download waits at the gate
        blob_outs, intruders = inflight(
            m, upstreams, blob, reached,
            before_release=None if fault == "read_only" else inject)
    else:
        inject()
        blob_outs = client_fetches(m, blob)
    manifest_outs = client_fetches(m, manifest)
    for c, outs in ((blob, blob_outs), (manifest, manifest_outs)):
        for out in outs:
            ok = check_outcome(out, c.good, fault)
            assert ok, f"{fault} cost a client its content (it must cost only caching): {out}"
    if fault == "read_only":
        ready = fetch(m.host, "/readyz")
        assert ready.status not in (200, 500), ready
        assert b"read-only" in ready.body.lower() or b"read only" in ready.body.lower(), (
            f"/readyz does not say the cache is read-only: {ready.body[:500]!r}")
    # the fault repaired: the cache works again, and the row's promises hold
    if fault == "disk_full":
        assert disk is not None
        (disk / "filler").unlink()
    elif fault == "read_only":
        m.stop()
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, timeout=30)
        m.start()
    check_rows(m, upstreams, [(blob, blob_outs, intruders), (manifest, manifest_outs, [])])


SLOW_SIZE = 8 << 20
SLOW_RATE = 2 << 20  # bytes/s: ~4 s for the blob


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
def test_slow_client_on_a_full_disk(workers: int, tmpfs: Callable[[], Path],
                                    mirror_factory: MirrorFactory,
                                    upstreams: Upstreams) -> None:
    """On a full disk a download is relayed from memory, not from a file: a slow reader
    of the same blob must not hold the others back (nor make them fail)."""
    priv = upstreams.private
    blob = make_content(priv, "blob", size=SLOW_SIZE)
    disk = tmpfs()
    m = start_mirror(mirror_factory, upstreams, workers, cache_dir=disk / "cache")
    fill(disk)
    reached = priv.set_actions(blob.key, [Act("ok", SLOW_SIZE // 8, gate=True)])
    path = blob.paths[0]
    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(fetch, m.host, path, rate=SLOW_RATE, rcvbuf=32 * 1024, timeout=60)
        assert reached.wait(15), "the upstream never reached its gate"
        sent = [threading.Event() for _ in range(2)]
        fast = [pool.submit(fetch, m.host, path, sent=s) for s in sent]
        assert all(s.wait(15) for s in sent)
        upstreams.release(priv, blob.key)
        fast_outs, slow_out = [f.result(60) for f in fast], slow.result(90)
    for out in [*fast_outs, slow_out]:
        ok = check_outcome(out, blob.good, "full disk")
        assert ok, f"a full disk cost a client its content: {out}"
    for out in fast_outs:
        assert out.ended < slow_out.ended, (
            f"a fast client finished only after the slow one ({out.seconds:.1f}s vs "
            f"{slow_out.seconds:.1f}s): the slowest reader paces everyone on a full disk")
    (disk / "filler").unlink()
    check_rows(m, upstreams, [(blob, [*fast_outs, slow_out], [])])


@pytest.mark.parametrize("state", ["cold", "cached"])
def test_worker_restart_on_a_full_disk(state: str, tmpfs: Callable[[], Path],
                                       mirror_factory: MirrorFactory,
                                       upstreams: Upstreams) -> None:
    """A worker that dies while the disk is full is replaced, and its replacement starts
    on the full disk: the mirror keeps serving (two workers), the index survives."""
    priv = upstreams.private
    blob, manifest = make_content(priv, "blob"), make_content(priv, "manifest")
    disk = tmpfs()
    m = start_mirror(mirror_factory, upstreams, 2, cache_dir=disk / "cache")
    if state == "cached":
        for c in (blob, manifest):
            for out in client_fetches(m, c):
                ok = check_outcome(out, c.good, "priming")
                assert ok, out
            m.wait_cached(c.stored)
    fill(disk)
    assert m.proc is not None
    supervisor = m.proc.pid

    def workers() -> list[int]:
        path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
        with contextlib.suppress(OSError):
            return [int(p) for p in path.read_text().split()]
        return []

    assert len(workers()) == 2, workers()
    killed = workers()[0]
    os.kill(killed, signal.SIGKILL)
    # the supervisor replaces it (bounded): a new worker listening, the mirror alive
    wait_until(lambda: not m.running or (killed not in workers() and len(workers()) == 2
                                         and listening_sockets(m.port) >= 2),
               10, what="a replacement worker listening")
    assert m.running, f"the mirror exited after a worker restart on a full disk:\n" \
                      f"{m.stderr_tail(1500)}"
    for c in (blob, manifest):
        for _ in range(4):  # both workers
            for out in client_fetches(m, c):
                ok = check_outcome(out, c.good, "after a worker restart on a full disk")
                assert ok, out
    (disk / "filler").unlink()
    check_rows(m, upstreams, [(blob, [], []), (manifest, [], [])])
