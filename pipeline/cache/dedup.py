"""Which pairs of a unit the model must score: one per distinct text, and none the cache knows.

Exact dedup works within one unit (a window of input rows, `--window`): pairs whose instruction,
query and document are the same strings, whatever their ids, are scored once and the score is
written to every row that has them. It does not span units: with `--cache`, a later unit finds
the scores of an earlier one in the cache once that unit has finished.

Positions are those of the unit's valid pairs (input order). `kept`: positions already scored
and committed to the checkpoint by an earlier, interrupted run; their texts count as known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.key import pair_keys


@dataclass
class UnitPlan:
    group: np.ndarray  # int64 per position: the first position with the same text
    todo: np.ndarray | None  # positions to score (group representatives), None: every position
    known: np.ndarray  # bool per position of a representative: its score is known before scoring
    score: np.ndarray  # float32 per representative position: the known scores (kept or cached)
    duplicates: int = 0  # positions not kept whose text an earlier position has
    from_cache: int = 0  # distinct texts the cache knew
    keys: tuple | None = None  # (hi, lo) of the todo positions (with a cache)
    # (hi, lo, score) of texts an interrupted run scored and committed (kept): they go to the
    # cache with the unit's new scores, since that run never reached the end of the unit
    kept_entries: tuple | None = None

    @property
    def computed(self) -> int:
        return len(self.group) if self.todo is None else len(self.todo)

    def fill(self, scored: np.ndarray, kept_pos: np.ndarray | None = None,
             kept_scores: np.ndarray | None = None) -> np.ndarray:
        """Every position's score, given the scores of `todo` in its order."""
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


def plan_unit(instructions, queries, documents, kept_pos=None, kept_scores=None, cache=None) -> UnitPlan:
    """Group a unit's pairs, take what the checkpoint (`kept_*`) and the cache know, and list
    the rest for the model."""
    n = len(queries)
    group = group_texts(instructions, queries, documents)
    known = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32)
    if kept_pos is not None and len(kept_pos):
        known[group[kept_pos]] = True
        score[group[kept_pos]] = kept_scores
    mine = np.ones(n, dtype=bool)  # positions this run has to give a score
    if kept_pos is not None and len(kept_pos):
        mine[kept_pos] = False
    reps = np.unique(group[mine])
    reps = reps[~known[reps]]
    duplicates = int(mine.sum()) - len(reps)
    from_cache = 0
    keys = kept_entries = None
    if cache is not None:
        kept_groups = np.unique(group[kept_pos]) if kept_pos is not None and len(kept_pos) else reps[:0]
        ask = np.concatenate([reps, kept_groups])
        hi, lo = pair_keys(cache.scope.id, [instructions[i] for i in ask], [queries[i] for i in ask],
                           [documents[i] for i in ask])
        k = len(reps)
        kept_entries = (hi[k:], lo[k:], score[kept_groups])
        hi, lo = hi[:k], lo[:k]
        if k:
            found, got = cache.lookup(hi, lo)
            known[reps[found]] = True
            score[reps[found]] = got[found]
            from_cache = int(found.sum())
            reps, hi, lo = reps[~found], hi[~found], lo[~found]
        keys = (hi, lo)
    todo = None if len(reps) == n else reps
    return UnitPlan(group, todo, known, score, duplicates, from_cache, keys, kept_entries)
