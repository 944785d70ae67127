"""SIGHUP reloads the whole configuration file (runtime.Mirror.reload) in every worker:
a changed upstream gets a new client while a download through the old one goes on to the
last byte; an added upstream is routed to, a removed one no longer; a file with an error is
refused whole with its reason in one line and the running configuration serves on; what only
a restart can change is said; the htpasswd users and the access rules are applied in every
worker; two reloads close together end with the file's last state."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest

from mirror import runtime
from mirror.config import Config
from tests.support.faultmatrix import (
    PASSWORD,
    USER,
    Act,
    Outcome,
    Upstreams,
    check_outcome,
    fetch,
)
from tests.support.faultupstream import random_bytes
from tests.support.mirror import MirrorProcess, RulesMirror, Upstream
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import free_port, wait_until

from .matrix import start_mirror, wait_listening

pytestmark = pytest.mark.timeout(120)


def hup(mirror: MirrorProcess, workers: int, what: str) -> list[dict[str, Any]]:
    """SIGHUP the mirror; wait for every worker's answer to it (reloaded or refused)."""
    msgs = ("configuration reloaded", "reload refused: the running configuration is kept")
    before = sum(e.get("msg") in msgs for e in mirror.log_entries())
    assert mirror.proc is not None
    os.kill(mirror.proc.pid, signal.SIGHUP)
    box: list[list[dict[str, Any]]] = [[]]

    def answered() -> bool:
        box[0] = mirror.log_entries()
        return sum(e.get("msg") in msgs for e in box[0]) >= before + workers

    wait_until(answered, 20, interval=0.05, what=what)
    return box[0]


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_reload_changes_upstreams_under_a_download_in_flight(
        mirror_factory: MirrorFactory, upstreams: Upstreams, workers: int) -> None:
    pub = upstreams.public
    mirror = start_mirror(mirror_factory, upstreams, workers)
    data = random_bytes(3 << 20)
    digest = pub.add_blob(data)
    reached = pub.set_actions(digest, [Act("ok", at=1 << 20, gate=True)])
    result: dict[str, Outcome] = {}
    client = threading.Thread(target=lambda: result.setdefault("out", fetch(
        mirror.host, f"/v2/pub.test/team/app/blobs/{digest}", timeout=60)))
    client.start()
    assert reached.wait(20), "the download never reached its gate"

    # pub.test changes (a new client for it), priv.test goes, new.test comes
    mirror.upstreams = [Upstream(name="pub.test", url=pub.url, extra={"read_timeout": "20s"}),
                        Upstream(name="new.test", url=pub.url)]
    mirror.write_config()
    log = hup(mirror, workers, "the reload")
    assert any(e.get("msg") == "configuration reloaded" for e in log)
    upstreams.release(pub, digest)
    client.join(60)
    check_outcome(result["out"], data)  # the download through the old client finished
    assert result["out"].status == 200 and result["out"].complete

    again = fetch(mirror.host, f"/v2/new.test/team/app/blobs/{digest}")
    assert again.status == 200 and again.body == data  # the added upstream is routed to
    gone = fetch(mirror.host, "/v2/team/app/tags/list?ns=priv.test")
    assert gone.status == 404 and b"NAME_UNKNOWN" in gone.body, gone  # not routed to


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_bad_file_is_refused_whole_and_restart_only_changes_are_said(
        mirror_factory: MirrorFactory, upstreams: Upstreams, workers: int) -> None:
    pub = upstreams.public
    mirror = start_mirror(mirror_factory, upstreams, workers)
    digest = pub.add_blob(random_bytes(1000))
    good = mirror.config_path.read_text()
    mirror.config_path.write_text(good + "\n[cache]\nmax_size = \"lots\"\n")
    log = hup(mirror, workers, "the refused reload")
    refused = [e for e in log if e.get("msg", "").startswith("reload refused")]
    assert len(refused) >= workers and "mirror.toml" in refused[-1]["error"]
    assert fetch(mirror.host, f"/v2/pub.test/team/app/blobs/{digest}").status == 200

    mirror.server_extra["workers"] = workers + 1  # only a restart can do that
    mirror.write_config()
    log = hup(mirror, workers, "the reload")
    said = [e for e in log if e.get("msg", "").startswith("reload: changes that take effect")]
    assert said and "server.workers" in said[-1]["keys"]
    assert fetch(mirror.host, f"/v2/pub.test/team/app/blobs/{digest}").status == 200


