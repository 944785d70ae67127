"""A real Redis: Debian's `redis-server` on 127.0.0.1, in a directory of its own, persisting
nothing (`--save "" --appendonly no`).

    server = RedisServer(workdir, user=("mirror", "secret")).start()
    SharedState(server.url, username="mirror", password="secret")

`password` sets the default user's `requirepass`; `user` adds an ACL user with every right and
turns the default user off. `shutdown()` stops it the way an operator would (`redis-cli
shutdown nosave`), `pause()`/`resume()` freeze it with SIGSTOP/SIGCONT (connections are still
accepted by the kernel, nothing is answered), `start()` again reuses the same port.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from .registry import HOST, free_port, wait_until

REDIS_BIN = "redis-server"
CLI_BIN = "redis-cli"


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        user: tuple[str, str] | None = None,
    ) -> None:
        if shutil.which(REDIS_BIN) is None or shutil.which(CLI_BIN) is None:
            raise RuntimeError(f"{REDIS_BIN} not installed (apt-get install redis-server)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "redis.log"
        self.password = password
        self.user = user
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _args(self) -> list[str]:
        args = [REDIS_BIN, "--bind", HOST, "--port", str(self.port), "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--logfile", str(self.log_path)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.user is not None:
            name, secret = self.user
            args += ["--user", name, "on", f">{secret}", "~*", "&*", "+@all",
                     "--user", "default", "off"]
        return args

    def cli(self, *command: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """redis-cli against this server, as the configured user."""
        auth: list[str] = ["--no-auth-warning"]
        if self.user is not None:
            auth += ["--user", self.user[0], "--pass", self.user[1]]
        elif self.password is not None:
            auth += ["--pass", self.password]
        return subprocess.run([CLI_BIN, "-h", HOST, "-p", str(self.port), *auth, *command],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            return self.cli("ping", timeout=1.0).stdout.strip() == "PONG"

        wait_until(ready, timeout, interval=0.02, what="redis-cli ping")
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def shutdown(self, timeout: float = 10.0) -> None:
        """`redis-cli shutdown nosave`; returns once the process has exited."""
        assert self.proc is not None
        self.cli("shutdown", "nosave")
        self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT if paused); SIGKILL if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
