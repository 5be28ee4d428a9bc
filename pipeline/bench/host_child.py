"""`python -m pipeline.bench.host_child [--real-forward] RECORD.json rerank-batch-args...`: the
`rerank-batch` CLI in this (fresh) process, and where the seconds of its scoring span go.

Without `--real-forward` (the cross-encoder host bench, host.py, runs one per repeat) the forward
costs nothing: NullEncoderForward makes its batch's arrays tensors, as a real one does, and
returns zeros. With `--real-forward` (the peer bench's CLI row with --cli-stages, peer.py) the
model's own forward runs, on its device, and is timed too (see below).

Every stage of the host side is timed by wrapping the function that does it: wall seconds and the
CPU seconds of the thread that ran it (the tokenizer's own threads, where it runs some, show only
in the process's CPU). The record also has the process's CPU seconds over the scoring span
(`execute`) and when the first batch ran, from the span's start.

With `--real-forward`, also: `forward`, the forward's `logits` calls within the scoring span
(`forward_outside_scoring`: the memory probe's, before it). On CUDA a call returns once its work
is queued, so its wall seconds are launch time (and waiting where the device's queue is full),
not device time; `forward_device_s` is the device's own seconds, from CUDA events around each
call of the span (read once the run is over: they never make the host wait). `device_sync`: the
engine's device-to-host copies of the scores (score.to_host), where the host waits for the
device; `first_batch_sync`: the engine's wait for the first batch (TorchEngine.synchronize),
which ends at `first_batch_done_after_s`.
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
# With --real-forward: the real forward runs, and these CUDA events bracket each of its calls in
# the scoring span.
REAL_FORWARD = False
EVENTS: list[tuple] = []


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


def _in_span() -> bool:
    return "scoring_start" in MARKS and "scoring_end" not in MARKS


def time_forward(cls) -> None:
    """Time the real forward `cls`'s logits calls: wall and thread CPU as `forward` (in the scoring
    span, whose first call marks the first batch) or `forward_outside_scoring`; on CUDA, events
    around each call of the span for its device seconds."""
    fn = cls.logits

    def logits(self, batch):
        span = _in_span()
        if span and "first_batch" not in MARKS:
            MARKS["first_batch"] = time.perf_counter()
        cuda = span and self.device.type == "cuda"
        if cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(self, batch)
        finally:
            _add("forward" if span else "forward_outside_scoring", time.perf_counter() - w0, time.thread_time() - c0)
            if cuda:
                end.record(stream)
                EVENTS.append((start, end))
    cls.logits = logits


def time_first_sync(cls) -> None:
    """Time the engine's synchronize as `first_batch_sync`; the end of its first call in the
    scoring span (the worker's wait for the first batch) is when that batch was done."""
    fn = cls.synchronize

    def synchronize(self):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(self)
        finally:
            _add("first_batch_sync", time.perf_counter() - w0, time.thread_time() - c0)
            if _in_span() and "first_batch_done" not in MARKS:
                MARKS["first_batch_done"] = time.perf_counter()
    cls.synchronize = synchronize


def forward_device_s() -> float | None:
    """The device seconds of the forward's calls in the scoring span (CUDA only; None elsewhere)."""
    if not EVENTS:
        return None
    try:
        total = 0.0
        for a, b in EVENTS:
            b.synchronize()  # on the engine's device, whichever it is
            total += a.elapsed_time(b)
        return total / 1e3
    except RuntimeError:  # the run's own device error: it is the news, the record says nothing
        return None


def install(real_forward: bool = False) -> None:
    """The stage timers, and for every engine built from now on the null forward, or (real_forward)
    the model's own forward, timed."""
    global REAL_FORWARD
    import pipeline.run as prun
    import pipeline.scoring as scoring
    from pipeline.cache import runwide
    from pipeline.engines import forwards, oom, prefix, score, tokenize
    from pipeline.executors import worker
    from pipeline.storage import sink

    REAL_FORWARD = real_forward
    if not real_forward:
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
    if real_forward:
        for cls in (forwards.PackedEncoder, forwards.PaddedEncoder, forwards.PackedDecoder):
            time_forward(cls)
        timed(prefix, "gather_shared", "gather_shared")  # decoders' batches with shared prefixes
        timed(score, "to_host", "device_sync")
        time_first_sync(score.TorchEngine)
        # Decoders' tokenizing (the reading thread).
        timed(tokenize.PairEncoder, "encode", "tokenize")
        timed(tokenize.PairEncoder, "tokenize_bodies", "tokenize_rust_call")
    else:
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
    rec = {"stages": {k: {"wall_s": round(v[0], 4), "cpu_s": round(v[1], 4), "calls": v[2]} for k, v in STAGES.items()},
            "scoring_s": round(MARKS.get("scoring_end", start) - start, 4),
            "first_batch_after_s": round(MARKS["first_batch"] - start, 4) if "first_batch" in MARKS else None,
            "scoring_process_cpu_s": round(MARKS.get("scoring_process_cpu_s", 0.0), 4),
            "scoring_main_thread_cpu_s": round(MARKS.get("scoring_main_thread_cpu_s", 0.0), 4),
            "final_write_s": round(MARKS.get("final_write_s", 0.0), 4),
            "final_write_process_cpu_s": round(MARKS.get("final_write_process_cpu_s", 0.0), 4)}
    if REAL_FORWARD:
        dev_s = forward_device_s()
        rec.update(forward="real", forward_device_s=None if dev_s is None else round(dev_s, 4),
                   first_batch_done_after_s=(round(MARKS["first_batch_done"] - start, 4)
                                             if "first_batch_done" in MARKS else None))
    return rec


def main() -> None:
    argv = sys.argv[1:]
    real_forward = bool(argv) and argv[0] == "--real-forward"
    out, args = argv[int(real_forward)], argv[int(real_forward) + 1:]
    install(real_forward)
    from jobs.cli import cli

    try:
        cli.main(args=args, prog_name="rerank-batch", standalone_mode=False)
    finally:
        with open(out, "w") as f:
            json.dump(record(), f)


if __name__ == "__main__":
    main()
