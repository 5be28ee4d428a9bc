"""The main job as a library function: Parquet pairs in, ranked Parquet out, resumable.

    plan    (pipeline/driver/plan.py):    validate inputs from footers, units, fingerprint, checkpoint + lock
    execute (pipeline/driver/execute.py): unfinished units -> parts, through an executor's unit workers
    finish  (pipeline/driver/finish.py):  rank, publish the output, remove the checkpoint
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from pipeline.cache import prepare as prepare_cache
from pipeline.cache.dedup import run_counts
from pipeline.config import RunConfig
from pipeline.data import chunk_scores
from pipeline.driver.execute import execute, pick_executor
from pipeline.driver.finish import cleanup, publish, published_output, totals, verify_parts
from pipeline.driver.plan import check_output, fingerprint, make_plan, validate
from pipeline.errors import Interrupted, RerankError, StoreUnavailable, first_line
from pipeline.executors.worker import load_engine
from pipeline.runtime import startup
from pipeline.runtime.progress import Progress
from pipeline.storage.sink import PartsChanged
from pipeline.runtime.stop import StopToken, as_token
from pipeline.runtime.timing import Timer

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


def _resumed(record: dict, key: str) -> int:
    return int(record.get("resumed", {}).get(key, 0))


def _kept_pairs(plan, partial: int | None = None) -> int:
    """Pairs in the checkpoint: finished units (nulls skipped included) and partial commits
    (`partial`, listed again when None: workers may have written some)."""
    ck = plan.ckpt
    whole = sum(ck.done[u.id]["pairs"] + ck.done[u.id]["skipped_null"] for u in plan.units if u.id in ck.done)
    return whole + (ck.kept_pairs(refresh=True) if partial is None else partial)


def _total_pairs(plan) -> int | None:
    """Pairs the run scores in all: known from the footers, except with --chunk-tokens, where each
    document is as many pairs as it has windows (known once its unit is tokenized)."""
    return None if plan.cfg.chunk_tokens else plan.total_pairs


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
    with startup.recording(timeline):  # the engine marks its loading stages there
        return _run(cfg, progress, stop, scorer, on_progress, timeline)


def _run(cfg: RunConfig, progress, stop: StopToken | None, scorer, on_progress, timeline) -> Summary:
    t_start = time.monotonic()
    plan = prog = executor = None
    try:
        try:
            if cfg.cache:  # a location that cannot be a cache is refused before any work
                prepare_cache(cfg.cache)
            plan = make_plan(cfg, kind=scorer.info.kind if scorer is not None else None)
        except OSError as exc:  # a store that fails before any work: nothing to keep, say so
            raise StoreUnavailable.before_work(exc) from None
        cfg = plan.cfg  # with a hub id resolved to its local snapshot
        timeline.mark("inputs_and_config")
        if cfg.chunk_scores:
            chunk_scores.check_target(plan)
        ck = plan.ckpt
        summary = Summary(output=cfg.output, units=len(plan.units), device=str(plan.device), dtype=plan.dtype)
        rec = published_output(plan)
        if rec is not None:  # killed after publishing: finish the cleanup only
            log.info("%s was already written by this checkpoint%s", cfg.output,
                     "" if cfg.keep_checkpoint else "; removing the checkpoint")
            summary.rows = rec["rows"]
            summary.units_resumed = len(plan.units)
            summary.__dict__.update(rec.get("totals", {}))
            summary.pairs_resumed = summary.pairs_scored + summary.skipped_null
            if cfg.chunk_scores:
                chunk_scores.write_if_missing(plan)
            cleanup(plan, cfg.keep_checkpoint)
            summary.seconds = round(time.monotonic() - t_start, 3)
            return summary
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
        done_pairs = _kept_pairs(plan, partial)
        summary.pairs_resumed = done_pairs
        prog = Progress(_total_pairs(plan), done_pairs, bar=progress)

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
            verify_parts(plan, lambda: execute(plan, executor, on_batch, stop, engine=scorer, timeline=timeline))
        finally:
            prog.close()
        score_seconds = time.monotonic() - t_score
        def rescore():
            execute(plan, executor, on_batch, stop, engine=scorer, timeline=timeline)
            verify_parts(plan, rescore)

        if cfg.chunk_scores:  # before the output: a rerun after a kill between the two writes both
            t0 = time.perf_counter()
            try:
                chunk_scores.write(plan)
            except PartsChanged:  # a part is not the one committed: score its units again, once
                rescore()
                chunk_scores.write(plan)
            timer.add("chunk_scores", t0)
        t0 = time.perf_counter()
        summary.rows = publish(plan, stop, rescore=lambda: execute(plan, executor, on_batch, stop, engine=scorer,
                                                                   timeline=timeline))
        timer.add("final_write", t0)
        summary.__dict__.update(totals(plan))
        cleanup(plan, cfg.keep_checkpoint)
    except KeyboardInterrupt:
        signum = (stop.signum if stop is not None else None) or 2
        if plan is None or plan.ckpt is None:
            raise Interrupted(signum) from None
        kept = redo = None
        try:  # what the checkpoint holds now, workers' last commits included
            if executor is not None and executor.kind != "local" and plan.ckpt.lease is not None:
                plan.ckpt.done = plan.ckpt.finished(known=plan.ckpt.done)  # units whose report never came
            kept = _kept_pairs(plan)
            # Pairs this run scored (counted per batch) and did not keep. Ray reports units only
            # when they end, so there the count is not known.
            if prog is None or executor is None or executor.kind != "ray":
                redo = max(0, (prog.done if prog is not None else kept) - kept)
        except (OSError, RerankError) as exc:
            log.warning("could not count the pairs kept in the checkpoint (%s)", first_line(exc))
        plan.ckpt.close(remove=False)
        raise Interrupted(signum, kept, _total_pairs(plan), redo) from None
    except BaseException:
        if plan is not None and plan.ckpt is not None and plan.ckpt.lease is not None:
            # nothing scored yet: leave no checkpoint behind; else keep it for the rerun
            try:
                plan.ckpt.close(remove=not plan.ckpt.holds_work(refresh=True))
            except OSError as exc:  # the store that failed the run fails this too: report the first
                log.warning("could not release the checkpoint (%s); a rerun takes it over once its lease expires",
                            first_line(exc))
        raise
    stages = dict(per_device[0]["stage_seconds"]) if executor.kind == "local" else {}  # this process's
    stages.update(timer.seconds)
    summary.extra = {f"seconds_{k}": round(v, 3) for k, v in stages.items()}
    summary.extra.update({f"startup_{k}_s": v for k, v in timeline.stages().items()})
    if executor.kind != "local":
        summary.extra["devices"] = per_device
    # Prefix sharing: the pairs' tokens this run scored, and those that went through the model.
    # (A unit resumed from partial commits counts only the pairs this run scored.)
    summary.extra["tokens_before_sharing"] = sum(ck.done[u]["tokens"] - _resumed(ck.done[u], "tokens") for u in fresh)
    summary.extra["tokens_after_sharing"] = sum(ck.done[u].get("tokens_computed", ck.done[u]["tokens"])
                                                - _resumed(ck.done[u], "tokens_computed") for u in fresh)
    if cfg.chunk_tokens:  # documents scored, those split into several windows, windows scored
        keys = ("documents", "split", "windows")
        summary.extra["chunking"] = {k: sum(ck.done[u.id].get("chunking", {}).get(k, 0) for u in plan.units)
                                     for k in keys}
    summary.__dict__.update(run_counts(ck.done[u] for u in fresh))
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
