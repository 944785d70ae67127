"""A network partition between two groups of processes on loopback, as nodes see one: their
packets to the other side are dropped, so peers go silent (not refused).

Every process on loopback connects from 127.0.0.1 whatever address it listens on, so the
sides cannot be told apart by address: each side is a cgroup (cgroup v2), its processes
started through `launcher(side)`, and `cut()` adds iptables OUTPUT rules dropping what a
side's sockets send to the other side's addresses (`-m cgroup --path`). The test itself
stays outside both and reaches every node. Rules carry a comment of their own and are
removed by `heal()`; `close()` removes the cgroups once their processes are gone. Only
127.0.0.0/8 addresses are accepted. Root only (iptables, from Debian).

    split = Partition(["127.0.0.13"], ["127.0.0.11", "127.0.0.12"])
    node.launcher = split.launcher(0)           # before the node starts
    split.cut(); ...; split.heal(); split.close()
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_HYBRID = Path("/sys/fs/cgroup/unified")  # cgroup v2 beside v1 controllers (systemd hybrid)
ROOT = _HYBRID if (_HYBRID / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
_JOIN = 'echo $$ > "$0" && exec "$@"'  # sh -c _JOIN CGROUP_PROCS CMD ARGS...


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", "10", *args], check=True, capture_output=True,
                   timeout=20)


class Partition:
    def __init__(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        for address in (*side_a, *side_b):
            if ipaddress.ip_address(address) not in LOOPBACK:
                raise ValueError(f"{address}: a partition between loopback addresses only")
        self.tag = f"mirror-test-{uuid.uuid4().hex[:12]}"
        self.groups = [f"{self.tag}-a", f"{self.tag}-b"]
        for group in self.groups:
            (ROOT / group).mkdir()
        self.rules = [(self.groups[0], b) for b in side_b] + [
            (self.groups[1], a) for a in side_a]
        self.added: list[tuple[str, str]] = []

    def launcher(self, side: int) -> tuple[str, ...]:
        """A command prefix that runs the command inside side 0 or 1."""
        return ("sh", "-c", _JOIN, str(ROOT / self.groups[side] / "cgroup.procs"))

    def _rule(self, group: str, destination: str) -> list[str]:
        return ["OUTPUT", "-m", "cgroup", "--path", group, "-d", destination,
                "-m", "comment", "--comment", self.tag, "-j", "DROP"]

    def cut(self) -> None:
        try:
            for group, destination in self.rules:
                _iptables("-I", *self._rule(group, destination))
                self.added.append((group, destination))
        except BaseException:
            self.heal()
            raise

    def heal(self) -> None:
        while self.added:
            _iptables("-D", *self._rule(*self.added.pop()))

    def close(self) -> None:
        """Heals, and removes the cgroups (their processes must have exited)."""
        self.heal()
        for group in self.groups:
            (ROOT / group).rmdir()
