"""The stop token: one object passed down from the run to the few places that may stop it.

Code that can stop cleanly (the scoring loop between batches, an executor between units) calls
`stop.check()` at those named points; it raises KeyboardInterrupt once a stop was asked, which
the run turns into a clean stop with the checkpoint consistent. A signal handler, a worker's
driver link or a caller's own callable asks for the stop; nothing polls a counter.
"""

from __future__ import annotations

import threading
from typing import Callable


class StopToken:
    """Set once, never cleared. `poll`: an extra callable asked at each check (a caller's own
    `should_stop`), so an API caller need not know this class."""

    def __init__(self, poll: Callable[[], bool] | None = None):
        self._event = threading.Event()
        self._poll = poll
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        if self.signum is None and signum is not None:
            self.signum = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self._poll is not None and self._poll():
            self._event.set()
        return self._event.is_set()

    def check(self) -> None:
        """Raise KeyboardInterrupt when a stop was asked: call only where stopping is safe."""
        if self.requested:
            raise KeyboardInterrupt

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is asked or `timeout` passes; True when asked."""
        return self._event.wait(timeout)

    def __call__(self) -> bool:  # the older `should_stop()` form
        return self.requested


NEVER = None  # callers pass None for "no stop token": every check site accepts None


def as_token(stop) -> StopToken | None:
    """A StopToken for what callers hand in: None, a token, or a callable returning True to stop."""
    if stop is None or isinstance(stop, StopToken):
        return stop
    if callable(stop):
        return StopToken(poll=stop)
    raise TypeError(f"stop must be a StopToken or a callable, not {type(stop).__name__}")
