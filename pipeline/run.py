"""The main job as a library function: Parquet pairs in, ranked Parquet out, resumable.

    plan    (pipeline/driver/plan.py):    inputs, output, layout and units, the model resolved, the
                                          checkpoint taken under its lease
    execute (pipeline/driver/execute.py): unfinished units -> parts, through an executor's unit
                                          workers; every record read again
    finish  (pipeline/driver/finish.py):  chunk scores, rank, publish the output, remove the
                                          checkpoint, the summary's counts
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from pipeline.cache import prepare as prepare_cache
from pipeline.config import RunConfig
from pipeline.driver.execute import execute, pick_executor
from pipeline.driver.finish import finish, finish_published
from pipeline.driver.plan import check_output, fingerprint, make_plan, validate
from pipeline.errors import Interrupted, RerankError, StoreUnavailable, first_line
from pipeline.executors.worker import load_engine
from pipeline.runtime import startup
from pipeline.runtime.progress import Progress
from pipeline.runtime.stop import as_token
from pipeline.runtime.timing import Timer
from pipeline.storage.places import check_chunk_scores

log = logging.getLogger(__name__)


@dataclass
class Summary:
    output: str
    rows: int = 0
    pairs_scored: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped_null: int = 0
    empty_lists: int = 0  # nested input: rows with an empty list (kept, unscored)
    seconds: float = 0.0  # the whole run: planning, model load, scoring, final write, cleanup
    # Rates count the pairs this run scored (not resumed units): over the seconds from the first
    # unit read to the last part, and over `seconds`, model load and final write included.
    scoring_pairs_per_s: float = 0.0
    scoring_tokens_per_s: float = 0.0
    run_pairs_per_s: float = 0.0
    peak_gpu_memory_bytes: int = 0
    oom_retries: int = 0
    batches: int = 0
    units: int = 0
    units_resumed: int = 0
    pairs_resumed: int = 0  # pairs this run took from the checkpoint (whole units and partial commits)
    pairs_this_run: int = 0  # pairs this run scored (nulls skipped included): the rest
    # Of the pairs this run gave a score: those the model computed, those the cache (--cache) gave,
    # and those whose text an earlier pair of the same unit has (scored once).
    pairs_computed: int = 0
    pairs_from_cache: int = 0
    duplicate_pairs: int = 0
    batch_token_budget: int = 0
    device: str = ""
    dtype: str = ""
    attention: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def run(cfg: RunConfig, *, progress: bool | None = None, should_stop=None, scorer=None,
        on_progress=None) -> Summary:
    """Score and rank `cfg.inputs` into `cfg.output`. Rerunning after a crash resumes.

    progress     a bar (True), log lines (False), or a bar on a terminal only (None)
    should_stop  a runtime.stop.StopToken, or a callable asked at the stop's check points (True:
                 stop there); a stop raises Interrupted with the checkpoint consistent
    scorer       an engine already loaded for `cfg` (the local executor scores on it)
    on_progress  on_progress(pairs, tokens), in this process after each scored batch (Ray:
                 after each unit), e.g. to stop on an event of the caller's
    """
    stop = as_token(should_stop)
    timeline = startup.Timeline.begin("process_to_run")
    t_start = time.monotonic()
    plan = prog = executor = None
    with startup.recording(timeline):  # the engine marks its loading stages there
        try:
            # -- plan: every check that needs no model, the model resolved, the checkpoint taken
            try:
                if cfg.cache:  # a location that cannot be a cache is refused before any work
                    prepare_cache(cfg.cache)
                plan = make_plan(cfg, kind=scorer.info.kind if scorer is not None else None)
            except OSError as exc:  # a store that fails before any work: nothing to keep, say so
                raise StoreUnavailable.before_work(exc) from None
            cfg, ck = plan.cfg, plan.ckpt  # with a hub id resolved to its local snapshot
            timeline.mark("inputs_and_config")
            if cfg.chunk_scores:
                check_chunk_scores(cfg.chunk_scores, ck, overwrite=cfg.overwrite)
            summary = Summary(output=cfg.output, units=len(plan.units), device=str(plan.device), dtype=plan.dtype)
            published = finish_published(plan)
            if published is not None:  # killed after publishing: the cleanup only
                summary.__dict__.update(published)
                summary.seconds = round(time.monotonic() - t_start, 3)
                return summary
            # -- execute: the units not in the checkpoint, on the executor picked once
            executor = pick_executor(cfg)
            if scorer is None and executor.kind == "local":
                scorer = load_engine(cfg, plan.kind)
            if stop is not None:
                stop.check()  # a check point: the model is loaded, nothing is scored yet
            summary.units_resumed = sum(1 for u in plan.units if u.id in ck.done)
            summary.attention = scorer.info.kernel if scorer is not None else ""
            partial = ck.kept_pairs(refresh=False)
            if partial:
                log.info("resuming: %d pairs of unfinished units already scored", partial)
            summary.pairs_resumed = ck.pairs_held(plan.unit_ids, partial)
            prog = Progress(plan.pairs_to_score, summary.pairs_resumed, bar=progress)

            def on_batch(pairs: int, tokens: int) -> None:
                prog.update(pairs, tokens)
                if on_progress is not None:
                    on_progress(pairs, tokens)

            if scorer is not None:
                scorer.reset_peak_memory()
            t_score = time.monotonic()
            timer = Timer()
            fresh = [u.id for u in plan.units if u.id not in ck.done]  # scored by this run
            try:
                per_device = execute(plan, executor, on_batch, stop, engine=scorer, timeline=timeline)
            finally:
                prog.close()
            score_seconds = time.monotonic() - t_score

            def rescore() -> None:  # a part found changed as the final write reads it
                execute(plan, executor, on_batch, stop, engine=scorer, timeline=timeline)

            # -- finish: the chunk scores, the output ranked and published, the checkpoint removed
            fields, extra = finish(plan, fresh, rescore, stop, timer)
            summary.__dict__.update(fields)
        except KeyboardInterrupt:
            signum = stop.signum if stop is not None else None
            # Set with no signal: the caller's should_stop (wait(0) reads the token without asking
            # the callable again). Unset: a KeyboardInterrupt of Python's own, i.e. SIGINT.
            requested = signum is None and stop is not None and stop.wait(0)
            signum = signum or 2
            if plan is None or plan.ckpt is None:
                raise Interrupted(signum, requested=requested) from None
            kept = redo = None
            try:  # what the checkpoint holds now, workers' last commits included
                if executor is not None and executor.kind != "local" and plan.ckpt.lease is not None:
                    plan.ckpt.done = plan.ckpt.finished(known=plan.ckpt.done)  # units whose report never came
                kept = plan.ckpt.pairs_held(plan.unit_ids)
                # Pairs this run scored (counted per batch) and did not keep. Ray reports units only
                # when they end, so there the count is not known.
                if prog is None or executor is None or executor.kind != "ray":
                    redo = max(0, (prog.done if prog is not None else kept) - kept)
            except (OSError, RerankError) as exc:
                log.warning("could not count the pairs kept in the checkpoint (%s)", first_line(exc))
            plan.ckpt.close(remove=False)
            raise Interrupted(signum, kept, plan.pairs_to_score, redo, requested=requested) from None
        except BaseException:
            if plan is not None and plan.ckpt is not None and plan.ckpt.lease is not None:
                # nothing scored yet: leave no checkpoint behind; else keep it for the rerun
                try:
                    plan.ckpt.close(remove=not plan.ckpt.holds_work(refresh=True))
                except OSError as exc:  # the store that failed the run fails this too: report the first
                    log.warning("could not release the checkpoint (%s); a rerun takes it over once its lease "
                                "expires", first_line(exc))
            raise
        stages = dict(per_device[0]["stage_seconds"]) if executor.kind == "local" else {}  # this process's
        stages.update(timer.seconds)
        summary.extra = {f"seconds_{k}": round(v, 3) for k, v in stages.items()}
        summary.extra.update({f"startup_{k}_s": v for k, v in timeline.stages().items()})
        if executor.kind != "local":
            summary.extra["devices"] = per_device
        summary.extra.update(extra)
        summary.seconds = round(time.monotonic() - t_start, 3)  # the whole run, plan to cleanup
        summary.pairs_this_run = prog.pairs
        summary.scoring_pairs_per_s = round(prog.pairs / max(score_seconds, 1e-9), 2)
        summary.scoring_tokens_per_s = round(prog.tokens / max(score_seconds, 1e-9), 1)
        summary.run_pairs_per_s = round(prog.pairs / max(summary.seconds, 1e-9), 2)
        if scorer is not None:
            stats = scorer.stats()
            summary.oom_retries = stats.oom_retries
            summary.batches = stats.batches
            summary.batch_token_budget = scorer.token_budget
            summary.peak_gpu_memory_bytes = scorer.peak_memory_bytes()
        log.info("summary %s", json.dumps(summary.__dict__, sort_keys=True))
        return summary


__all__ = ["run", "validate", "check_output", "fingerprint", "Summary", "RerankError"]
