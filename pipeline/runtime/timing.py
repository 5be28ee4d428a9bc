"""Wall time spent in named stages of a process (waiting for input, writing parts, the final
write), for the summary."""

from __future__ import annotations

import time


class Timer:
    """Seconds per stage name, summed over every call of `add`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, t0: float) -> float:
        """Count the time from `t0` (a time.perf_counter() reading) to now under `name`; returns now."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        return now
