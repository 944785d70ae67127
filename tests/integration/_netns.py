"""A private network namespace with nothing but `lo`, for clients that must not reach the
outside world (dockerd falls back to Docker Hub whenever a mirror fails), and a TCP bridge
that makes one loopback port of this (the test's) namespace reachable from inside it.

    with NetNS.create() as ns:                      # `ip netns add`, lo up, no routes out
        ns.forward(mirror.port)                     # ns 127.0.0.1:P -> host 127.0.0.1:P
        ns.argv(["dockerd", ...])                   # runs it inside

Nothing inside the namespace can send a packet anywhere but its own loopback: it has no
other interface and no route (`assert_isolated` checks it). Commands run by `argv` also get
a private mount namespace in which /etc/resolv.conf names 127.0.0.1, so even a DNS lookup
for registry-1.docker.io goes to the namespace's own loopback, where nothing listens.
(`ip netns exec` would do the resolv.conf part, but it also mounts a fresh /sys, hiding
the cgroup hierarchies dockerd needs; `nsenter --net` + `unshare --mount` keeps them.)

The bridge needs no address outside loopback: a listening socket is created *inside* the
namespace by a short-lived thread that enters it with setns(2) (a socket keeps the
namespace it was created in), and connections accepted on it are relayed from this
process to 127.0.0.1:P of the test's namespace. Root only (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.registry import HOST, stop_loop_thread

CLONE_NEWNET = 0x40000000
_NETNS_RUN = Path("/run/netns")
# sh -c _ENTER sh SRC1 DST1 SRC2 DST2 ... -- CMD ARGS... (in a fresh mount namespace):
# bind-mount each SRC over its DST, then exec CMD.
_ENTER = (
    'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 125; shift 2; done; '
    'shift; exec "$@"'
)


def _ip(*args: str, timeout: float = 20.0) -> str:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in_netns(ns_path: Path, port: int, host: str = HOST) -> socket.socket:
    """A TCP socket listening on host:port inside the namespace at ns_path (the calling
    process stays where it is: only a throwaway thread enters the namespace)."""
    box: list[socket.socket | BaseException] = []

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(ns_path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(64)
                box.append(s)
            finally:
                _setns(own)  # if this failed the thread ends anyway: it is never reused
        except BaseException as e:
            box.append(e)
        finally:
            os.close(own)
            os.close(target)

    t = threading.Thread(target=work, name=f"netns-listen-{port}")
    t.start()
    t.join(timeout=10)
    if not box:
        raise RuntimeError("listen_in_netns: thread did not finish")
    res = box[0]
    if isinstance(res, BaseException):
        raise res
    return res


class Bridge:
    """Relays connections accepted on `listener` (a socket in another namespace) to
    target_host:target_port in this process's namespace. Its own event loop in a thread.

    `cut_once_after(n)`: the first connection that carries more than n bytes back to the
    client is aborted there (both sides reset), once: a download broken mid-blob."""

    def __init__(self, listener: socket.socket, target_port: int, target_host: str = HOST):
        self.listener = listener
        self.target = (target_host, target_port)
        self.connections = 0
        self.cut_after: int | None = None
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"netns-bridge-{target_port}", daemon=True
        )
        self._server: asyncio.Server | None = None

    def start(self) -> Bridge:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    def cut_once_after(self, nbytes: int) -> None:
        self.cut_after = nbytes

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.listener)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        abort: tuple[asyncio.StreamWriter, ...] = (),
    ) -> None:
        """Copy until EOF. With `abort` (the downstream direction), a pending cut resets
        the writers in `abort` once this connection has carried more than cut_after bytes."""
        sent = 0
        try:
            while data := await reader.read(64 * 1024):
                limit = self.cut_after
                if abort and limit is not None and sent + len(data) > limit:
                    self.cut_after = None
                    self.cuts += 1
                    writer.write(data[: max(0, limit - sent)])
                    await writer.drain()
                    for w in abort:
                        w.transport.abort()
                    return
                writer.write(data)
                sent += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ureader, uwriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        try:
            await asyncio.gather(
                self._pipe(creader, uwriter),
                self._pipe(ureader, cwriter, abort=(cwriter, uwriter)),
            )
        finally:
            for w in (cwriter, uwriter):
                w.close()

    def stop(self) -> None:
        stop_loop_thread(self._loop, self._thread, self._server)
        self.listener.close()


class NetNS:
    """`ip netns add NAME` with only `lo` (up), deleted by `delete()` / the context exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = _NETNS_RUN / name
        self.etc_dir = Path(tempfile.mkdtemp(prefix=f"{name}-etc-"))
        self.bridges: list[Bridge] = []

    @classmethod
    def create(cls, prefix: str = "mirror-test") -> NetNS:
        ns = cls(f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        _ip("netns", "add", ns.name)
        try:
            # Bind-mounted over /etc/<file> for the commands run by argv().
            (ns.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
            (ns.etc_dir / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
            ns.exec_check(["ip", "link", "set", "lo", "up"])
        except BaseException:
            ns.delete()
            raise
        return ns

    def argv(self, args: Sequence[str], binds: Mapping[Path, Path] | None = None) -> list[str]:
        """The command line that runs `args` inside the namespace, and in a mount namespace
        of its own where /etc/resolv.conf and /etc/hosts point at loopback only and each
        `binds` source is bind-mounted over its target (mounts made there, e.g. by dockerd,
        vanish with its last process)."""
        mounts = {
            self.etc_dir / "resolv.conf": Path("/etc/resolv.conf"),
            self.etc_dir / "hosts": Path("/etc/hosts"),
            **(binds or {}),
        }
        pairs = [str(p) for src, dst in mounts.items() for p in (src, dst)]
        return [
            "nsenter", f"--net={self.path}", "--",
            "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", _ENTER, "sh", *pairs, "--",
            *[str(a) for a in args],
        ]  # fmt: skip

    def exec_check(self, args: Sequence[str], timeout: float = 20.0) -> str:
        proc = subprocess.run(
            self.argv(args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{self.argv(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def interfaces(self) -> list[str]:
        out = self.exec_check(["ip", "-o", "link", "show"])
        return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines()]

    def routes(self) -> list[str]:
        """Every route of every table (IPv4 and IPv6) inside the namespace."""
        lines: list[str] = []
        for family in ("-4", "-6"):
            out = self.exec_check(["ip", family, "route", "show", "table", "all"])
            lines += [line for line in out.splitlines() if line.strip()]
        return lines

    def assert_isolated(self) -> None:
        """Only `lo`, and every route leads to it: no packet can leave the namespace."""
        assert self.interfaces() == ["lo"], self.interfaces()
        for route in self.routes():
            assert " dev lo" in f" {route} " or route.startswith("local "), route
            assert "via" not in route.split(), route

    def forward(self, port: int, target_port: int | None = None) -> Bridge:
        """Make HOST:target_port of this namespace reachable as HOST:port inside it."""
        listener = listen_in_netns(self.path, port)
        bridge = Bridge(listener, target_port or port).start()
        self.bridges.append(bridge)
        return bridge

    def delete(self) -> None:
        for b in self.bridges:
            with contextlib.suppress(Exception):
                b.stop()
        self.bridges.clear()
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        if self.path.exists():
            _ip("netns", "delete", self.name)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
