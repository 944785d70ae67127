"""Running the server: start-up housekeeping, worker processes, signals, systemd notification.

`[server] workers = 1`: this process serves. `workers = N > 1`: this process supervises N
forked workers, each with its own uvloop event loop and its own listening socket on the same
port (SO_REUSEPORT: the kernel spreads connections over them), all sharing the cache dir
(single-flight across processes goes through flocks on tmp/*.partial, see pull/downloads.py).
The supervisor cleans tmp/ once before forking, tells systemd READY=1 when every worker
listens, forwards SIGTERM/SIGINT (stop) and SIGHUP (reload the configuration and the TLS
certificate), and restarts a worker that dies. A worker dies with its supervisor
(PR_SET_PDEATHSIG), so a supervisor killed with -9 leaves nothing serving.

One instance per cache dir: `serve` holds a flock on locks/serve.lock for its whole life (its
workers share the open file, so the lock outlives a killed supervisor until its last worker is
gone); a second `serve` on the same dir refuses to start. The listen address is tried before
anything starts, so a busy port is one line and exit status 1 (with SO_REUSEPORT the kernel
would otherwise let a second same-user mirror share the port).

Metrics with several workers: PROMETHEUS_MULTIPROC_DIR is pointed at a fresh directory before
prometheus_client is first imported (so mirror.server is imported lazily here).

Connections go through connections.py: a deadline on receiving a request's headers, the
keep-alive idle timeout, and bounds per worker and per client address (`[server]` keys).

Stopping (SIGTERM): the listening socket closes, downloads in flight get `shutdown_timeout`
to finish, the rest are cancelled and their partial files removed (ops.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import os
import selectors
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvloop

from mirror.cache import cachedir
from mirror.config import Config, shutdown_timeout
from mirror.logs import ACCESS_LOG, setup_logging
from mirror.process import tls
from mirror.process.notify import notify

log = logging.getLogger("mirror")

RESTART_BACKOFF = 1.0  # seconds between restarts of a worker that keeps dying
LISTEN_FAILED = 3  # a worker's exit status when it could not bind the listen address
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RUNTIME_DIR_ENV = "MIRROR_RUNTIME_DIR"  # also read by activity.py


class ListenError(Exception):
    """The listen address cannot be bound; the message names it and why."""


def listen_address(config: Config) -> str:
    host = config.server.host
    return f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"


def _listen_error(config: Config, exc: OSError) -> ListenError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process listens there: stop it, or change [server] listen)"
    return ListenError(f"cannot listen on {listen_address(config)}: {reason}")


def check_listen(config: Config) -> None:
    """Bind each address once without SO_REUSEPORT: fails while anything listens there, even
    a same-user process that would let our SO_REUSEPORT sockets join it."""
    try:
        infos = socket.getaddrinfo(config.server.host, config.server.port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise _listen_error(config, exc) from None


def serve(config: Config) -> NoReturn:
    """Serves until stopped, then exits the process with the status."""
    _exit(_serve(config))


def _exit(code: int) -> NoReturn:
    """Exits without the interpreter's teardown: everything is closed by now, and tearing
    down the modules (a garbage collection over them) costs a fifth of a second of CPU on
    each stop. os._exit skips atexit, so the logs are flushed here."""
    ACCESS_LOG.flush()
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _serve(config: Config) -> int:
    setup_logging()
    workers = config.server.workers
    if config.server.tls_cert and config.server.tls_key:
        try:
            tls.server_context(config.server.tls_cert, config.server.tls_key)
        except tls.TLSError as exc:
            print(f"mirror: {config.path}: server.tls_cert: {exc}", file=sys.stderr)
            return 2
    claim = cachedir.claim(config.cache.dir)
    if not claim.held:
        print(f"mirror: serve: another mirror is already serving from {config.cache.dir} (it "
              f"holds {claim.lock}): stop it first, or give this one another [cache] dir",
              file=sys.stderr)
        return 1
    if claim.problem is not None:
        log.warning("cannot take the instance lock: a second mirror on this cache dir would not "
                    "be noticed", extra={"lock": str(claim.lock), "error": claim.problem})
    try:
        check_listen(config)
    except ListenError as exc:
        print(f"mirror: serve: {exc}", file=sys.stderr)
        return 1
    metrics_dir = _prepare_runtime_dir() if workers > 1 else None
    removed = cachedir.clean_temporaries(config.cache.dir)
    scheme = "https" if config.server.tls_cert else "http"
    log.info("starting", extra={
        "listen": f"{scheme}://{config.server.host}:{config.server.port}",
        "cache_dir": str(config.cache.dir), "workers": workers,
        "upstreams": [u.name for u in config.upstreams], "temporaries_removed": removed,
        "max_connections": config.server.max_connections,
        "header_timeout": config.server.header_timeout,
        "keepalive_timeout": config.server.keepalive_timeout})
    default = config.upstreams[0]
    log.info("names without a registry (e.g. /v2/library/nginx/...) go to the default "
             "upstream, the first [[upstream]]", extra={
                 "default_upstream": default.name, "url": default.url})
    try:
        if workers == 1:
            return run_worker(config, reuse_port=False, on_ready=_notify_ready(config),
                              on_stopping=lambda: notify("STOPPING=1"))
        return Supervisor(config, workers).run()
    except ListenError as exc:  # the port was taken between the check and the bind
        print(f"mirror: serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _notify_ready(config: Config) -> Callable[[], None]:
    def ready() -> None:
        notify("READY=1", f"STATUS=serving on {config.server.host}:{config.server.port} "
                          f"with {config.server.workers} worker(s)")
    return ready


def _prepare_runtime_dir() -> Path:
    """A fresh directory for the workers' metric files and shared status (systemd's
    RuntimeDirectory= when set, else a temporary one)."""
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before the worker set-up: metrics will "
                    "only show the worker that answers a scrape")
    base = os.environ.get("RUNTIME_DIRECTORY")
    if base:
        directory = Path(base.split(":")[0]) / "workers"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix="mirror-"))
    (directory / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory / "metrics")
    os.environ[RUNTIME_DIR_ENV] = str(directory)
    return directory


# --- one serving process ----------------------------------------------------------------------


def run_worker(config: Config, *, reuse_port: bool, on_ready: Callable[[], object],
               on_stopping: Callable[[], object]) -> int:
    # uvloop parses HTTP faster; blob bodies bypass its copying sendfile (see zerocopy.py).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_until_stopped(config, reuse_port, on_ready, on_stopping))
    return 0


async def _serve_until_stopped(config: Config, reuse_port: bool, on_ready: Callable[[], object],
                               on_stopping: Callable[[], object]) -> None:
    from aiohttp import web

    from mirror.http.app import build_app
    from mirror.http.connections import GuardedRunner, Limits, fit_file_limit

    ssl_context = None
    cert, key = config.server.tls_cert, config.server.tls_key
    if cert and key:
        ssl_context = tls.server_context(cert, key)
    runner = GuardedRunner(build_app(config), fit_file_limit(Limits.of(config.server)),
                           access_log=None, shutdown_timeout=shutdown_timeout(config))
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context,
                       reuse_port=reuse_port or None, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(_reload(runner.app, ssl_context))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        try:
            await site.start()
        except OSError as exc:
            raise _listen_error(config, exc) from None
        on_ready()
        await stop.wait()
        log.info("stopping", extra={"pid": os.getpid()})
        on_stopping()
    finally:
        await runner.cleanup()
    log.info("stopped", extra={"pid": os.getpid()})


async def _reload(app: Any, ssl_context: ssl.SSLContext | None) -> None:
    """SIGHUP: the configuration file again (runtime.Mirror.reload: a bad one is refused
    whole), then the certificate files it names, loaded into the live context."""
    from mirror.http.keys import MIRROR

    mirror = app.get(MIRROR)
    if mirror is not None:
        await mirror.reload()
    server = mirror.config.server if mirror is not None else None
    if ssl_context is not None and server is not None and server.tls_cert and server.tls_key:
        tls.reload(ssl_context, server.tls_cert, server.tls_key)


# --- the supervisor of several ----------------------------------------------------------------


def _preload(config: Config) -> None:
    """What every worker would load for itself, loaded once before the forks so that the
    workers share its pages: the HTTP stack and, with [s3], botocore's parsed S3 data. The
    mirror's own modules are left to the workers: importing them creates prometheus values,
    which would give the supervisor files of its own in the multiprocess directory.
    gc.freeze(): a collection in a worker would otherwise write to every object's header
    and so copy the pages."""
    import aiohttp.web  # noqa: F401

    if config.s3 is not None:
        from mirror.tiers.s3client import preload
        try:
            preload(config.s3)
        except Exception as exc:  # each worker opens its own and reports what is wrong
            log.info("S3 client not preloaded: each worker loads its own", extra={
                "error": str(exc) or type(exc).__name__})
    gc.freeze()


class Supervisor:
    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.workers: dict[int, int] = {}  # pid -> slot
        self.started_at: dict[int, float] = {}  # slot -> when its current worker started
        self.stopping = False
        self.signals: list[int] = []
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        # A signal wakes the loop at once (select() is retried after a handler runs, so
        # without a byte to read it would sleep its whole timeout); SIGCHLD included, so a
        # worker's death is seen when it happens.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.ready_r, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)
        with contextlib.suppress(BlockingIOError):  # full: the loop is awake anyway
            os.write(self.wake_w, b"s")

    def _wait(self, timeout: float) -> int:
        """Sleeps until a signal, a worker's ready byte or `timeout`; the ready bytes read."""
        ready = 0
        for key, _events in self.selector.select(timeout=timeout):
            with contextlib.suppress(BlockingIOError):
                got = len(os.read(key.fd, 64))
                ready += got if key.fd == self.ready_r else 0
        return ready

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        _preload(self.config)
        for slot in range(self.count):
            self._spawn(slot)
        status = self._supervise()
        self._stop_all()
        return status

    def _spawn(self, slot: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                _die_with(supervisor)
                self.selector.close()
                for fd in (self.ready_r, self.wake_r, self.wake_w):
                    os.close(fd)
                code = run_worker(self.config, reuse_port=True,
                                  on_ready=lambda: os.write(self.ready_w, b"r"),
                                  on_stopping=lambda: None)
            except ListenError as exc:
                log.error("worker cannot listen", extra={"pid": os.getpid(), "error": str(exc)})
                code = LISTEN_FAILED
            except BaseException:
                log.exception("worker failed", extra={"pid": os.getpid()})
            finally:
                _exit(code)
        self.workers[pid] = slot
        self.started_at[slot] = time.monotonic()
        log.info("worker started", extra={"pid": pid, "slot": slot})

    def _supervise(self) -> int:
        ready = 0
        while True:
            got = self._wait(0.2)
            ready += got
            if got and ready == self.count:
                _notify_ready(self.config)()
                log.info("all workers listening", extra={"workers": self.count})
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: forwarding to the workers")
                    self._signal_all(signal.SIGHUP)
                else:
                    notify("STOPPING=1")
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    return 0
            dead = self._reap()
            slots = [self.workers.pop(pid) for pid, _code in dead]  # before any return
            for pid, _code in dead:
                _mark_dead(pid)
            for (pid, code), slot in zip(dead, slots, strict=True):
                if code == LISTEN_FAILED:
                    print(f"mirror: serve: cannot listen on {listen_address(self.config)}: a "
                          "worker could not bind it (the log says why)", file=sys.stderr)
                    return 1
                if ready < self.count:
                    log.error("a worker failed to start: giving up",
                              extra={"pid": pid, "status": code})
                    return 1
                log.error("worker died: restarting it", extra={"pid": pid, "status": code})
                since = time.monotonic() - self.started_at.get(slot, 0.0)
                if since < RESTART_BACKOFF:
                    time.sleep(RESTART_BACKOFF - since)
                self._spawn(slot)

    def _reap(self) -> list[tuple[int, int]]:
        dead = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.workers:
                dead.append((pid, os.waitstatus_to_exitcode(status)))
        return dead

    def _signal_all(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 2 * shutdown_timeout(self.config) + 5
        while self.workers and time.monotonic() < deadline:
            for pid, _code in self._reap():  # not marked dead: serve() removes their files
                self.workers.pop(pid, None)
            if self.signals:  # asked again while stopping: don't wait any longer
                self.signals.clear()
                break
            self._wait(0.05)
        if self.workers:
            log.error("workers did not stop in time: killing them",
                      extra={"pids": list(self.workers)})
            self._signal_all(signal.SIGKILL)
            for pid in list(self.workers):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        log.info("stopped")


def _die_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (its graceful stop) when the supervisor dies,
    even by SIGKILL. Linux only; elsewhere the worker outlives a killed supervisor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: this worker will outlive a killed "
                        "supervisor", extra={"errno": ctypes.get_errno()})
    if os.getppid() != supervisor:  # it died before the prctl took effect
        os._exit(0)


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
