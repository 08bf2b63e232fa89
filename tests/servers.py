"""Real servers on 127.0.0.1 for tests: an MLflow tracking server and a Ray head node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pipeline_cli import env

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextmanager
def mlflow_server(root: Path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def ray_head(root: Path, num_cpus: int = 2):
    """``ray start --head --block`` on 127.0.0.1 with its own ports and temp dir, in a process
    group of its own; stopping it stops that group only (``ray stop`` would stop every Ray of
    the machine: a user's, a second test run's)."""
    ports = {"port": free_port(), "dashboard": free_port()}
    temp = Path("/tmp") / f"ray_t{ports['port']}"  # Ray caps the socket path length
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(ports["port"]), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(ports["dashboard"]), "--num-cpus", str(num_cpus),
           "--temp-dir", str(temp), "--include-dashboard", "true", "--disable-usage-stats"]
    with open(root / "ray_head.log", "w") as log:
        head = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['dashboard']}"
        wait_http(f"{address}/api/version", timeout=120)
        yield {"gcs": f"127.0.0.1:{ports['port']}", "dashboard": address, "temp": temp}
    finally:
        stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (``ray start --block`` tears its node down), then SIGKILL
    what is left of it after 5 s (a test's node need not go gracefully)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
