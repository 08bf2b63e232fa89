"""A live progress display on the driver for stages whose work runs in Ray workers.

Workers add what they processed to a zero-CPU counter actor (one fire-and-forget call per
batch); a thread on the driver polls it and draws a bar on a terminal, or writes a log line
every ``every_s`` seconds otherwise (``ray job submit`` logs, CI). Workers get the actor's name,
not its handle, so no handle outlives the display inside a trainer's or a dataset's config.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable


class _Counter:
    def __init__(self) -> None:
        self.sequences, self.tokens = 0, 0

    def add(self, sequences: int, tokens: int) -> None:
        self.sequences += sequences
        self.tokens += tokens

    def read(self) -> tuple[int, int]:
        return self.sequences, self.tokens


_HANDLES: dict[str, object] = {}  # per worker process: counter name -> handle (None: gone)


def report(counter: str | None, sequences: int, tokens: int) -> None:
    """Called by a worker after each batch; ``counter`` (a name) may be None: no display."""
    if counter is None:
        return
    import ray
    if counter not in _HANDLES:
        try:
            _HANDLES[counter] = ray.get_actor(counter)
        except ValueError:  # the display ended or its actor was lost: work goes on without it
            _HANDLES[counter] = None
    handle = _HANDLES[counter]
    if handle is not None:
        handle.add.remote(int(sequences), int(tokens))


class Progress:
    """``with Progress("score", total, log) as p:`` hand ``p.counter`` to the workers."""

    def __init__(self, label: str, total: int, log: Callable[[str], None] = print,
                 every_s: float = 30.0, poll_s: float = 0.5, tty: bool | None = None) -> None:
        import ray
        self.label, self.total, self.log = label, max(int(total), 1), log
        self.every_s, self.poll_s = every_s, poll_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.counter = f"lancet-progress-{uuid.uuid4().hex}"  # what the workers are given
        self._actor = ray.remote(num_cpus=0)(_Counter).options(name=self.counter).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()
        self._bar = None
        self.done = (0, 0)  # (sequences, tokens) counted when the block ended

    def __enter__(self) -> Progress:
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=self.label, unit="seq", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.done = self._settled()
        self._show(*self.done, final=True)
        if self._bar is not None:
            self._bar.close()
        import ray
        ray.kill(self._actor)
        self._actor = None

    def _read(self) -> tuple[int, int]:
        import ray
        try:
            return ray.get(self._actor.read.remote(), timeout=10)
        except Exception:  # a display must never fail the stage
            return 0, 0

    def _settled(self, wait_s: float = 3.0) -> tuple[int, int]:
        """The counts once the workers' last fire-and-forget calls have landed (or ``wait_s``)."""
        deadline = time.perf_counter() + wait_s
        done = self._read()
        while done[0] < self.total and time.perf_counter() < deadline:
            time.sleep(0.05)
            done = self._read()
        return done

    def _run(self) -> None:
        last_line = time.perf_counter()
        while not self._stop.wait(self.poll_s):
            done = self._read()
            if self.tty or time.perf_counter() - last_line >= self.every_s:
                self._show(*done)
                last_line = time.perf_counter()

    def _show(self, sequences: int, tokens: int, final: bool = False) -> None:
        seconds = max(time.perf_counter() - self._start, 1e-9)
        rate = f"{sequences / seconds:.1f} seq/s, {tokens / seconds:.0f} tokens/s"
        if self._bar is not None:
            self._bar.n = min(sequences, self.total)
            self._bar.set_postfix_str(rate, refresh=True)
        elif not final:
            self.log(f"{self.label}: {sequences}/{self.total} sequences "
                     f"({100 * min(sequences / self.total, 1):.0f}%), {rate}")
