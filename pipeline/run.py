"""The main job as a library function: Parquet pairs in, ranked Parquet out, resumable.

    plan    (pipeline/driver/plan.py):    validate inputs from footers, units, fingerprint, checkpoint + lock
    execute (pipeline/driver/execute.py): unfinished units -> parts, via score_unit
    finish  (pipeline/driver/finish.py):  rank, publish the output, remove the checkpoint
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from pipeline.runtime import startup
from pipeline.config import RunConfig
from pipeline.errors import Interrupted, RerankError, ScoringError, StoreUnavailable, first_line
from pipeline.driver.execute import _Timer, execute, score_unit, uses_workers
from pipeline.driver.finish import cleanup, publish, published_output, totals, verify_parts
from pipeline.driver.plan import check_output, fingerprint, make_plan, validate
from pipeline.runtime.progress import Progress

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


def _load_scorer(cfg: RunConfig, kind):
    """Scorer.load, with GPU memory failures as one line naming the free memory and the fix."""
    import torch

    from pipeline.engines.score import Scorer

    try:
        return Scorer.load(cfg, kind)
    except (torch.OutOfMemoryError, torch.AcceleratorError if hasattr(torch, "AcceleratorError") else RuntimeError
            ) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "CUDA" not in str(exc):
            raise
        free = ""
        try:
            free_b, total_b = torch.cuda.mem_get_info()
            free = f" ({free_b / 2**20:.0f} MiB free of {total_b / 2**30:.0f} GiB)"
        except Exception:  # no CUDA context to ask: say nothing rather than guess
            pass
        raise ScoringError(
            f"model {cfg.model}: the GPU has not enough free memory to load it{free}; another process may hold "
            "it: free the GPU, pick another with --device cuda:N, or pass --device cpu"
        ) from None


class _FirstBatch:
    """The progress sink, marking the moment the first batch is done (for the startup timeline)."""

    def __init__(self, prog: Progress, scorer):
        self.prog, self.scorer = prog, scorer

    def update(self, pairs: int, tokens: int) -> None:
        if not startup.seen("first_batch"):
            if self.scorer is not None and self.scorer.device.type == "cuda":  # done, not only launched
                import torch

                torch.cuda.synchronize(self.scorer.device)
            startup.mark("first_batch")
        self.prog.update(pairs, tokens)

    def __getattr__(self, name):
        return getattr(self.prog, name)


def _resumed(record: dict, key: str) -> int:
    return int(record.get("resumed", {}).get(key, 0))


def _kept_pairs(plan, partial: int | None = None) -> int:
    """Pairs in the checkpoint: finished units (nulls skipped included) and partial commits
    (`partial`, listed again when None: workers may have written some)."""
    ck = plan.ckpt
    whole = sum(ck.done[u.id]["pairs"] + ck.done[u.id]["skipped_null"] for u in plan.units if u.id in ck.done)
    return whole + (ck.kept_pairs(refresh=True) if partial is None else partial)


def run(cfg: RunConfig, *, progress: bool | None = None, should_stop=None, scorer=None) -> Summary:
    """Score and rank `cfg.inputs` into `cfg.output`. Rerunning after a crash resumes."""
    t_start = time.monotonic()
    startup.reset("process_to_run")
    plan = prog = None
    try:
        try:
            if cfg.cache:  # a location that cannot be a cache is refused before any work
                from pipeline.cache import prepare

                prepare(cfg.cache)
            plan = make_plan(cfg, kind=scorer.kind if scorer is not None else None)
        except OSError as exc:  # a store that fails before any work: nothing to keep, say so
            raise StoreUnavailable.before_work(exc) from None
        cfg = plan.cfg  # with a hub id resolved to its local snapshot
        startup.mark("inputs_and_config")
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
            cleanup(plan, cfg.keep_checkpoint)
            summary.seconds = round(time.monotonic() - t_start, 3)
            return summary
        if scorer is None and not uses_workers(cfg):
            scorer = _load_scorer(cfg, plan.kind)
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        summary.units_resumed = sum(1 for u in plan.units if u.id in ck.done)
        summary.attention = scorer.kernel if scorer is not None else ""
        partial = ck.kept_pairs(refresh=False)
        if partial:
            log.info("resuming: %d pairs of unfinished units already scored", partial)
        done_pairs = _kept_pairs(plan, partial)
        summary.pairs_resumed = done_pairs
        prog = _FirstBatch(Progress(plan.total_pairs, done_pairs, bar=progress), scorer)
        if scorer is not None and scorer.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(scorer.device)
        t_score = time.monotonic()
        timer = _Timer()
        fresh = [u.id for u in plan.units if u.id not in ck.done]  # scored by this run
        try:
            per_device = execute(plan, scorer, prog, timer, should_stop)
            verify_parts(plan, lambda: execute(plan, scorer, prog, timer, should_stop))
        finally:
            prog.close()
        score_seconds = time.monotonic() - t_score
        t0 = time.perf_counter()
        summary.rows = publish(plan, should_stop)
        timer.add("final_write", t0)
        summary.__dict__.update(totals(plan))
        cleanup(plan, cfg.keep_checkpoint)
    except KeyboardInterrupt:
        signum = getattr(should_stop, "signum", None) or 2
        if plan is None or plan.ckpt is None:
            raise Interrupted(signum) from None
        kept = redo = None
        try:  # what the checkpoint holds now, workers' last commits included
            if uses_workers(plan.cfg) and plan.ckpt.lease is not None:
                plan.ckpt.done = plan.ckpt.finished(known=plan.ckpt.done)  # units whose report never came
            kept = _kept_pairs(plan)
            # Pairs this run scored (counted per batch) and did not keep. Ray reports units only
            # when they end, so there the count is not known.
            if prog is None or plan.cfg.executor != "ray":
                redo = max(0, (prog.done if prog is not None else kept) - kept)
        except (OSError, RerankError) as exc:
            log.warning("could not count the pairs kept in the checkpoint (%s)", first_line(exc))
        plan.ckpt.close(remove=False)
        raise Interrupted(signum, kept, plan.total_pairs, redo) from None
    except BaseException:
        if plan is not None and plan.ckpt is not None and plan.ckpt.lease is not None:
            # nothing scored yet: leave no checkpoint behind; else keep it for the rerun
            try:
                plan.ckpt.close(remove=not plan.ckpt.holds_work(refresh=True))
            except OSError as exc:  # the store that failed the run fails this too: report the first
                log.warning("could not release the checkpoint (%s); a rerun takes it over once its lease expires",
                            first_line(exc))
        raise
    summary.extra = {f"seconds_{k}": round(v, 3) for k, v in timer.seconds.items()}
    summary.extra.update({f"startup_{k}_s": v for k, v in startup.stages().items()})
    if per_device is not None:
        summary.extra["devices"] = per_device
    # Prefix sharing: the pairs' tokens this run scored, and those that went through the model.
    # (A unit resumed from partial commits counts only the pairs this run scored.)
    summary.extra["tokens_before_sharing"] = sum(ck.done[u]["tokens"] - _resumed(ck.done[u], "tokens") for u in fresh)
    summary.extra["tokens_after_sharing"] = sum(ck.done[u].get("tokens_computed", ck.done[u]["tokens"])
                                                - _resumed(ck.done[u], "tokens_computed") for u in fresh)
    from pipeline.cache.dedup import run_counts

    summary.__dict__.update(run_counts(ck.done[u] for u in fresh))
    summary.seconds = round(time.monotonic() - t_start, 3)  # the whole run, plan to cleanup
    summary.pairs_this_run = prog.pairs
    summary.scoring_pairs_per_s = round(prog.pairs / max(score_seconds, 1e-9), 2)
    summary.scoring_tokens_per_s = round(prog.tokens / max(score_seconds, 1e-9), 1)
    summary.run_pairs_per_s = round(prog.pairs / max(summary.seconds, 1e-9), 2)
    if scorer is not None:
        summary.oom_retries = scorer.stats.oom_retries
        summary.batches = scorer.stats.batches
        summary.batch_token_budget = scorer.budget
    if scorer is not None and scorer.device.type == "cuda":
        import torch

        summary.peak_gpu_memory_bytes = int(torch.cuda.max_memory_reserved(scorer.device))
    log.info("summary %s", json.dumps(summary.__dict__, sort_keys=True))
    return summary


__all__ = ["run", "validate", "check_output", "fingerprint", "score_unit", "Summary", "RerankError"]
