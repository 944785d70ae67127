"""The fault matrix, upstream side: every fault, for a blob or a manifest, with one or two
workers, cold, in flight or cached. Each row asserts the mirror's promises (see check_row).

Rows are real mirror processes (tests/support/mirror.py) in front of two upstreams served
from a thread (conftest.py): `pub.test`, the public default (first) upstream, and
`priv.test`, reached with Basic credentials, holding the row's content under `team/app`
only (`intruder/repo` holds nothing).
"""

from __future__ import annotations

import os

import pytest

from tests.support.faultmatrix import (
    OCI_MANIFEST,
    Act,
    RssPeak,
    Upstreams,
    assert_no_500_logged,
    assert_store_clean,
    check_outcome,
    fetch,
    huge_tags_sha256,
    image_manifest,
    tmp_leftovers,
)
from tests.support.mirrorfixtures import MirrorFactory

from .matrix import (
    ACCEPT,
    INFLIGHT_CLIENTS,
    STATES,
    WORKERS,
    Outcome,
    check_row,
    inflight,
    make_content,
    run_concurrently,
    start_mirror,
)

pytestmark = pytest.mark.timeout(120)

FAULTS = ["reset", "stall", "short", "long", "wrong_bytes", "ignored_range", "5xx",
          "redirect_loop"]
TARGETS = ["blob", "manifest"]


def fault_actions(fault: str, size: int, gated: bool) -> list[Act]:
    """The upstream's answers to the next requests for the row's content. In flight, the
    first answer pauses mid-body (a gate) while the other clients join; a fault that has no
    body (5xx, redirect loop) then hits the resumption after a reset."""
    half = size // 2
    acts = {
        "reset": [Act("reset", half)],
        "stall": [Act("stall", half)],
        "short": [Act("short", half)],
        "long": [Act("long", half)],
        "wrong_bytes": [Act("corrupt", half)],
        "ignored_range": [Act("reset", half), Act("ignore_range", half),
                          Act("ignore_range", half)],
        "5xx": [Act("status", 503), Act("status", 500)],
        "redirect_loop": [Act("redirect_loop"), Act("redirect_loop")],
    }[fault]
    if gated:
        if acts[0].kind in ("status", "redirect_loop"):
            acts.insert(0, Act("reset", half))
        acts[0].gate = True
    return acts



@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fault", FAULTS)
def test_upstream_fault(fault: str, target: str, workers: int, state: str,
                        mirror_factory: MirrorFactory, upstreams: Upstreams) -> None:
    priv = upstreams.private
    c = make_content(priv, target)
    m = start_mirror(mirror_factory, upstreams, workers)
    if state == "cached":
        for path in c.paths:
            out = fetch(m.host, path, headers=c.headers)
            ok = check_outcome(out, c.good, "priming")
            assert ok, out
        m.wait_cached(c.stored)
    size = len(c.good)
    reached = priv.set_actions(c.key, fault_actions(fault, size, gated=state == "inflight"))
    hops = priv.loop_hops
    intruders: list[Outcome] = []
    if state == "inflight":
        outs, intruders = inflight(m, upstreams, c, reached)
    else:
        outs = [fetch(m.host, p, headers=c.headers) for p in c.paths]
        if target == "blob":
            rng = [("Range", f"bytes={size // 3}-")]
            outs.append(fetch(m.host, c.paths[0], headers=rng))
    # redirects are followed a bounded number of times (a few per request)
    assert priv.loop_hops - hops <= 10 * (len(outs) + len(intruders) + 4), (
        f"{priv.loop_hops - hops} redirect-loop hops for {len(outs)} requests")
    check_row(m, upstreams, c, outs, intruders)


# --- huge bodies ---------------------------------------------------------------------------

