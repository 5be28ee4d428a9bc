"""The stop token: one object passed down from the run to the few places that may stop it.

Code that can stop cleanly calls `stop.check()` at its named check points; it raises
KeyboardInterrupt once a stop was asked, which the run turns into a clean stop with the
checkpoint consistent. The check points:

  run()                    once, after the model is loaded, before any unit is scored
  the scoring loop         before each unit (pipeline/scoring.py)
  the engine               between batches (the `stop` argument of Engine.score_stream)
  the pool's driver loop   between worker messages (executors/pool.py)
  the Ray driver loop      between finished units (executors/ray_data.py)

A stop is asked by a signal (runtime/signals.py sets the token), a pool worker's link to its
driver ("stop", or the driver gone), an event in a caller's code (`set()`), or a caller's own
`should_stop` callable, asked at each check (`as_token`).
"""

from __future__ import annotations

import threading
from typing import Callable


class StopToken:
    """Set once, never cleared. `poll`: a caller's callable asked at each check (True: stop); a
    `signum` attribute on it names the signal the stop reports."""

    def __init__(self, poll: Callable[[], bool] | None = None):
        self._event = threading.Event()
        self._poll = poll
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        """Ask for the stop; `signum`, the signal that asked (the first one given is kept)."""
        if self.signum is None and signum is not None:
            self.signum = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self._poll is not None and self._poll():
            self.set(getattr(self._poll, "signum", None))
        return self._event.is_set()

    def check(self) -> None:
        """Raise KeyboardInterrupt when a stop was asked: call only where stopping is safe."""
        if self.requested:
            raise KeyboardInterrupt

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is asked or `timeout` passes; True when asked. (A `poll` callable
        is asked only by `requested` and `check`.)"""
        return self._event.wait(timeout)


def as_token(stop) -> StopToken | None:
    """A StopToken for what callers hand in: None, a token, or a callable returning True to stop."""
    if stop is None or isinstance(stop, StopToken):
        return stop
    if callable(stop):
        return StopToken(poll=stop)
    raise TypeError(f"should_stop must be a StopToken or a callable, not {type(stop).__name__}")
