"""The `container` group (issue 17's figures): the mirror running in its own OCI image
(`make image`) under podman with host networking, against the same mirror as a bare
process from .venv, both up at once and measured interleaved (best of 3 rounds, 2 with
--quick): the `warm` group's blob rows, the `manifest` group's wrk rows, and the cold start
from process/container start to the first 200 of /readyz.

The image: MIRROR_BENCH_IMAGE if set, else localhost/registry-mirror:latest from the
system's containers storage (what `make image` commits), else packaging/build-image.sh is
run (as `make image` does). The container gets the cache as a bind mount of a host
directory (what an operator mounts; the image's VOLUME otherwise gives an anonymous volume,
also a plain host directory, never the overlay root) and this process's open-files limit."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .fetch import MANIFEST_ACCEPT, http_get
from .harness import REPO_ROOT, Proc, log
from .report import Row
from .scenarios import Ctx, _fetch_ok, measure_once, run_wrk
from .servers import Server, free_port

DEFAULT_IMAGE = "localhost/registry-mirror:latest"
READY_TIMEOUT = 60.0
MIRROR_UID = 10001  # the image's user `mirror`


def _podman(*args: str, timeout: float = 120.0, check: bool = True) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr.strip()[-1500:]}")
    return res.stdout


def find_image() -> str:
    """The image to measure; built by packaging/build-image.sh when there is none."""
    ref = os.environ.get("MIRROR_BENCH_IMAGE", DEFAULT_IMAGE)
    if subprocess.run(["podman", "image", "exists", ref], timeout=60).returncode == 0:
        return ref
    if ref != DEFAULT_IMAGE:
        raise RuntimeError(f"MIRROR_BENCH_IMAGE={ref} is not in podman's storage "
                           "(podman load -i build/image/registry-mirror-*.tar)")
    log(f"{ref} not found: building it (packaging/build-image.sh, a few minutes)")
    subprocess.run(["bash", str(REPO_ROOT / "packaging" / "build-image.sh")], check=True,
                   timeout=1800, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return ref


class Instance(Server):
    """One mirror, bare (`python -m mirror serve`) or in the image (`podman run`), with an
    empty cache; `started` is time.monotonic() just before its process was spawned."""

    def __init__(self, workdir: Path, name: str, upstream: str, workers: int,
                 image: str | None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / f"{name}-cache"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        port = free_port()
        cfg = workdir / f"{name}.toml"
        inner_cache = "/var/cache/mirror" if image else str(cache)
        cfg.write_text(_config(port, inner_cache, upstream, workers))
        self.base = f"http://127.0.0.1:{port}"
        self.name = name
        self.container = name if image else None
        self.scratch = cache
        log_path = workdir / f"{name}.log"
        if image:
            os.chown(cache, MIRROR_UID, MIRROR_UID)
            argv = _podman_run(name, image, cfg, cache)
            env = None
        else:
            argv = [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "mirror", "serve",
                    "--config", str(cfg)]
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.started = time.monotonic()
        self.proc = Proc(name, argv, log_path=log_path, cwd=REPO_ROOT, env=env)
        self.ready_s = self._wait_ready()
        if workers > 1:
            _wait_log(self.proc, "all workers listening")

    def _wait_ready(self) -> float:
        """Poll /readyz every 20 ms; seconds from the spawn to its first 200."""
        deadline = self.started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.popen.returncode}):\n"
                                   f"{self.proc.tail()}")
            with contextlib.suppress(OSError, urllib.error.HTTPError), \
                    urllib.request.urlopen(self.base + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: /readyz not 200 after {READY_TIMEOUT}s:\n"
                           f"{self.proc.tail()}")

    def stop(self) -> None:
        super().stop()  # SIGTERM to `podman run`, which forwards it (--sig-proxy)
        if self.container:
            _podman("rm", "--force", "--time", "5", self.container, check=False)


def _config(port: int, cache: str, upstream: str, workers: int) -> str:
    """The configuration benchmarks.servers.Mirror writes."""
    hostport = upstream.split("://", 1)[1].rstrip("/")
    return (f'[server]\nlisten = "127.0.0.1:{port}"\nworkers = {workers}\n\n'
            f'[cache]\ndir = "{cache}"\nmax_size = "100GiB"\ntag_ttl = "60s"\n'
            f'prefetch = true\n\n[[upstream]]\nname = "{hostport}"\nurl = "{upstream}"\n')


def _podman_run(name: str, image: str, cfg: Path, cache: Path) -> list[str]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ["podman", "run", "--rm", "--name", name, "--network", "host",
            # podman's default limits are above this sandbox's hard ones (runc fails)
            "--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=4096:4096",
            "--volume", f"{cfg}:/etc/mirror/mirror.toml:ro",
            "--volume", f"{cache}:/var/cache/mirror", image]


def _wait_log(proc: Proc, text: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while text not in proc.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline or not proc.alive():
            raise RuntimeError(f"{proc.name} never logged {text!r}:\n{proc.tail()}")
        time.sleep(0.05)


def bench_container(ctx: Ctx) -> None:
    if shutil.which("podman") is None:
        raise RuntimeError("podman is not installed (bash tests/install-system-deps.sh)")
    image = find_image()
    log(f"container image {image}")
    rounds = 2 if ctx.opts.quick else 3
    for w in ctx.opts.workers:
        with contextlib.ExitStack() as es:
            pair = {who: es.enter_context(_instance(ctx, who, w, img))
                    for who, img in (("bare", None), ("container", image))}
            _cold_rows(ctx, pair, w)
            _warm_rows(ctx, pair, w, rounds)
            _manifest_rows(ctx, pair, w, rounds)


@contextlib.contextmanager
def _instance(ctx: Ctx, who: str, workers: int, image: str | None) -> Iterator[Instance]:
    ctx.upstream  # noqa: B018 - started before the clock of the cold start runs
    inst = Instance(ctx.root / "container", f"mirror-{who}-w{workers}-{time.monotonic_ns()}",
                    ctx.upstream.base, workers, image)
    try:
        yield inst
    finally:
        if not inst.proc.alive():
            ctx.problem(f"{who} mirror w={workers} died:\n{inst.proc.tail()}")
        inst.stop()


def _cold_rows(ctx: Ctx, pair: dict[str, Instance], w: int) -> None:
    bare, cont = pair["bare"].ready_s, pair["container"].ready_s
    log(f"cold start to /readyz w={w}: bare {bare:.2f} s, container {cont:.2f} s")
    ctx.rows.append(Row("container", "cold start to /readyz 200", "s", cont, "bare process",
                        bare, w, None, "spawn (podman run / python) to the first 200"))


def _interleaved(rounds: int, pair: dict[str, Instance],
                 measure: Callable[[Instance], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {who: [] for who in pair}
    for _ in range(rounds):
        for who, inst in pair.items():
            runs[who].append(measure(inst))
    return runs


def _warm_rows(ctx: Ctx, pair: dict[str, Instance], w: int, rounds: int) -> None:
    sizes = [("100 MB", 100 * 1_000_000), ("1 GB", 1_000_000_000)]
    if ctx.opts.quick:
        sizes = [("32 MB", 32 * 1_000_000), ("256 MB", 256 * 1_000_000)]
    for label, size in sizes:
        blob = ctx.blob(f"warm-{label.replace(' ', '')}", size, "bench/warm")
        path = f"/v2/bench/warm/blobs/{blob.digest}"
        if not all(_fetch_ok(ctx, f"{who} w={w} warm-up", inst.base + path, blob)
                   and _fetch_ok(ctx, f"{who} w={w} warm hit", inst.base + path, blob)
                   for who, inst in pair.items()):
            continue
        for n in (1, 8):
            runs = _interleaved(rounds, pair, lambda i, n=n, blob=blob, path=path:  # type: ignore[misc]
                                measure_once(i.base + path, blob.size, n, ctx.opts.quick))
            best = {who: max(r["gbps"] for r in rs) for who, rs in runs.items()}
            log(f"container warm {label} x{n} w={w}: " + ", ".join(
                f"{who} {best[who]:.2f} GB/s {[round(r['gbps'], 2) for r in rs]}"
                for who, rs in runs.items()))
            for who, rs in runs.items():
                errors = [e for r in rs for e in r["errors"]]
                if errors:
                    ctx.problem(f"{who} w={w} warm GET {label} x{n}: {errors[:3]}")
            ctx.rows.append(Row(
                "container", f"warm blob {label}, {n} client{'s' if n > 1 else ''}", "GB/s",
                best["container"], "bare process", best["bare"], w, ("ratio>=", 0.9), "",
                {who: [round(r["gbps"], 3) for r in rs] for who, rs in runs.items()}))


def _manifest_rows(ctx: Ctx, pair: dict[str, Instance], w: int, rounds: int) -> None:
    image = ctx.app_image()
    secs = 3 if ctx.opts.quick else ctx.opts.wrk_seconds
    for label, ref in (("by digest", image.digest), ("by tag", image.tag)):
        path = f"/v2/{image.repo}/manifests/{ref}"
        for who, inst in pair.items():  # the first GET fills the cache
            r0, body = http_get(inst.base + path, headers={"Accept": MANIFEST_ACCEPT},
                                keep_body=True)
            if r0.error or body != image.manifest:
                raise RuntimeError(f"{who} w={w}: GET {path} -> {r0.status} {r0.error}")
        runs = _interleaved(rounds, pair, lambda i, path=path:  # type: ignore[misc]
                            run_wrk(i.base + path, secs))
        for who, rs in runs.items():
            if any(r["non2xx"] or r["socket_errors"] or r["rps"] is None for r in rs):
                ctx.problem(f"{who} w={w} wrk {label}: non-2xx or socket errors "
                            f"{[(r['non2xx'], r['socket_errors']) for r in rs]}")
        best = {who: max((r for r in rs if r["rps"]), key=lambda r: r["rps"], default=None)
                for who, rs in runs.items()}
        log(f"container manifest {label} w={w}: " + ", ".join(
            f"{who} {[r['rps'] for r in rs]} req/s" for who, rs in runs.items()))
        b, c = best["bare"], best["container"]
        ctx.rows.append(Row("container", f"manifest {label}, 64 conns", "req/s",
                            c["rps"] if c else None, "bare process", b["rps"] if b else None,
                            w, ("ratio>=", 0.9), "",
                            {who: [r["rps"] for r in rs] for who, rs in runs.items()}))
        ctx.rows.append(Row("container", f"manifest {label}, p99 latency", "ms",
                            c["p99_ms"] if c else None, "bare process",
                            b["p99_ms"] if b else None, w, None, "p99 of the best req/s run"))