async def test_two_reloads_close_together_end_with_the_files_last_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGHUPs close together (in process: Mirror.reload twice): the first read of the
    file is held until the second reload had its chance; the file's last state must be the
    one running after both, never the earlier read applied after the later one."""
    path = tmp_path / "mirror.toml"

    def write(tag_ttl: str) -> None:
        path.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[cache]\n'
                        f'dir = "{tmp_path / "cache"}"\ntag_ttl = "{tag_ttl}"\n'
                        '[[upstream]]\nname = "a.test"\nurl = "http://127.0.0.1:9"\n')

    write("1s")
    real = runtime.load_config
    held, release = threading.Event(), threading.Event()
    reads: list[float] = []

    def load(p: Path) -> Config:
        config = real(p)
        reads.append(config.cache.tag_ttl)
        if len(reads) == 1:  # the first reload's read: held
            held.set()
            release.wait(10)
        return config

    async with runtime.open_mirror(real(path)) as mirror:
        monkeypatch.setattr(runtime, "load_config", load)
        write("10s")
        first = asyncio.ensure_future(mirror.reload())
        assert await asyncio.to_thread(held.wait, 10)
        write("20s")
        second = asyncio.ensure_future(mirror.reload())
        await asyncio.wait({second}, timeout=1.0)  # its chance to apply (unless it waits)
        release.set()
        assert await first and await second
        assert mirror.config.cache.tag_ttl == 20.0, reads


async def test_every_cache_key_but_dir_is_applied_by_a_reload(tmp_path: Path) -> None:
    """[cache] keys a reload applies in process (dir only after a restart, and said): the
    download engine's finish_abandoned too, which was built once and never followed."""
    path = tmp_path / "mirror.toml"

    def write(cache: str) -> None:
        path.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[cache]\n'
                        f'dir = "{tmp_path / "cache"}"\n{cache}\n'
                        '[[upstream]]\nname = "a.test"\nurl = "http://127.0.0.1:9"\n')

    write("")
    async with runtime.open_mirror(runtime.load_config(path)) as mirror:
        write('tag_ttl = "7s"\nmax_size = "1GiB"\nfinish_abandoned = false\nprefetch = false\n'
              'offline = true\npin = ["a.test/app:v1"]')
        assert await mirror.reload()
        assert mirror.downloads.finish_abandoned is False
        assert mirror.proxy.offline and mirror.offline
        cache = mirror.config.cache
        assert (cache.tag_ttl, cache.max_size, cache.prefetch, cache.pin) == (
            7.0, 1 << 30, False, ("a.test/app:v1",))


def _per_worker(mirror: MirrorProcess, path: str, token: str, workers: int) -> dict[int, int]:
    """On new connections until every worker answered: pid -> status of GET `path`."""
    seen: dict[int, int] = {}
    for _ in range(100):
        with httpx.Client(trust_env=False, timeout=20) as client:
            pid = int(client.get(f"{mirror.url}/healthz").json()["pid"])
            seen[pid] = client.get(f"{mirror.url}{path}", headers={
                "Authorization": f"Bearer {token}"}).status_code
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered")


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_reload_applies_the_htpasswd_users_and_the_access_rules_in_every_worker(
        tmp_path: Path, upstreams: Upstreams, workers: int) -> None:
    pub = upstreams.public
    digest = pub.add_blob(random_bytes(1000))
    path = f"/v2/pub.test/team/app/blobs/{digest}"
    htpasswd = tmp_path / "htpasswd"

    def users(*names: str) -> None:
        htpasswd.write_text("".join(
            f"{n}:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n" for n in names))

    def token(user: str) -> httpx.Response:
        return httpx.get(f"{mirror.url}/token", auth=(user, "pw"), trust_env=False, timeout=20)

    users("alice")
    mirror = RulesMirror(tmp_path / "m", [Upstream(name="pub.test", url=pub.url)],
                         htpasswd=htpasswd, rules=[{"users": ["alice"], "allow": ["pub.test/**"]}],
                         server_extra={"workers": workers})
    mirror.start()
    try:
        wait_listening(mirror, workers)
        alice = token("alice").json()["token"]
        assert set(_per_worker(mirror, path, alice, workers).values()) == {200}
        assert token("bob").status_code == 401

        users("alice", "bob")
        mirror.rules = [{"users": ["bob"], "allow": ["pub.test/**"]}]
        mirror.write_config()
        hup(mirror, workers, "the reload")
        bob = token("bob")
        assert bob.status_code == 200, bob.text  # a user added to the file
        assert set(_per_worker(mirror, path, bob.json()["token"], workers).values()) == {200}
        assert set(_per_worker(mirror, path, alice, workers).values()) == {403}  # rules
    finally:
        mirror.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"w{w}")
def test_a_reload_applies_an_upstreams_new_credentials(
        mirror_factory: MirrorFactory, upstreams: Upstreams, workers: int) -> None:
    """A wrong password refused by the private upstream (403 DENIED, saying the mirror has
    credentials); the right one by a reload: served, in every worker."""
    priv = upstreams.private
    data = random_bytes(2000)
    digest = priv.add_blob(data)
    path = f"/v2/priv.test/team/app/blobs/{digest}"
    mirror = mirror_factory(
        upstreams=[Upstream(name="priv.test", url=priv.url, username=USER, password="wrong")],
        server_extra={"workers": workers})
    wait_listening(mirror, workers)
    refused = fetch(mirror.host, path)
    assert refused.status == 403 and b"DENIED" in refused.body, refused
    mirror.upstreams = [Upstream(name="priv.test", url=priv.url, username=USER,
                                 password=PASSWORD)]
    mirror.write_config()
    hup(mirror, workers, "the reload")
    for _ in range(4 * workers):  # new connections, spread over the workers
        out = fetch(mirror.host, path)
        assert out.status == 200 and out.body == data, out
