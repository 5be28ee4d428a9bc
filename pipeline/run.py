"""The main job as a library function: Parquet pairs in, ranked Parquet out, resumable.

    check inputs and output -> plan units -> open checkpoint -> load model
    -> for each unfinished unit: read, explode, tokenize (a thread ahead), score, commit a part
    -> rank all parts per query -> write the output atomically -> drop the checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa

from . import checkpoint as ckpt_mod
from .config import RunConfig
from .errors import InputError, Interrupted, RerankError
from .pairs import build_pairs, result_part
from .progress import Progress
from .read import InputLayout, Unit, check_same_layout, inspect_layout, plan_units
from .executors import execute_remote
from .executors.stream import Timer, score_units, unit_info
from .executors.worker import WorkSpec
from .write import write_ranked

log = logging.getLogger(__name__)


@dataclass
class Summary:
    output: str
    rows: int = 0
    pairs_scored: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped_null: int = 0
    seconds: float = 0.0
    pairs_per_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_gpu_memory_bytes: int = 0
    oom_retries: int = 0
    batches: int = 0
    units: int = 0
    units_resumed: int = 0
    batch_token_budget: int = 0
    device: str = ""
    dtype: str = ""
    attention: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def check_output(cfg: RunConfig) -> None:
    out = os.path.abspath(cfg.output)
    for p in cfg.inputs:
        if os.path.abspath(p) == out or (os.path.exists(cfg.output) and os.path.samefile(p, cfg.output)):
            raise InputError(f"{cfg.output}: the output is one of the inputs; pass another -o")
    if os.path.isdir(cfg.output):
        raise InputError(f"{cfg.output}: the output is a directory; pass a file path with -o")
    # An output beside its own checkpoint was written by a run killed before it removed the
    # checkpoint: the rerun rewrites it from the parts (the fingerprint check still applies).
    ours = os.path.exists(os.path.join(cfg.ckpt_dir, "manifest.json"))
    if os.path.exists(cfg.output) and not cfg.overwrite and not ours:
        raise InputError(f"{cfg.output}: the output exists; pass --overwrite to replace it")
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise InputError(f"{cfg.output}: the directory {d} does not exist; create it or pass another -o")
    try:  # os.access says yes to root on read-only file systems; a real file is the test
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise InputError(
            f"{cfg.output}: cannot write in {d} ({exc.strerror}); pass an -o in a writable directory"
        ) from None


def validate(cfg: RunConfig) -> tuple[InputLayout, list[Unit], int]:
    """Everything that can fail on bad input, before any model is loaded."""
    check_output(cfg)
    layout = inspect_layout(cfg.inputs[0], cfg)
    check_same_layout(list(cfg.inputs), layout, cfg)
    units, total_pairs = plan_units(cfg.inputs, layout, cfg.window_pairs)
    return layout, units, total_pairs


def fingerprint(cfg: RunConfig, layout: InputLayout, device: str, dtype: str, kind) -> dict:
    t = kind.template
    return {
        "inputs": [ckpt_mod.file_fingerprint(p) for p in cfg.inputs],
        "model": {**ckpt_mod.model_fingerprint(cfg.model), "family": kind.family},
        "options": {**cfg.score_fields(), "device_type": device, "dtype": dtype, "nested": layout.nested},
        "template": None if t is None else {"prefix": t.prefix, "body": t.body, "suffix": t.suffix,
                                            "positive": t.positive, "negative": t.negative},
    }


def score_unit(unit: Unit, table: pa.Table, layout: InputLayout, cfg: RunConfig, scorer,
               on_batch=None, should_stop=None) -> tuple[pa.Table, dict]:
    """Score one unit already read: the same result the executors' loop commits for it."""
    pairs = build_pairs(unit, table, layout, cfg)
    enc = scorer.encoder.encode(pairs.instructions, pairs.queries, pairs.documents)
    scores = scorer.score(enc, on_batch=on_batch, should_stop=should_stop)
    return result_part(pairs, scores), unit_info(pairs, [enc])


def run(cfg: RunConfig, *, progress: bool | None = None, should_stop=None, scorer=None) -> Summary:
    """Score and rank `cfg.inputs` into `cfg.output`. Rerunning after a crash resumes."""
    from .families import inspect_model
    from .score import Scorer, resolve_device, resolve_dtype

    t0 = time.monotonic()
    layout, units, total_pairs = validate(cfg)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    kind = scorer.kind if scorer is not None else inspect_model(cfg)
    fp = fingerprint(cfg, layout, device.type, dtype, kind)
    ck = ckpt_mod.Checkpoint.open(cfg.ckpt_dir, fp, restart=cfg.restart)
    pending = [u for u in units if u.id not in ck.done]
    local = cfg.executor == "local" and not cfg.devices
    if scorer is None and local:
        scorer = Scorer.load(cfg, kind)
    summary = Summary(output=cfg.output, units=len(units), units_resumed=len(units) - len(pending),
                      device=str(device), dtype=dtype, attention=scorer.kernel if scorer else "")
    done_pairs = sum(ck.done[u.id]["pairs"] + ck.done[u.id]["skipped_null"] for u in units if u.id in ck.done)
    prog = Progress(total_pairs, done_pairs, bar=progress)
    if scorer is not None and scorer.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(scorer.device)
    t_score = time.monotonic()
    timer = Timer()
    try:
        if local:
            for unit, part, info in score_units(pending, layout, cfg, scorer, on_batch=prog.update,
                                                should_stop=should_stop, timer=timer):
                t0 = time.perf_counter()
                ck.commit(unit.id, part, info)
                timer.add("writing_parts", t0)
        else:
            spec = WorkSpec(cfg=cfg, kind=kind, layout=layout, ckpt_dir=cfg.ckpt_dir)
            ck.prepare()
            summary.extra["devices"] = execute_remote(cfg, spec, pending, ck.record, prog.update, should_stop)
    except KeyboardInterrupt:
        prog.close()
        signum = getattr(should_stop, "signum", None) or 2
        raise Interrupted(signum) from None
    except BaseException:
        prog.close()
        raise
    prog.close()
    score_seconds = time.monotonic() - t_score

    done_units = [u.id for u in units]
    t0 = time.perf_counter()
    summary.rows = write_ranked(ck.parts(done_units), layout, cfg)
    timer.add("final_write", t0)
    summary.extra.update({f"seconds_{k}": round(v, 3) for k, v in timer.seconds.items()})
    for u in units:
        info = ck.done[u.id]
        summary.pairs_scored += info["pairs"]
        summary.tokens += info["tokens"]
        summary.truncated += info["truncated"]
        summary.skipped_null += info["skipped_null"]
    if cfg.keep_checkpoint:
        ck.finish()
    else:
        ck.remove()
    summary.seconds = round(time.monotonic() - t0, 3)
    this_run_pairs, this_run_tokens = prog.pairs, prog.tokens
    summary.pairs_per_s = round(this_run_pairs / max(score_seconds, 1e-9), 2)
    summary.tokens_per_s = round(this_run_tokens / max(score_seconds, 1e-9), 1)
    if scorer is not None:
        summary.oom_retries = scorer.stats.oom_retries
        summary.batches = scorer.stats.batches
        summary.batch_token_budget = scorer.budget
    if scorer is not None and scorer.device.type == "cuda":
        import torch

        summary.peak_gpu_memory_bytes = int(torch.cuda.max_memory_reserved(scorer.device))
    log.info("summary %s", json.dumps(summary.__dict__, sort_keys=True))
    return summary


__all__ = ["run", "validate", "score_unit", "Summary", "RerankError"]
