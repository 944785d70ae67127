"""What every suite needs: `tests.support` importable, the `root` marker (skipped unless
root), each test's report kept on its node (`rep_call`, read by failure-aware fixtures), a
passing test's tmp_path emptied afterwards (images are large), in-process access logs
flushed into the test's own output.

The suites' fixtures: tests/integration/conftest.py (real registries, token server,
containerd, the mirror as a subprocess), tests/faults/conftest.py (fault-injecting upstreams
in a loop thread, mirror processes), tests/inprocess/conftest.py (the mirror's app in the
test's loop); tests/support/mirrorfixtures.py the ones integration and faults share.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Make `tests.support` importable however pytest is started (rootdir not on sys.path).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mirror.logs import ACCESS_LOG  # noqa: E402

pytest_plugins = ["tests.support.disk"]  # tiny_disk, for the full-disk tests of every suite

# --- one TLS context for the suite's httpx clients ----------------------------------------
# Every httpx.get() and httpx.Client() builds an SSL context and parses certifi's bundle into
# it: 15-60 ms a call on this machine, minutes over the suite's thousands of plain-HTTP
# requests. The default contexts (verify=True or False, no client cert) are made once; any
# other argument builds its own as before. A TLS test that needs its own CA passes
# verify=<its context> and is not affected.
_make_context = httpx._transports.default.create_ssl_context
_contexts: dict[tuple[bool, bool], Any] = {}


def _shared_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
    if cert is not None or not isinstance(verify, bool):
        return _make_context(verify=verify, cert=cert, trust_env=trust_env)
    key = (verify, trust_env)  # trust_env: SSL_CERT_FILE/SSL_CERT_DIR, read once
    if key not in _contexts:
        _contexts[key] = _make_context(verify=verify, trust_env=trust_env)
    return _contexts[key]


httpx._transports.default.create_ssl_context = _shared_context

# --- bytecode for the mirror's subprocesses ------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite starts the mirror (and its CLI) as a subprocess a thousand times; with
    PYTHONDONTWRITEBYTECODE set (as on CI machines) or an editable install never run before,
    each start compiles the package from source: 0.3 s of its 1 s start-up. Compiled once
    here, every start reads the bytecode (a file changed later is compiled again by mtime)."""
    for part in ("mirror", "tests/support"):
        compileall.compile_dir(Path(_REPO_ROOT) / part, quiet=1)


# --- markers ----------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (containerd)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(autouse=True)
def _free_disk_after_passing_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Pulled images and mirror caches run to hundreds of MB per test: drop a passing
    test's tmp_path (a failing one's is kept for inspection)."""
    tmp: Path | None = None
    if "tmp_path" in request.fixturenames:
        tmp = request.getfixturevalue("tmp_path")  # torn down after this fixture
    yield
    rep = getattr(request.node, "rep_call", None)
    if tmp is not None and rep is not None and rep.passed:
        for child in tmp.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _stop_leaked_mirrors() -> Iterator[None]:
    """A mirror server a test started and left running is stopped when the test ends (one
    that a module or session fixture runs for several tests was running before it began)."""
    from tests.support.mirror import RUNNING

    before = set(RUNNING)
    yield
    for leaked in RUNNING - before:
        leaked.stop()


@pytest.fixture(autouse=True)
def _flush_access_log() -> Iterator[None]:
    """In-process mirrors batch their access-log lines: write them into the test's own
    captured output, not after the session's summary line."""
    yield
    ACCESS_LOG.flush()
