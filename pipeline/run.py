"""The main job as a library function: Parquet pairs in, ranked Parquet out, resumable.

    check inputs and output -> plan units -> open checkpoint -> load model
    -> for each unfinished unit: read, explode, tokenize (a thread ahead), score, commit a part
    -> rank all parts per query -> write the output atomically -> drop the checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa

from . import checkpoint as ckpt_mod
from . import startup
from .config import RunConfig
from .errors import InputError, Interrupted, RerankError
from .pairs import UnitPairs, build_pairs, result_part
from .progress import Progress
from .read import InputLayout, Unit, check_same_layout, inspect_layout, iter_unit_tables, plan_units
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
    """Score one unit on its own: the piece any executor (this loop, Ray Data) can run."""
    pairs = build_pairs(unit, table, layout, cfg)
    enc = scorer.encoder.encode(pairs.instructions, pairs.queries, pairs.documents)
    scores = scorer.score(enc, on_batch=on_batch, should_stop=should_stop)
    return result_part(pairs, scores), _concat_info(pairs, [enc])


# First chunk small, so the GPU starts at once; later ones larger, for fewer Python round trips.
FIRST_CHUNK, MAX_CHUNK = 256, 4096


def _prefetch(units, layout, cfg, encoder, stop_event: threading.Event):
    """Read, explode and tokenize units in a thread, ahead of the GPU.

    Yields ("unit", unit, pairs), then ("chunk", Encoded) for pieces of that unit's pairs as
    they are tokenized, then ("end",). The queue holds a few chunks, so memory stays about a
    window while tokenization overlaps scoring, also inside the first window.
    """
    q: queue.Queue = queue.Queue(maxsize=4)
    target = pa.schema([layout.schema.field(n) for n in layout.columns])

    def put(item) -> bool:
        while not stop_event.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for unit, table in iter_unit_tables(units):
                if stop_event.is_set():
                    return
                if table.schema != target:
                    try:
                        table = table.cast(target)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise InputError(
                            f"{unit.path}: its column types differ from {cfg.inputs[0]} ({exc}); "
                            "give files of one schema in one run"
                        ) from None
                pairs = build_pairs(unit, table, layout, cfg)
                if not put(("unit", unit, pairs)):
                    return
                start, size = 0, FIRST_CHUNK
                n = len(pairs.queries)
                while start < n:
                    stop = min(n, start + size)
                    enc = encoder.encode(pairs.instructions[start:stop], pairs.queries[start:stop],
                                         pairs.documents[start:stop])
                    if not put(("chunk", enc)):
                        return
                    start, size = stop, min(MAX_CHUNK, size * 2)
                if not put(("end",)):
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            q.put(exc)
            return
        q.put(None)

    t = threading.Thread(target=work, name="rerank-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Stop the worker and wait for it: a thread left inside native tokenizer or Arrow code
        # while the interpreter shuts down can abort the process (SIGABRT instead of exit 143).
        stop_event.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


class _Timer:
    """Wall time spent in named stages, for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        return now


def _unit_chunks(items, timer: _Timer, encs: list):
    """The chunks of one unit from the prefetch stream; time spent waiting is input-bound time."""
    while True:
        t0 = time.perf_counter()
        item = next(items)
        timer.add("waiting_for_input", t0)
        if item[0] == "end":
            return
        encs.append(item[1])
        yield item[1]


def _concat_info(pairs: UnitPairs, encs: list) -> dict:
    return {"rows": pairs.table.num_rows, "pairs": int(sum(len(e) for e in encs)),
            "tokens": int(sum(int(e.offsets[-1]) for e in encs)),
            "truncated": int(sum(int(e.truncated.sum()) for e in encs)),
            "skipped_null": int((~pairs.valid).sum())}


def run(cfg: RunConfig, *, progress: bool | None = None, should_stop=None, scorer=None) -> Summary:
    """Score and rank `cfg.inputs` into `cfg.output`. Rerunning after a crash resumes."""
    from .families import inspect_model
    from .score import Scorer, resolve_device, resolve_dtype

    startup.reset("process_to_run")
    t0 = time.monotonic()
    layout, units, total_pairs = validate(cfg)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    kind = scorer.kind if scorer is not None else inspect_model(cfg)
    fp = fingerprint(cfg, layout, device.type, dtype, kind)
    ck = ckpt_mod.Checkpoint.open(cfg.ckpt_dir, fp, restart=cfg.restart)
    pending = [u for u in units if u.id not in ck.done]
    startup.mark("inputs_and_config")
    if scorer is None:
        scorer = Scorer.load(cfg, kind)
    summary = Summary(output=cfg.output, units=len(units), units_resumed=len(units) - len(pending),
                      device=str(device), dtype=dtype, attention=scorer.kernel)
    done_pairs = sum(ck.done[u.id]["pairs"] + ck.done[u.id]["skipped_null"] for u in units if u.id in ck.done)
    prog = Progress(total_pairs, done_pairs, bar=progress)
    stop_event = threading.Event()
    if scorer.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(scorer.device)
    t_score = time.monotonic()
    timer = _Timer()
    items = _prefetch(pending, layout, cfg, scorer.encoder, stop_event)

    def on_batch(pairs: int, tokens: int) -> None:
        if not startup.seen("first_batch"):
            if scorer.device.type == "cuda":  # the batch is done, not only launched
                import torch

                torch.cuda.synchronize(scorer.device)
            startup.mark("first_batch")
        prog.update(pairs, tokens)
    try:
        while True:
            t0 = time.perf_counter()
            head = next(items, None)
            timer.add("waiting_for_input", t0)
            if head is None:
                break
            _, unit, pairs = head
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            encs: list = []
            scores = scorer.score_stream(_unit_chunks(items, timer, encs), on_batch=on_batch,
                                         should_stop=should_stop)
            if pairs.valid.size and not pairs.valid.all():
                prog.update(int((~pairs.valid).sum()), 0)
            t0 = time.perf_counter()
            ck.commit(unit.id, result_part(pairs, scores), _concat_info(pairs, encs))
            timer.add("writing_parts", t0)
    except KeyboardInterrupt:
        items.close()
        prog.close()
        signum = getattr(should_stop, "signum", None) or 2
        raise Interrupted(signum) from None
    except BaseException:
        items.close()
        prog.close()
        raise
    prog.close()
    score_seconds = time.monotonic() - t_score

    done_units = [u.id for u in units]
    t0 = time.perf_counter()
    summary.rows = write_ranked(ck.parts(done_units), layout, cfg)
    timer.add("final_write", t0)
    summary.extra = {f"seconds_{k}": round(v, 3) for k, v in timer.seconds.items()}
    summary.extra.update({f"startup_{k}_s": v for k, v in startup.stages().items()})
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
    summary.oom_retries = scorer.stats.oom_retries
    summary.batches = scorer.stats.batches
    summary.batch_token_budget = scorer.budget
    if scorer.device.type == "cuda":
        import torch

        summary.peak_gpu_memory_bytes = int(torch.cuda.max_memory_reserved(scorer.device))
    log.info("summary %s", json.dumps(summary.__dict__, sort_keys=True))
    return summary


__all__ = ["run", "validate", "score_unit", "Summary", "RerankError"]
