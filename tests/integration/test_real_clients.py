"""podman and the Docker daemon pull through the mirror, and what they store is byte for
byte what was pushed upstream.

Both clients run inside a network namespace made by the test (see `_netns.py`): only `lo`,
no route anywhere else, resolv.conf naming 127.0.0.1. The mirror itself runs in the test's
namespace and is bridged into it on the same 127.0.0.1 port. So even dockerd's fallback to
Docker Hub (it retries there whenever a mirror fails) ends at a closed loopback port.

podman: pulls `<blackhole>/repo:tag` with the mirror as the registry's `[[registry.mirror]]`
(the blackhole is a closed port, inside the namespace too: only the mirror path works).
Checked: the image ID is the pushed config's digest, the manifest (and list/index) bytes
kept in containers/storage are the pushed bytes, and `podman save --uncompressed` gives
back every layer's exact uncompressed bytes. Also a partial pull (overlay driver,
zstd:chunked layer fetched by a Range request for its table of contents, then one request
with many ranges) cold and warm, checked file by file.

dockerd: uses registry mirrors for Docker Hub images only, so the mirror's first upstream is
named `docker.io` and `docker pull test/small:v1` asks it for /v2/test/small/manifests/v1.
Checked: RepoDigests and ID, the manifest bytes in dockerd's content store, the layer
digests dockerd recorded for each diff ID, and the layers and config from `docker save`.
Also: `docker pull busybox` goes to library/busybox; a layer download reset mid-blob (by
the bridge) is resumed with a Range request the mirror answers 206; and a tag the mirror
does not have sends dockerd to Docker Hub, which inside the namespace ends at 127.0.0.1:53.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration._netns import NetNS
from tests.support import oci
from tests.support.clients import Result, UpstreamRegistry, write_registries_conf
from tests.support.clients import run as clients_run
from tests.support.mirror import MirrorProcess, Upstream
from tests.support.registry import ClosedPort, Registry, env_without_proxies, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.root]

PODMAN_BIN = "podman"
SYSTEM_BLOB_INFO_CACHE = Path("/var/lib/containers/cache")
DOCKERD_BIN = "dockerd"
MB = 1 << 20
# The CLI of the docker.io package (same version as its dockerd) before any other on PATH.
DOCKER_CLI_CANDIDATES = ("/usr/bin/docker", "docker")


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (see tests/install-system-deps.sh)")
    return path


def _docker_cli() -> str:
    for cand in DOCKER_CLI_CANDIDATES:
        path = shutil.which(cand)
        if path:
            return path
    raise RuntimeError("the docker CLI is not installed (see tests/install-system-deps.sh)")


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _client_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no proxies, HOME and TMPDIR of the test's own."""
    env = {
        k: v
        for k, v in env_without_proxies().items()
        if k in ("PATH", "LANG", "LC_ALL", "TERM")
    }
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["TMPDIR"] = str(home)
    env.update(extra)
    return env


def run_cmd(argv: Sequence[str], env: dict[str, str], timeout: float, check: bool = True) -> Result:
    return clients_run(argv, timeout, check, env=env)


# --- what was pushed --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A pushed tag and the platform a client pulls from it."""

    repo: str
    attr: str  # ImageSet attribute
    arch: str = "amd64"

    def artifact(self, images: oci.ImageSet) -> oci.Image | oci.ImageIndex:
        art: oci.Image | oci.ImageIndex = getattr(images, self.attr)
        return art

    def image(self, images: oci.ImageSet) -> oci.Image:
        art = self.artifact(images)
        return art.image_for(self.arch) if isinstance(art, oci.ImageIndex) else art


CASES = [
    Case("test/small", "small"),  # OCI manifest, uncompressed tar layers
    Case("test/docker", "docker"),  # Docker schema 2, gzip layers
    Case("test/dockerlist", "docker_list", "amd64"),  # Docker manifest list
    Case("test/dockerlist", "docker_list", "arm64"),
    Case("test/multi", "multi", "amd64"),  # OCI image index
    Case("test/multi", "multi", "arm64"),
]


def case_id(c: Case) -> str:
    return f"{c.repo.split('/')[-1]}-{c.arch}"


def uncompressed_layer(blob: oci.Blob) -> bytes:
    """The tar stream a client stores for a pushed layer (gunzipped if it was gzip)."""
    data = blob.read()
    return gzip.decompress(data) if blob.media_type.endswith("gzip") else data


