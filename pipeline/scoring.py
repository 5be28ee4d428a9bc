"""The one loop that scores: units in, (unit, scored part, counts) out.

`score_units` is what every unit worker runs (executors/worker.py: in the driver process for the
local executor, in a pool process, in a Ray actor). Reading, exploding and tokenizing run in a
thread one unit ahead of the device (see `prefetch`), so all of them overlap the host work with
the device the same way.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.cache.dedup import plan_unit
from pipeline.cache.runwide import InFlight
from pipeline.data.pairs import UnitPairs, build_pairs, result_part
from pipeline.data.read import Unit, iter_unit_tables
from pipeline.errors import InputError
from pipeline.runtime.stop import StopToken
from pipeline.runtime.timing import Timer
from pipeline.storage.checkpoint import Kept

# First chunk small, so the GPU starts at once; later ones larger, for fewer Python round trips.
FIRST_CHUNK, MAX_CHUNK = 256, 4096


def prefetch(units, layout, cfg, encoder, finished: threading.Event, kept_for=None, dedup=None,
             inflight: InFlight | None = None):
    """Read, explode and tokenize units in a thread, ahead of the device.

    Yields ("unit", work), then ("chunk", Encoded) for pieces of the pairs it has to score as
    they are tokenized, then ("end",). The queue holds a few chunks, so memory stays about a
    window while tokenization overlaps scoring, also inside the first window. `kept_for(unit)`:
    the unit's pairs already committed (a Kept, or None), which are not tokenized again; nor are
    repeats of a pair of the same unit or of an earlier unit of the run (`inflight`: the units
    not finished; `dedup`, a RunDedup: the finished ones and the shared cache, looked up here, in
    the thread). `finished`: set by the consumer when it stops reading; the thread then ends.
    """
    q: queue.Queue = queue.Queue(maxsize=4)
    # String views (what polars writes) are read as large strings: Arrow's take and sort kernels,
    # which the rank and write steps use, have none for views.
    view = getattr(pa.types, "is_string_view", lambda t: False)
    target = pa.schema([f.with_type(pa.large_string()) if view(f.type) else f
                        for f in (layout.schema.field(n) for n in layout.columns)])

    def put(item) -> bool:
        while not finished.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for unit, table in iter_unit_tables(units, schema=layout.schema):
                if finished.is_set():
                    return
                if table.schema.names != target.names:  # the same columns in another order (checked at the start)
                    table = table.select(target.names)
                if table.schema != target:
                    try:
                        table = table.cast(target)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                        raise InputError(
                            f"{unit.path}: its column types differ from {layout.source} ({exc}); "
                            "give files of one schema in one run"
                        ) from None
                pairs = build_pairs(unit, table, layout, cfg, getattr(encoder, "tokenizer", None))
                work = Work(unit, pairs, kept_for(unit) if kept_for is not None else None, dedup, inflight)
                if not put(("unit", work)):
                    return
                instructions, queries, documents = work.to_score()
                start, size = 0, FIRST_CHUNK
                n = len(queries)
                while start < n:
                    end = min(n, start + size)
                    enc = encoder.encode(instructions[start:end], queries[start:end], documents[start:end])
                    if not put(("chunk", enc)):
                        return
                    start, size = end, min(MAX_CHUNK, size * 2)
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
        finished.set()
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
            "skipped_null": int((~pairs.valid).sum()) - pairs.empty_lists, "empty_lists": pairs.empty_lists,
            **({"chunking": pairs.chunks.counters()} if pairs.chunks is not None else {})}


class Work:
    """One unit on its way through the scorer: its pairs, those an earlier run committed
    (`kept`), the positions among its valid pairs (windows, with --chunk-tokens) still to score
    (`todo`, None: all): one per distinct text of the run (exact dedup), none that `kept`, an
    earlier unit or the cache give (pipeline/cache/dedup.py), and the encoded chunks of those as
    they arrive."""

    def __init__(self, unit: Unit, pairs: UnitPairs, kept: Kept | None = None, dedup=None,
                 inflight: InFlight | None = None):
        self.unit, self.pairs, self.encs = unit, pairs, []
        self.start = 0  # position of its first pair to score in the scoring stream
        self.ords = pairs.score_ords()  # sorted: input order
        self.kept = None
        self.kept_pos = None  # positions of the kept pairs
        if kept is not None:
            hit = np.isin(kept.ords, self.ords)
            if hit.any():
                self.kept = Kept(kept.ords[hit], kept.scores[hit], kept.counts)
                self.kept_pos = np.searchsorted(self.ords, self.kept.ords)
        self.full = None  # every position's score, once result() made it
        self.plan = plan_unit(pairs.instructions, pairs.queries, pairs.documents, self.kept_pos,
                              None if self.kept is None else self.kept.scores, dedup, inflight)
        self.todo = self.plan.todo

    @property
    def to_score_n(self) -> int:
        return len(self.ords) if self.todo is None else len(self.todo)

    def to_score(self) -> tuple[list, list, list]:
        p = self.pairs
        if self.todo is None:
            return p.instructions, p.queries, p.documents
        return ([p.instructions[i] for i in self.todo], [p.queries[i] for i in self.todo],
                [p.documents[i] for i in self.todo])

    def ords_to_score(self) -> np.ndarray:
        return self.ords if self.todo is None else self.ords[self.todo]

    def result(self, scores: np.ndarray) -> tuple[pa.Table, dict]:
        """The unit's part (new scores merged with the kept, cached and repeated ones) and its
        record's counts."""
        info = unit_info(self.pairs, self.encs)
        if self.kept is not None or self.todo is not None:
            scores = self.plan.fill(scores, self.kept_pos, None if self.kept is None else self.kept.scores)
        self.full = scores
        # Every valid pair has a score; `computed` of them went through the model in this run.
        info.update(computed=self.plan.computed, duplicates=self.plan.duplicates, from_cache=self.plan.from_cache)
        if self.kept is not None:
            c = self.kept.counts
            resumed = {"pairs": self.kept.pairs, "tokens": int(c.get("tokens", 0)),
                       "tokens_computed": int(c.get("tokens_computed", 0))}
            info["tokens"] += resumed["tokens"]
            info["truncated"] += int(c.get("truncated", 0))
            info["resumed"] = resumed
        info["pairs"] = len(self.ords)
        return result_part(self.pairs, scores), info

    def remember(self, dedup, inflight: InFlight | None, scores: np.ndarray) -> None:
        """After result(): add the unit's scores to the cache and the run's store's buffer
        (`dedup`): this run's (those of `todo`, in its order), and those an interrupted run
        committed for it; hand them to later units waiting on them (`inflight`), which keeps
        them until the buffer is written (score_units)."""
        if dedup is not None:
            dedup.add(self.plan, scores)
        if inflight is not None:
            inflight.finish(self.plan, self.full)

    @property
    def done_without_model(self) -> int:
        """Pairs of this run that got a score with no forward: repeats and cache hits."""
        return self.plan.duplicates + self.plan.from_cache


