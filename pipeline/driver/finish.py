"""Finish a run: rank all parts, publish the output, then remove the checkpoint.

The sequence is safe to kill at any point; the rerun of the same command ends with exit 0 and
the right output:
  1. re-check every input (fast path): an input changed during the run is never published;
  2. write the ranked output to a staging name unique to this run, reading every part through
     the checkpoint, checked against its record as it is read;
  3. put it in place and mark the checkpoint "published" (with the output's size, mtime and
     rows), one critical section that signals do not split;
  4. delete the parts and records, the fingerprint, the marker last.
A rerun that finds a published checkpoint checks that the output is still the one recorded,
finishes step 4 and exits 0; an output that was changed or removed since is written again.
The steps themselves are the sink's (pipeline/storage/sink.py); this module says what to write.
"""

from __future__ import annotations

from pipeline.data.write import write_dataset, write_ranked
from pipeline.errors import RerankError
from pipeline.runtime.signals import critical
from pipeline.storage.sink import PartsChanged


def verify_parts(plan, rescore) -> None:
    """Before the final write: read every finished unit's record again and call rescore() to
    score the units whose record is no longer intact. The parts themselves are checked by the
    final write as it reads them (publish). A record bad again right after that is a runtime
    failure."""
    ck = plan.ckpt
    bad = ck.recheck([u.id for u in plan.units])
    if not bad:
        return
    rescore()
    again = ck.recheck(bad)
    if again:
        raise RerankError(f"{ck.dir}: the record of unit {again[0]} changed on disk right after it was written; "
                          "check that disk (or pass another --checkpoint-dir), then rerun the same command")


def totals(plan) -> dict:
    """The summary's counts, from the verified records of the units (CheckpointSink.finished/recheck)."""
    t = {"pairs_scored": 0, "tokens": 0, "truncated": 0, "skipped_null": 0, "empty_lists": 0}
    for u in plan.units:
        info = plan.ckpt.done[u.id]
        t["pairs_scored"] += info["pairs"]
        for k in ("tokens", "truncated", "skipped_null"):
            t[k] += info[k]
        t["empty_lists"] += info.get("empty_lists", 0)
    return t


def _shape(plan) -> dict:
    """What decides an output beyond the scores (not in the fingerprint): a rerun that asks for
    another one writes the output again from the parts."""
    shape = {"top_k": plan.cfg.top_k}
    if plan.cfg.dataset:
        shape["output_file_rows"] = plan.cfg.output_file_rows
    return shape


def published_output(plan) -> dict | None:
    """The record of an output this checkpoint already published, if it is still that one."""
    return plan.ckpt.published_output(_shape(plan))


def publish(plan, should_stop=None, rescore=None) -> int:
    """Steps 1-3; returns the rows written. A part that is not the one committed when the write
    reads it is scored again (`rescore()`, then the write starts over); one bad again right
    after that fails the run."""
    cfg, ck = plan.cfg, plan.ckpt
    unit_ids = [u.id for u in plan.units]
    for attempt in (1, 2):
        try:
            return ck.finish(unit_ids,
                             lambda parts, path: write_ranked(parts, plan.layout, cfg, path),
                             lambda parts, folder: write_dataset(parts, plan.layout, cfg, folder),
                             overwrite=cfg.overwrite, restart=cfg.restart, output_existed=plan.output_existed,
                             critical=lambda: critical(should_stop), record={"totals": totals(plan), **_shape(plan)})
        except PartsChanged:
            if attempt == 2 or rescore is None:
                raise
            rescore()
            verify_parts(plan, rescore)


def cleanup(plan, keep: bool) -> None:
    """Step 4 (or, with keep, just release the lease)."""
    plan.ckpt.close(remove=not keep)
