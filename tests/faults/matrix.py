"""What the fault-matrix rows share: the mirror they start, the content they ask for, the
in-flight choreography and the promises every row checks (check_row)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.support.faultmatrix import (
    OCI_MANIFEST,
    PASSWORD,
    USER,
    MatrixUpstream,
    Outcome,
    Upstreams,
    assert_no_500_logged,
    assert_not_leaked,
    assert_store_clean,
    check_outcome,
    fetch,
    image_manifest,
    tmp_leftovers,
)
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import wait_until

WORKERS = [1, 2]
STATES = ["cold", "inflight", "cached"]
SIZE = 3 << 19  # 1.5 MiB blobs
MANIFEST_PAD = 100_000  # ~100 KB manifests: several reads, as issue 10 item 6 needs
ACCEPT = [("Accept", ", ".join([
    OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json"]))]
INFLIGHT_CLIENTS = 4

def start_mirror(mirror_factory: MirrorFactory, ups: Upstreams, workers: int,
                 nofile: int | None = None, server_extra: dict[str, object] | None = None,
                 **kwargs: object) -> MirrorProcess:
    """A mirror in front of both upstreams (pub.test first: the default); `nofile`: its
    RLIMIT_NOFILE (soft and hard) from the start: its command runs under prlimit(1)."""
    if nofile is not None:
        command = MirrorProcess.command

        def limited(self: MirrorProcess) -> list[str]:
            return ["prlimit", f"--nofile={nofile}:{nofile}", *command(self)]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MirrorProcess, "command", limited)
            return start_mirror(mirror_factory, ups, workers, server_extra=server_extra,
                                **kwargs)
    m = mirror_factory(
        upstreams=[
            Upstream(name="pub.test", url=ups.public.url),
            Upstream(name="priv.test", url=ups.private.url, username=USER, password=PASSWORD,
                     extra={"read_timeout": "500ms", "resume_attempts": 3}),
        ],
        server_extra={"workers": workers, **(server_extra or {})}, tag_ttl="0s", **kwargs)
    wait_listening(m, workers)
    return m


def listening_sockets(port: int) -> int:
    """LISTEN sockets on 127.0.0.1:`port` (/proc/net/tcp): one per ready worker, since
    each binds its own with SO_REUSEPORT after its start-up (index, store) succeeded."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_listening(m: MirrorProcess, workers: int, timeout: float = 20.0) -> None:
    """MirrorProcess.start returns when one worker answers: wait for all of them, so that
    a row's requests can land on every worker and a fault hits none mid-start."""
    wait_until(lambda: listening_sockets(m.port) >= workers, timeout,
               what=f"{workers} workers listening on {m.host}")


@dataclass
class Content:
    """One row's content on the private upstream: what clients ask for and what is right."""

    key: str  # the digest the upstream's actions are keyed by
    good: bytes
    paths: list[str]  # what clients GET (first: the main path)
    intruder_paths: list[str]  # the same digest under names that do not hold it
    headers: list[tuple[str, str]]
    stored: list[str]  # digests that must be in blobs/ after recovery


def make_content(priv: MatrixUpstream, target: str, size: int = SIZE) -> Content:
    priv.private["intruder/repo"] = set()
    if target == "blob":
        data = os.urandom(size)
        d = priv.add_blob(data)
        return Content(d, data, [f"/v2/priv.test/team/app/blobs/{d}"],
                       [f"/v2/priv.test/intruder/repo/blobs/{d}", f"/v2/someone/else/blobs/{d}"],
                       [], [d])
    config, layer = os.urandom(700), os.urandom(4096)
    cd, ld = priv.add_blob(config), priv.add_blob(layer)
    manifest = image_manifest((cd, len(config)), [(ld, len(layer))], pad=MANIFEST_PAD)
    tag = "t" + os.urandom(6).hex()
    md = priv.add_manifest("team/app", tag, manifest, OCI_MANIFEST)
    return Content(md, manifest,
                   [f"/v2/priv.test/team/app/manifests/{tag}",
                    f"/v2/priv.test/team/app/manifests/{md}"],
                   [f"/v2/priv.test/intruder/repo/manifests/{md}",
                    f"/v2/someone/else/manifests/{md}"],
                   ACCEPT, [md])


def run_concurrently(fns: list[Callable[[], Outcome]], timeout: float = 60.0) -> list[Outcome]:
    with ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(f) for f in fns]
        return [f.result(timeout=timeout) for f in futures]


def inflight(m: MirrorProcess, ups: Upstreams, c: Content, reached: threading.Event,
             before_release: Callable[[], None] | None = None
             ) -> tuple[list[Outcome], list[Outcome]]:
    """INFLIGHT_CLIENTS clients and the intruders, all sent while the upstream's first answer
    is paused mid-body; then `before_release()` (a fault of the row's own), then the gate
    opens."""
    n = INFLIGHT_CLIENTS + len(c.intruder_paths)
    sent = [threading.Event() for _ in range(n)]
    targets = [c.paths[i % len(c.paths)] for i in range(INFLIGHT_CLIENTS)] + c.intruder_paths
    with ThreadPoolExecutor(n) as pool:
        first = pool.submit(fetch, m.host, targets[0], headers=c.headers, sent=sent[0])
        assert reached.wait(15), "the upstream's first answer never reached its gate"
        rest = [pool.submit(fetch, m.host, t, headers=c.headers, sent=s)
                for t, s in zip(targets[1:], sent[1:], strict=True)]
        wait_until(lambda: all(s.is_set() for s in sent), 15, what="requests sent")
        if before_release is not None:
            before_release()
        ups.release(ups.private, c.key)
        outs = [first.result(60)] + [f.result(60) for f in rest]
    return outs[:INFLIGHT_CLIENTS], outs[INFLIGHT_CLIENTS:]


def check_row(m: MirrorProcess, ups: Upstreams, c: Content, outs: list[Outcome],
              intruders: list[Outcome]) -> None:
    check_rows(m, ups, [(c, outs, intruders)])


def check_rows(m: MirrorProcess, ups: Upstreams,
               rows: list[tuple[Content, list[Outcome], list[Outcome]]]) -> None:
    """The promises, for each content of a row: (1) no wrong bytes to anyone, no 500;
    (2) no private content under another name; (3) once the fault is gone the content
    arrives whole and is cached; (4) nothing wrong in blobs/; (5) no 500 logged, nothing
    unhandled; (6) nothing left in tmp/. Stops the mirror (to read its whole log)."""
    priv = ups.private
    for c, outs, intruders in rows:
        for i, out in enumerate(outs):
            check_outcome(out, c.good, f"client {i}")
        for path, out in zip(c.intruder_paths, intruders, strict=False):
            assert_not_leaked(out, c.good, f"during the fault: {path}")
    for c, _, _ in rows:
        priv.clear_actions(c.key)
        for path in c.paths:
            out = fetch(m.host, path, headers=c.headers)
            ok = check_outcome(out, c.good, f"after the fault: {path}")
            assert ok, f"after the fault: {path}: {out}"
        m.wait_cached(c.stored)
        for path in c.intruder_paths:
            assert_not_leaked(fetch(m.host, path, headers=c.headers), c.good,
                              f"after the fault: {path}")
    assert_store_clean(m.cache_dir)
    left = tmp_leftovers(m.cache_dir)
    m.stop()
    assert_no_500_logged(m)
    # asserted last: the other promises matter more
    assert not left, f"files left in tmp/: {left}"