HUGE_MANIFEST_PAD = 5 * 1024 * 1024  # > the 4 MiB bound


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
def test_huge_manifest(framing: str, workers: int, state: str,
                       mirror_factory: MirrorFactory, upstreams: Upstreams) -> None:
    """A manifest above 4 MiB is refused with a clear error, never cut, never cached; with a
    smaller manifest cached under the tag before (state cached), the tag may answer that one
    (stale), but never the big one cut short."""
    priv = upstreams.private
    priv.chunked_manifests = framing == "chunked"
    try:
        config, layer = os.urandom(700), os.urandom(4096)
        cd, ld = priv.add_blob(config), priv.add_blob(layer)
        descs = ((cd, len(config)), [(ld, len(layer))])
        small = image_manifest(*descs)
        big = image_manifest(*descs, pad=HUGE_MANIFEST_PAD)
        tag = "h" + os.urandom(6).hex()
        m = start_mirror(mirror_factory, upstreams, workers)
        tag_path = f"/v2/priv.test/team/app/manifests/{tag}"
        if state == "cached":
            priv.add_manifest("team/app", tag, small, OCI_MANIFEST)
            out = fetch(m.host, tag_path, headers=ACCEPT)
            ok = check_outcome(out, small, "priming")
            assert ok, out
        bd = priv.add_manifest("team/app", tag, big, OCI_MANIFEST)
        paths = [tag_path, f"/v2/priv.test/team/app/manifests/{bd}"]
        n = INFLIGHT_CLIENTS if state == "inflight" else 1
        outs = run_concurrently([lambda p=p: fetch(m.host, p, headers=ACCEPT)
                                 for p in paths for _ in range(n)])
        for out in outs:
            got_bytes = check_outcome(out, {small, big} if state == "cached" else big)
            assert not (got_bytes and out.body == big), "a manifest above 4 MiB was served"
            if not got_bytes:
                assert out.status is not None and 400 <= out.status < 600, out
        assert bd not in m.cached_digests()
        assert_store_clean(m.cache_dir)
        left = tmp_leftovers(m.cache_dir)
        m.stop()
        assert_no_500_logged(m)
        assert not left, f"files left in tmp/: {left}"
    finally:
        priv.chunked_manifests = False


TAGS_BYTES = 256 * 1024 * 1024
TAGS_RSS_GROWTH = 128 * 1024 * 1024


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("state", ["cold", "inflight"])
@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
def test_huge_tags_list(framing: str, workers: int, state: str,
                        mirror_factory: MirrorFactory, upstreams: Upstreams) -> None:
    """A 256 MiB tags list (generated by the upstream, never held in this process): the
    mirror streams it exactly or refuses it with a clear error, and its memory does not grow
    by the body's size. Tags lists are never cached, so there is no cached state; in flight
    means two clients at once."""
    priv = upstreams.private
    repo = "huge/" + os.urandom(4).hex()
    priv.huge_tags[repo] = (TAGS_BYTES, framing == "chunked")
    m = start_mirror(mirror_factory, upstreams, workers)
    assert m.proc is not None
    want = huge_tags_sha256(repo, TAGS_BYTES)
    n = 2 if state == "inflight" else 1
    with RssPeak(m.proc.pid) as rss:
        outs = run_concurrently([lambda: fetch(m.host, f"/v2/priv.test/{repo}/tags/list",
                                               digest_only=True, timeout=90)
                                 for _ in range(n)], timeout=100)
    for out in outs:
        assert out.status != 500, out
        if out.status == 200 and out.complete:
            assert out.headers["x-body-sha256"] == want, f"a complete tags list, wrong: {out}"
        elif out.status is not None and out.complete:
            assert 400 <= out.status < 600, out
    assert rss.growth < TAGS_RSS_GROWTH, (
        f"the mirror's RSS grew by {rss.growth >> 20} MiB for a {TAGS_BYTES >> 20} MiB tags "
        f"list (peak {rss.peak >> 20} MiB)")
    m.stop()
    assert_no_500_logged(m)
