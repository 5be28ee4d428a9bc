"""SIGINT/SIGTERM: the first stops the run, the second exits at once.

Where the run polls the flag (the scoring loop: it stops at the next batch boundary with the
checkpoint consistent) the first signal only sets it. Everywhere else (planning, model loading,
the final rank and write) the handler raises KeyboardInterrupt at once, which the run turns into
exit 128+signum with no output published; inside a critical section (the output's rename and
the published record) that is deferred to the section's end.

Python runs a handler once for several deliveries of one signal that land while the main thread
is in native code, so signals are counted from the wakeup fd instead: the C-level handler writes
one byte per delivery, a thread reads them, and the second one exits the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class StopFlag:
    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._polled = 0
        self._critical = 0

    def __call__(self) -> bool:
        return self.signum is not None

    def _raise_now(self) -> bool:
        return self.signum is not None and not self._polled and not self._critical

    @contextlib.contextmanager
    def polled(self):
        """The code inside checks the flag itself at safe points."""
        self._polled += 1
        try:
            yield
        finally:
            self._polled -= 1
        if self._raise_now():
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """A signal arriving inside takes effect at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._raise_now():
            raise KeyboardInterrupt


def polled(should_stop):
    return should_stop.polled() if isinstance(should_stop, StopFlag) else contextlib.nullcontext()


def critical(should_stop):
    return should_stop.critical() if isinstance(should_stop, StopFlag) else contextlib.nullcontext()


def _count(flag: StopFlag, signum: int) -> None:
    flag.count += 1
    if flag.signum is None:
        flag.signum = signum
    if flag.count >= 2:
        os._exit(128 + flag.signum)


@contextlib.contextmanager
def graceful_signals():
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
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
                    _count(flag, b)

    def handler(signum, frame):
        if not counted_by_thread:
            _count(flag, signum)
        elif flag.signum is None:
            flag.signum = signum
        if flag._raise_now():
            raise KeyboardInterrupt

    if counted_by_thread:
        threading.Thread(target=watch, name="rerank-signals", daemon=True).start()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if counted_by_thread:
            signal.set_wakeup_fd(old_fd)
            os.close(w)  # ends the watcher's read
