#!/usr/bin/env bash
# Builds the mirror's OCI image with no base image from any registry:
#   1. the mirror's wheel (pip wheel; its version from the git tag, setuptools-scm) and its
#      dependencies as cp311 manylinux x86_64 wheels from PyPI (pinned to the versions of the
#      dev venv when there is one, so the image runs what the tests ran);
#   2. a Debian bookworm root filesystem made by mmdebstrap (the essential set plus Debian's
#      python3 and python3-venv), the wheels installed into a venv at /opt/mirror, then pip,
#      the venv tooling, docs, man pages, locales and apt/dpkg caches removed;
#   3. that tree assembled into an image by buildah (FROM scratch), in Docker format so the
#      HEALTHCHECK is kept (the OCI image config has no healthcheck field).
# Writes <out>/registry-mirror-<version>.tar (docker-archive, for `podman load`) and commits
# localhost/registry-mirror:<version> and :latest into the containers storage.
#
# Environment (all optional):
#   OUT=build/image        where the wheels, the rootfs tar and the archive go
#   IMAGE=localhost/registry-mirror
#   STORAGE_ROOT=DIR       a containers storage of its own (buildah --root DIR/root
#                          --runroot DIR/run, driver STORAGE_DRIVER=overlay) instead of the
#                          system's (the tests build there, then `podman load` the archive)
#   SUITE=bookworm  DEBIAN_MIRROR=http://deb.debian.org/debian
#   PYTHON=python3         the Python that builds the wheel (3.11, like Debian bookworm's)
# Root only (mmdebstrap --mode=root, buildah's storage). amd64 only: the dependency wheels
# are fetched for x86_64 and mmdebstrap builds for the host's architecture.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/build/image}
IMAGE=${IMAGE:-localhost/registry-mirror}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
BUILDAH=(buildah)
if [ -n "${STORAGE_ROOT:-}" ]; then
    BUILDAH+=(--root "$STORAGE_ROOT/root" --runroot "$STORAGE_ROOT/run"
              --storage-driver "${STORAGE_DRIVER:-overlay}")
fi

