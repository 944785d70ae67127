"""Real clients: skopeo (registries.conf mirrors) and containerd/ctr (hosts.toml mirrors).

skopeo:
    conf = write_registries_conf(tmp / "registries.conf", registry="127.0.0.1:5001",
                                 mirrors=["127.0.0.1:5000"])
    skopeo_copy(f"docker://127.0.0.1:5001/repo:tag", f"dir:{out}", registries_conf=conf)
    digests = verify_dir(out)          # every blob's sha256 checked

containerd (root):
    ctd = Containerd(tmp / "ctd").start()
    hosts = write_hosts_toml(tmp / "hosts", registry="127.0.0.1:5001",
                             mirror_url="http://127.0.0.1:5000")
    ctd.pull("127.0.0.1:5001/repo:tag", hosts_dir=hosts)
    ctd.verify_content()               # every blob in the content store checked
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import oci
from .oci import sha256_file
from .registry import Registry, env_without_proxies, wait_until

SKOPEO_BIN = "skopeo"
CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed (see tests/install-system-deps.sh)")
    return path


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(
                f"command failed ({self.returncode}): {' '.join(self.args)}\n"
                f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"
            )
        return self


def run(args: Sequence[str | Path], timeout: float, check: bool = True,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run a command with a hard timeout (the whole process group is killed on expiry), in
    `env` (default: this one without proxies)."""
    argv = [str(a) for a in args]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env_without_proxies() if env is None else env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"command timed out after {timeout}s: {' '.join(argv)}\n"
            f"stdout:\n{out.decode(errors='replace')[-3000:]}\n"
            f"stderr:\n{err.decode(errors='replace')[-4000:]}"
        ) from None
    res = Result(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    return res.check() if check else res


# --- skopeo -----------------------------------------------------------------------------


def write_registries_conf(
    path: Path, registry: str, mirrors: Sequence[str], insecure: bool = True
) -> Path:
    """A registries.conf (v2) whose `registry` is served through `mirrors` (host[:port][/path]).

    Mirrors are tried in order, then `registry` itself: point `registry` at a ClosedPort so
    that a failing mirror makes the pull fail instead of silently bypassing it.
    """
    ins = "true" if insecure else "false"
    lines = [
        'unqualified-search-registries = []',
        "",
        "[[registry]]",
        f'location = "{registry}"',
        f"insecure = {ins}",
    ]
    for m in mirrors:
        lines += ["", "[[registry.mirror]]", f'location = "{m}"', f"insecure = {ins}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def skopeo_base(registries_conf: Path | None = None) -> list[str]:
    args = [_require(SKOPEO_BIN), "--insecure-policy"]
    if registries_conf is not None:
        args += ["--registries-conf", str(registries_conf)]
    return args


def skopeo_copy(
    src: str,
    dest: str,
    *,
    registries_conf: Path | None = None,
    all_platforms: bool = False,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    timeout: float = 180.0,
    check: bool = True,
    extra: Sequence[str] = (),
) -> Result:
    """`skopeo copy SRC DEST`. Without registries_conf, TLS verification is off for both."""
    args = [*skopeo_base(registries_conf), "copy", "--retry-times", "0"]
    if all_platforms:
        args += ["--all", "--preserve-digests"]
    if registries_conf is None:
        args += ["--src-tls-verify=false", "--dest-tls-verify=false"]
    if src.startswith("docker://"):
        args += ["--src-creds", src_creds] if src_creds else ["--src-no-creds"]
    if dest.startswith("docker://"):
        args += ["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]
    args += [*extra, src, dest]
    return run(args, timeout=timeout, check=check)


def skopeo_copy_async(
    src: str,
    dest: str,
    *,
    registries_conf: Path | None = None,
    log_path: Path,
    all_platforms: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `skopeo copy` in the background (stdout+stderr to log_path); pair it with
    `wait_for_exit(proc, timeout)`."""
    args = [*skopeo_base(registries_conf), "copy", "--retry-times", "0", "--src-no-creds"]
    if all_platforms:
        args += ["--all", "--preserve-digests"]
    if registries_conf is None:
        args += ["--src-tls-verify=false"]
    args += [src, dest]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env_without_proxies(),
            start_new_session=True,
        )


def push_oci_layout(
    layout_ref: str, dest: str, *, creds: str | None = None, timeout: float = 180.0
) -> None:
    """Push `oci:DIR:TAG` to `docker://HOST/repo:tag` keeping the exact manifest bytes."""
    skopeo_copy(
        layout_ref,
        dest,
        all_platforms=True,
        dest_creds=creds,
        timeout=timeout,
    )


@dataclass(frozen=True)
class PulledDir:
    """What `verify_dir` found in a skopeo `dir:` destination."""

    manifest: bytes
    # Every blob file (config and layers) by digest, each verified.
    blobs: frozenset[str]
    # Per-instance manifests of a multi-arch copy (`--all`): digest -> bytes.
    instance_manifests: dict[str, bytes]


def skopeo_pull(
    registries_conf: Path,
    registry: str,
    repo: str,
    tag: str,
    out: Path,
    all_platforms: bool = False,
    timeout: float = 180.0,
) -> PulledDir:
    """`skopeo copy docker://REGISTRY/REPO:TAG dir:OUT` through registries_conf, then
    `verify_dir(OUT)`. For a pull by digest pass tag="@sha256:<hex>"."""
    sep = "" if tag.startswith("@") else ":"
    skopeo_copy(
        f"docker://{registry}/{repo}{sep}{tag}",
        f"dir:{out}",
        registries_conf=registries_conf,
        all_platforms=all_platforms,
        timeout=timeout,
    )
    return verify_dir(out)


def assert_pulled(pulled: PulledDir, art: oci.Image | oci.ImageIndex) -> None:
    """A pull got exactly `art`: its manifest (an index's own bytes), its configs and
    layers, and for an index (a `--all` copy) every per-platform manifest."""
    assert pulled.manifest == art.manifest_bytes
    assert pulled.blobs == {b.digest for b in art.blobs}
    if isinstance(art, oci.ImageIndex):
        assert pulled.instance_manifests == {
            img.manifest.digest: img.manifest_bytes for img in art.images
        }


def verify_dir(out: Path) -> PulledDir:
    """Check every blob in a skopeo `dir:` destination hashes to its name."""
    manifest = (out / "manifest.json").read_bytes()
    blobs: set[str] = set()
    instances: dict[str, bytes] = {}
    for p in sorted(out.iterdir()):
        name = p.name
        if _HEX64.match(name):
            got = sha256_file(p)
            assert got == f"sha256:{name}", f"blob {p} hashes to {got}"
            blobs.add("sha256:" + name)
        elif name.endswith(".manifest.json") and _HEX64.match(name.split(".", 1)[0]):
            data = p.read_bytes()
            got = hashlib.sha256(data).hexdigest()
            assert got == name.split(".", 1)[0], f"manifest {p} hashes to sha256:{got}"
            instances["sha256:" + got] = data
    return PulledDir(manifest, frozenset(blobs), instances)


# --- containerd -------------------------------------------------------------------------


def write_hosts_toml(
    hosts_dir: Path,
    registry: str,
    mirror_url: str,
    server_url: str | None = None,
    override_path: bool = False,
) -> Path:
    """hosts_dir/<registry>/hosts.toml sending pulls for `registry` to `mirror_url`.

    `server_url` defaults to http://<registry> (containerd's fallback after the mirror).
    """
    d = hosts_dir / registry
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        f'server = "{server_url or "http://" + registry}"',
        "",
        f'[host."{mirror_url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if override_path:
        lines.append("  override_path = true")
    (d / "hosts.toml").write_text("\n".join(lines) + "\n")
    return hosts_dir


class Containerd:
    """A private containerd (root needed): root, state and sockets under `workdir`."""

    namespace = "mirror-tests"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.address = str(workdir / "containerd.sock")
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if len(self.address) > 100:
            raise ValueError(f"socket path too long for a unix socket: {self.address}")

    def start(self, timeout: float = 30.0) -> Containerd:
        _require(CONTAINERD_BIN)
        _require(CTR_BIN)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.root}"',
                    f'state = "{self.state}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.address}"',
                    "[ttrpc]",
                    f'  address = "{self.address}.ttrpc"',
                    "[debug]",
                    '  address = ""',
                    "[metrics]",
                    '  address = ""',
                    "",
                ]
            )
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env_without_proxies(),
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{self.log()}")
            if not Path(self.address).exists():
                return False
            return self.ctr("version", timeout=10, check=False).returncode == 0

        wait_until(ready, timeout, interval=0.1, what="containerd to serve")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def ctr(self, *args: str, timeout: float = 120.0, check: bool = True) -> Result:
        return run(
            [_require(CTR_BIN), "--address", self.address, "--namespace", self.namespace, *args],
            timeout=timeout,
            check=check,
        )

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path,
        platform: str | None = None,
        all_platforms: bool = False,
        plain_http: bool = True,
        user: str | None = None,
        timeout: float = 180.0,
        check: bool = True,
    ) -> Result:
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user:
            args += ["--user", user]
        args.append(ref)
        return self.ctr(*args, timeout=timeout, check=check)

    def content_digests(self) -> set[str]:
        out = self.ctr("content", "ls", "-q", timeout=30).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def image_digest(self, ref: str) -> str:
        """The target digest of an image record (`ctr images ls`)."""
        out = self.ctr("images", "ls", timeout=30).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if cols and cols[0] == ref:
                for c in cols:
                    if c.startswith("sha256:"):
                        return c
        raise KeyError(f"{ref} not in ctr images ls:\n{out}")

    def check_image(self, ref: str) -> str:
        """`ctr images check` line for ref; asserts the image is complete."""
        out = self.ctr("images", "check", timeout=60).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if cols and cols[0] == ref:
                assert "complete" in line, f"image incomplete in containerd: {line}"
                return line
        raise AssertionError(f"{ref} not in ctr images check:\n{out}")

    def verify_content(self) -> set[str]:
        """Hash every blob file in the content store; returns the verified digests."""
        blobs = self.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        verified: set[str] = set()
        for p in blobs.iterdir():
            got = sha256_file(p)
            assert got == f"sha256:{p.name}", f"containerd blob {p} hashes to {got}"
            verified.add("sha256:" + p.name)
        return verified

    def content_bytes(self, digest: str) -> bytes:
        algo, hexd = digest.split(":", 1)
        return (self.root / "io.containerd.content.v1.content" / "blobs" / algo / hexd).read_bytes()

    def remove_all(self) -> None:
        """Delete every image and let the GC remove their content (a cold client)."""
        out = self.ctr("images", "ls", "-q", timeout=30).stdout.split()
        if out:
            self.ctr("images", "rm", "--sync", *out, timeout=60)
        leftover = self.content_digests()
        if leftover:
            self.ctr("content", "rm", *sorted(leftover), timeout=60, check=False)


def wait_for_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for a process; kill its group and fail if it outlives `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"process {proc.args!r} did not exit within {timeout}s") from None


@dataclass
class UpstreamRegistry:
    """A started Registry and what was pushed to it: repo -> tag -> artifact."""

    registry: Registry
    pushed: dict[str, dict[str, oci.Image | oci.ImageIndex]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    def push(
        self,
        layout: oci.OCILayout,
        layout_tag: str,
        artifact: oci.Image | oci.ImageIndex,
        repo: str,
        tag: str,
        creds: str | None = None,
    ) -> None:
        """Push `layout_tag` of an OCI layout as HOST/repo:tag (exact manifest bytes kept)."""
        push_oci_layout(layout.ref(layout_tag), f"docker://{self.host}/{repo}:{tag}", creds=creds)
        self.pushed.setdefault(repo, {})[tag] = artifact

    def push_direct(self, artifact: oci.Image | oci.ImageIndex, repo: str, tag: str) -> None:
        """Push over the registry API (any media type; unauthenticated registries only)."""
        push_direct(self.url, repo, tag, artifact)
        self.pushed.setdefault(repo, {})[tag] = artifact


# --- raw HTTP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    host: str,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = 30.0,
) -> RawResponse:
    """One HTTP/1.1 request with the target sent verbatim (no normalisation of `..` or
    percent-escapes, unlike httpx), and repeated header lines kept as given."""
    h, _, p = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return RawResponse(resp.status, list(resp.getheaders()), data)
    finally:
        conn.close()


def push_direct(
    registry_url: str,
    repo: str,
    tag: str,
    artifact: oci.Image | oci.ImageIndex,
    timeout: float = 120.0,
) -> None:
    """Push an image or index with the registry API itself (any manifest media type, e.g.
    Docker schema 2, which skopeo's oci: transport cannot carry). Unauthenticated."""
    images = artifact.images if isinstance(artifact, oci.ImageIndex) else (artifact,)
    with httpx.Client(base_url=registry_url, timeout=timeout, trust_env=False) as c:
        for img in images:
            for blob in img.blobs:
                if c.head(f"/v2/{repo}/blobs/{blob.digest}").status_code == 200:
                    continue
                r = c.post(f"/v2/{repo}/blobs/uploads/")
                assert r.status_code == 202, (r.status_code, r.text)
                location = r.headers["Location"]
                sep = "&" if "?" in location else "?"
                with blob.path.open("rb") as f:
                    r = c.put(
                        f"{location}{sep}digest={blob.digest}",
                        content=f.read(),
                        headers={"Content-Type": "application/octet-stream"},
                    )
                assert r.status_code == 201, (r.status_code, r.text)
            ref = tag if img is artifact else img.manifest.digest
            r = c.put(
                f"/v2/{repo}/manifests/{ref}",
                content=img.manifest_bytes,
                headers={"Content-Type": img.manifest.media_type},
            )
            assert r.status_code == 201, (r.status_code, r.text)
        if isinstance(artifact, oci.ImageIndex):
            r = c.put(
                f"/v2/{repo}/manifests/{tag}",
                content=artifact.index_bytes,
                headers={"Content-Type": artifact.index.media_type},
            )
            assert r.status_code == 201, (r.status_code, r.text)
