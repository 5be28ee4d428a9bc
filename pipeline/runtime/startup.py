"""Where the seconds before the first scored batch go: a timeline of named moments, measured from
the start of the process (read from /proc, so the interpreter's start and imports count too).

A `Timeline` is an object: run() begins one, each pool or Ray worker begins its own in its
process, and a worker's marks travel back to the driver with its results, where `then()` appends
them to the run's (`spawn_workers` is the gap between the two). Code that cannot be handed the
timeline (model loading, deep in the engine) marks the one being recorded in its process through
`mark(name)`; `recording(timeline)` says which that is.
"""

from __future__ import annotations

import contextlib
import os
import time


def process_start() -> float | None:
    """The process's start as a Unix time (to a clock tick), or None where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in ticks since boot
        # The age against the boot-time clock: /proc/stat's btime is whole seconds only.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# The process's start, until the first timeline of the process takes it: later timelines in the
# same process (a library caller's second run) did not pay for the start.
_unclaimed_start = process_start()


class Timeline:
    """Named moments in order, as (name, Unix time); each closes the stage since the one before.
    Picklable and JSON-able as `marks`, so a worker can send its timeline back."""

    def __init__(self, marks: list | None = None):
        self.marks: list[tuple[str, float]] = [tuple(m) for m in marks or []]

    @classmethod
    def begin(cls, first_stage: str) -> "Timeline":
        """A new timeline from now; on the first in this process, `first_stage` is the stage from
        the process's start until now (the interpreter's start and imports)."""
        global _unclaimed_start
        now = time.time()
        if _unclaimed_start is not None:
            start, _unclaimed_start = _unclaimed_start, None
            return cls([("origin", start), (first_stage, now)])
        return cls([("origin", now)])

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def seen(self, name: str) -> bool:
        return any(n == name for n, _ in self.marks)

    def then(self, marks: list, gap_stage: str) -> None:
        """Append another process's timeline (`marks`, begun after this one's last mark): the time
        from our last mark to its origin becomes `gap_stage`, its stages follow. Clocks of other
        hosts may differ a little: a mark earlier than the one before it counts as that one."""
        if not self.marks or not marks:
            return
        last = self.marks[-1][1]
        for i, (name, t) in enumerate(marks):
            last = max(last, t)
            self.marks.append((gap_stage if i == 0 else name, last))

    def stages(self) -> dict[str, float]:
        """Seconds per stage, in order (a name marked twice adds up), and `total`."""
        out: dict[str, float] = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:]):
            out[name] = round(out.get(name, 0.0) + t1 - t0, 3)
        if len(self.marks) > 1:
            out["total"] = round(self.marks[-1][1] - self.marks[0][1], 3)
        return out


_recording: Timeline | None = None


@contextlib.contextmanager
def recording(timeline: Timeline):
    """Make `timeline` the one `mark()` writes to in this process, inside the block."""
    global _recording
    before, _recording = _recording, timeline
    try:
        yield timeline
    finally:
        _recording = before


def mark(name: str) -> None:
    """Mark the timeline being recorded in this process (none: nothing happens)."""
    if _recording is not None:
        _recording.mark(name)
