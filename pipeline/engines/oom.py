"""Running batches without ever dropping a pair: a CUDA out-of-memory error splits the batch in
two and retries the halves, empties the cache, and shrinks the budget for later windows; a single
pair that never fits is a runtime error naming the fix.

`BatchRunner` owns what this changes: the token budget and the engine's counters, which the
engine hands out as snapshots (engine.EngineStats).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.engines import prefix
from pipeline.engines.budget import MIN_BATCH_TOKENS
from pipeline.engines.engine import EngineStats
from pipeline.engines.packing import gather_packed
from pipeline.errors import ScoringError

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs packed batches through a forward (forwards.Forward), splitting them on OOM."""

    def __init__(self, forward, budget: int, device: torch.device, empty_cache_every: int | None = None):
        self.forward = forward
        self.budget = budget  # tokens per batch; shrinks after an OOM
        self.device = device
        self.empty_cache_every = empty_cache_every
        self.batches = self.oom_retries = self.tokens = self.tokens_computed = self.attention_area = 0

    def stats(self) -> EngineStats:
        return EngineStats(self.batches, self.oom_retries, self.tokens, self.tokens_computed, self.attention_area)

    def run(self, ids, offsets, types, idx: np.ndarray, share=None,
            stop=None) -> Iterator[tuple[np.ndarray, int, torch.Tensor]]:
        """Run pairs `idx` of the flat `ids` / `offsets` (`types`) as one batch; on OOM, as its
        halves, recursively. Yields (pairs, tokens, head logits) for each batch that ran. `share`:
        (prefix length, group key) per pair of idx, for a batch with shared prefixes. `stop`
        (runtime.stop.StopToken or None) is checked before each batch."""
        stack = [(idx, share)]
        while stack:
            if stop is not None:
                stop.check()
            idx, share = stack.pop()
            if share is None:
                batch = gather_packed(ids, offsets, idx, types)
                tokens = computed = int(batch.cu[-1])
                area = batch.area
            else:
                batch = prefix.gather_shared(ids, offsets, idx, *share)
                tokens, computed, area = batch.unshared_tokens, len(batch.ids), batch.area
            try:
                logits = self.forward.logits(batch)
            except torch.OutOfMemoryError:
                logits = None  # leave the except block first, so the failed batch's tensors are freed
            if logits is None:
                self._after_oom(idx, computed, stack, share)
                continue
            self.batches += 1
            self.tokens += tokens
            self.tokens_computed += computed
            self.attention_area += area
            yield idx, tokens, logits
            if self.empty_cache_every and self.device.type == "cuda" and self.batches % self.empty_cache_every == 0:
                torch.cuda.empty_cache()

    def _after_oom(self, idx: np.ndarray, tokens: int, stack: list, share=None) -> None:
        self.oom_retries += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(idx) == 1:
            raise ScoringError(
                f"one pair of {tokens} tokens does not fit in GPU memory; lower --max-length or "
                "raise --gpu-memory-limit"
            )
        # Later windows pack smaller batches, so the OOM is not met again and again.
        self.budget = max(MIN_BATCH_TOKENS, min(self.budget, int(tokens * 0.75)))
        log.warning("out of memory on a batch of %d tokens; split it in two, budget now %d", tokens, self.budget)
        half = len(idx) // 2
        # A group cut in two keeps its prefix length: the common prefix of a part is no shorter.
        hi, lo = (None, None) if share is None else ((share[0][half:], share[1][half:]),
                                                     (share[0][:half], share[1][:half]))
        stack.append((idx[half:], hi))
        stack.append((idx[:half], lo))
