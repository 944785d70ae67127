"""The image's HEALTHCHECK: GET /healthz on this container's own listening port.

Reads [server] listen and tls_cert from $MIRROR_CONFIG (default /etc/mirror/mirror.toml) with
the standard library only, so it runs in a fraction of the mirror's start-up time. Exit 0 when
the answer is 200, 1 otherwise (the Docker/podman healthcheck contract).
"""

import os
import ssl
import sys
import tomllib
import urllib.request


def main() -> int:
    path = os.environ.get("MIRROR_CONFIG", "/etc/mirror/mirror.toml")
    try:
        with open(path, "rb") as f:
            server = tomllib.load(f).get("server", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"healthcheck: {path}: {exc}", file=sys.stderr)
        return 1
    host, _, port = str(server.get("listen", "0.0.0.0:5000")).rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    tls = bool(server.get("tls_cert"))
    url = f"{'https' if tls else 'http'}://{host}:{port}/healthz"
    context = ssl._create_unverified_context() if tls else None  # our own port, by address
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