def diff_ids(image: oci.Image) -> list[str]:
    config = json.loads(image.config.read())
    ids: list[str] = config["rootfs"]["diff_ids"]
    return ids


def assert_pulled_through_mirror(
    mirror: MirrorProcess, repo: str, tag: str, artifact: oci.Image | oci.ImageIndex,
    image: oci.Image,
) -> None:
    """The mirror's request log shows the tag resolved and the manifest(s) and every blob
    of `image` served with 200 under `repo`."""
    prefix = f"/v2/{repo}/"

    def served(log: list[dict[str, Any]], suffix: str, methods: tuple[str, ...]) -> bool:
        return any(
            str(e["path"]).split("?", 1)[0] == prefix + suffix
            and e["method"] in methods
            and e["status"] == 200
            for e in log
        )

    wanted: list[tuple[str, tuple[str, ...]]] = [(f"manifests/{tag}", ("GET", "HEAD"))]
    if isinstance(artifact, oci.ImageIndex):
        wanted.append((f"manifests/{image.manifest.digest}", ("GET",)))
    wanted += [(f"blobs/{b.digest}", ("GET",)) for b in image.blobs]
    log = mirror.wait_log(
        lambda log: all(served(log, s, m) for s, m in wanted),
        timeout=10,
        what=f"the mirror serving {repo}:{tag} ({image.arch})",
    )
    manifest_gets = [
        e for e in log
        if str(e["path"]).startswith(prefix + "manifests/") and e["method"] == "GET"
    ]
    assert manifest_gets, "no manifest GET reached the mirror"


# --- network namespace --------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[NetNS]:
    for tool in ("ip", "nsenter", "unshare", "mount"):
        _which(tool)
    with NetNS.create() as ns:
        ns.assert_isolated()
        yield ns


# --- podman -------------------------------------------------------------------------------


