"""Test hosts on one machine: network namespaces joined by veth pairs (iproute2, needs root).

Each host is a namespace with its loopback and one interface named ``IFNAME`` on a private
/24 that exists only inside these namespaces: traffic between hosts never leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

IFNAME = "lancet0"
SUBNET = "10.213.7"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def prefix(self) -> list[str]:
        """Run a command on this host: ``[*host.prefix(), "ray", "start", ...]``."""
        return ["ip", "netns", "exec", self.namespace]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"lancetprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return f"'ip netns add' failed: {err.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def two_hosts():
    """Two hosts joined by a veth pair; each sees its end as ``IFNAME``."""
    tag = f"lct{os.getpid() % 100000}"
    made = [Host(f"{tag}h{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    try:
        for host in made:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
        for end, host in zip((f"{tag}a", f"{tag}b"), made, strict=True):
            _ip("link", "set", end, "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", end, "name", IFNAME)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", IFNAME)
            _ip("-n", host.namespace, "link", "set", IFNAME, "up")
        yield made
    finally:
        for host in made:  # deleting a namespace deletes the veth pair too
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
