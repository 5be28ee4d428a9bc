"""SIGINT/SIGTERM: the first stops the run, the second exits at once.

`graceful_signals()` gives a `SignalStop`, the run's stop token, which the signals set. Inside
`polled(stop)` (the execute step: its code checks the token at safe points, runtime/stop.py) the
first signal only sets it, and the run stops at the next check point with the checkpoint
consistent. Everywhere else (planning, model loading, the final rank and write) the handler
raises KeyboardInterrupt at once, which the run turns into exit 128+signum with no output
published; inside `critical(stop)` (the output's rename and the published record) that is
deferred to the section's end.

Python runs a handler once for several deliveries of one signal that land while the main thread
is in native code, so signals are counted from the wakeup fd instead: the C-level handler writes
one byte per delivery, a thread reads them, and the second one exits the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from .stop import StopToken


class SignalStop(StopToken):
    """The stop token signals set; it knows whether the main thread is where a signal may only
    set it (polled or critical sections) or must raise at once."""

    def __init__(self):
        super().__init__()
        self.count = 0  # signals received
        self.polled_depth = 0
        self.critical_depth = 0

    def raise_now(self) -> bool:
        return self.signum is not None and not self.polled_depth and not self.critical_depth

    def received(self, signum: int) -> None:
        """One delivery of `signum`: the first asks for the stop, the second exits at once."""
        self.count += 1
        self.set(signum)
        if self.count >= 2:
            os._exit(128 + self.signum)


@contextlib.contextmanager
def polled(stop):
    """The code inside checks `stop` itself at safe points: a signal only sets it."""
    if not isinstance(stop, SignalStop):
        yield
        return
    stop.polled_depth += 1
    try:
        yield
    finally:
        stop.polled_depth -= 1
    if stop.raise_now():
        raise KeyboardInterrupt


@contextlib.contextmanager
def critical(stop):
    """A signal arriving inside takes effect at the section's end."""
    if not isinstance(stop, SignalStop):
        yield
        return
    stop.critical_depth += 1
    try:
        yield
    finally:
        stop.critical_depth -= 1
    if stop.raise_now():
        raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_signals():
    """Install the handlers for the block; yields the SignalStop they set."""
    stop = SignalStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    counted_by_thread = True
    try:
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        counted_by_thread, old_fd = False, -1

    def watch():
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for b in data:
                if b in (signal.SIGINT, signal.SIGTERM):
                    stop.received(b)

    def handler(signum, frame):
        if counted_by_thread:
            stop.set(signum)  # counted by the watcher; the handler may run once for two
        else:
            stop.received(signum)
        if stop.raise_now():
            raise KeyboardInterrupt

    if counted_by_thread:
        threading.Thread(target=watch, name="rerank-signals", daemon=True).start()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if counted_by_thread:
            signal.set_wakeup_fd(old_fd)
            os.close(w)  # ends the watcher's read
