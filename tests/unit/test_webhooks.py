"""events/: the [[webhook]] configuration, the envelope and its signature, the durable queue
shared by workers, and upstream down/up told once whatever the number of workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mirror.config import ConfigError, WebhookConfig, parse_config
from mirror.events.bus import Events
from mirror.events.envelope import encode, envelope, event, signature, verify
from mirror.events.queue import EventQueue

UPSTREAM = {"name": "a.test", "url": "http://a.invalid"}
CLOSED = "http://127.0.0.1:9/hook"  # discard port: nothing listens on loopback here


def webhooks(*tables: dict[str, Any]) -> tuple[WebhookConfig, ...]:
    return parse_config({"upstream": [UPSTREAM], "webhook": list(tables)}).webhooks


def test_defaults_and_keys(tmp_path: Path) -> None:
    (secret_file := tmp_path / "hook.secret").write_text("s3cret\n")
    (a, b) = webhooks({"url": "https://hooks.example/registry"},
                      {"name": "siem", "url": "http://siem.internal:8080/in",
                       "events": ["denied", "pull", "denied"], "secret_file": str(secret_file),
                       "headers": {"Authorization": "Bearer x"}, "timeout": "500ms",
                       "max_queue": 10, "max_batch": 2})
    assert a.name == "hooks.example" and len(a.events) == 6 and a.secret is None
    assert b.events == ("denied", "pull") and b.secret == b"s3cret"
    assert b.headers == (("Authorization", "Bearer x"),) and b.timeout == 0.5
    assert (b.max_queue, b.max_batch) == (10, 2)
    assert "s3cret" not in repr(b) and "Bearer" not in repr(b)


@pytest.mark.parametrize(("table", "key", "says"), [
    ({"url": "ftp://hooks.example/x"}, "webhook[0].url", "http(s)"),
    ({"url": "https://user:pw@hooks.example/x"}, "webhook[0].url", "credentials"),
    ({}, "webhook[0].url", "missing"),
    ({"url": "http://h/x", "events": ["push"]}, "webhook[0].events", "unknown event 'push'"),
    ({"url": "http://h/x", "events": []}, "webhook[0].events", "no events"),
    ({"url": "http://h/x", "name": "../etc"}, "webhook[0].name", "letters"),
    ({"url": "http://h/x", "headers": {"Bad Name": "x"}}, "webhook[0].headers", "invalid"),
    ({"url": "http://h/x", "headers": {"X": "a\r\nInjected: 1"}}, "webhook[0].headers",
     "invalid"),
    ({"url": "http://h/x", "secret": "a", "secret_file": "/x"}, "webhook[0].secret_file",
     "not both"),
    ({"url": "http://h/x", "timeout": "0s"}, "webhook[0].timeout", ""),
    ({"url": "http://h/x", "max_queue": 0}, "webhook[0].max_queue", "positive"),
    ({"url": "http://h/x", "retries": 3}, "webhook[0].retries", "unknown key"),
])
def test_bad_tables_name_their_key(table: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        webhooks(table)
    assert key in str(err.value) and says in str(err.value)


def test_two_webhooks_of_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate webhook names"):
        webhooks({"url": "http://h/a"}, {"url": "http://h/b"})


def test_the_envelope_and_its_signature() -> None:
    one = event("pull", 0.0, target={"digest": "sha256:" + "a" * 64, "tag": None},
                request={"addr": "10.0.0.1"}, actor="ci", source={"addr": "m:5000"},
                upstream="docker.io", error=None)
    body = envelope([encode(one), encode(event("evict", 1.5))])
    parsed = json.loads(body)["events"]
    assert [e["action"] for e in parsed] == ["pull", "evict"]
    assert parsed[0]["timestamp"] == "1970-01-01T00:00:00.000000Z"
    assert parsed[0]["target"] == {"digest": "sha256:" + "a" * 64}
    assert parsed[0]["actor"] == {"name": "ci"} and parsed[1]["actor"] == {}
    assert parsed[0]["upstream"] == "docker.io" and "error" not in parsed[0]
    assert parsed[0]["id"] != parsed[1]["id"]
    assert verify(b"k", body, signature(b"k", body))
    assert not verify(b"k", body + b" ", signature(b"k", body))
    assert not verify(b"other", body, signature(b"k", body))


def events_in(queue: EventQueue) -> list[bytes]:
    return [x for chunk in queue.peek(1000) for _t, x in chunk]


def test_the_queue_is_bounded_fifo_shared_and_durable(tmp_path: Path) -> None:
    a, b = EventQueue(tmp_path / "q", 5, 2), EventQueue(tmp_path / "q", 5, 2)  # two workers
    assert a.put([(1.0, b"1"), (2.0, b"2"), (3.0, b"3")]) == 0  # chunks of 2: [1 2] [3]
    assert b.put([(4.0, b"4"), (5.0, b"5"), (6.0, b"6"), (7.0, b"7")]) == 2
    assert len(a) == len(b) == 5
    assert events_in(a) == [b"1", b"2", b"3", b"4", b"5"]
    assert [len(c) for c in a.peek(3)] == [2, 1]  # whole chunks, at most 3 events
    assert [len(c) for c in a.peek(1)] == [2]  # one at least
    a.remove(2)
    assert events_in(b) == [b"4", b"5"] and len(b) == 2
    a.close()
    b.close()
    again = EventQueue(tmp_path / "q", 5, 2)
    assert len(again) == 2
    again.remove(10)
    assert len(again) == 0 and again.peek(1) == []
    again.close()


def test_a_count_a_crash_left_wrong_is_taken_again(tmp_path: Path) -> None:
    queue = EventQueue(tmp_path / "q", 5, 10)
    queue.put([(1.0, b"1"), (2.0, b"2")])
    queue._meta.set("events", 5)  # as if killed between the append and the count
    queue.close()
    again = EventQueue(tmp_path / "q", 5, 10)
    assert len(again) == 2 and again.put([(3.0, b"3")] * 4) == 1
    again.close()


async def test_upstream_changes_are_told_once_for_all_workers(tmp_path: Path) -> None:
    hook = webhooks({"name": "ops", "url": CLOSED, "events": ["upstream_down", "upstream_up"]})
    a, b = Events(tmp_path, 5000), Events(tmp_path, 5000)  # two workers, one cache dir
    for worker in (a, b):
        await worker.configure(hook)
    try:
        told: list[tuple[str, str]] = []

        async def both(up: bool) -> None:
            for worker, error in ((a, "refused"), (b, "timeout")):
                worker.upstream_health("docker.io", up, "" if up else error)
                await worker.flush()
            queue = EventQueue(tmp_path / "ops", 100, 100)
            told.extend((e["action"], e.get("error", "")) for e in
                        (json.loads(x) for x in events_in(queue)))
            queue.remove(100)
            queue.close()

        await both(True)  # first seen up: nothing to tell
        await both(False)
        await both(False)  # a worker's view flapping back to what is known: nothing
        await both(True)
        assert told == [("upstream_down", "refused"), ("upstream_up", "")]
    finally:
        await a.close()
        await b.close()


async def test_events_no_webhook_wants_are_not_made(tmp_path: Path) -> None:
    events = Events(tmp_path, 5000)
    await events.configure(webhooks({"name": "ops", "url": CLOSED, "events": ["denied"]}))
    try:
        events.emit("pull", target={"digest": "x"})
        events.emit("denied", target={"repository": "r"}, reason="rule")
        await events.flush()
        queue = EventQueue(tmp_path / "ops", 10, 10)
        assert [json.loads(x)["action"] for x in events_in(queue)] == ["denied"]
        queue.close()
    finally:
        await events.close()


async def test_a_cache_dir_that_cannot_hold_queues_drops_and_counts_but_never_fails(
        tmp_path: Path) -> None:
    from mirror import metrics

    (blocked := tmp_path / "not-a-dir").write_text("")  # full or read-only, as root can't be
    events = Events(blocked / "events", 5000)
    await events.configure(webhooks({"name": "blocked", "url": CLOSED, "events": ["pull"]}))
    dropped = metrics.WEBHOOK_EVENTS.labels("blocked", "dropped")
    before = dropped._value.get()
    try:
        events.emit("pull", target={"digest": "x"})
        events.upstream_health("docker.io", False, "refused")
        await events.flush()
        assert dropped._value.get() == before + 1
    finally:
        await events.close()
