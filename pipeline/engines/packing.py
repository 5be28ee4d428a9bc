"""Packing: pairs sorted by length into token-budget batches with no padding, and the flat ids,
cu_seqlens and positions of one batch (prefix-shared batches: engines/prefix.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def plan_batches(lengths: np.ndarray, budget: int, padded: bool = False) -> list[np.ndarray]:
    """Sort by length (longest first) and pack greedily into batches of at most `budget` tokens
    (for padded batches: rows x the longest row, which is the first one).

    A sequence longer than the budget gets a batch of its own. Longest first makes the biggest
    batches come early, so a memory surprise shows at the start of a window, not at its end.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        cost = (len(current) + 1) * int(lengths[current[0]]) if padded and current else used + n
        if current and cost > budget:
            batches.append(np.asarray(current, dtype=np.int64))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


@dataclass
class PackedBatch:
    """Pairs laid out one after another in one row of tokens, no padding: what a forward takes
    (prefix-shared batches: prefix.SharedBatch)."""

    ids: np.ndarray  # (T,) token ids
    cu: np.ndarray  # (n+1,) where each pair starts (cu_seqlens), int64
    pos: np.ndarray  # (T,) position of each token in its pair
    types: np.ndarray | None = None  # (T,) token types (cross-encoders), or None

    @property
    def pairs(self) -> int:
        return len(self.cu) - 1

    @property
    def area(self) -> int:
        """Sum over pairs of L^2 (the causal score entries, doubled; for FLOP counts)."""
        return int((np.diff(self.cu) ** 2).sum())


def gather_packed(ids: np.ndarray, offsets: np.ndarray, idx: np.ndarray, types: np.ndarray | None = None
                  ) -> PackedBatch:
    """The sequences `idx` of a flat id array (with `offsets`), concatenated into one batch."""
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    cu = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    within = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lens)
    src = np.repeat(starts, lens) + within
    return PackedBatch(ids[src], cu, within, types[src] if types is not None else None)
