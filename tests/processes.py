"""Processes a test started: its own descendants by title (the Ray workers of the Ray it
started), and the whole session of a driver it runs and kills.

Tests that kill a worker must not kill a worker of another Ray on the machine (a user's, a
second test run's): Ray's head processes are children of the driver that started them, and its
workers theirs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


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


def session(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (a process started with
    ``start_new_session=True`` leads the session of its pid)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, timeout: float = 60) -> None:
    """SIGKILL every process of session ``sid`` and return once none is left. Killing the
    process group is not enough: Ray's workers lead process groups of their own and outlive
    their raylet for a moment, long enough to write a file after the kill."""
    deadline = time.monotonic() + timeout
    while pids := session(sid):
        assert time.monotonic() < deadline, f"processes {pids} of session {sid} outlived SIGKILL"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