class Commits:
    """Commits by time: `every` seconds of scoring after the last commit (a unit's part or this),
    the pairs scored so far of the units in the stream go to `save(items)`, one list of (unit,
    ords, scores, counts) per commit (CheckpointSink.commit_partials: one object for them all),
    so that a stop or a crash loses at most that much scoring, whatever the size of a unit.
    What the scorer calls: `due()` and `__call__(idx, scores)`."""

    def __init__(self, every: float | None, save, scorer):
        self.every, self.save, self.scorer = every, save, scorer
        self.works: list[Work] = []
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()
        self.computed0 = self.scorer.stats().tokens_computed

    def begin(self, works: list[Work]) -> "Commits | None":
        """The units of the next scoring stream, in stream order; the object for score_stream."""
        start = 0
        for w in works:
            w.start = start
            start += w.to_score_n
        self.works = works
        return self if self.save is not None else None

    def due(self) -> bool:
        return self.every is not None and time.monotonic() - self.last >= self.every

    def __call__(self, idx: np.ndarray, scores: np.ndarray) -> None:
        computed = self.scorer.stats().tokens_computed - self.computed0
        starts = np.array([w.start for w in self.works])
        owner = np.searchsorted(starts, idx, side="right") - 1
        # The scored pairs of each unit, found in one sort (a mask per unit would cost units x pairs).
        by_owner = np.argsort(owner, kind="stable")
        owners, first = np.unique(owner[by_owner], return_index=True)
        picked = []
        for k, seg in zip(owners, np.split(by_owner, first[1:])):
            w = self.works[k]
            lens = np.concatenate([e.lengths for e in w.encs])
            trunc = np.concatenate([e.truncated for e in w.encs])
            local = idx[seg] - w.start
            order = np.argsort(local, kind="stable")
            local = local[order]
            picked.append((w, local, scores[seg][order], int(lens[local].sum()), int(trunc[local].sum())))
        total = max(1, sum(p[3] for p in picked))
        self.save([(w.unit, w.ords_to_score()[local], sc, {"tokens": tokens, "truncated": truncated,
                                                            "tokens_computed": int(round(computed * tokens / total))})
                   for w, local, sc, tokens, truncated in picked])
        self.reset()


