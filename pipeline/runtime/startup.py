"""Where the seconds before the first scored batch go: a timeline of named moments, measured from
the start of the process (read from /proc, so the interpreter's start and imports count too).

`mark(name)` closes the stage that ran since the previous mark; `stages()` gives them in order,
in seconds, with `total` from process start to the last mark. run() resets the timeline at its
start (keeping the process-start stage), so a library caller's repeated runs each get their own.
"""

from __future__ import annotations

import os
import time

_marks: list[tuple[str, float]] = []


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


_START = process_start()


def reset(name: str) -> None:
    """Begin a new timeline; `name` is the stage from process start until now (only on the
    first reset of the process: later runs in the same process did not pay for its start)."""
    global _START
    now = time.time()
    _marks.clear()
    if _START is not None:
        _marks.append(("origin", _START))
        _marks.append((name, now))
        _START = None
    else:
        _marks.append(("origin", now))


def mark(name: str) -> None:
    if _marks:
        _marks.append((name, time.time()))


def seen(name: str) -> bool:
    return any(n == name for n, _ in _marks)


def stages() -> dict[str, float]:
    out = {}
    for (_, t0), (name, t1) in zip(_marks, _marks[1:]):
        out[name] = round(out.get(name, 0.0) + t1 - t0, 3)
    if len(_marks) > 1:
        out["total"] = round(_marks[-1][1] - _marks[0][1], 3)
    return out
