"""`mirror verify`: rehash every stored file; remove and report what does not match its name."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from mirror.cache.index import Index
from mirror.cache.store import BlobStore
from mirror.oci.reference import Digest

CHUNK = 1 << 20


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    bad: list[Digest] = field(default_factory=list)


def file_matches(store: BlobStore, digest: Digest) -> bool:
    hasher = digest.hasher()
    try:
        with open(store.path(digest), "rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return True  # evicted meanwhile: nothing wrong is stored
    return hasher.hexdigest() == digest.hex


def verify(store: BlobStore, index: Index, progress: bool = True) -> VerifyReport:
    stored = list(store.iter_stored())
    report = VerifyReport()
    with tqdm(total=sum(size for _, size, _ in stored), unit="B", unit_scale=True,
              desc="verifying", disable=not progress or not sys.stderr.isatty()) as bar:
        for digest, size, _ in stored:
            if not file_matches(store, digest):
                report.bad.append(digest)
                store.delete(digest)
                index.remove_entry(digest)
            report.checked += 1
            report.bytes += size
            bar.update(size)
    return report