step() { printf '== %s\n' "$*" >&2; }
for tool in mmdebstrap buildah; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is not installed (bash tests/install-system-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build-image: run as root (mmdebstrap --mode=root)" >&2; exit 1; }
[ "$(dpkg --print-architecture)" = amd64 ] || { echo "build-image: amd64 only" >&2; exit 1; }

mkdir -p "$OUT"
cd "$ROOT"

# --- 1. wheels ---------------------------------------------------------------------------
# The committed HEAD, not the work tree: a clean clone (with the tags) is what is built, so
# the version names a commit and uncommitted edits stay out. Not a git clone: the tree as is
# (setuptools-scm's fallback_version).
SRC=$ROOT
REVISION=unknown
rm -rf "$OUT/src" "$OUT/dist" && mkdir -p "$OUT/dist"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    REVISION=$(git -C "$ROOT" rev-parse HEAD)
    git clone --quiet --shared --no-checkout "$ROOT" "$OUT/src"
    git -C "$OUT/src" checkout --quiet --detach "$REVISION"
    SRC=$OUT/src
fi
step "wheel"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT/dist" "$SRC"
WHEEL=$(ls "$OUT"/dist/registry_mirror-*.whl)
VERSION=$(basename "$WHEEL" | cut -d- -f2)
# org.opencontainers.image.source: IMAGE_SOURCE, else the clone's origin, else a placeholder.
SOURCE_URL=${IMAGE_SOURCE:-$(git -C "$ROOT" remote get-url origin 2>/dev/null || echo https://example.invalid/registry-mirror)}
# Reproducible timestamps: the commit's time (mmdebstrap and buildah honour it).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
step "version $VERSION (revision $REVISION)"

constraints=$OUT/constraints.txt
: >"$constraints"
if [ -x "$ROOT/.venv/bin/pip" ]; then
    "$ROOT/.venv/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v '^-e ' >"$constraints" || true
fi
# The dependency wheels are keyed by what decides them: the wheel's requirements and the pins.
deps_key=$( { unzip -p "$WHEEL" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true;
              cat "$constraints" "$0"; } | sha256sum | cut -c1-16)
WHEELS=$OUT/wheels-$deps_key
if [ ! -e "$WHEELS/.complete" ]; then
    step "dependency wheels (cp311 manylinux x86_64) into $WHEELS"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
        --implementation cp --python-version 3.11.2 --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_36_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any ${constraints:+--constraint "$constraints"} "$WHEEL" \
        'async-timeout>=4.0.3'
    # async-timeout: redis needs it below Python 3.11.3 (bookworm has 3.11.2), and pip
    # download evaluates python_full_version markers for the running Python, not the target.
    touch "$WHEELS/.complete"
fi
rm -f "$WHEELS"/registry_mirror-*.whl
cp "$WHEEL" "$WHEELS/"

# --- 2. root filesystem ------------------------------------------------------------------
rootfs_key=$( { echo "$SUITE $DEBIAN_MIRROR"; sha256sum "$0" "$ROOT/packaging/mirror.toml" \
                "$ROOT/packaging/healthcheck.py" "$WHEELS"/*.whl; } | sha256sum | cut -c1-16)
ROOTFS=$OUT/rootfs-$rootfs_key.tar
if [ ! -e "$ROOTFS" ]; then
    step "root filesystem ($SUITE, mmdebstrap) into $ROOTFS"
    rm -f "$OUT"/rootfs-*.tar "$OUT"/rootfs-*.tar.partial
    for old in "$OUT"/wheels-*; do [ "$old" = "$WHEELS" ] || rm -rf "$old"; done
    # The hooks run on the host with the new root as $1.
    # Essential packages a running mirror never uses (no logins, no PAM, no perl, no bash:
    # /bin/sh is dash), purged once everything is installed (perl last: the others'
    # maintainer scripts need it, and diff is one of dpkg's own prerequisites). The image is not upgraded in
    # place (rebuild it), so apt is absent and these holes in the dependencies harmless.
    PRUNE="libpam-runtime libpam-modules libpam-modules-bin login util-linux-extra util-linux
           sysvinit-utils bsdutils ncurses-bin hostname findutils bash
           libsystemd0 libudev1 libgcrypt20 libgpg-error0 liblz4-1 libblkid1 libmount1
           libsmartcols1 libaudit1 libaudit-common libcap-ng0 libpam0g libdebconfclient0"
    PRUNE=$(echo $PRUNE)
    # merged-usr: /usr merged by the hook instead of the usrmerge package (which drags perl in).
    mmdebstrap --mode=root --variant=essential --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include=python3,python3-venv \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp \"$WHEELS\"/*.whl \"\$1/tmp/wheels/\"" \
        --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" python3 -m venv /opt/mirror' \
        --customize-hook="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot \"\$1\" /opt/mirror/bin/pip install --quiet --no-index --no-cache-dir --find-links /tmp/wheels 'registry-mirror==$VERSION'" \
        --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" /opt/mirror/bin/pip uninstall --quiet --yes pip setuptools' \
        --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" dpkg --purge python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl >/dev/null' \
        --customize-hook='rm -rf "$1/tmp/wheels" "$1/opt/mirror/bin/activate"* "$1/opt/mirror/bin/Activate.ps1"' \
        --customize-hook='cd "$1/usr/lib/python3.11" && rm -rf ensurepip idlelib lib2to3 pydoc_data tkinter turtledemo distutils/command/*.exe' \
        --customize-hook='find "$1/opt/mirror" "$1/usr/lib/python3" "$1/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +' \
        --customize-hook='find "$1/opt/mirror/lib" -name "*.so" -exec strip --strip-unneeded {} + 2>/dev/null || true' \
        --customize-hook='find "$1/opt/mirror/lib" -type d \( -name tests -o -name test \) -path "*/site-packages/*" -prune -exec rm -rf {} +' \
        --customize-hook='find "$1"/opt/mirror/lib/python3.11/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +' \
        --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" /opt/mirror/bin/python -m compileall -q -j 0 /opt/mirror/lib /usr/lib/python3.11 >/dev/null || true' \
        --customize-hook='install -D -m 0644 '"$ROOT"'/packaging/mirror.toml "$1/etc/mirror/mirror.toml"' \
        --customize-hook='install -D -m 0755 '"$ROOT"'/packaging/healthcheck.py "$1/opt/mirror/bin/mirror-healthcheck" && sed -i "1i #!/opt/mirror/bin/python" "$1/opt/mirror/bin/mirror-healthcheck"' \
        --customize-hook='echo "mirror:x:10001:10001:registry mirror:/var/cache/mirror:/usr/sbin/nologin" >>"$1/etc/passwd"' \
        --customize-hook='echo "mirror:x:10001:" >>"$1/etc/group"' \
        --customize-hook='echo "mirror:!:19000::::::" >>"$1/etc/shadow"' \
        --customize-hook='install -d -m 0750 -o 10001 -g 10001 "$1/var/cache/mirror"' \
        --customize-hook="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot \"\$1\" dpkg --purge --force-remove-essential --force-depends $PRUNE >/dev/null 2>&1" \
        --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" dpkg --purge --force-remove-essential --force-depends perl-base diffutils >/dev/null 2>&1' \
        --customize-hook='rm -rf "$1/usr/lib/x86_64-linux-gnu/gconv"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old "$1"/var/log/* "$1"/var/lib/dpkg/*-old' \
        "$SUITE" "$ROOTFS.partial" "deb $DEBIAN_MIRROR $SUITE main"
    mv "$ROOTFS.partial" "$ROOTFS"
fi

# --- 3. image ----------------------------------------------------------------------------
TAG=${VERSION//+/-}  # a tag may not hold '+'
step "image $IMAGE:$TAG (buildah, docker format)"
export BUILDAH_FORMAT=docker
ctr=$("${BUILDAH[@]}" from --quiet scratch)
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${BUILDAH[@]}" add --quiet "$ctr" "$ROOTFS" /
"${BUILDAH[@]}" config \
    --user 10001:10001 \
    --workingdir /var/cache/mirror \
    --volume /var/cache/mirror \
    --port 5000/tcp \
    --env PATH=/opt/mirror/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env MIRROR_CONFIG=/etc/mirror/mirror.toml \
    --entrypoint '["/opt/mirror/bin/mirror"]' \
    --cmd '["serve", "--config", "/etc/mirror/mirror.toml"]' \
    --stop-signal SIGTERM \
    --healthcheck 'CMD /opt/mirror/bin/mirror-healthcheck' \
    --healthcheck-interval 30s --healthcheck-timeout 5s \
    --healthcheck-start-period 10s --healthcheck-retries 3 \
    --label org.opencontainers.image.title=registry-mirror \
    --label "org.opencontainers.image.description=Pull-through caching mirror for container registries" \
    --label "org.opencontainers.image.source=$SOURCE_URL" \
    --label "org.opencontainers.image.version=$VERSION" \
    --label "org.opencontainers.image.revision=$REVISION" \
    --label "org.opencontainers.image.base.name=debian:$SUITE (mmdebstrap, no registry image)" \
    "$ctr"
"${BUILDAH[@]}" commit --quiet --format docker --rm --timestamp "$SOURCE_DATE_EPOCH" \
    "$ctr" "$IMAGE:$TAG" >/dev/null
trap - EXIT
"${BUILDAH[@]}" tag "$IMAGE:$TAG" "$IMAGE:latest"
ARCHIVE=$OUT/registry-mirror-$TAG.tar
rm -f "$OUT"/registry-mirror-*.tar
"${BUILDAH[@]}" push --quiet "$IMAGE:$TAG" "docker-archive:$ARCHIVE:$IMAGE:$TAG"
size=$(stat -c %s "$ROOTFS")
step "done: $IMAGE:$TAG, its one layer $(( size / 1000000 )) MB uncompressed; archive $ARCHIVE"
echo "$IMAGE:$TAG"
