"""Executors turn planned units into parts in the checkpoint, behind one call:

    run_units(executor, work, units, on_unit_done, progress, stop) -> per-device rows

  local     this process, one device, on the engine the run loaded      (local.py)
  pool      one worker process per device of this host (`--devices`)    (pool.py)
  ray       an actor pool through Ray Data, on one machine or a cluster (ray_data.py)

Every executor runs the same `UnitWorker` (worker.py) over the same units, so their parts are
identical. Workers commit each part and its record themselves; `on_unit_done(unit, record)` runs
in the driver's process as each lands.
"""

from __future__ import annotations

from .local import run_local
from .pool import run_pool
from .ray_data import run_ray
from .specs import ExecutorSpec, WorkSpec
from .worker import UnitWorker

RUNNERS = {"local": run_local, "pool": run_pool, "ray": run_ray}


def run_units(executor: ExecutorSpec, work: WorkSpec, units, on_unit_done, progress=None, stop=None) -> list[dict]:
    """Score `units` (a list of read.Unit) where `executor` says, with what `work` says.

    on_unit_done(unit, record)  called in this process as each unit's part and record land
    progress(pairs, tokens)     called in this process after each batch (Ray: after each unit)
    stop                        a runtime.stop.StopToken (or None), checked at the executor's
                                check points (runtime/stop.py); KeyboardInterrupt once set

    Returns one row per device or actor: device, units, pairs, tokens, busy_seconds, and what the
    executor knows besides (its load time, its startup stages)."""
    return RUNNERS[executor.kind](executor, work, units, on_unit_done, progress, stop)


__all__ = ["ExecutorSpec", "WorkSpec", "UnitWorker", "run_units"]
