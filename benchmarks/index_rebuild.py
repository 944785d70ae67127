"""How long rebuilding a lost index takes: `python -m benchmarks.index_rebuild [N]`.

Builds N small stored files in a temporary cache dir, removes the index, and times
`Index.rebuild_entries` over the store (what a serving process does in a background thread
at start when the index is missing or damaged).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci.reference import digest_of


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    root = Path(tempfile.mkdtemp(prefix="index-rebuild-"))
    try:
        store = BlobStore(root)
        for i in range(count):
            data = os.urandom(64) + i.to_bytes(4, "big")
            path = store.path(digest_of(data))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for attempt in (1, 2):
            shutil.rmtree(store.index_dir, ignore_errors=True)
            index = Index(store.index_dir)
            started = time.perf_counter()
            rebuilt = index.rebuild_entries(store.iter_stored())
            print(f"run {attempt}: {rebuilt} entries rebuilt in "
                  f"{time.perf_counter() - started:.3f} s")
            index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
