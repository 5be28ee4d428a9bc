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
finishes step 4 and exits 0 (finish_published); an output that was changed or removed since is
written again. The steps themselves are the sink's (pipeline/storage/sink.py); this module says
what to write, and counts what the summary reports from the units' verified records.
"""

from __future__ import annotations

import logging
import time

from pipeline.data import chunk_scores
from pipeline.data.chunks import Chunking
from pipeline.data.write import write_dataset, write_ranked
from pipeline.runtime.signals import critical
from pipeline.runtime.timing import Timer
from pipeline.storage.sink import PartsChanged

log = logging.getLogger(__name__)


def finish(plan, fresh: list[str], rescore, should_stop, timer: Timer) -> tuple[dict, dict]:
    """The chunk scores (--chunk-scores), then steps 1-4, and the summary's counts from the units'
    verified records: its fields (rows, totals, this run's pairs computed, from the cache and
    repeated) and its extra counts. `fresh`: the units this run scored. A part that is not the
    one committed when a write reads it is scored again (`rescore()`, which verifies the records
    again), then that write starts over; one bad again right after that fails the run."""
    cfg, ck = plan.cfg, plan.ckpt
    unit_ids = plan.unit_ids
    if cfg.chunk_scores:  # before the output: a rerun after a kill between the two writes both
        t0 = time.perf_counter()
        chunking = Chunking.of(cfg)
        try:
            chunk_scores.write(ck, cfg.chunk_scores, unit_ids, plan.layout, chunking)
        except PartsChanged:  # a part is not the one committed: score its units again, once
            rescore()
            chunk_scores.write(ck, cfg.chunk_scores, unit_ids, plan.layout, chunking)
        timer.add("chunk_scores", t0)
    t0 = time.perf_counter()
    for attempt in (1, 2):  # steps 1-3
        try:
            rows = ck.finish(unit_ids,
                             lambda parts, path: write_ranked(parts, plan.layout, cfg, path),
                             lambda parts, folder: write_dataset(parts, plan.layout, cfg, folder),
                             overwrite=cfg.overwrite, restart=cfg.restart, output_existed=plan.output_existed,
                             critical=lambda: critical(should_stop),
                             record={"totals": ck.totals(unit_ids), **plan.shape})
            break
        except PartsChanged:
            if attempt == 2:
                raise
            rescore()
    timer.add("final_write", t0)
    fields = {"rows": rows, **ck.totals(unit_ids), **ck.run_counts(fresh)}
    extra = ck.sharing_counts(fresh)
    if cfg.chunk_tokens:
        extra["chunking"] = ck.chunking_counts(unit_ids)
    ck.close(remove=not cfg.keep_checkpoint)  # step 4 (or, kept, just release the lease)
    return fields, extra


def finish_published(plan) -> dict | None:
    """A rerun that finds the output published by this checkpoint, still as recorded: the chunk
    scores where they are missing, and step 4 only. Returns the summary's fields, from the
    published record (None: not published, or the output changed since, which is written again)."""
    cfg, ck = plan.cfg, plan.ckpt
    rec = ck.published_output(plan.shape)
    if rec is None:
        return None
    log.info("%s was already written by this checkpoint%s", cfg.output,
             "" if cfg.keep_checkpoint else "; removing the checkpoint")
    fields = {"rows": rec["rows"], "units_resumed": len(plan.units), **rec.get("totals", {})}
    fields["pairs_resumed"] = fields.get("pairs_scored", 0) + fields.get("skipped_null", 0)
    if cfg.chunk_scores:
        chunk_scores.write(ck, cfg.chunk_scores, plan.unit_ids, plan.layout, Chunking.of(cfg), if_missing=True)
    ck.close(remove=not cfg.keep_checkpoint)
    return fields
