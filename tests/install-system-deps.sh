#!/usr/bin/env bash
# Installs the real components the integration tests and benchmarks drive, when missing.
# The packages' own services are stopped: the tests start private instances on loopback
# (podman and dockerd inside network namespaces of their own, see
# tests/integration/test_real_clients.py).
set -euo pipefail
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null          || need+=(skopeo)
command -v containerd >/dev/null      || need+=(containerd)
command -v nginx >/dev/null           || need+=(nginx-light)
command -v wrk >/dev/null             || need+=(wrk)
command -v ip >/dev/null              || need+=(iproute2)
command -v tc >/dev/null              || need+=(iproute2)
command -v chromium >/dev/null        || need+=(chromium)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v podman >/dev/null          || need+=(podman)
command -v dockerd >/dev/null         || need+=(docker.io)
command -v nsenter >/dev/null         || need+=(util-linux)
command -v redis-server >/dev/null    || need+=(redis-server)
command -v iptables >/dev/null        || need+=(iptables)
command -v haproxy >/dev/null         || need+=(haproxy)
command -v tinyproxy >/dev/null       || need+=(tinyproxy)
command -v promtool >/dev/null        || need+=(prometheus)
command -v mmdebstrap >/dev/null      || need+=(mmdebstrap)
command -v buildah >/dev/null         || need+=(buildah)
command -v strip >/dev/null           || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No package may start its service while installing (docker.io's would start a dockerd
    # on /run/docker.sock with a docker0 bridge and iptables rules): a policy-rc.d that
    # denies every start, unless the machine already has one; removed afterwards.
    policy=/usr/sbin/policy-rc.d
    own_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    if [ -n "$own_policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    for svc in docker-registry containerd nginx docker.socket docker redis-server haproxy \
               tinyproxy; do
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
fi
