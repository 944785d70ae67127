"""`mirror status` says when a [[sync]] rule runs next as the scheduler decides (pull/sync
next_run): a rule a reload changed is due now, not its old start plus interval."""

from __future__ import annotations

import time
from pathlib import Path

from mirror.cache.index import Index
from mirror.cache.locks import try_exclusive
from mirror.cache.store import BlobStore
from mirror.commands.status import sync_lines
from mirror.config import Config, load_config
from mirror.pull.sync import fingerprint, lock_name


def one_rule(tmp_path: Path) -> tuple[Config, Index, BlobStore]:
    """A configuration with one [[sync]] rule "web" (interval 1h), its index and store."""
    path = tmp_path / "mirror.toml"
    path.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n'
                    '[[upstream]]\nname = "r"\nurl = "http://127.0.0.1:1"\n'
                    '[[sync]]\nname = "web"\nupstream = "r"\nrepositories = ["library/nginx"]\n'
                    "tags = '^1\\.'\ninterval = \"1h\"\n")
    return load_config(path), Index(tmp_path / "index"), BlobStore(tmp_path / "cache")


def test_a_changed_rule_is_due_now_and_an_unchanged_one_at_its_interval(tmp_path: Path) -> None:
    config, index, store = one_rule(tmp_path)
    state = {"started": time.time() - 60, "ok": True, "summary": "3 images"}
    index.set_sync_state("web", {**state, "rule": fingerprint(config.syncs[0])})
    line = sync_lines(config, index, store.lock_path)[0]
    assert "next in" in line and "due now" not in line
    index.set_sync_state("web", {**state, "rule": "a rule before a reload changed it"})
    assert "due now" in sync_lines(config, index, store.lock_path)[0]


def test_a_run_cut_short_is_due_now_and_a_live_one_is_running(tmp_path: Path) -> None:
    """A state left "running" by a process that died (its lock gone with it) is a run cut
    short, due now as the scheduler retries it; while a process holds the lock it runs."""
    config, index, store = one_rule(tmp_path)
    rule = config.syncs[0]
    index.set_sync_state("web", {"started": time.time() - 60, "running": 12345,
                                 "rule": fingerprint(rule)})
    line = sync_lines(config, index, store.lock_path)[0]
    assert "cut short" in line and "due now" in line, line
    with try_exclusive(str(store.lock_path(lock_name(rule)))) as mine:
        assert mine
        line = sync_lines(config, index, store.lock_path)[0]
    assert ": running" in line and "next in" in line, line
