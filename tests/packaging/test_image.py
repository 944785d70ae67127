"""The mirror's OCI image (packaging/build-image.sh, `make image`), built once per session,
loaded into podman from its archive and run with `--network host` on loopback ports.

Checked: the image's metadata (size under 120 MB, non-root user, volume, labels naming the
version `mirror --version` prints and the commit built, the HEALTHCHECK); a pull through the
containerized mirror by skopeo and by containerd (ctr), byte for byte what was pushed, each
blob fetched from the upstream once; `podman healthcheck run`; SIGTERM (`podman stop`) ends
it with status 0 long before podman's kill; the image pushed to the upstream and pulled
through the containerized mirror (it mirrors itself) then run; a broken config makes the
container exit 2 with the one-line error in `podman logs`; the pruned botocore still makes an
S3 client; the pull test runs with a read-only root filesystem (as deploy/kubernetes
does); compose.yaml's default `podman-compose up` serves a pull and starts only the
mirror (redis and seaweedfs are behind profiles).

Figures (printed with -s, recorded in packaging/README.md): image size, cold start to ready.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.packaging.conftest import (
    ROOT,
    BuiltImage,
    MirrorContainer,
    Podman,
    mirror_config,
    run_env,
    run_mirror,
)
from tests.support import oci
from tests.support.clients import (
    Containerd,
    UpstreamRegistry,
    assert_pulled,
    skopeo_copy,
    skopeo_pull,
    verify_dir,
    write_hosts_toml,
    write_registries_conf,
)
from tests.support.registry import ClosedPort, env_without_proxies

pytestmark = [pytest.mark.integration, pytest.mark.root]

MAX_IMAGE_BYTES = 120_000_000
# podman stop's grace: a mirror ignoring SIGTERM (PID 1 without a handler) would be killed
# after it and exit 137; ours stops in about a second.
STOP_TIMEOUT = 30


@pytest.fixture
def blackhole() -> Iterator[ClosedPort]:
    """A registry name that is a closed port: only the mirror path can serve a pull."""
    port = ClosedPort()
    yield port
    port.close()


def _start(
    podman: Podman, image: BuiltImage, tmp_path: Path, port: int, upstream: UpstreamRegistry,
    name: str, registry: str = "blackhole.invalid", read_only: bool = False,
) -> MirrorContainer:
    config = tmp_path / "mirror.toml"
    config.write_text(mirror_config(port, upstream.url, name=registry))
    return run_mirror(podman, image, config, name, port, read_only=read_only)


def test_image_metadata(podman: Podman, image: BuiltImage) -> None:
    info = json.loads(podman("image", "inspect", image.ref).stdout)[0]
    size = int(info["Size"])
    print(f"\nimage {image.ref}: {size / 1e6:.1f} MB uncompressed, built in "
          f"{image.build_seconds:.0f} s")
    assert size < MAX_IMAGE_BYTES, f"{size} bytes"
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert "/var/cache/mirror" in config["Volumes"]
    assert config["Entrypoint"] == ["/opt/mirror/bin/mirror"]
    assert config["Cmd"] == ["serve", "--config", "/etc/mirror/mirror.toml"]
    assert config["StopSignal"] == "SIGTERM"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == image.version
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.source"]
    assert info["Healthcheck"]["Test"] == ["CMD", "/opt/mirror/bin/mirror-healthcheck"]
    assert info["ManifestType"] == "application/vnd.docker.distribution.manifest.v2+json"
    # The version is the git tag's (setuptools-scm), the one `mirror --version` prints.
    out = podman("run", "--rm", "--network", "host", image.ref, "--version").stdout
    assert out.strip() == f"mirror {image.version}"
    who = podman("run", "--rm", "--network", "host", "--entrypoint", "/usr/bin/id", image.ref)
    assert who.stdout.split()[0] == "uid=10001(mirror)"
    # What was stripped is gone: no pip, perl or bash; no apt lists, man pages, locales or
    # docs beyond the copyrights.
    script = (
        "import os\n"
        "for p in ('/opt/mirror/bin/pip', '/usr/bin/perl', '/usr/bin/bash'):\n"
        "    os.path.lexists(p) and print(p)\n"
        "for top in ('/var/lib/apt/lists', '/usr/share/man', '/usr/share/locale',"
        " '/usr/share/doc', '/usr/lib/x86_64-linux-gnu/gconv'):\n"
        "    for d, _, files in os.walk(top):\n"
        "        for f in files:\n"
        "            path = os.path.join(d, f)\n"
        "            if f not in ('copyright', 'locale.alias') and not os.path.islink(path)"
        " and os.path.getsize(path):\n"
        "                print(path)\n"
    )
    gone = podman("run", "--rm", "--network", "host", "--entrypoint", "/opt/mirror/bin/python",
                  image.ref, "-c", script)
    assert gone.stdout.strip() == ""


def test_pull_through_the_container(
    podman: Podman, image: BuiltImage, upstream: UpstreamRegistry,
    small_image: tuple[oci.OCILayout, oci.Image], containerd: Containerd,
    tmp_path: Path, free_tcp_port: int, blackhole: ClosedPort,
) -> None:
    # Read-only root, as the Kubernetes manifests run it: only the volume is written.
    mirror = _start(podman, image, tmp_path, free_tcp_port, upstream, "mirror-pull",
                    registry=blackhole.host, read_only=True)
    ready = mirror.wait_ready()
    print(f"\ncold start to ready (podman run -> /healthz 200): {ready:.2f} s")
    assert podman("healthcheck", "run", mirror.name, check=False).returncode == 0
    mark = upstream.registry.mark()

    conf = write_registries_conf(tmp_path / "registries.conf", registry=blackhole.host,
                                 mirrors=[mirror.host])
    _layout, img = small_image
    pulled = skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "skopeo")
    assert_pulled(pulled, img)

    hosts = write_hosts_toml(tmp_path / "hosts", blackhole.host, mirror.url)
    containerd.remove_all()
    ref = f"{blackhole.host}/test/small:v1"
    containerd.pull(ref, hosts_dir=hosts)
    containerd.check_image(ref)
    assert containerd.image_digest(ref) == img.manifest.digest
    assert {b.digest for b in img.blobs} <= containerd.verify_content()

    # Two clients, one upstream GET per blob: the second pull was served from the cache.
    upstream.registry.barrier()
    gets = upstream.registry.blob_gets(mark, status=200)
    assert {d: gets[d] for d in gets} == {b.digest: 1 for b in img.blobs}

    t0 = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT), mirror.name, timeout=STOP_TIMEOUT + 30)
    stopped = time.monotonic() - t0
    assert podman.exit_code(mirror.name) == 0
    assert stopped < 10, f"podman stop took {stopped:.1f} s"
    logs = podman.logs(mirror.name)
    assert '"msg": "stopped"' in logs, logs[-2000:]


def test_the_image_mirrors_itself(
    podman: Podman, image: BuiltImage, upstream: UpstreamRegistry, tmp_path: Path,
    free_tcp_port: int, blackhole: ClosedPort,
) -> None:
    tag = image.ref.rsplit(":", 1)[1]
    skopeo_copy(f"docker-archive:{image.archive}",
                f"docker://{upstream.host}/registry-mirror:{tag}", timeout=300)
    pushed = run_env(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", "--no-creds",
         f"docker://{upstream.host}/registry-mirror:{tag}"], env_without_proxies(), 60,
    ).stdout.encode()

    mirror = _start(podman, image, tmp_path, free_tcp_port, upstream, "mirror-self",
                    registry=blackhole.host)
    mirror.wait_ready()
    conf = write_registries_conf(tmp_path / "registries.conf", registry=blackhole.host,
                                 mirrors=[mirror.host])
    out = tmp_path / "self"
    skopeo_copy(f"docker://{blackhole.host}/registry-mirror:{tag}", f"dir:{out}",
                registries_conf=conf, timeout=300)
    pulled = verify_dir(out)
    assert pulled.manifest == pushed
    layers = [d["digest"] for d in json.loads(pushed)["layers"]]
    assert set(layers) <= pulled.blobs

    # podman itself pulls it through the container and runs what it got.
    pulled_ref = f"{blackhole.host}/registry-mirror:{tag}"
    podman("pull", "--quiet", pulled_ref, timeout=300, CONTAINERS_REGISTRIES_CONF=str(conf))
    again = podman("run", "--rm", "--network", "host", pulled_ref, "--version").stdout
    assert again.strip() == f"mirror {image.version}"
    podman("rmi", pulled_ref, check=False)


def test_broken_config_exits_with_one_line(
    podman: Podman, image: BuiltImage, tmp_path: Path, free_tcp_port: int,
) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text(
        mirror_config(free_tcp_port, "http://127.0.0.1:1").replace(
            'dir = "/var/cache/mirror"', 'dir = "/var/cache/mirror"\nmax_size = "lots"'
        )
    )
    name = "mirror-broken"
    res = podman(
        "run", "--name", name, "--network", "host",
        "--volume", f"{config}:/etc/mirror/mirror.toml:ro", image.ref, check=False,
    )
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert podman.exit_code(name) == 2
    lines = [line for line in podman.logs(name).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("mirror: /etc/mirror/mirror.toml: cache.max_size"), lines[0]


def test_s3_client_after_pruning_botocore(podman: Podman, image: BuiltImage) -> None:
    """build-image.sh keeps only botocore's s3, sts and sso data: an S3 client still builds
    and presigns (no network: a presigned URL is computed locally)."""
    script = (
        "import asyncio, aiobotocore.session\n"
        "async def main():\n"
        "    s = aiobotocore.session.get_session()\n"
        "    async with s.create_client('s3', region_name='us-east-1',"
        " endpoint_url='http://127.0.0.1:1', aws_access_key_id='a',"
        " aws_secret_access_key='b') as c:\n"
        "        print(await c.generate_presigned_url('get_object',"
        " Params={'Bucket': 'b', 'Key': 'k'}, ExpiresIn=60))\n"
        "asyncio.run(main())\n"
    )
    out = podman("run", "--rm", "--network", "host", "--entrypoint", "/opt/mirror/bin/python",
                 image.ref, "-c", script).stdout
    assert out.startswith("http://127.0.0.1:1/b/k?"), out
    assert "Signature=" in out


def test_compose_up_serves_a_pull(
    podman: Podman, image: BuiltImage, upstream: UpstreamRegistry,
    small_image: tuple[oci.OCILayout, oci.Image], tmp_path: Path, free_tcp_port: int,
    blackhole: ClosedPort,
) -> None:
    compose = ROOT / "compose.yaml"
    config = tmp_path / "mirror.toml"
    config.write_text(mirror_config(free_tcp_port, upstream.url, name=blackhole.host))
    # The site's own settings over the shipped file: the image under test, host networking
    # on loopback (the shipped file publishes port 5000 on a bridge) and this machine's
    # open-files limit.
    override = tmp_path / "compose.override.yaml"
    override.write_text(
        "services:\n"
        "  mirror:\n"
        "    network_mode: host\n"
        "    ports: !reset []\n"
        "    ulimits:\n"
        f"      nofile: {podman.nofile}\n"
        "      nproc: 4096\n"
    )
    project = "mirrortest"
    env = podman.env(MIRROR_IMAGE=image.ref, MIRROR_CONFIG_FILE=str(config))
    cmd = [str(Path(ROOT / ".venv" / "bin" / "podman-compose")), "--project-name", project,
           "-f", str(compose), "-f", str(override)]
    try:
        run_env([*cmd, "up", "-d"], env, 180, cwd=ROOT)
        names = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
        mine = sorted(n for n in names if n.startswith(project))
        assert len(mine) == 1 and "mirror" in mine[0], mine  # redis, seaweedfs: profiles
        mirror = MirrorContainer(podman, mine[0], free_tcp_port, time.monotonic())
        mirror.wait_ready()
        with httpx.Client(trust_env=False, timeout=5) as c:
            assert c.get(f"{mirror.url}/v2/").status_code == 200
        conf = write_registries_conf(tmp_path / "registries.conf", registry=blackhole.host,
                                     mirrors=[mirror.host])
        _layout, img = small_image
        assert_pulled(skopeo_pull(conf, blackhole.host, "test/small", "v1", tmp_path / "p"), img)
    finally:
        run_env([*cmd, "down", "--volumes"], env, 180, cwd=ROOT, check=False)
    left = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in left if n.startswith(project)], left
