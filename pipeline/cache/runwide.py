"""Exact dedup across a whole run, in memory that does not grow with the run.

A pair's text (instruction, query, document) is scored once per run, whatever unit, worker or
earlier (interrupted) invocation of the run met it first. Three places answer a repeat:

  - its own unit: plan_unit (dedup.py) groups the unit's equal texts;
  - a unit scheduled before it in the same worker and not finished yet (`InFlight`): the
    prefetch thread plans unit k+1 while unit k is still scored, so a repeat of unit k's text
    cannot be in any store yet. It waits instead: when unit k's scores are known the consumer
    pushes them into the waiting plans (in stream order, so before their own result is made).
    The table holds the keys of the units scheduled and not finished: a few windows;
  - a finished unit: its scores are in the run's store (`RunDedup.private`), a score cache of
    the same file format and writes (cache.py) in the checkpoint folder, `<checkpoint>/dedup/`,
    made by the run and removed with the checkpoint. Finished units' scores are written a file
    at a time (FLUSH_ENTRIES, or when the stream ends), before the part of the unit that fills
    the file is committed: a unit of a default window writes its own, so a resumed run finds
    every committed unit's pairs there, and every worker (pool processes, Ray actors: they all
    see the checkpoint folder) finds the others' finished units once written. A reader holds only the files' headers (about 0.25-1.5 bytes an entry), not
    the keys: a run of 100M pairs does not hold 100M keys in memory.

A repeat in flight on another worker at the same moment (two devices scoring units that share a
text at once) is computed by both: each worker's in-flight table is its own.

With --cache, the shared cache is asked what the run's store does not know; the run's store
still receives every score the run gave (computed or from the cache), so that the counts are
exact and do not depend on timing: the first row of the run with a text is computed or taken
from the cache (`pairs_from_cache`), every later one is a repeat (`duplicate_pairs`).
"""

from __future__ import annotations

import threading

import numpy as np

from pipeline.cache.cache import PairCache
from pipeline.cache.key import Scope, run_scope
from pipeline.storage.checkpoint import DEDUP as FOLDER  # the run's store, inside the checkpoint folder

# Finished units' scores are written to the run's store once they fill a file of this many
# entries (and when a scoring stream ends): a unit of a default window (16,384 pairs) writes its
# own file just before its part is committed, while thousands of tiny units (a tiny --window, many
# small files) do not cost a store file each. Until written, their keys stay in the in-flight
# table, with their scores, so the worker still answers their repeats.
FLUSH_ENTRIES = 16384


def int_keys(hi: np.ndarray, lo: np.ndarray) -> list[int]:
    """One Python int per key, for the in-flight table's dict."""
    return [(h << 64) | lo_ for h, lo_ in zip(hi.tolist(), lo.tolist())]


class RunDedup:
    """A worker's stores: the run's own (`private`) and the shared cache (`shared`, --cache)."""

    def __init__(self, private: PairCache, shared: PairCache | None = None):
        self.private, self.shared = private, shared
        self.scope: Scope = private.scope
        self.buffer: list[tuple] = []  # (hi, lo, scores) of finished units not yet in the run's store
        self.buffered = 0

    def add(self, plan, scores: np.ndarray) -> None:
        """A finished unit's scores: its computed ones (`scores`, in the order of plan.todo) and
        those an interrupted run committed for it go to the shared cache now (as without the run's
        store) and to the run's store at the next flush(); those the shared cache gave go to the
        run's store only."""
        if plan.keys is None:
            return
        hi, lo = plan.keys
        scores = np.asarray(scores, np.float32)
        if plan.kept_entries is not None and len(plan.kept_entries[0]):
            khi, klo, ksc = plan.kept_entries
            hi, lo, scores = np.concatenate([hi, khi]), np.concatenate([lo, klo]), np.concatenate([scores, ksc])
        if self.shared is not None:
            self.shared.add(hi, lo, scores)
        if plan.hit_entries is not None and len(plan.hit_entries[0]):
            chi, clo, csc = plan.hit_entries
            hi, lo, scores = np.concatenate([hi, chi]), np.concatenate([lo, clo]), np.concatenate([scores, csc])
        if len(hi):
            self.buffer.append((hi, lo, scores))
            self.buffered += len(hi)

    def due(self) -> bool:
        """Whether the finished units' scores held here fill a file (FLUSH_ENTRIES)."""
        return self.buffered >= FLUSH_ENTRIES

    def flush(self) -> None:
        """Write the finished units' scores held here to the run's store, as one file."""
        if self.buffer:
            hi, lo, sc = (np.concatenate(x) for x in zip(*self.buffer))
            self.buffer, self.buffered = [], 0
            self.private.add(hi, lo, sc)

    def close(self) -> None:
        self.private.close()
        if self.shared is not None:
            self.shared.close()


