"""The local executor: one unit worker in this process, on the engine the run loaded."""

from __future__ import annotations

from .specs import ExecutorSpec, WorkSpec
from .worker import UnitWorker


def run_local(executor: ExecutorSpec, work: WorkSpec, units, on_unit_done, progress=None, stop=None) -> list[dict]:
    """Score `units` here; `on_unit_done(unit, record)` as each part lands. One row: this process."""
    worker = UnitWorker(work, engine=executor.engine, checkpoint=executor.checkpoint, timeline=executor.timeline)
    # Small units share batches: the units are a list here, so the next never waits on this one.
    try:
        for unit, record in worker.run(iter(units), on_batch=progress, stop=stop, group_small=True):
            on_unit_done(unit, record)
    finally:
        worker.close()
    return [worker.row()]
