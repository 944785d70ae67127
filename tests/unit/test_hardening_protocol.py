"""Issue 10, pure protocol pieces: range merging and its bounds (13), manifest references and
writes as the distribution spec's conformance tests expect them (18), the failed-login limiter
and cached password checks (5), the status page's offline state and hidden URL credentials
(17, 4), a client gone while its body is sent (20)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from types import SimpleNamespace

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.http import statuspage
from mirror.http.clientauth import Authenticator, FailureLimiter
from mirror.http.ranges import MAX_RANGES, ByteRange, multipart_layout, parse_ranges
from mirror.http.zerocopy import Sender
from mirror.oci.errors import RegistryError
from mirror.oci.reference import manifest_reference_for_read, parse_reference
from mirror.upstream.client import redact_url

# --- 13: range amplification ----------------------------------------------------------------


def test_overlapping_ranges_merge_into_one() -> None:
    assert parse_ranges("bytes=" + ",".join(["0-"] * 64), 1000) == [ByteRange(0, 999)]


def test_adjacent_and_overlapping_ranges_merge_in_order() -> None:
    header = "bytes=50-59,0-9,10-19,5-12,-10,95-96"
    assert parse_ranges(header, 100) == [ByteRange(0, 19), ByteRange(50, 59), ByteRange(90, 99)]


def test_disjoint_ranges_are_kept_as_asked() -> None:
    # podman's partial pulls match parts to the chunks they asked for, adjacent ones included
    assert parse_ranges("bytes=10-19,0-9,20-29", 100) == [
        ByteRange(10, 19), ByteRange(0, 9), ByteRange(20, 29)]


def test_too_many_ranges_after_merging_is_the_whole_body() -> None:
    disjoint = ",".join(f"{i * 10}-{i * 10}" for i in range(MAX_RANGES + 1))
    assert parse_ranges("bytes=" + disjoint, 100_000) is None
    within = ",".join(f"{i * 10}-{i * 10}" for i in range(MAX_RANGES))
    assert len(parse_ranges("bytes=" + within, 100_000) or []) == MAX_RANGES


def test_a_huge_header_is_not_parsed_spec_by_spec() -> None:
    assert parse_ranges("bytes=" + ",".join(["0-0"] * 100_000), 10) is None


PER_PART = 200  # a part's header and CRLF for a 40-character boundary, with room to spare
spec = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda a: f"{a}-", st.integers(0, 3000)),
    st.builds(lambda a: f"-{a}", st.integers(1, 3000)),
)


@settings(max_examples=300)
@given(st.lists(spec, min_size=1, max_size=300), st.integers(1, 2500))
def test_a_multipart_answer_never_exceeds_the_body_plus_overhead(specs: list[str],
                                                                  size: int) -> None:
    try:
        ranges = parse_ranges("bytes=" + ",".join(specs), size)
    except Exception:  # RangeNotSatisfiable
        return
    if ranges is None:
        return
    assert len(ranges) <= MAX_RANGES
    assert sum(r.length for r in ranges) <= size
    ordered = sorted(ranges, key=lambda r: r.start)
    assert all(a.end < b.start for a, b in itertools.pairwise(ordered))  # no byte twice
    layout = multipart_layout(ranges, size, "b" * 32)
    assert layout.length <= size + PER_PART * len(ranges) + 64


# --- 18: references as the spec's pull tests expect them -------------------------------------

@pytest.mark.parametrize(("reference", "status", "code"), [
    (".INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("-x", 404, "MANIFEST_UNKNOWN"),
    ("t" * 129, 404, "MANIFEST_UNKNOWN"),
    ("sha256:totallywrong", 400, "DIGEST_INVALID"),
])
def test_reading_a_malformed_reference(reference: str, status: int, code: str) -> None:
    with pytest.raises(RegistryError) as exc:
        manifest_reference_for_read(reference)
    assert (exc.value.status, exc.value.code) == (status, code)


@pytest.mark.parametrize(("reference", "code"), [
    (".INVALID_MANIFEST_NAME", "MANIFEST_INVALID"),
    ("sha256:totallywrong", "DIGEST_INVALID"),
])
def test_a_malformed_reference_is_a_spec_error_code(reference: str, code: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_reference(reference)
    # TAG_INVALID is not among the spec's error codes: conformance tests refuse it
    assert (exc.value.status, exc.value.code) == (400, code)


# --- 5: failed logins --------------------------------------------------------------------------

def test_failure_limiter_blocks_an_address_for_the_rest_of_its_window() -> None:
    now = [960.0]  # a window's start: windows are fixed in wall-clock time, for every worker
    limiter = FailureLimiter(limit=3, window=60.0, timer=lambda: now[0])
    assert limiter.attempt("10.0.0.1") is None
    limiter.succeeded("10.0.0.1")  # a good password is refunded
    for _ in range(3):  # attempts count before their verdict: concurrent ones too
        assert limiter.attempt("10.0.0.1") is None
    assert limiter.attempt("10.0.0.1") == 60
    assert limiter.attempt("10.0.0.2") is None  # per address
    now[0] += 45.5
    assert limiter.attempt("10.0.0.1") == 15
    now[0] += 15
    assert limiter.attempt("10.0.0.1") is None


def _authenticator() -> Authenticator:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4))
    return Authenticator({"alice": hashed}, b"k" * 32, 300.0)


async def test_password_checks_are_cached_and_coalesced(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    auth = _authenticator()
    calls = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    results = await asyncio.gather(*(auth.check_password("alice", "wrong") for _ in range(50)))
    assert results == [False] * 50 and len(calls) == 1  # one bcrypt for 50 equal attempts
    assert await auth.check_password("alice", "right") is True
    assert await auth.check_password("alice", "right") is True
    assert len(calls) == 2


async def test_bcrypt_runs_off_the_event_loop() -> None:
    auth = Authenticator({"alice": bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=12))},
                         b"k" * 32, 300.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(ticker())
    started = time.perf_counter()
    assert await auth.check_password("alice", "wrong") is False
    elapsed = time.perf_counter() - started
    task.cancel()
    # The loop kept turning while bcrypt ran (cost 12: ~0.2 s here).
    assert ticks >= elapsed / 0.005 / 4, (ticks, elapsed)


# --- 17 and 4: the status page --------------------------------------------------------------

def _view(upstream: statuspage.UpstreamView) -> statuspage.StatusView:
    zero = dict.fromkeys(statuspage.counts_from({}), 0.0)
    return statuspage.StatusView(**zero, downloads=[], upstreams=[upstream], top=[], workers=1,
                                 started=0.0)


def test_an_offline_mirror_says_offline() -> None:
    page = statuspage.render(_view(statuspage.UpstreamView(
        "up", "https://up.test", None, None, None, None, 0.0, offline=True)))
    assert "offline" in page and "unreachable" not in page and "not contacted" not in page


def test_url_credentials_are_never_shown() -> None:
    assert redact_url("https://user:secret@up.test:5000/x") == "https://up.test:5000/x"
    assert redact_url("https://up.test") == "https://up.test"
    page = statuspage.render(_view(statuspage.UpstreamView(
        "up", "https://user:secret@up.test", False, "boom", None, None, 0.0)))
    assert "secret" not in page and "up.test" in page


# --- 20: a client gone while its body is sent ----------------------------------------------

class _ClosedSocket:
    """uvloop's socket object once the client left and the transport closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def setsockopt(self, *args: object) -> None:
        raise ValueError("negative file descriptor")


class _Transport:
    def __init__(self, sock: object) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


def _sender(sock: object) -> Sender:
    request = SimpleNamespace(transport=_Transport(sock))
    return Sender(request, None, None)  # type: ignore[arg-type]


def test_uncorking_a_closed_socket_is_no_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        sender = _sender(_ClosedSocket(a.fileno()))
        with sender.corked():
            pass  # uvloop's ValueError here was a 500 "unhandled error"
        sender.close()


def test_a_socket_already_closed_is_a_client_gone() -> None:
    with pytest.raises(ConnectionResetError, match="client went away"):
        _sender(_ClosedSocket(-1))
