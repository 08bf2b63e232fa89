"""Ctrl-C and ``ray job stop`` end a run with one line, not a silent exit or a trace.

Python raises ``KeyboardInterrupt`` on SIGINT; SIGTERM (what ``ray job stop`` and most
schedulers send first) kills the process without unwinding, which left ``.pending`` behind and
the MLflow runs RUNNING. Inside ``run`` both unwind the same way: the stage's temporary folder
is removed, the MLflow runs end as KILLED, and the driver exits 130 (SIGINT) or 143 (SIGTERM)
with the stage it stopped in; finished stages and score shards stay in the cache, so the same
command resumes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from cluster.signals import handler_for


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``stage``: the stage it stopped in, once known."""

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.stage: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def as_interrupted(err: KeyboardInterrupt) -> Interrupted:
    """``err`` as an ``Interrupted``. A plain ``KeyboardInterrupt`` is a SIGINT, unless SIGTERM
    arrived: ``ray.get`` turns whatever its wait raised into a plain ``KeyboardInterrupt``."""
    if isinstance(err, Interrupted):
        return err
    return Interrupted("SIGTERM" if _TERMINATED else "SIGINT")


def message(err: Interrupted, cache_dir: str) -> str:
    where = f" during stage {err.stage}" if err.stage else ""
    return (f"interrupted by {err.signal_name}{where}: finished stages (and finished score "
            f"shards) are kept in {cache_dir}; run the same command again to resume")


_ARMED: list[bool] = []  # per open sigterm_interrupts block: whether its handler is set
_TERMINATED: list[bool] = []  # SIGTERM arrived within the current block


def _raise_interrupted(signum, frame):
    _TERMINATED.append(True)
    raise Interrupted("SIGTERM")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted("SIGTERM")`` in the main thread."""
    with handler_for(signal.SIGTERM, _raise_interrupted) as armed:
        _ARMED.append(armed)
        _TERMINATED.clear()
        try:
            yield
        finally:
            _ARMED.pop()


def rearm_sigterm() -> None:
    """Put the handler back after ``ray.init``, whose failure-signal handler takes SIGTERM in
    the driver and aborts the process (exit 134, ``.pending`` and RUNNING runs left behind)."""
    if _ARMED and _ARMED[-1]:  # set in the main thread by sigterm_interrupts
        signal.signal(signal.SIGTERM, _raise_interrupted)
