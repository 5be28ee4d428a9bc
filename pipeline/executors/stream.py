"""The one loop that scores: units in, (unit, scored part, counts) out.

Reading, exploding and tokenizing run in a thread one unit ahead of the device (see `prefetch`),
so a worker pulling units from its driver, the local loop and a Ray actor all overlap the host
work with the GPU the same way.
"""

from __future__ import annotations

import queue
import threading
import time

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.data.pairs import UnitPairs, build_pairs, result_part
from pipeline.data.read import iter_unit_tables

# First chunk small, so the GPU starts at once; later ones larger, for fewer Python round trips.
FIRST_CHUNK, MAX_CHUNK = 256, 4096


class Timer:
    """Wall time spent in named stages, for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        return now


def prefetch(units, layout, cfg, encoder, stop_event: threading.Event):
    """Read, explode and tokenize units in a thread, ahead of the device.

    Yields ("unit", unit, pairs), then ("chunk", Encoded) for pieces of that unit's pairs as
    they are tokenized, then ("end",). The queue holds a few chunks, so memory stays about a
    window while tokenization overlaps scoring, also inside the first window.
    """
    q: queue.Queue = queue.Queue(maxsize=4)
    # String views (what polars writes) are read as large strings: Arrow's take and sort kernels,
    # which the rank and write steps use, have none for views.
    view = getattr(pa.types, "is_string_view", lambda t: False)
    target = pa.schema([f.with_type(pa.large_string()) if view(f.type) else f
                        for f in (layout.schema.field(n) for n in layout.columns)])

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
            for unit, table in iter_unit_tables(units, schema=layout.schema):
                if stop_event.is_set():
                    return
                if table.schema.names != target.names:  # the same columns in another order (checked at the start)
                    table = table.select(target.names)
                if table.schema != target:
                    try:
                        table = table.cast(target)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
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
        except BaseException as exc:  # handed to the consuming thread, which raises it
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


def _unit_chunks(items, timer: Timer, encs: list):
    """The chunks of one unit from the prefetch stream; time spent waiting is input-bound time."""
    while True:
        t0 = time.perf_counter()
        item = next(items)
        timer.add("waiting_for_input", t0)
        if item[0] == "end":
            return
        encs.append(item[1])
        yield item[1]


def unit_info(pairs: UnitPairs, encs: list) -> dict:
    return {"rows": pairs.table.num_rows, "pairs": int(sum(len(e) for e in encs)),
            "tokens": int(sum(int(e.offsets[-1]) for e in encs)),
            "truncated": int(sum(int(e.truncated.sum()) for e in encs)),
            "skipped_null": int((~pairs.valid).sum()) - pairs.empty_lists, "empty_lists": pairs.empty_lists}


def score_units(units, layout, cfg, scorer, on_batch=None, should_stop=None, timer: Timer | None = None,
                group_small: bool = False):
    """Yield (unit, part, info) for each unit: its rows with their scores, and its counts.

    With `group_small`, consecutive small units (under a quarter of a window each, as many small
    files make) are scored together, up to a window of pairs, so that their pairs share full
    batches instead of each unit running its own tiny ones; each unit still gets its own part.
    Only for a source that never waits on anyone (the local executor's list): a pool worker's
    next unit may depend on this one finishing. KeyboardInterrupt is raised when `should_stop()`
    turns true between batches.
    """
    timer = timer if timer is not None else Timer()
    stop_event = threading.Event()
    items = prefetch(units, layout, cfg, scorer.encoder, stop_event)
    small = max(1, cfg.window_pairs // 4)
    group: list = []  # (unit, pairs, encs) of small units read but not yet scored

    def flush():
        if not group:
            return
        t0, computed0 = time.perf_counter(), scorer.stats.tokens_computed
        encs = [e for _, _, es in group for e in es]
        scores = scorer.score_stream(iter(encs), on_batch=on_batch, should_stop=should_stop)
        seconds, computed = time.perf_counter() - t0, scorer.stats.tokens_computed - computed0
        tokens = max(1, sum(int(e.offsets[-1]) for e in encs))
        start = 0
        members = list(group)
        group.clear()
        for unit, pairs, es in members:
            info = unit_info(pairs, es)
            n = info["pairs"]
            if info["skipped_null"] and on_batch is not None:
                on_batch(info["skipped_null"], 0)
            share = info["tokens"] / tokens  # one scoring pass: its time and work, by tokens
            info["seconds"] = seconds * share
            info["tokens_computed"] = int(round(computed * share))
            yield unit, result_part(pairs, scores[start:start + n]), info
            start += n

    try:
        while True:
            t0 = time.perf_counter()
            head = next(items, None)
            timer.add("waiting_for_input", t0)
            if head is None:
                yield from flush()
                return
            _, unit, pairs = head
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            if group_small and len(pairs.queries) < small:
                group.append((unit, pairs, list(_unit_chunks(items, timer, []))))
                if sum(len(p.queries) for _, p, _ in group) >= cfg.window_pairs:
                    yield from flush()
                continue
            yield from flush()
            encs: list = []
            t_unit = time.perf_counter()
            computed0 = scorer.stats.tokens_computed
            scores = scorer.score_stream(_unit_chunks(items, timer, encs), on_batch=on_batch,
                                         should_stop=should_stop)
            skipped = int((~pairs.valid).sum()) if pairs.valid.size else 0
            if skipped and on_batch is not None:
                on_batch(skipped, 0)
            info = unit_info(pairs, encs)
            info["seconds"] = time.perf_counter() - t_unit
            info["tokens_computed"] = int(scorer.stats.tokens_computed - computed0)  # after prefix sharing
            yield unit, result_part(pairs, scores), info
    finally:
        items.close()
