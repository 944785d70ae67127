"""The catalog's pages (http/catalog.py `page`) over a real Index, no HTTP: cached repositories
only (a manifest stored), named as clients pull them, sorted across upstreams, `n`/`last`
pagination that neither skips nor repeats, thousands of repositories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.cache.index import Index
from mirror.http.catalog import page
from mirror.oci.reference import Digest, digest_of

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UPSTREAMS = ["registry.test", "other.test:5000"]
STORED = digest_of(b"a stored manifest")
GONE = digest_of(b"an evicted manifest")


def stored(digest: Digest) -> bool:
    return digest == STORED


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(tmp_path / "index")
    yield idx
    idx.close()


def walk(index: Index, n: int, last: str | None = None) -> list[str]:
    names: list[str] = []
    for _ in range(10_000):
        got, more = page(index, stored, UPSTREAMS, last, n)
        assert len(got) <= n
        names += got
        if not more:
            return names
        last = got[-1]
    raise AssertionError("the pages never ended")


def test_cached_repositories_by_the_names_clients_pull_sorted(index: Index) -> None:
    index.set_tag("registry.test", "zeta", "v1", STORED, OCI_MANIFEST)
    index.set_tag("registry.test", "app", "v1", STORED, OCI_MANIFEST)
    index.set_tag("registry.test", "app", "v2", STORED, OCI_MANIFEST)
    index.hold("registry.test", "app/sub", STORED)  # pulled by digest only
    index.set_tag("other.test:5000", "y/z", "v1", STORED, OCI_MANIFEST)
    index.hold("other.test:5000", "x", STORED)
    index.set_tag("registry.test", "evicted", "v1", GONE, OCI_MANIFEST)  # nothing stored
    index.hold("registry.test", "evicted-too", GONE)
    index.set_tag("registry.test", "both", "old", GONE, OCI_MANIFEST)  # one of two stored
    index.hold("registry.test", "both", STORED)
    expected = ["app", "app/sub", "both", "other.test:5000/x", "other.test:5000/y/z", "zeta"]
    assert page(index, stored, UPSTREAMS, None, 100) == (expected, False)
    for n in (1, 2, 5):
        assert walk(index, n) == expected
    assert page(index, stored, UPSTREAMS, "app", 2) == (["app/sub", "both"], True)
    assert page(index, stored, UPSTREAMS, "other", 100)[0] == expected[3:]  # not a name
    assert page(index, stored, UPSTREAMS, "other.test:5000/x", 1) == (
        ["other.test:5000/y/z"], True)
    assert page(index, stored, UPSTREAMS, "zeta", 100) == ([], False)
    assert page(index, stored, UPSTREAMS, "0", 3) == (expected[:3], True)


def test_thousands_of_repositories_paginate_without_a_gap_or_a_repeat(index: Index) -> None:
    expected = []
    with index.db.transact():
        for i in range(3000):
            upstream = UPSTREAMS[i % 2]
            repository = f"team{i % 7}/app-{i:05d}"
            if i % 3:
                index.set_tag(upstream, repository, "v1", STORED, OCI_MANIFEST)
            else:
                index.hold(upstream, repository, STORED)
            expected.append(repository if i % 2 == 0 else f"{upstream}/{repository}")
    expected.sort()
    assert walk(index, 100) == expected
    assert walk(index, 1000) == expected
    assert walk(index, 7, last=expected[1234]) == expected[1235:]


def test_the_catalog_is_off_unless_server_catalog_is_true() -> None:
    from mirror.config import ConfigError, parse_config

    upstream = [{"name": "registry.test", "url": "http://registry.invalid"}]
    assert parse_config({"upstream": upstream}).server.catalog is False
    assert parse_config({"server": {"catalog": True}, "upstream": upstream}).server.catalog
    with pytest.raises(ConfigError, match=r"server\.catalog"):
        parse_config({"server": {"catalog": "yes"}, "upstream": upstream})
