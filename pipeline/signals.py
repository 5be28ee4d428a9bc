"""Graceful SIGINT/SIGTERM: the first asks the run to stop at the next batch boundary, the
second exits at once (the checkpoint is consistent at every moment, so that is safe too)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def graceful_signals():
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum is not None:
            os._exit(128 + signum)
        flag.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
