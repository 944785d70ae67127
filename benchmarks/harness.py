"""Process management, readiness checks, client fan-out and memory sampling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_PROCS: list[Proc] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Proc:
    """A server process in its own session, so that it and its children (worker
    processes) can be stopped together through its process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._stopped = False
        ALL_PROCS.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children that outlived the leader (same process group).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def stop_all() -> None:
    """Stop every server process this run started (by process group id)."""
    for proc in reversed(ALL_PROCS):
        with contextlib.suppress(Exception):
            proc.stop(grace=3)


def wait_http(url: str, timeout: float, proc: Proc | None = None) -> None:
    """Wait until GET url answers 200 (bounded by timeout)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    tail = proc.tail() if proc else ""
    raise RuntimeError(f"{url} not ready after {timeout}s ({last})\n{tail}")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _proc_kib(path: str, field: str) -> int:
    """Bytes of a `Field:   N kB` line of a /proc file (0 when the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return _proc_kib(f"/proc/{pid}/status", "VmRSS:")


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (a forked worker shares most of its parent's)
    are split between the processes sharing them, so the sum over a tree is its real use."""
    return _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


class RssSampler:
    """Samples the summed RSS and PSS of a process tree every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tree_every, n = 20, 0
        tree = process_tree(self.pid)
        while not self._stop.is_set():
            if n % tree_every == 0:
                tree = process_tree(self.pid)
            n += 1
            self.max_procs = max(self.max_procs, len(tree))
            self.peak = max(self.peak, sum(rss_bytes(p) for p in tree))
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in tree))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_clients(
    specs: Sequence[dict[str, Any]],
    timeout: float,
    during: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Start one client process per spec, release them together, and collect results.

    Returns (results, t_go). A client that fails to report gets ``{"error": ...}``.
    """
    procs: list[subprocess.Popen[str]] = []
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        for spec in specs:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.fetch", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    cwd=REPO_ROOT,
                    env=env,
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"client did not start: {line!r}")
        t_go = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        if during is not None:
            during()
        results: list[dict[str, Any]] = []
        deadline = t_go + timeout
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                results.append(json.loads(out.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                results.append({"error": f"client timed out after {timeout:.0f}s"})
            except (ValueError, IndexError):
                results.append({"error": f"client exited {p.returncode} without a result"})
        return results, t_go
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks clean up."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
