"""Which pairs of a unit the model must score: one per distinct text of the run, and none the
cache knows.

Exact dedup spans the run (runwide.py): pairs whose instruction, query and document are the same
strings, whatever their ids, are scored once and the score is written to every row that has
them. plan_unit groups the unit's own repeats, then asks, for each distinct text, the units of
the same worker still in flight (it then waits for their scores), the run's store (finished
units), and the shared cache (--cache); only what none of them knows goes to the model.

Positions are those of the unit's valid pairs (input order). `kept`: positions already scored
and committed to the checkpoint by an earlier, interrupted run; their texts count as known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.key import pair_keys
from pipeline.cache.runwide import int_keys


@dataclass
class UnitPlan:
    group: np.ndarray  # int64 per position: the first position with the same text
    todo: np.ndarray | None  # positions to score (group representatives), None: every position
    known: np.ndarray  # bool per position of a representative: its score is known before scoring
    score: np.ndarray  # float32 per representative position: the known scores (kept, repeated, cached)
    duplicates: int = 0  # positions not kept whose text an earlier position of the run has
    from_cache: int = 0  # distinct texts, new to the run, that the shared cache knew
    keys: tuple | None = None  # (hi, lo) of the todo positions (with a run-wide dedup)
    # (hi, lo, score) of texts an interrupted run scored and committed (kept): they go to the
    # stores with the unit's new scores, since that run never reached the end of the unit
    kept_entries: tuple | None = None
    hit_entries: tuple | None = None  # (hi, lo, score) of the shared cache's answers, for the run's store
    waiting: int = 0  # positions whose score an earlier unit in flight still has to give (InFlight)

    @property
    def computed(self) -> int:
        return len(self.group) if self.todo is None else len(self.todo)

    def fill(self, scored: np.ndarray, kept_pos: np.ndarray | None = None,
             kept_scores: np.ndarray | None = None) -> np.ndarray:
        """Every position's score, given the scores of `todo` in its order."""
        if self.waiting:  # the stream finishes units in order: an earlier unit's scores come first
            raise RuntimeError(f"{self.waiting} repeated pairs still wait for the scores of an earlier unit")
        score = self.score.copy()
        if self.todo is None:
            score[:] = scored
        else:
            score[self.todo] = scored
        full = score[self.group]
        if kept_pos is not None and len(kept_pos):
            full[kept_pos] = kept_scores  # a kept position keeps its own score
        return full


def group_texts(instructions, queries, documents) -> np.ndarray:
    """For each position, the first position with exactly the same three strings."""
    first: dict = {}
    out = np.empty(len(queries), dtype=np.int64)
    for k, t in enumerate(zip(instructions, queries, documents)):
        out[k] = first.setdefault(t, k)
    return out


def plan_unit(instructions, queries, documents, kept_pos=None, kept_scores=None, run=None,
              inflight=None) -> UnitPlan:
    """Group a unit's pairs, take what the checkpoint (`kept_*`), the units in flight
    (`inflight`, an InFlight), the run's store and the shared cache (`run`, a RunDedup) know, and
    list the rest for the model. Without `run`, dedup stays within the unit."""
    n = len(queries)
    group = group_texts(instructions, queries, documents)
    known = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32)
    has_kept = kept_pos is not None and len(kept_pos) > 0
    if has_kept:
        known[group[kept_pos]] = True
        score[group[kept_pos]] = kept_scores
    mine = np.ones(n, dtype=bool)  # positions this run has to give a score
    if has_kept:
        mine[kept_pos] = False
    reps = np.unique(group[mine])
    reps = reps[~known[reps]]
    plan = UnitPlan(group, None, known, score, int(mine.sum()) - len(reps))
    if run is not None:
        kept_groups = np.unique(group[kept_pos]) if has_kept else reps[:0]
        ask = np.concatenate([reps, kept_groups])
        hi, lo = pair_keys(run.scope.id, [instructions[i] for i in ask], [queries[i] for i in ask],
                           [documents[i] for i in ask])
        k = len(reps)
        plan.kept_entries = (hi[k:], lo[k:], score[kept_groups])
        ints = int_keys(hi, lo) if inflight is not None else None
        kept_ints = ints[k:] if ints is not None else None
        ints = ints[:k] if ints is not None else None
        hi, lo = hi[:k], lo[:k]
        if k and inflight is not None:  # repeats of a unit in flight wait for its scores
            wait = inflight.match(plan, reps, ints)
            plan.duplicates += int(wait.sum())
            rest = ~wait
            reps, hi, lo, ints = reps[rest], hi[rest], lo[rest], [x for x, r in zip(ints, rest) if r]
        if len(reps):  # repeats of finished units
            found, got = run.private.lookup(hi, lo)
            known[reps[found]] = True
            score[reps[found]] = got[found]
            plan.duplicates += int(found.sum())
            rest = ~found
            reps, hi, lo = reps[rest], hi[rest], lo[rest]
            if ints is not None:
                ints = [x for x, r in zip(ints, rest) if r]
        hits, hit_ints = reps[:0], []
        if len(reps) and run.shared is not None:
            found, got = run.shared.lookup(hi, lo)
            known[reps[found]] = True
            score[reps[found]] = got[found]
            plan.from_cache = int(found.sum())
            plan.hit_entries = (hi[found], lo[found], got[found])
            hits = reps[found]
            rest = ~found
            reps, hi, lo = reps[rest], hi[rest], lo[rest]
            if ints is not None:
                hit_ints = [x for x, f in zip(ints, found) if f]
                ints = [x for x, r in zip(ints, rest) if r]
        plan.keys = (hi, lo)
        if inflight is not None:  # later units find this unit's texts here until they are stored
            inflight.claim(plan, np.concatenate([reps, hits, kept_groups]), ints + hit_ints + kept_ints)
    plan.todo = None if len(reps) == n else reps
    return plan
