"""A signal handler for a block of the driver's main thread, and the one before it put back."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def handler_for(signum: int, handler: Callable | None = None) -> Iterator[bool]:
    """Within the block ``handler`` (when given) handles ``signum``; after it, the handler from
    before does again (also when the block set another, as Ray Train's ``fit`` does for
    SIGINT). Yields False, and changes nothing, outside the main thread, where Python cannot
    set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.getsignal(signum)
    if handler is not None:
        signal.signal(signum, handler)
    try:
        yield True
    finally:
        if previous is not None:  # None: installed outside Python, nothing to put back
            signal.signal(signum, previous)