def score_units(units, layout, cfg, scorer, on_batch=None, stop: StopToken | None = None,
                timer: Timer | None = None, group_small: bool = False, kept_for=None, save_partial=None,
                batches: bool = False, dedup=None):
    """Yield (unit, part, info) for each unit: its rows with their scores, and its counts.

    Each distinct text of the run is scored once (`dedup`, a RunDedup: the run's store and the
    shared cache, if any; None: dedup within each unit only), and none that the cache knows; a
    unit's new scores go to the stores just before it is yielded (so before its part is
    committed), and to the later units in flight that repeat its texts. Pairs answered without
    the model count as done for `on_batch` (the progress).

    With `group_small`, consecutive small units (under a quarter of a window each to score, as many
    small files make, or units the cache and their own repeats mostly answer) are scored together,
    up to a window of pairs to score, so that their pairs share full batches instead of each unit
    running its own tiny ones; each unit still gets its own part. A group's chunks go to the
    engine as they are tokenized: the device starts on its first unit (a whole small input)
    while the rest is read and tokenized.
    Only for a source that never waits on anyone (the local executor's list): a pool worker's
    next unit may depend on this one finishing.

    `stop` is checked before each unit and, by the engine, between batches: KeyboardInterrupt
    once a stop was asked (the pairs scored of the unit in flight are handed to `save_partial`
    first).

    Commits by time (`cfg.commit_every`): with `save_partial(items)`, the pairs scored of units
    not yet yielded are handed to it, as one list of (unit, ords, scores, counts), every
    `cfg.commit_every` seconds of scoring and at a stop; `kept_for(unit)` gives back what was
    saved so (a Kept), and only the unit's other pairs are scored.

    With `batches`, yields lists of (unit, part, info) instead: the units scored together, for
    one commit of them all (CheckpointSink.commit_group).
    """
    timer = timer if timer is not None else Timer()
    finished = threading.Event()
    inflight = InFlight() if dedup is not None else None
    unstored: list = []  # plans of finished units whose scores wait in dedup's buffer

    def remember(w: Work, scores) -> None:
        """A finished unit's scores to the stores, before its part is committed; the buffer is
        written once it fills a file (RunDedup.due), then its units leave the in-flight table."""
        w.remember(dedup, inflight, scores)
        if dedup is None:
            return
        unstored.append(w.plan)
        if dedup.due():
            store()

    def store() -> None:
        dedup.flush()
        inflight.release(unstored)
        unstored.clear()
    items = prefetch(units, layout, cfg, scorer.encoder, finished, kept_for, dedup, inflight)
    commits = Commits(cfg.commit_every, save_partial, scorer)
    small = max(1, cfg.window_pairs // 4)
    pushed: list = []  # the head of a unit that did not join a group, taken back for the next turn

    def next_head():
        if pushed:
            return pushed.pop()
        t0 = time.perf_counter()
        head = next(items, None)
        timer.add("waiting_for_input", t0)
        return head

    def grouped_chunks(members: list[Work], counts: list[int]):
        """The chunks of a group of small units as they arrive, so that the device starts on the
        first unit's while the next ones are read and tokenized: each member's, then those of the
        next unit if it is small too and the group holds less than a window of pairs to score and
        of rows (`counts`, running sums: summing the group at each unit is quadratic in units).
        Rows are held until the group is scored: one window of them at most. A unit that does not
        join (or the stream's end) is taken back for the main loop."""
        while True:
            w = members[-1]
            yield from _unit_chunks(items, timer, w.encs)
            if counts[0] >= cfg.window_pairs or counts[1] >= cfg.window_pairs:
                return
            head = next_head()
            if head is not None and stop is not None:
                stop.check()  # a check point: before each unit
            if head is None or not work_is_small(head[1]):
                pushed.append(head)
                return
            nxt = head[1]
            nxt.start = w.start + w.to_score_n
            members.append(nxt)
            counts[0] += nxt.to_score_n
            counts[1] += len(nxt.pairs.queries)

    def work_is_small(work: Work) -> bool:
        # Small by what is left to score: a unit whose pairs the cache or its own repeats mostly
        # give joins a group too.
        return group_small and work.to_score_n < small

    def score_group(first: Work):
        t0, computed0 = time.perf_counter(), scorer.stats().tokens_computed
        members = [first]
        commit = commits.begin(members)  # later members join this very list, with their starts
        scores = scorer.score_stream(grouped_chunks(members, [first.to_score_n, len(first.pairs.queries)]),
                                     on_batch=on_batch, stop=stop, commit=commit)
        seconds, computed = time.perf_counter() - t0, scorer.stats().tokens_computed - computed0
        tokens = max(1, sum(int(e.offsets[-1]) for w in members for e in w.encs))
        together = []
        for w in members:
            n = w.to_score_n
            # In stream order: a member's repeats of an earlier member get their scores first.
            part, info = w.result(scores[w.start:w.start + n])
            remember(w, scores[w.start:w.start + n])
            if (info["skipped_null"] or w.done_without_model) and on_batch is not None:
                on_batch(info["skipped_null"] + w.done_without_model, 0)
            share = sum(int(e.offsets[-1]) for e in w.encs) / tokens  # one scoring pass: its time and work, by tokens
            info["seconds"] = seconds * share
            info["tokens_computed"] = int(round(computed * share)) + info.get("resumed", {}).get("tokens_computed", 0)
            if batches:
                together.append((w.unit, part, info))
                continue
            yield w.unit, part, info
            commits.reset()
        if batches:
            yield together
            commits.reset()

    try:
        while True:
            head = next_head()
            if head is None:
                return
            work = head[1]
            if stop is not None:
                stop.check()  # a check point: before each unit
            if work_is_small(work):
                yield from score_group(work)
                continue
            t_unit = time.perf_counter()
            computed0 = scorer.stats().tokens_computed
            scores = scorer.score_stream(_unit_chunks(items, timer, work.encs), on_batch=on_batch,
                                         stop=stop, commit=commits.begin([work]))
            skipped = int((~work.pairs.valid).sum()) if work.pairs.valid.size else 0
            skipped += work.done_without_model
            if skipped and on_batch is not None:
                on_batch(skipped, 0)
            part, info = work.result(scores)
            remember(work, scores)
            info["seconds"] = time.perf_counter() - t_unit
            # after prefix sharing; with the kept pairs' own
            info["tokens_computed"] = int(scorer.stats().tokens_computed - computed0) + \
                info.get("resumed", {}).get("tokens_computed", 0)
            yield [(work.unit, part, info)] if batches else (work.unit, part, info)
            commits.reset()
    finally:
        items.close()
        if dedup is not None:  # the stream's last units, for the next stream, worker or resumed run
            store()
