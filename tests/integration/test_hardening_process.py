"""Issue 10, items 15, 16 and 21 with the mirror as a real process: workers exit when their
supervisor is killed, a second `serve` on the same cache dir refuses to start, a busy port is
one line and exit status 1 at once, and a name of an unconfigured registry is warned about."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.mirror import MirrorProcess, Upstream
from tests.support.mirrorfixtures import MirrorFactory
from tests.support.registry import HOST, env_without_proxies, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = env_without_proxies()
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def _run_serve(m: MirrorProcess, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`mirror serve` expected to give up by itself; the elapsed time is in .elapsed."""
    m.write_config()
    started = time.monotonic()
    proc = subprocess.Popen(m.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=m.workdir, env=_env(), text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(m.command(), proc.returncode, out, err)
    result.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
    return result


def _plain_lines(stderr: str) -> list[str]:
    """The lines meant for a human (not the JSON log)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(m: MirrorProcess, count: int) -> list[int]:
    def started() -> list[int]:
        return [int(e["pid"]) for e in m.log_entries() if e.get("msg") == "worker started"]

    wait_until(lambda: len(started()) >= count, 10, what="workers started")
    return started()


# --- item 15 ------------------------------------------------------------------------------


def test_workers_exit_when_the_supervisor_is_killed(mirror_factory: MirrorFactory) -> None:
    m = mirror_factory(server_extra={"workers": 2})
    workers = _worker_pids(m, 2)
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGKILL)  # the supervisor alone, not its process group
    m.proc.wait(timeout=10)
    wait_until(lambda: not any(_alive(p) for p in workers), 15,
               what=f"workers {workers} to exit after their supervisor was killed")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{m.url}/v2/", timeout=2, trust_env=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_second_serve_on_the_same_cache_dir_refuses(mirror_factory: MirrorFactory,
                                                     tmp_path: Path, workers: int) -> None:
    first = mirror_factory(server_extra={"workers": workers})
    second = MirrorProcess(tmp_path / "second", first.upstreams, cache_dir=first.cache_dir,
                           port=first.port, server_extra={"workers": workers})
    result = _run_serve(second)
    assert result.returncode == 1, result.stderr
    lines = _plain_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(first.cache_dir) in lines[0] and "already" in lines[0]
    assert "Traceback" not in result.stderr
    assert httpx.get(f"{first.url}/v2/", timeout=5, trust_env=False).status_code == 200
    assert first.running


# --- item 9, wired into the serving process --------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_serving_process_closes_connections_without_a_request(
        mirror_factory: MirrorFactory, workers: int) -> None:
    m = mirror_factory(server_extra={"workers": workers, "header_timeout": "1s"})
    idle = [socket.create_connection((HOST, m.port), timeout=10) for _ in range(10)]
    started = time.monotonic()
    for s in idle:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n")  # and never the rest
    for s in idle:
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1024) == b""  # closed by the mirror (the timeout above would raise)
        s.close()
    assert time.monotonic() - started < 8
    assert httpx.get(f"{m.url}/v2/", timeout=5, trust_env=False).status_code == 200


# --- item 16 ------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["plain", "reuseport"])
def busy_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port another process listens on (with SO_REUSEPORT too, as another mirror's
    workers would: the kernel would let a same-user process join it silently)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if request.param:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((HOST, 0))
    s.listen()
    yield int(s.getsockname()[1])
    s.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_busy_port_exits_at_once_with_one_line(tmp_path: Path, busy_port: int,
                                               workers: int) -> None:
    m = MirrorProcess(tmp_path / "m", [Upstream(name="up.test", url=f"http://{HOST}:1")],
                      port=busy_port, server_extra={"workers": workers})
    result = _run_serve(m)
    assert result.returncode == 1, result.stderr
    assert result.elapsed < 10, result.elapsed  # type: ignore[attr-defined]
    lines = _plain_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"{HOST}:{busy_port}" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_failing_to_bind_stops_everything_at_once(tmp_path: Path,
                                                           workers: int) -> None:
    """The port taken between the start-up check and the workers' bind (the check is
    skipped here): the supervisor stops at once, not after its 65 s stop deadline."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind((HOST, 0))
    holder.listen()
    busy_port = int(holder.getsockname()[1])
    m = MirrorProcess(tmp_path / "m", [Upstream(name="up.test", url=f"http://{HOST}:1")],
                      port=busy_port, server_extra={"workers": workers})
    m.write_config()
    code = ("import sys, mirror.process.serve as s; s.check_listen = lambda config: None; "
            "from mirror.cli import main; sys.exit(main(sys.argv[1:]))")
    started = time.monotonic()
    proc = subprocess.run([m.command()[0], "-c", code, *m.command()[3:]], capture_output=True,
                          text=True, timeout=30, cwd=m.workdir, env=_env())
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 10
    lines = _plain_lines(proc.stderr)
    assert len(lines) == 1 and f"{HOST}:{busy_port}" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    holder.close()


# --- item 21 ------------------------------------------------------------------------------


def test_unconfigured_registry_in_a_path_is_warned_about(mirror_factory: MirrorFactory,
                                                         tmp_path: Path) -> None:
    m = mirror_factory()
    default = m.upstreams[0].name
    starts = [e for e in m.log_entries() if e.get("default_upstream") == default]
    assert starts, "the start-up log names the upstream answering names without a registry"
    with httpx.Client(base_url=m.url, timeout=10, trust_env=False) as client:
        client.get(f"/v2/{default}/test/small/manifests/v1")  # configured: no warning
        for i in range(30):  # bounded: a flood must not become 30 lines
            client.get(f"/v2/quay.io/foo{i}/manifests/x")
    m.wait_log(lambda log: sum("quay.io/foo" in str(e["path"]) for e in log) >= 30)
    warnings = [e for e in m.log_entries() if e.get("registry") == "quay.io"]
    assert 1 <= len(warnings) <= 2, warnings
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["default_upstream"] == default
    assert not [e for e in m.log_entries() if e.get("registry") == default]
