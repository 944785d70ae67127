"""The mirror under test, as a real subprocess: `python -m mirror serve --config PATH`.

    m = MirrorProcess(tmp / "mirror", [Upstream(name="127.0.0.1:5001",
                                                url="http://127.0.0.1:5002")]).start()
    httpx.get(f"{m.url}/v2/")
    m.log_entries()          # the JSON lines the mirror wrote to stderr
    m.kill9(); m.start()     # crash and restart on the same port and cache dir
    m.verify_cache()         # every file under blobs/ hashes to its name

stderr and stdout are appended to files in the work dir, so they survive restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .oci import sha256_file
from .registry import HOST, env_without_proxies, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Upstream:
    """One `[[upstream]]` table. `extra` holds further keys (read_timeout, …)."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> dict[str, Any]:
        t: dict[str, Any] = {"name": self.name, "url": self.url}
        if self.username is not None:
            t["username"] = self.username
        if self.password is not None:
            t["password"] = self.password
        t.update(self.extra)
        return t


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]], arrays: Mapping[str, list[Any]]) -> str:
    """A TOML document from plain tables and arrays of tables (scalar values only)."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for name, tables in arrays.items():
        for table in tables:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)


# Every MirrorProcess started and not yet stopped: tests/conftest.py stops those a test
# left running (a leaked server holds memory and a core for the rest of the session).
RUNNING: set[MirrorProcess] = set()


class MirrorProcess:
    def __init__(
        self,
        workdir: Path,
        upstreams: list[Upstream],
        *,
        cache_dir: Path | None = None,
        max_size: str = "20GiB",
        tag_ttl: str = "60s",
        server_extra: Mapping[str, Any] | None = None,
        cache_extra: Mapping[str, Any] | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.upstreams = upstreams
        self.cache_dir = cache_dir or workdir / "cache"
        self.max_size = max_size
        self.tag_ttl = tag_ttl
        self.server_extra = dict(server_extra or {})
        self.cache_extra = dict(cache_extra or {})
        self.port = port or free_port()
        self.host = f"{HOST}:{self.port}"
        self.url = f"http://{self.host}"
        self.config_path = workdir / "mirror.toml"
        self.stderr_path = workdir / "mirror.stderr"
        self.stdout_path = workdir / "mirror.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.launcher: tuple[str, ...] = ()  # a prefix that execs the command (a cgroup)
        self.sections: dict[str, dict[str, Any]] = {}  # more tables: [s3], ...
        self.arrays: dict[str, list[dict[str, Any]]] = {}  # more arrays: [[policy]], ...
        self.env: dict[str, str] = {}  # more environment (MIRROR_HISTORY_SECONDS, ...)

    # --- configuration ---------------------------------------------------------------

    def config_text(self) -> str:
        server = {"listen": self.host, **self.server_extra}
        cache = {
            "dir": str(self.cache_dir),
            "max_size": self.max_size,
            "tag_ttl": self.tag_ttl,
            **self.cache_extra,
        }
        return to_toml(
            {"server": server, "cache": cache, **self.sections},
            {"upstream": [u.table() for u in self.upstreams], **self.arrays},
        )

    def write_config(self) -> Path:
        self.config_path.write_text(self.config_text())
        return self.config_path

    # --- process control ---------------------------------------------------------------

    def command(self) -> list[str]:
        return [*self.launcher, sys.executable, "-m", "mirror", "serve", "--config",
                str(self.config_path)]

    def start(self, timeout: float = 20.0) -> MirrorProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("mirror already running")
        self.write_config()
        env = env_without_proxies()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        with self.stderr_path.open("ab") as err, self.stdout_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        self.starts += 1
        RUNNING.add(self)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mirror exited with status {self.proc.returncode}:\n{self.stderr_tail()}"
                )
            try:
                httpx.get(f"{self.url}/v2/", timeout=1.0, trust_env=False)
            except httpx.TransportError:
                return False
            return self._all_workers_listening()

        wait_until(ready, timeout, interval=0.05, what=f"mirror at {self.url}/v2/")

    def _all_workers_listening(self) -> bool:
        """One worker answering is not all of them: with several, the supervisor says when the
        last one listens (a test spreading connections over workers needs them all)."""
        if int(self.server_extra.get("workers", 1)) <= 1:
            return True
        said = sum(e.get("msg") == "all workers listening" for e in self.log_entries())
        return said >= self.starts

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the mirror's whole process group (workers included)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        RUNNING.discard(self)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit status."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Reap any leftover worker in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None
        RUNNING.discard(self)
        return proc.returncode

    def restart(self, timeout: float = 20.0) -> MirrorProcess:
        self.stop()
        return self.start(timeout)

    # --- observation -------------------------------------------------------------------

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, n: int = 6000) -> str:
        return self.stderr_text()[-n:]

    def log_entries(self) -> list[dict[str, Any]]:
        """Every JSON object line the mirror wrote to stderr (across restarts)."""
        out: list[dict[str, Any]] = []
        for line in self.stderr_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples (all workers) whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", trust_env=False, timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def request_log(self) -> list[dict[str, Any]]:
        """The per-request log lines (those with method, path and status)."""
        return [
            e for e in self.log_entries() if {"method", "path", "status"} <= e.keys()
        ]

    def wait_log(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 10.0,
        what: str = "mirror request log",
    ) -> list[dict[str, Any]]:
        """Poll the request log until `predicate(log)` holds (a line is written after its
        response is sent, so a client can see the response before the line exists)."""
        box: list[list[dict[str, Any]]] = [[]]

        def ok() -> bool:
            box[0] = self.request_log()
            return predicate(box[0])

        wait_until(ok, timeout, interval=0.02, what=what)
        return box[0]

    def requests_for(self, path_suffix: str, method: str | None = None) -> list[dict[str, Any]]:
        """Request-log lines whose path (query stripped) ends with `path_suffix`."""
        return [
            e
            for e in self.request_log()
            if str(e["path"]).split("?", 1)[0].endswith(path_suffix)
            and (method is None or e["method"] == method)
        ]

    @property
    def blobs_dir(self) -> Path:
        return self.cache_dir / "blobs"

    @property
    def tmp_dir(self) -> Path:
        return self.cache_dir / "tmp"

    def cached_files(self) -> list[Path]:
        if not self.blobs_dir.exists():
            return []
        return sorted(p for p in self.blobs_dir.rglob("*") if p.is_file())

    def cached_digests(self) -> set[str]:
        return {f"{p.parent.parent.name}:{p.name}" for p in self.cached_files()}

    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.blobs_dir / algo / hexd[:2] / hexd

    def wait_cached(self, digests: Iterable[str], timeout: float = 15.0) -> None:
        """Wait until every digest is in blobs/ (a download is committed — verified and
        renamed — a moment after its last byte reached the client)."""
        want = set(digests)
        wait_until(
            lambda: want <= self.cached_digests(),
            timeout,
            what=f"{len(want)} blobs committed to {self.blobs_dir}",
        )

    def tmp_files(self) -> list[Path]:
        if not self.tmp_dir.exists():
            return []
        try:
            return sorted(p for p in self.tmp_dir.rglob("*") if p.is_file())
        except FileNotFoundError:  # a file renamed away while listing
            return self.tmp_files()

    def verify_cache(self) -> set[str]:
        """Every file under blobs/ must be at blobs/<algo>/<2 hex>/<hex> and hash to <hex>."""
        verified: set[str] = set()
        for p in self.cached_files():
            rel = p.relative_to(self.blobs_dir).parts
            assert len(rel) == 3 and rel[0] == "sha256", f"unexpected file in blobs/: {p}"
            assert rel[1] == rel[2][:2], f"blob in the wrong fan-out dir: {p}"
            try:
                got = sha256_file(p)
            except FileNotFoundError:  # evicted since it was listed: nothing to verify
                continue
            assert got == f"sha256:{rel[2]}", f"cached blob {p} hashes to {got}"
            verified.add(got)
        return verified


class RulesMirror(MirrorProcess):
    """A mirror with `[auth] htpasswd`, `[auth.groups]` and `[[auth.rule]]` tables."""

    def __init__(self, *args: Any, htpasswd: Path, rules: list[dict[str, Any]],
                 groups: Mapping[str, list[str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.htpasswd, self.rules, self.groups = htpasswd, rules, dict(groups or {})

    def config_text(self) -> str:
        rules = "".join("\n[[auth.rule]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in rule.items()) for rule in self.rules)
        groups = "".join(f"{g} = {json.dumps(users)}\n" for g, users in self.groups.items())
        return (super().config_text() + f'\n[auth]\nhtpasswd = "{self.htpasswd}"\n'
                + (f"[auth.groups]\n{groups}" if groups else "") + rules)


def _pid_then(mirror: MirrorProcess, path: str) -> tuple[int, int]:
    """On one connection: which worker answers, then the status of GET `path`."""
    with httpx.Client(trust_env=False, timeout=30) as client:
        pid = int(client.get(f"{mirror.url}/healthz").json()["pid"])
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        return pid, client.get(f"{mirror.url}{path}", headers=accept).status_code


def on_both_workers(mirror: MirrorProcess, status: int, repository: str) -> None:
    """Cold manifest GETs (tags never asked before) until both workers have answered one
    with `status` (5xx: any server error): each worker has seen the upstream's state."""
    seen: set[int] = set()
    for n in range(200):
        pid, got = _pid_then(mirror, f"/v2/{repository}/manifests/absent-{time.time_ns()}-{n}")
        if got == status or (status == 500 and got >= 500):
            seen.add(pid)
        if len(seen) == 2:
            return
    raise AssertionError(f"only workers {seen} answered {status}")
