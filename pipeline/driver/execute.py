"""Execute a plan: unfinished units -> scored parts in the checkpoint.

Three interchangeable executors run the same units through the same loop
(`pipeline.scoring.score_units`): this process on one device, one worker process per device of
this host (`--devices`), or Ray Data actors (`--executor ray`). Workers commit parts themselves
(`Checkpoint(path).commit`); the driver learns each unit's record as it lands.
"""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.scoring import Timer, Work, score_units
from pipeline.data.pairs import build_pairs
from pipeline.data.read import InputLayout, Unit

_Timer = Timer  # the name run.py and the bench know


def score_unit(unit: Unit, table: pa.Table, layout: InputLayout, cfg: RunConfig, scorer,
               on_batch=None, should_stop=None) -> tuple[pa.Table, dict]:
    """Score one unit already read: the same result the executors' loop commits for it (each
    distinct text scored once, pipeline/cache/dedup.py)."""
    work = Work(unit, build_pairs(unit, table, layout, cfg))
    enc = scorer.encoder.encode(*work.to_score())
    work.encs.append(enc)
    return work.result(scorer.score(enc, on_batch=on_batch, should_stop=should_stop))


def uses_workers(cfg: RunConfig) -> bool:
    """True when units run in other processes (the device pool or Ray), not in this one."""
    return cfg.executor == "ray" or bool(cfg.devices)


def execute(plan, scorer, prog, timer: Timer, should_stop=None) -> list[dict] | None:
    """Score every unit of `plan` not yet in its checkpoint, one committed part per unit.
    Stops (KeyboardInterrupt) at a batch boundary once should_stop() says so. Returns the
    per-device rows of a worker executor, None for this process."""
    from pipeline.runtime.signals import polled

    ck = plan.ckpt
    pending = [u for u in plan.units if u.id not in ck.done]
    with polled(should_stop):
        if uses_workers(plan.cfg):
            from pipeline.executors import execute_remote
            from pipeline.executors.worker import WorkSpec

            spec = WorkSpec(cfg=plan.cfg, kind=plan.kind, layout=plan.layout, ckpt_dir=ck.dir)

            def landed(unit_id: str, record: dict) -> None:
                ck.done[unit_id] = record
                if ck.lease is not None:
                    ck.lease.renew()

            return execute_remote(plan.cfg, spec, pending, landed, prog.update, should_stop)
        # This process holds the lease and is the only writer: the partials it listed at the
        # start and those it writes are all there are.
        for unit, part, info in score_units(pending, plan.layout, plan.cfg, scorer, on_batch=prog.update,
                                            should_stop=should_stop, timer=timer, group_small=True,
                                            kept_for=lambda u: ck.kept(u.id, refresh=False),
                                            save_partial=lambda u, *a: ck.commit_partial(u.id, *a)):
            t0 = time.perf_counter()
            ck.commit(unit.id, part, info)
            timer.add("writing_parts", t0)
    return None
