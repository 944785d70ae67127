"""The token-signing key every worker reads from the cache dir (cache/store.py)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from mirror.cache import store as store_module
from mirror.cache.store import BlobStore


def test_a_worker_reading_while_another_creates_the_key_gets_the_whole_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second worker asks for the key while the first is still generating it: it must get
    the same 32 bytes the first ends up with, never an empty or partial file (it was read
    empty, and each worker refused the CSRF and bearer tokens the other issued)."""
    real = secrets.token_bytes
    seen: list[bytes] = []

    def generating(n: int | None = None) -> bytes:
        if not seen:
            seen.append(b"")  # once: the second worker's own creation is not interrupted
            seen.append(BlobStore(tmp_path).shared_secret())
        return real(n)

    monkeypatch.setattr(store_module.secrets, "token_bytes", generating)
    first = BlobStore(tmp_path).shared_secret()
    monkeypatch.setattr(store_module.secrets, "token_bytes", real)
    second = seen[1]
    assert len(first) == 32 and second == first
    assert BlobStore(tmp_path).shared_secret() == first
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
