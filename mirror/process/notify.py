"""The systemd notify protocol (sd_notify(3)): `Type=notify` services tell the service manager
they are ready, reloading or stopping by sending a datagram to $NOTIFY_SOCKET.

No dependency on libsystemd: one AF_UNIX datagram per call. An address starting with `@` is in
the abstract namespace. Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mirror.notify")


def notify(*assignments: str) -> bool:
    """Send `READY=1`, `STOPPING=1`, `STATUS=…` (several make one message). True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        log.warning("could not notify the service manager",
                    extra={"socket": os.environ.get("NOTIFY_SOCKET"), "error": str(exc)})
        return False
    return True
