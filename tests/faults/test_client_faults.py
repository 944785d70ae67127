"""The fault matrix, client side: a slow reader, idle connections holding the server's file
descriptors, a client that half-closes after its request, a client leaving mid-body; each
with one or two workers, on a cold blob, a download in flight and a cached blob. None of
them may harm another client, leave anything wrong in the cache or make a 500.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.faultmatrix import Act, Outcome, Upstreams, check_outcome, fetch
from tests.support.mirror import MirrorProcess
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import wait_until

from .matrix import STATES, WORKERS, Content, check_row, make_content, start_mirror

pytestmark = pytest.mark.timeout(120)

SIZE = 8 << 20  # big enough that a blocked reader holds the server mid-send
SLOW_RATE = 4 << 20  # bytes/s: ~2 s for the blob
SMALL_RCVBUF = 32 * 1024
LEAVE_AFTER = 256 * 1024
NOFILE = 1024  # the mirror's file limit in the idle rows (systemd's default soft limit)
IDLE_CONNECTIONS = 1100  # from 127.0.0.2, more than a worker's NOFILE
ATTACKER = "127.0.0.2"
HEADER_TIMEOUT = "2s"  # [server] header_timeout in the idle rows
IDLE_CLOSED_WITHIN = 8.0  # seconds: every idle connection closed by the mirror by then
BEHAVIOURS = ["slow", "idle", "half_closed", "leaving"]


def prime(m: MirrorProcess, c: Content) -> None:
    out = fetch(m.host, c.paths[0])
    ok = check_outcome(out, c.good, "priming")
    assert ok, out
    m.wait_cached(c.stored)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_client_fault(behaviour: str, workers: int, state: str,
                      mirror_factory: MirrorFactory, upstreams: Upstreams) -> None:
    priv = upstreams.private
    c = make_content(priv, "blob", size=SIZE)
    idle_row = behaviour == "idle"
    m = start_mirror(mirror_factory, upstreams, workers, nofile=NOFILE if idle_row else None,
                     server_extra={"header_timeout": HEADER_TIMEOUT} if idle_row else None)
    if state == "cached":
        prime(m, c)
    gated = state == "inflight"
    reached = priv.set_actions(c.key, [Act("ok", SIZE // 2, gate=True)] if gated else [])
    path = c.paths[0]
    release = (lambda: upstreams.release(priv, c.key)) if gated else (lambda: None)
    idle: list[socket.socket] = []
    try:
        with ThreadPoolExecutor(4) as pool:
            if behaviour == "slow":
                slow_headers = threading.Event()
                slow = pool.submit(fetch, m.host, path, rate=SLOW_RATE, rcvbuf=SMALL_RCVBUF,
                                   got_headers=slow_headers, timeout=60)
                if gated:
                    assert reached.wait(15), "the upstream never reached its gate"
                else:
                    assert slow_headers.wait(15), "the slow client got no headers"
                sent = threading.Event()
                fast = pool.submit(fetch, m.host, path, sent=sent)
                assert sent.wait(15)
                release()
                fast_out, slow_out = fast.result(60), slow.result(90)
                ok = check_outcome(fast_out, c.good, "fast client")
                assert ok, fast_out
                ok = check_outcome(slow_out, c.good, "slow client")
                assert ok, slow_out
                assert fast_out.ended < slow_out.ended, (
                    "the fast client finished only after the slow one: "
                    f"fast {fast_out.seconds:.1f}s, slow {slow_out.seconds:.1f}s")
                outs: list[Outcome] = [fast_out, slow_out]
            elif behaviour == "idle":
                first = None
                if gated:
                    first = pool.submit(fetch, m.host, path, timeout=60)
                    assert reached.wait(15), "the upstream never reached its gate"
                idle = open_idle_connections(m, IDLE_CONNECTIONS)
                sent = threading.Event()
                legit = pool.submit(fetch, m.host, path, sent=sent, timeout=20)
                assert sent.wait(15)
                release()
                outs = [legit.result(60)] + ([first.result(60)] if first else [])
                for out in outs:
                    ok = check_outcome(out, c.good, "a client beside idle connections")
                    assert ok, (
                        f"{len(idle)} idle connections from {ATTACKER} locked out a client "
                        f"from 127.0.0.1 (mirror NOFILE {NOFILE}): {out}")
                assert_closed_by_server(idle, IDLE_CLOSED_WITHIN)
                for s in idle:
                    s.close()
                idle = []
            elif behaviour == "half_closed":
                sents = [threading.Event() for _ in range(2)]
                futs = [pool.submit(fetch, m.host, path, half_close=True, sent=s)
                        for s in sents]
                if gated:
                    assert reached.wait(15), "the upstream never reached its gate"
                wait_until(lambda: all(s.is_set() for s in sents), 15, what="requests sent")
                release()
                outs = [f.result(60) for f in futs]
                for out in outs:
                    ok = check_outcome(out, c.good, "half-closed client")
                    assert ok, (
                        f"a client that half-closed after its request got: {out}")
            else:  # leaving
                leaver = pool.submit(fetch, m.host, path, leave_after=LEAVE_AFTER,
                                     rcvbuf=SMALL_RCVBUF)
                if gated:
                    assert reached.wait(15), "the upstream never reached its gate"
                left = leaver.result(60)
                assert left.status != 500, left
                stayer = pool.submit(fetch, m.host, path)
                release()
                outs = [stayer.result(60)]
                assert check_outcome(outs[0], c.good, "the client that stayed"), outs[0]
    finally:
        for s in idle:
            s.close()
    check_row(m, upstreams, c, outs, [])


def open_idle_connections(m: MirrorProcess, n: int) -> list[socket.socket]:
    """`n` connections to the mirror from ATTACKER: half send nothing, half an unfinished
    request head (slowloris). Each connect is bounded (2 s); refused ones are dropped."""
    host, _, port = m.host.rpartition(":")
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.bind((ATTACKER, 0))
            s.connect((host, int(port)))
            if i % 2:
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def assert_closed_by_server(socks: list[socket.socket], within: float) -> None:
    """Every connection is closed by the mirror (EOF or reset) within `within` seconds: a
    connection that sends no complete request head must not hold a slot for ever."""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        left = len(socks)
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    left -= 1
    assert not left, (f"{left} of {len(socks)} idle connections still open after "
                      f"{within}s (header_timeout {HEADER_TIMEOUT})")
