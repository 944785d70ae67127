"""Fixtures for suites that run the mirror as a subprocess (tests/integration, tests/faults),
registered by importing them into those suites' conftest.py. Each suite provides its own
`upstream` fixture (an object with a `.url`): the default upstream of `mirror_factory`.

  blackhole       ClosedPort (session): the registry name clients pull from
                  (`blackhole.host`); nothing listens there, so a client can only succeed
                  through the mirror
  mirror_factory  make(upstreams=None, **kwargs) -> started MirrorProcess; kwargs go to
                  MirrorProcess (cache_dir, max_size, tag_ttl, server_extra, cache_extra,
                  port); default upstream: name=blackhole.host, url=upstream.url; all
                  stopped at teardown, their stderr printed when the test failed
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .mirror import MirrorProcess, Upstream
from .registry import ClosedPort

MirrorFactory = Callable[..., MirrorProcess]


def call_failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test's call phase failed (tests/conftest.py's makereport hook sets
    `rep_call`)."""
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


@pytest.fixture(scope="session")
def blackhole() -> Iterator[ClosedPort]:
    port = ClosedPort()
    yield port
    port.close()


@pytest.fixture
def mirror_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream: Any,
    blackhole: ClosedPort,
) -> Iterator[MirrorFactory]:
    started: list[MirrorProcess] = []

    def make(upstreams: list[Upstream] | None = None, **kwargs: Any) -> MirrorProcess:
        ups = upstreams or [Upstream(name=blackhole.host, url=upstream.url)]
        m = MirrorProcess(tmp_path / f"mirror{len(started)}", ups, **kwargs)
        started.append(m)
        return m.start()

    yield make
    for m in started:
        m.stop()
        if call_failed(request):
            print(f"--- mirror stderr ({m.stderr_path}) ---\n{m.stderr_tail()}")