def open_run_dedup(cfg, engine, checkpoint_root, shared: PairCache | None) -> RunDedup:
    """The run's store in `checkpoint_root` (a Location) for the scope of the engine's scores:
    the shared cache's scope with --cache (the keys are made once for both), else run_scope."""
    scope = shared.scope if shared is not None else run_scope(cfg, engine.info.kind, engine.info.dtype)
    return RunDedup(PairCache(checkpoint_root / FOLDER, scope, private=True), shared)


class InFlight:
    """The keys of the units one scoring stream has planned and whose scores are not yet in the
    run's store, and the plans waiting on them. The prefetch thread matches and claims (it alone
    claims, so between its match and its claim no key appears); the consumer finishes units in
    stream order, then releases them once RunDedup has written their scores, so a key is always
    in one of the two for a unit that plans it. A finished unit's scores stay here until then: a
    repeat of it takes them at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.owner: dict[int, tuple[object, int]] = {}  # key -> (plan, its position there)
        self.claimed: dict[int, tuple[list[int], np.ndarray]] = {}  # id(plan) -> its keys, their positions
        self.waits: dict[int, list[tuple[object, np.ndarray, np.ndarray]]] = {}  # id(producer) -> waiters
        # id(plan) -> (its claimed positions, sorted; their scores), until released: only what
        # it claimed, so the memory is that of the keys, not of the units' rows
        self.finished: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def match(self, plan, positions: np.ndarray, keys: list[int]) -> np.ndarray:
        """Which of `positions` (their `keys`) an unstored unit has (bool): those take its score,
        at once when it is finished, else when it finishes (they wait)."""
        wait = np.zeros(len(keys), dtype=bool)
        with self.lock:
            by: dict[int, tuple[object, list, list]] = {}
            for j, k in enumerate(keys):
                got = self.owner.get(k)
                if got is not None and got[0] is not plan:
                    wait[j] = True
                    entry = by.setdefault(id(got[0]), (got[0], [], []))
                    entry[1].append(positions[j])
                    entry[2].append(got[1])
            for pid, (producer, mine, theirs) in by.items():
                mine, theirs = np.array(mine, np.int64), np.array(theirs, np.int64)
                done = self.finished.get(pid)
                if done is not None:
                    plan.score[mine] = done[1][np.searchsorted(done[0], theirs)]
                    plan.known[mine] = True
                    continue
                self.waits.setdefault(pid, []).append((plan, mine, theirs))
                plan.waiting += len(mine)
        return wait

    def claim(self, plan, positions: np.ndarray, keys: list[int]) -> None:
        """`plan` gives these keys a score when it finishes."""
        with self.lock:
            mine, where = [], []
            for p, k in zip(positions.tolist(), keys):
                if k not in self.owner:
                    self.owner[k] = (plan, p)
                    mine.append(k)
                    where.append(p)
            if mine:
                self.claimed[id(plan)] = (mine, np.array(where, np.int64))

    def finish(self, plan, full: np.ndarray) -> None:
        """`plan`'s unit is scored (`full`: every position's score): hand its scores to the plans
        waiting on it, and keep them for later repeats until release()."""
        with self.lock:
            for waiter, mine, theirs in self.waits.pop(id(plan), []):
                waiter.score[mine] = full[theirs]
                waiter.known[mine] = True
                waiter.waiting -= len(mine)
            if id(plan) in self.claimed:
                where = np.sort(self.claimed[id(plan)][1])
                self.finished[id(plan)] = (where, full[where])

    def release(self, plans) -> None:
        """These finished units' scores are in the run's store now: let their keys go."""
        with self.lock:
            for plan in plans:
                self.finished.pop(id(plan), None)
                for k in self.claimed.pop(id(plan), ([], None))[0]:
                    if self.owner.get(k, (None,))[0] is plan:
                        del self.owner[k]

    def __len__(self) -> int:
        return len(self.owner)
