"""Execute a plan: unfinished units -> scored parts in the checkpoint.

Three interchangeable executors run the same units through the same loop
(`pipeline.scoring.score_units`): this process on one device, one worker process per device of
this host (`--devices`), or Ray Data actors (`--executor ray`). Workers commit parts themselves
(`spec.sink.attach().commit`); the driver learns each unit's record as it lands.
"""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.scoring import Timer, score_units, unit_info
from pipeline.data.pairs import build_pairs, result_part
from pipeline.data.read import InputLayout, Unit

_Timer = Timer  # the name run.py and the bench know


def score_unit(unit: Unit, table: pa.Table, layout: InputLayout, cfg: RunConfig, scorer,
               on_batch=None, should_stop=None) -> tuple[pa.Table, dict]:
    """Score one unit already read: the same result the executors' loop commits for it."""
    pairs = build_pairs(unit, table, layout, cfg)
    enc = scorer.encoder.encode(pairs.instructions, pairs.queries, pairs.documents)
    scores = scorer.score(enc, on_batch=on_batch, should_stop=should_stop)
    return result_part(pairs, scores), unit_info(pairs, [enc])


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

            spec = WorkSpec(cfg=plan.cfg, kind=plan.kind, layout=plan.layout, sink=ck.spec())
            return execute_remote(plan.cfg, spec, pending, ck.landed, prog.update, should_stop)
        # This process holds the lease and is the only writer: the partials it listed at the
        # start and those it writes are all there are.
        for together in score_units(pending, plan.layout, plan.cfg, scorer, on_batch=prog.update,
                                    should_stop=should_stop, timer=timer, group_small=True,
                                    kept_for=lambda u: ck.kept(u.id, refresh=False),
                                    save_partial=lambda items: ck.commit_partials([(u.id, *a) for u, *a in items]),
                                    batches=True):
            t0 = time.perf_counter()
            ck.commit_group([(unit.id, part, info) for unit, part, info in together])
            timer.add("writing_parts", t0)
    return None
