#!/usr/bin/env bash
# Installs the real components the integration tests and benchmarks drive, when missing.
# The packages' own services are stopped: the tests start private instances on loopback.
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
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    for svc in docker-registry containerd nginx; do
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
fi
