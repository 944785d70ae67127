"""Fault-matrix fixtures (helpers: tests/support/faultmatrix.py).

  upstreams       Upstreams (session): `public` and `private` (Basic user:pass)
                  MatrixUpstreams on one loop thread
  upstream        upstreams.public: mirror_factory's default upstream
From tests/support/mirrorfixtures.py (shared with tests/integration): blackhole,
mirror_factory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.support.faultmatrix import LoopThread, MatrixUpstream, Upstreams
from tests.support.faultupstream import close_upstream, serve_upstream
from tests.support.mirrorfixtures import blackhole, mirror_factory

__all__ = ["blackhole", "mirror_factory"]  # fixtures shared with tests/integration


@pytest.fixture(scope="session")
def upstreams() -> Iterator[Upstreams]:
    lt = LoopThread()
    public, private = MatrixUpstream(), MatrixUpstream()
    private.auth = "basic"
    lt.run(serve_upstream(public))
    lt.run(serve_upstream(private))
    yield Upstreams(lt, public, private)
    for up in (public, private):
        with contextlib.suppress(Exception):
            lt.run(close_upstream(up))
    lt.stop()


@pytest.fixture(scope="session")
def upstream(upstreams: Upstreams) -> MatrixUpstream:
    """mirror_factory's default upstream: nothing here needs the integration tests'
    docker-registry or its 100 MB test images."""
    return upstreams.public