class Podman:
    """podman with its own storage under `workdir`, run inside `ns`. `partial`: the
    overlay driver with partial pulls on (zstd:chunked layers are fetched by ranges);
    otherwise vfs."""

    def __init__(
        self, workdir: Path, ns: NetNS, registries_conf: Path, partial: bool = False
    ) -> None:
        self.workdir = workdir
        self.ns = ns
        self.root = workdir / "root"
        # podman refuses a runroot longer than 50 characters: a short directory of its own.
        self.short = Path(tempfile.mkdtemp(prefix="mrc-podman-", dir="/tmp"))
        self.runroot = self.short / "run"
        self.registries_conf = registries_conf
        self.driver = "overlay" if partial else "vfs"
        self.bin = _which(PODMAN_BIN)
        # containers.conf / storage.conf of our own: nothing from /etc/containers leaks in
        # (the registries.conf is passed explicitly, the default policy.json is used).
        workdir.mkdir(parents=True, exist_ok=True)
        self.containers_conf = workdir / "containers.conf"
        self.containers_conf.write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\n'
        )
        self.storage_conf = workdir / "storage.conf"
        storage = (
            f'[storage]\ndriver = "{self.driver}"\n'
            f'graphroot = "{self.root}"\nrunroot = "{self.runroot}"\n'
        )
        if partial:
            storage += (
                "[storage.options]\npull_options = "
                '{enable_partial_images = "true", use_hard_links = "false", ostree_repos = ""}\n'
            )
        self.storage_conf.write_text(storage)

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> Result:
        # Storage comes from storage.conf only (a --storage-driver flag would drop its
        # pull_options).
        argv = [self.bin, "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args]
        env = _client_env(
            self.workdir / "home",
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
        )
        # c/image's blob info cache (which blobs it saw where, used to skip or reuse
        # blobs) is global for root: give this podman its own, in its mount namespace.
        cache = self.workdir / "blob-info-cache"
        cache.mkdir(exist_ok=True)
        SYSTEM_BLOB_INFO_CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
        return run_cmd(
            self.ns.argv(argv, binds={cache: SYSTEM_BLOB_INFO_CACHE}), env, timeout, check
        )

    def pull(self, ref: str, arch: str) -> Result:
        return self.run("pull", "--arch", arch, ref)

    def inspect(self, ref: str) -> dict[str, Any]:
        out = json.loads(self.run("image", "inspect", ref).stdout)
        assert isinstance(out, list) and len(out) == 1, out
        info: dict[str, Any] = out[0]
        return info

    def big_data(self, image_id: str, key: str) -> bytes:
        """An item containers/storage keeps with an image (the file name is `=` and the
        key in base64), e.g. `manifest-sha256:…` or the config under its digest."""
        name = "=" + base64.b64encode(key.encode()).decode()
        return (self.root / f"{self.driver}-images" / image_id / name).read_bytes()

    def close(self) -> None:
        shutil.rmtree(self.short, ignore_errors=True)

    def save_oci_dir(self, ref: str, out: Path) -> tuple[dict[str, Any], Path]:
        """`podman save --uncompressed --format oci-dir`: layers as stored, uncompressed.
        Returns the saved manifest and the blobs dir (every blob checked against its name)."""
        self.run("save", "--uncompressed", "--format", "oci-dir", "-o", str(out), ref)
        blobs = out / "blobs" / "sha256"
        for p in blobs.iterdir():
            assert _sha256(p.read_bytes()) == f"sha256:{p.name}", f"saved blob {p} is corrupt"
        index = json.loads((out / "index.json").read_text())
        (desc,) = index["manifests"]
        manifest: dict[str, Any] = json.loads((blobs / desc["digest"].split(":", 1)[1]).read_text())
        return manifest, blobs


@pytest.fixture
def podman_ns(netns: NetNS, mirror: MirrorProcess) -> NetNS:
    """The namespace with the mirror bridged in at its own 127.0.0.1 port."""
    netns.forward(mirror.port)
    return netns


PodmanFactory = Callable[[str], Podman]


@pytest.fixture
def new_podman(
    tmp_path: Path, podman_ns: NetNS, blackhole: ClosedPort, mirror: MirrorProcess
) -> Iterator[PodmanFactory]:
    """new_podman(name): a podman with empty storage whose registries.conf sends
    `blackhole.host` through `mirror`."""
    made: list[Podman] = []

    def make(name: str) -> Podman:
        conf = write_registries_conf(
            tmp_path / f"{name}-registries.conf", registry=blackhole.host, mirrors=[mirror.host]
        )
        made.append(Podman(tmp_path / name, podman_ns, conf))
        return made[-1]

    yield make
    for p in made:
        p.close()


def check_podman_image(podman: Podman, ref: str, repo: str,
                       artifact: oci.Image | oci.ImageIndex, image: oci.Image,
                       out: Path) -> None:
    info = podman.inspect(ref)
    assert f"sha256:{info['Id']}" == image.config.digest
    assert info["Digest"] == artifact.manifest.digest
    assert f"{ref.rsplit(':', 1)[0]}@{artifact.manifest.digest}" in info["RepoDigests"]
    assert info["Architecture"] == image.arch
    assert info["RootFS"]["Layers"] == diff_ids(image)
    # exact bytes kept in containers/storage
    assert podman.big_data(info["Id"], image.config.digest) == image.config.read()
    assert podman.big_data(info["Id"], f"manifest-{artifact.manifest.digest}") == (
        artifact.manifest_bytes
    )
    if isinstance(artifact, oci.ImageIndex):
        assert podman.big_data(info["Id"], f"manifest-{image.manifest.digest}") == (
            image.manifest_bytes
        )
    # every layer, as podman gives it back (the saved config is converted to OCI for a
    # Docker image: its exact bytes were checked above)
    saved, blobs = podman.save_oci_dir(ref, out)
    assert len(saved["layers"]) == len(image.layers)
    for desc, layer, diff_id in zip(saved["layers"], image.layers, diff_ids(image), strict=True):
        data = (blobs / desc["digest"].split(":", 1)[1]).read_bytes()
        assert desc["digest"] == diff_id, (repo, layer.digest)
        assert data == uncompressed_layer(layer), f"layer {layer.digest} differs"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_podman_pulls_through_mirror_byte_for_byte(
    case: Case, new_podman: PodmanFactory, podman_ns: NetNS, mirror: MirrorProcess,
    blackhole: ClosedPort, test_images: oci.ImageSet, tmp_path: Path,
) -> None:
    artifact, image = case.artifact(test_images), case.image(test_images)
    podman = new_podman("podman")
    ref = f"{blackhole.host}/{case.repo}:v1"
    podman.pull(ref, case.arch)
    check_podman_image(podman, ref, case.repo, artifact, image, tmp_path / "saved")
    assert_pulled_through_mirror(mirror, case.repo, "v1", artifact, image)
    assert podman_ns.bridges[0].connections > 0
    mirror.verify_cache()


@pytest.mark.timeout(180)
def test_podman_second_store_is_served_from_the_cache(
    new_podman: PodmanFactory, mirror: MirrorProcess, blackhole: ClosedPort,
    upstream: UpstreamRegistry, test_images: oci.ImageSet, tmp_path: Path,
) -> None:
    multi = test_images.multi
    image = multi.image_for("amd64")
    ref = f"{blackhole.host}/test/multi:v1"
    first = new_podman("first")
    first.pull(ref, "amd64")
    mirror.wait_cached([b.digest for b in image.blobs])
    mark = upstream.registry.mark()
    second = new_podman("second")
    second.pull(ref, "amd64")
    check_podman_image(second, ref, "test/multi", multi, image, tmp_path / "saved")
    # no blob went upstream again (the tag may be revalidated, per tag_ttl)
    assert upstream.registry.blob_gets(mark) == {}
    hits = mirror.requests_for(f"/blobs/{image.layers[-1].digest}", "GET")
    assert len(hits) >= 2 and hits[-1]["cache"] == "hit", hits


def write_rootfs_tar(path: Path, files: dict[str, bytes]) -> None:
    """An uncompressed tar of regular files (what `podman import` turns into a layer)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in sorted({n.rsplit("/", 1)[0] for n in files if "/" in n}):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.timeout(240)
def test_podman_partial_pull_of_zstd_chunked_layer(
    mirror_factory: Any, netns: NetNS, blackhole: ClosedPort, tmp_path: Path,
) -> None:
    """podman with partial pulls on fetches a zstd:chunked layer by ranges: one Range
    for the table of contents, then one request with many ranges (the files' chunks).
    Cold (while the mirror downloads the blob) and warm (from the cache)."""
    reg = Registry(tmp_path / "chunked-upstream").start()
    podmans: list[Podman] = []
    try:
        mirror: MirrorProcess = mirror_factory([Upstream(name=blackhole.host, url=reg.url)])
        netns.forward(mirror.port)
        netns.forward(reg.port)  # for the push only
        conf = write_registries_conf(tmp_path / "registries.conf", blackhole.host,
                                     [mirror.host])
        # Files of random bytes, several chunks' worth each, and some small ones.
        files = {f"data/big{i}.bin": os.urandom(300_000 + i) for i in range(4)}
        files |= {f"data/small{i}.txt": os.urandom(500 + 4000 * i) for i in range(3)}
        rootfs = tmp_path / "rootfs.tar"
        write_rootfs_tar(rootfs, files)

        builder = Podman(tmp_path / "builder", netns, conf)
        podmans.append(builder)
        builder.run("import", str(rootfs), "localhost/chunked:v1")
        builder.run("push", "--tls-verify=false", "--compression-format", "zstd:chunked",
                    "localhost/chunked:v1", f"docker://{reg.host}/test/chunked:v1")
        r = httpx.get(f"{reg.url}/v2/test/chunked/manifests/v1", trust_env=False,
                      headers={"Accept": oci.OCI_MANIFEST})
        assert r.status_code == 200, r.text
        manifest_bytes = r.content
        manifest = json.loads(manifest_bytes)
        (layer,) = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd", layer
        assert "io.containers.zstd-chunked.manifest-checksum" in layer["annotations"], layer
        layer_path = f"/v2/test/chunked/blobs/{layer['digest']}"

        ref = f"{blackhole.host}/test/chunked:v1"
        for name in ("cold", "warm"):
            puller = Podman(tmp_path / name, netns, conf, partial=True)
            podmans.append(puller)
            res = puller.run("--log-level", "debug", "pull", ref)
            assert f"Retrieved partial blob {layer['digest']}" in res.stderr, res.stderr[-4000:]
            info = puller.inspect(ref)
            assert f"sha256:{info['Id']}" == manifest["config"]["digest"]
            assert info["Digest"] == _sha256(manifest_bytes)
            assert puller.big_data(info["Id"], f"manifest-{info['Digest']}") == manifest_bytes
            # The files as podman laid them out (podman 4.3 cannot `save` a partially
            # pulled layer: it does not reproduce the tar's digest), read from the overlay
            # layer's directory.
            upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
            got = {
                str(f.relative_to(upper)): f.read_bytes()
                for f in sorted(upper.rglob("*")) if f.is_file()
            }
            assert got.keys() == files.keys()
            for fname, data in files.items():
                assert got[fname] == data, f"{fname} differs after a {name} partial pull"
            ranged = [
                e for e in mirror.requests_for(layer_path, "GET") if e["status"] == 206
            ]
            assert ranged, mirror.requests_for(layer_path)
        assert mirror.requests_for(layer_path, "GET")[-1]["cache"] == "hit"
        mirror.verify_cache()
    finally:
        for pm in podmans:
            pm.close()
        reg.stop()


# --- dockerd ------------------------------------------------------------------------------


class Dockerd:
    """A private dockerd (vfs storage, its own managed containerd) inside `ns`, using
    `mirror_url` as its registry mirror. /etc/docker is replaced, in dockerd's own mount
    namespace, by an empty directory (no daemon.json, certs.d or key.json of the host's)."""

    def __init__(self, workdir: Path, ns: NetNS, mirror_url: str, mirror_host: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ns = ns
        self.mirror_url = mirror_url
        self.mirror_host = mirror_host
        self.data_root = workdir / "data"
        self.etc = workdir / "etc-docker"
        self.etc.mkdir(exist_ok=True)
        (self.etc / "daemon.json").write_text("{}\n")
        self.log_path = workdir / "dockerd.log"
        # Unix socket paths must stay under 108 bytes: exec-root and the API socket live in
        # a short directory of their own.
        self.short = Path(tempfile.mkdtemp(prefix="mrc-dockerd-", dir="/tmp"))
        self.exec_root = self.short / "exec"
        self.sock = self.short / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cli_bin = _docker_cli()
        self.env = _client_env(workdir / "home", DOCKER_CONFIG=str(workdir / "cli-config"),
                               DOCKER_HOST=f"unix://{self.sock}")

    def command(self) -> list[str]:
        return [
            _which(DOCKERD_BIN),
            "--config-file", str(self.etc / "daemon.json"),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.short / "docker.pid"),
            "-H", f"unix://{self.sock}",
            "-G", "root",
            "--registry-mirror", self.mirror_url,
            "--insecure-registry", self.mirror_host,
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false",
            "--storage-driver", "vfs",
            "--log-level", "debug",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> Dockerd:
        etc_docker = Path("/etc/docker")  # the bind mount needs a target
        etc_docker.mkdir(exist_ok=True)
        argv = self.ns.argv(self.command(), binds={self.etc: etc_docker})
        env = _client_env(self.workdir / "home")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            return self.cli("version", timeout=20, check=False).returncode == 0

        wait_until(ready, timeout, interval=0.2, what="dockerd answering `docker version`")
        return self

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> Result:
        """The docker CLI, in the test's namespace: it only talks to the unix socket."""
        return run_cmd([self.cli_bin, "-H", f"unix://{self.sock}", *args], self.env, timeout,
                       check)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    def inspect(self, ref: str) -> dict[str, Any]:
        out = json.loads(self.cli("image", "inspect", ref).stdout)
        assert isinstance(out, list) and len(out) == 1, out
        info: dict[str, Any] = out[0]
        return info

    def content_blob(self, digest: str) -> bytes:
        """A blob in dockerd's containerd content store (it keeps manifests there)."""
        return (
            self.data_root / "containerd" / "daemon" / "io.containerd.content.v1.content"
            / "blobs" / "sha256" / digest.split(":", 1)[1]
        ).read_bytes()

    def v2metadata(self, diff_id: str) -> list[dict[str, Any]]:
        """What dockerd recorded as the registry blobs behind a layer diff ID."""
        path = (
            self.data_root / "image" / "vfs" / "distribution" / "v2metadata-by-diffid"
            / "sha256" / diff_id.split(":", 1)[1]
        )
        meta: list[dict[str, Any]] = json.loads(path.read_text())
        return meta

    def save(self, ref: str, out: Path) -> tuple[bytes, list[bytes]]:
        """`docker save`: the config bytes and the layer tars, in order."""
        archive = out / "image.tar"
        out.mkdir(parents=True, exist_ok=True)
        self.cli("save", "-o", str(archive), ref)
        with tarfile.open(archive) as tar:

            def member(name: str) -> bytes:
                f = tar.extractfile(name)
                assert f is not None, name
                return f.read()

            (entry,) = json.loads(member("manifest.json"))
            return member(entry["Config"]), [member(name) for name in entry["Layers"]]

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            # dockerd's containerd and shims are in the same process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            self.proc = None
        # Its mounts lived in its own mount namespace, gone with it; unmount anything that
        # still shows up here under its directories all the same.
        for mnt in self._mounts_under((self.data_root, self.short)):
            subprocess.run(["umount", "-l", mnt], check=False, timeout=20, capture_output=True)
        shutil.rmtree(self.short, ignore_errors=True)

    @staticmethod
    def _mounts_under(roots: Sequence[Path]) -> list[str]:
        found: list[str] = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                target = line.split()[4]
                if any(target == str(r) or target.startswith(f"{r}/") for r in roots):
                    found.append(target)
        return sorted(found, key=len, reverse=True)


@pytest.fixture
def hub_mirror(mirror_factory: Any, upstream: UpstreamRegistry) -> MirrorProcess:
    """A mirror whose default upstream is named docker.io (dockerd mirrors only that)."""
    m: MirrorProcess = mirror_factory([Upstream(name="docker.io", url=upstream.url)])
    return m


DockerdFactory = Callable[[MirrorProcess], Dockerd]


@pytest.fixture
def dockerd_factory(
    request: pytest.FixtureRequest, netns: NetNS, tmp_path: Path
) -> Iterator[DockerdFactory]:
    """make(mirror): a started dockerd in `netns` using `mirror` (bridged in) as its
    registry mirror; stopped at teardown, its log printed when the test failed."""
    for tool in (DOCKERD_BIN, "containerd", "runc"):
        _which(tool)
    started: list[Dockerd] = []

    def make(mirror: MirrorProcess) -> Dockerd:
        netns.forward(mirror.port)
        d = Dockerd(tmp_path / f"dockerd{len(started)}", netns, mirror.url, mirror.host)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()
        if _failed(request):
            print(f"--- dockerd log ({d.log_path}) ---\n{d.log_tail()}")


@pytest.fixture
def dockerd(dockerd_factory: DockerdFactory, hub_mirror: MirrorProcess) -> Dockerd:
    return dockerd_factory(hub_mirror)


@pytest.fixture
def own_hub(tmp_path: Path) -> Iterator[UpstreamRegistry]:
    """An empty registry of this test's own, to push what it needs."""
    reg = Registry(tmp_path / "hub").start()
    try:
        yield UpstreamRegistry(reg)
    finally:
        reg.stop()


def check_docker_image(d: Dockerd, ref: str, repo: str, artifact: oci.Image | oci.ImageIndex,
                       image: oci.Image, out: Path) -> None:
    """`repo` as on the registry (library/busybox); docker shows it without `library/`."""
    info = d.inspect(ref)
    assert info["Id"] == image.config.digest
    shown = repo.removeprefix("library/")
    assert f"{shown}@{artifact.manifest.digest}" in info["RepoDigests"], info["RepoDigests"]
    assert info["Architecture"] == image.arch
    assert info["RootFS"]["Layers"] == diff_ids(image)
    # the manifest(s) as dockerd stored them
    assert d.content_blob(artifact.manifest.digest) == artifact.manifest_bytes
    if isinstance(artifact, oci.ImageIndex):
        assert d.content_blob(image.manifest.digest) == image.manifest_bytes
    # the registry blob dockerd downloaded for each layer
    for layer, diff_id in zip(image.layers, diff_ids(image), strict=True):
        meta = d.v2metadata(diff_id)
        assert any(
            m["Digest"] == layer.digest and m["SourceRepository"] == f"docker.io/{repo}"
            for m in meta
        ), (layer.digest, meta)
    config, layers = d.save(ref, out)
    assert config == image.config.read()
    assert len(layers) == len(image.layers)
    for data, layer in zip(layers, image.layers, strict=True):
        assert data == uncompressed_layer(layer), f"layer {layer.digest} differs"


DOCKER_CASES = [c for c in CASES if c.arch == "amd64"]  # dockerd pulls its own platform


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", DOCKER_CASES, ids=case_id)
def test_dockerd_pulls_through_mirror_byte_for_byte(
    case: Case, dockerd: Dockerd, hub_mirror: MirrorProcess, test_images: oci.ImageSet,
    tmp_path: Path,
) -> None:
    if os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip(f"dockerd pulls the platform it runs on; the cases are amd64, "
                    f"this machine is {os.uname().machine}")
    artifact, image = case.artifact(test_images), case.image(test_images)
    ref = f"{case.repo}:v1"
    res = dockerd.cli("pull", ref, timeout=180)
    assert f"Digest: {artifact.manifest.digest}" in res.stdout, res.stdout
    check_docker_image(dockerd, ref, case.repo, artifact, image, tmp_path / "saved")
    assert_pulled_through_mirror(hub_mirror, case.repo, "v1", artifact, image)
    # it never gave up on the mirror
    assert "Attempting next endpoint" not in dockerd.log_text()
    hub_mirror.verify_cache()


@pytest.mark.timeout(240)
def test_dockerd_official_image_name_goes_to_library(
    dockerd_factory: DockerdFactory, mirror_factory: Any, own_hub: UpstreamRegistry,
    test_images: oci.ImageSet, tmp_path: Path,
) -> None:
    """`docker pull busybox` asks the mirror for library/busybox:latest."""
    image = test_images.docker
    own_hub.push_direct(image, "library/busybox", "latest")
    mirror: MirrorProcess = mirror_factory([Upstream(name="docker.io", url=own_hub.url)])
    d = dockerd_factory(mirror)
    d.cli("pull", "busybox", timeout=180)
    check_docker_image(d, "busybox:latest", "library/busybox", image, image, tmp_path / "saved")
    assert_pulled_through_mirror(mirror, "library/busybox", "latest", image, image)


@pytest.mark.timeout(240)
def test_dockerd_resumes_a_broken_blob_download_with_a_range_request(
    dockerd_factory: DockerdFactory, mirror_factory: Any, own_hub: UpstreamRegistry,
    netns: NetNS, tmp_path: Path,
) -> None:
    """The connection carrying a layer is reset mid-blob: dockerd keeps what it has and
    asks again with `Range: bytes=N-`, which only a 206 satisfies (its reader rejects a
    200 once it has an offset)."""
    layout = oci.OCILayout(tmp_path / "layout")
    image = oci.build_image(layout.blobs_dir, (6 * MB,), docker=True, labels={"t": "resume"})
    own_hub.push_direct(image, "test/resume", "v1")
    mirror: MirrorProcess = mirror_factory([Upstream(name="docker.io", url=own_hub.url)])
    d = dockerd_factory(mirror)
    (bridge,) = netns.bridges
    bridge.cut_once_after(2 * MB)
    d.cli("pull", "test/resume:v1", timeout=180)
    assert bridge.cuts == 1
    layer = image.layers[0]
    log = mirror.wait_log(
        lambda log: any(
            str(e["path"]).endswith(f"/blobs/{layer.digest}") and e["status"] == 206
            for e in log
        ),
        what=f"a 206 for {layer.digest}",
    )
    ranged = [
        e for e in log
        if str(e["path"]).endswith(f"/blobs/{layer.digest}") and e["status"] == 206
    ]
    assert 0 < ranged[0]["bytes"] < layer.size, ranged  # the rest, not the whole blob
    assert "Attempting next endpoint" not in d.log_text()
    check_docker_image(d, "test/resume:v1", "test/resume", image, image, tmp_path / "saved")
    mirror.verify_cache()


@pytest.mark.timeout(240)
def test_dockerd_fallback_to_docker_hub_stays_inside_the_namespace(
    dockerd: Dockerd, hub_mirror: MirrorProcess,
) -> None:
    """A tag the mirror answers 404 for makes dockerd retry at Docker Hub; inside the
    namespace that ends at a DNS query to 127.0.0.1 that nothing answers."""
    res = dockerd.cli("pull", "test/absent:v1", timeout=180, check=False)
    assert res.returncode != 0, res.stdout
    hub_mirror.wait_log(
        lambda log: any(
            str(e["path"]).startswith("/v2/test/absent/manifests/") and e["status"] == 404
            for e in log
        ),
        what="the mirror answering 404 for test/absent",
    )
    log = dockerd.log_text()
    assert "Attempting next endpoint" in log
    # the only resolver it could reach is the namespace's loopback, where nothing listens
    assert "lookup registry-1.docker.io on 127.0.0.1:53" in res.stderr, res.stderr
