"""This test process's own descendants by title: the Ray workers of the Ray it started.

Tests that kill a worker must not kill a worker of another Ray on the machine (a user's, a
second test run's): Ray's head processes are children of the driver that started them, and its
workers theirs.
"""

from __future__ import annotations

import os
import subprocess


def descendants(title: str, root: int | None = None) -> list[int]:
    """Pids (oldest first) of the processes under ``root`` (this one) whose command line
    contains ``title``."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    parent, args = {}, {}
    for line in out.splitlines()[1:]:
        pid, ppid, *rest = line.split(None, 2)
        parent[int(pid)], args[int(pid)] = int(ppid), rest[0] if rest else ""
    root = os.getpid() if root is None else root

    def under(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen and pid > 1:
            seen.add(pid)
            pid = parent[pid]
            if pid == root:
                return True
        return False
    return sorted(p for p in parent if title in args[p] and under(p))
