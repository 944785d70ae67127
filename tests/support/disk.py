"""Small filesystems for the full-disk and read-only tests (mount needs root, as CI has).

Registered as a plugin by tests/conftest.py, so `tiny_disk` is a fixture everywhere."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_tmpfs(directory: Path, size: str) -> Path:
    if shutil.which("mount") is None:
        pytest.fail("mount(8) is needed for the disk tests")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                   check=True, timeout=30)
    return directory


def unmount(directory: Path) -> None:
    # A read-only bind mount may sit on top of the tmpfs: lift both.
    for _ in range(2):
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True,
                       timeout=30)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs for a cache dir."""
    mount = mount_tmpfs(tmp_path / "tiny", "6m")
    try:
        yield mount
    finally:
        unmount(mount)


def fill(disk: Path) -> None:
    """Fill the filesystem to the last byte (bounded by its size)."""
    piece = b"\0" * (1 << 20)
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            for _ in range(64 << 20 // size):
                try:
                    f.write(piece[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    st = os.statvfs(disk)
    assert st.f_bavail == 0, f"{disk} still has {st.f_bavail} blocks free"
