"""Checks on a mirror's cache dir from the outside (what is in blobs/, and is it right)."""

from __future__ import annotations

from pathlib import Path

from .oci import sha256_digest


def stored_files(cache: Path) -> dict[str, bytes]:
    """digest -> bytes of every file under `cache`/blobs."""
    out = {}
    for path in (cache / "blobs").rglob("*"):
        if path.is_file():
            out[f"{path.parent.parent.name}:{path.name}"] = path.read_bytes()
    return out


def assert_store_verified(cache: Path) -> None:
    for digest, data in stored_files(cache).items():
        assert sha256_digest(data) == digest, f"{digest} in the store does not match its content"
