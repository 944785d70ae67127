"""The cache dir before and beside a running mirror: the instance lock, the start-up sweep of
`tmp/`, and the key every worker signs client tokens with.

Kept out of runtime.py on purpose: the supervisor calls these before it forks, and before it
points PROMETHEUS_MULTIPROC_DIR at the workers' metrics directory, so nothing here may import
prometheus_client (a test checks that importing process/serve.py does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirror.cache import locks
from mirror.cache.store import BlobStore


@dataclass(frozen=True)
class Claim:
    held: bool  # False: another mirror serves from this cache dir
    lock: Path
    problem: str | None = None  # the lock file could not be made: going on unguarded


def claim(directory: Path) -> Claim:
    """Take the instance lock on the cache dir for this process's life (and its workers')."""
    path = BlobStore(directory).lock_path("serve")
    try:
        held = locks.hold_for_life(str(path)) is not None
    except OSError as exc:
        return Claim(True, path, exc.strerror)
    return Claim(held, path)


def clean_temporaries(directory: Path) -> int:
    """Empty `tmp/` of what no live worker holds; the number of files removed."""
    return BlobStore(directory).clean_temporaries()


def token_secret(directory: Path) -> bytes:
    """The key signing the mirror's client tokens, shared by every worker via the cache dir."""
    return BlobStore(directory).shared_secret()
