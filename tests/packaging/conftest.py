"""Fixtures for the image tests (tests/packaging/test_image.py).

Session-scoped:
  podman       Podman: podman (and podman-compose) on a containers storage, a network
               config dir and a tmp dir of the session's own (the system's are never
               touched), with this machine's open-files limit for the containers
  image        BuiltImage: packaging/build-image.sh run once into a private buildah storage,
               its docker-archive then `podman load`ed (the user's path)
  upstream     UpstreamRegistry: docker-registry on 127.0.0.1 holding test/small:v1
  containerd   a private containerd (tests/support/clients.Containerd)

Every container runs with `--network host`: the mirror inside listens on a free 127.0.0.1
port and reaches the upstream on another, so no traffic leaves loopback (podman's default
bridge would put the container on a private range).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import oci
from tests.support.clients import Containerd, Result, UpstreamRegistry, run
from tests.support.registry import HOST, Registry, env_without_proxies, free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "packaging" / "build-image.sh"
IMAGE_NAME = "localhost/registry-mirror-test"
BUILD_TIMEOUT = 900.0
SMALL_LAYERS = (64 * 1024, 300 * 1024)


def _missing_tools() -> list[str]:
    return [t for t in ("podman", "buildah", "mmdebstrap", "skopeo") if shutil.which(t) is None]


def run_env(
    argv: Sequence[str | Path], env: dict[str, str], timeout: float, check: bool = True,
    cwd: Path | None = None,
) -> Result:
    return run(argv, timeout, check, env=env, cwd=cwd)


class Podman:
    """podman with a storage, network config and tmp dir under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        storage = workdir / "storage"
        (workdir / "networks").mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.storage_conf = workdir / "storage.conf"
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{storage / "root"}"\n'
            f'runroot = "{storage / "run"}"\n'
        )
        # The containers get this process's open-files limit and a bounded process count:
        # podman's defaults (above this sandbox's hard limits) fail in runc's setrlimit.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.nofile = hard
        self.containers_conf = workdir / "containers.conf"
        self.containers_conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={hard}:{hard}", "nproc=4096:4096"]\n'
            "[engine]\n"
            f'tmp_dir = "{workdir / "tmp"}"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{workdir / "events.log"}"\n'
            "[network]\n"
            f'network_config_dir = "{workdir / "networks"}"\n'
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = env_without_proxies()
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        env.update(extra)
        return env

    def __call__(
        self, *args: str | Path, timeout: float = 120.0, check: bool = True, **env: str
    ) -> Result:
        return run_env(["podman", *args], self.env(**env), timeout, check)

    def exit_code(self, name: str) -> int:
        return int(self("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip())

    def running(self, name: str) -> bool:
        res = self("inspect", name, "--format", "{{.State.Running}}", check=False)
        return res.returncode == 0 and res.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        res = self("logs", name, check=False)
        return res.stdout + res.stderr

    def cleanup(self) -> None:
        self("rm", "--all", "--force", "--volumes", "--time", "5", check=False, timeout=120)
        self("volume", "prune", "--force", check=False)
        self("rmi", "--all", "--force", check=False, timeout=120)


@dataclass(frozen=True)
class BuiltImage:
    ref: str  # localhost/registry-mirror-test:<tag>
    version: str  # the wheel's version (the label and `mirror --version`)
    revision: str  # the commit built
    archive: Path
    build_seconds: float


@dataclass
class MirrorContainer:
    """A mirror container on 127.0.0.1:port, `--network host`."""

    podman: Podman
    name: str
    port: int
    started: float  # time.monotonic() just before `podman run`

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll /healthz until 200; the seconds from `podman run` to that answer."""
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as c:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if c.get(f"{self.url}/healthz").status_code == 200:
                        return time.monotonic() - self.started
                if not self.podman.running(self.name):
                    raise AssertionError(
                        f"container {self.name} exited ({self.podman.exit_code(self.name)}):\n"
                        f"{self.podman.logs(self.name)[-4000:]}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.name} not ready after {timeout}s:\n"
                        f"{self.podman.logs(self.name)[-4000:]}"
                    )
                time.sleep(0.05)


def mirror_config(port: int, upstream_url: str, name: str = "blackhole.invalid") -> str:
    return (
        "[server]\n"
        f'listen = "{HOST}:{port}"\n'
        "workers = 2\n"
        "[cache]\n"
        'dir = "/var/cache/mirror"\n'
        "[[upstream]]\n"
        f'name = "{name}"\n'
        f'url = "{upstream_url}"\n'
    )


def run_mirror(
    podman: Podman, image: BuiltImage, config: Path, name: str, port: int,
    read_only: bool = False,
) -> MirrorContainer:
    """read_only: the root filesystem read-only, /tmp and /run tmpfs (podman's --read-only),
    as deploy/kubernetes runs it (readOnlyRootFilesystem, an emptyDir on /tmp)."""
    started = time.monotonic()
    podman(
        "run", "--detach", "--name", name, "--network", "host",
        *(["--read-only"] if read_only else []),
        "--volume", f"{config}:/etc/mirror/mirror.toml:ro", image.ref,
    )
    return MirrorContainer(podman, name, port, started)


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if os.geteuid() != 0:
        pytest.skip("the image is built and run as root (mmdebstrap --mode=root, podman)")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (bash tests/install-system-deps.sh)")
    p = Podman(tmp_path_factory.mktemp("podman"))
    yield p
    p.cleanup()


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory, podman: Podman) -> BuiltImage:
    """packaging/build-image.sh, once per session, into a directory of this run's own (its
    wheels and rootfs caches are keyed by a hash of their inputs, within the run).
    MIRROR_TEST_IMAGE_BUILD=DIR keeps that directory across runs (while iterating on the
    tests: an unchanged HEAD then rebuilds only the image from the cached rootfs)."""
    reuse = os.environ.get("MIRROR_TEST_IMAGE_BUILD")  # iterating on these tests: an OUT
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("image-build")
    env = env_without_proxies()
    env.update(OUT=str(out), STORAGE_ROOT=str(out / "buildah"), IMAGE=IMAGE_NAME)
    t0 = time.monotonic()
    res = run_env(["bash", BUILD_SCRIPT], env, BUILD_TIMEOUT, cwd=ROOT)
    seconds = time.monotonic() - t0
    ref = res.stdout.strip().splitlines()[-1]
    assert ref.startswith(IMAGE_NAME + ":"), res.stdout
    archives = list(out.glob("registry-mirror-*.tar"))
    assert len(archives) == 1, archives
    wheel = next((out / "dist").glob("registry_mirror-*.whl"))
    version = wheel.name.split("-")[1]
    revision = run_env(["git", "-C", ROOT, "rev-parse", "HEAD"], env, 30).stdout.strip()
    loaded = podman("load", "--input", archives[0], timeout=300)
    assert ref in loaded.stdout + loaded.stderr, loaded.stdout + loaded.stderr
    # The build's own storage is not needed once the archive is loaded.
    run_env(["buildah", "--root", out / "buildah" / "root", "--runroot", out / "buildah" / "run",
             "rmi", "--all", "--force"], env, 120, check=False)
    return BuiltImage(ref, version, _revision(res.stderr) or revision, archives[0], seconds)


def _revision(build_log: str) -> str | None:
    m = re.search(r"\(revision ([0-9a-f]{40})\)", build_log)
    return m.group(1) if m else None


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[oci.OCILayout, oci.Image]:
    layout = oci.OCILayout(tmp_path_factory.mktemp("layout"))
    img = oci.build_image(layout.blobs_dir, SMALL_LAYERS, labels={"image": "small"})
    layout.add(img, "small")
    layout.write_index()
    return layout, img


@pytest.fixture(scope="session")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, small_image: tuple[oci.OCILayout, oci.Image]
) -> Iterator[UpstreamRegistry]:
    reg = Registry(tmp_path_factory.mktemp("upstream")).start()
    up = UpstreamRegistry(reg)
    try:
        layout, img = small_image
        up.push(layout, "small", img, "test/small", "v1")
        yield up
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    ctd = Containerd(tmp_path_factory.mktemp("ctd")).start()
    yield ctd
    ctd.stop()


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()
