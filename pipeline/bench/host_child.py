"""`python -m pipeline.bench.host_child RECORD.json rerank-batch-args...`: the `rerank-batch` CLI in
this (fresh) process, with a forward that costs nothing, and where the seconds of its scoring
span go (the cross-encoder host bench, host.py, runs one per repeat).

The forward (NullEncoderForward) makes its batch's arrays tensors, as a real one does, and returns
zeros. Every stage of the host side is timed by wrapping the function that does it: wall seconds
and the CPU seconds of the thread that ran it (the tokenizer's own threads, where it runs some,
show only in the process's CPU). The record also has the process's CPU seconds over the scoring
span (`execute`) and when the first batch ran, from the span's start.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import torch

STAGES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # name -> [wall s, thread cpu s, calls]
MARKS: dict[str, float] = {}
_lock = threading.Lock()


class NullEncoderForward:
    """A cross-encoder forward (engines.forwards.Forward) that costs nothing beyond the host's share:
    ids, positions, cu_seqlens and token types made tensors on the device; zero logits."""

    name = "null"
    kernel = "none"
    padded = False
    compiled = False

    def __init__(self, device: torch.device):
        self.device = device

    def logits(self, batch) -> torch.Tensor:
        from pipeline.engines.forwards import to_device

        if "first_batch" not in MARKS:
            MARKS["first_batch"] = time.perf_counter()
        for a in (batch.cu, batch.ids, batch.pos) + ((batch.types,) if batch.types is not None else ()):
            to_device(a, np.int64, self.device)
        return torch.zeros(batch.pairs, 1, dtype=torch.float32)


def _add(name: str, wall: float, cpu: float) -> None:
    with _lock:
        s = STAGES[name]
        s[0] += wall
        s[1] += cpu
        s[2] += 1


def timed(owner, attr: str, name: str) -> None:
    """Time every call of owner.attr under `name` (a generator: the time spent producing items)."""
    import inspect

    fn = getattr(owner, attr)
    if inspect.isgeneratorfunction(fn):
        def gen(*a, **k):
            it = fn(*a, **k)
            while True:
                w0, c0 = time.perf_counter(), time.thread_time()
                try:
                    item = next(it)
                except StopIteration:
                    _add(name, time.perf_counter() - w0, time.thread_time() - c0)
                    return
                _add(name, time.perf_counter() - w0, time.thread_time() - c0)
                yield item
        setattr(owner, attr, gen)
        return

    def wrapped(*a, **k):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            _add(name, time.perf_counter() - w0, time.thread_time() - c0)
    setattr(owner, attr, wrapped)


def install() -> None:
    """The null forward for every engine built from now on, and the stage timers."""
    import pipeline.run as prun
    import pipeline.scoring as scoring
    from pipeline.cache import runwide
    from pipeline.engines import forwards, oom, score, tokenize
    from pipeline.executors import worker
    from pipeline.storage import sink

    forwards.choose = lambda m, cfg: NullEncoderForward(m.device)
    # The reading thread's own CPU seconds, in all (its Rust tokenizer calls included where they
    # run on it: TOKENIZERS_PARALLELISM=false).
    real_thread = threading.Thread

    class Thread(real_thread):
        def __init__(self, *a, target=None, **k):
            def run_timed(*ta, **tk):
                c0 = time.thread_time()
                try:
                    target(*ta, **tk)
                finally:
                    _add("reading_thread_total", 0.0, time.thread_time() - c0)
            super().__init__(*a, target=run_timed, **k)
    scoring.threading = type("threading", (), {"Thread": Thread, "Event": threading.Event})
    # The reading thread, in the order it runs them.
    timed(scoring, "iter_unit_tables", "read")
    timed(scoring, "build_pairs", "build_pairs")
    timed(scoring.Work, "__init__", "plan_dedup")  # exact dedup: group, hash, look up
    timed(tokenize.CrossEncoderEncoder, "encode", "tokenize")  # all of it, ids to arrays included
    timed(tokenize.CrossEncoderEncoder, "_batch", "tokenize_rust_call")
    # The consuming thread.
    timed(score.TorchEngine, "_plan", "batch_plan")
    timed(oom, "gather_packed", "gather")
    timed(NullEncoderForward, "logits", "forward_to_device")
    timed(scoring.Work, "result", "unit_result")
    timed(scoring.Work, "remember", "dedup_remember")
    timed(runwide.RunDedup, "flush", "dedup_store_write")
    timed(sink, "_encode", "part_encode")
    timed(sink.CheckpointSink, "_write", "part_and_record_write")
    timed(sink.CheckpointSink, "commit_group", "commit")
    timed(sink.CheckpointSink, "verify", "verify_records")
    timed(worker, "open_run_dedup", "open_run_dedup")
    real_execute, real_finish = prun.execute, prun.finish

    def execute(*a, **k):
        MARKS["scoring_start"] = time.perf_counter()
        c0, t0 = time.process_time(), time.thread_time()
        try:
            return real_execute(*a, **k)
        finally:
            MARKS["scoring_end"] = time.perf_counter()
            MARKS["scoring_process_cpu_s"] = time.process_time() - c0
            MARKS["scoring_main_thread_cpu_s"] = time.thread_time() - t0

    def finish(*a, **k):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return real_finish(*a, **k)
        finally:
            MARKS["final_write_s"] = time.perf_counter() - w0
            MARKS["final_write_process_cpu_s"] = time.process_time() - c0
    prun.execute, prun.finish = execute, finish


def record() -> dict:
    start = MARKS.get("scoring_start", 0.0)
    return {"stages": {k: {"wall_s": round(v[0], 4), "cpu_s": round(v[1], 4), "calls": v[2]} for k, v in STAGES.items()},
            "scoring_s": round(MARKS.get("scoring_end", start) - start, 4),
            "first_batch_after_s": round(MARKS["first_batch"] - start, 4) if "first_batch" in MARKS else None,
            "scoring_process_cpu_s": round(MARKS.get("scoring_process_cpu_s", 0.0), 4),
            "scoring_main_thread_cpu_s": round(MARKS.get("scoring_main_thread_cpu_s", 0.0), 4),
            "final_write_s": round(MARKS.get("final_write_s", 0.0), 4),
            "final_write_process_cpu_s": round(MARKS.get("final_write_process_cpu_s", 0.0), 4)}


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    install()
    from jobs.cli import cli

    try:
        cli.main(args=args, prog_name="rerank-batch", standalone_mode=False)
    finally:
        with open(out, "w") as f:
            json.dump(record(), f)


if __name__ == "__main__":
    main()
