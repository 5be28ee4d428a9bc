"""Execute a plan: unfinished units -> scored parts in the checkpoint.

    for each unit: read, explode, tokenize (a thread ahead), score, commit a part

score_unit is the piece any executor (this loop, several GPU processes, Ray) runs on its own;
a worker commits with Checkpoint(path).commit(unit.id, part, info).
"""

from __future__ import annotations

import queue
import threading
import time

import pyarrow as pa

from .config import RunConfig
from .errors import InputError
from .pairs import UnitPairs, build_pairs, result_part
from .read import InputLayout, Unit, iter_unit_tables


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


def execute(plan, scorer, prog, timer: _Timer, should_stop=None) -> None:
    """Score every unit of `plan` not yet in its checkpoint, committing one part per unit.
    Stops (KeyboardInterrupt) at a batch boundary once should_stop() says so."""
    from .signals import polled

    ck = plan.ckpt
    pending = [u for u in plan.units if u.id not in ck.done]
    stop_event = threading.Event()
    items = _prefetch(pending, plan.layout, plan.cfg, scorer.encoder, stop_event)
    try:
        with polled(should_stop):
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
                scores = scorer.score_stream(_unit_chunks(items, timer, encs), on_batch=prog.update,
                                             should_stop=should_stop)
                if pairs.valid.size and not pairs.valid.all():
                    prog.update(int((~pairs.valid).sum()), 0)
                t0 = time.perf_counter()
                ck.commit(unit.id, result_part(pairs, scores), _concat_info(pairs, encs))
                timer.add("writing_parts", t0)
    finally:
        items.close()
