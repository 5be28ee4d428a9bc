"""Running batches without ever dropping a pair: a CUDA out-of-memory error splits the batch in
two and retries the halves, empties the cache, and shrinks the budget for later windows; a single
pair that never fits is a runtime error naming the fix."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.engines import prefix
from pipeline.engines.packing import gather_packed
from pipeline.errors import ScoringError

log = logging.getLogger(__name__)


def submit(scorer, idx, ids, offsets, types, pending, on_batch, stop, share=None) -> None:
    """Run one packed batch; on OOM, split it and run the halves (no pair is ever dropped).
    `stop` (runtime.stop.StopToken or None) is checked before each batch. `share`: (prefix
    length, group key) per pair of idx, for a batch with shared prefixes."""
    stack = [(idx, share)]
    while stack:
        if stop is not None:
            stop.check()
        idx, share = stack.pop()
        if share is None:
            packed = gather_packed(ids, offsets, idx, types)
            tokens = computed = int(packed[1][-1])
            area = int((np.diff(packed[1]) ** 2).sum())
        else:
            sb = prefix.gather_shared(ids, offsets, idx, *share)
            tokens, computed, area = sb.unshared_tokens, len(sb.ids), sb.area
        try:
            s = scorer._forward(*packed) if share is None else scorer._forward(sb.ids, sb.cu_q, sb.pos, None, sb)
        except torch.OutOfMemoryError:
            s = None  # leave the except block first, so the failed batch's tensors are freed
        if s is None:
            after_oom(scorer, idx, computed, stack, share)
            continue
        pending.append((idx, s))
        scorer.stats.batches += 1
        scorer.stats.tokens += tokens
        scorer.stats.tokens_computed += computed
        scorer.stats.attention_area += area
        if on_batch is not None:
            on_batch(len(idx), tokens)
        if scorer.cfg.empty_cache_every and scorer.device.type == "cuda" \
                and scorer.stats.batches % scorer.cfg.empty_cache_every == 0:
            torch.cuda.empty_cache()


def after_oom(scorer, idx: np.ndarray, tokens: int, stack: list, share=None) -> None:
    scorer.stats.oom_retries += 1
    if scorer.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(idx) == 1:
        raise ScoringError(
            f"one pair of {tokens} tokens does not fit in GPU memory; lower --max-length or "
            "raise --gpu-memory-limit"
        )
    # Later windows pack smaller batches, so the OOM is not met again and again.
    scorer.budget = max(512, min(scorer.budget, int(tokens * 0.75)))
    log.warning("out of memory on a batch of %d tokens; split it in two, budget now %d", tokens, scorer.budget)
    half = len(idx) // 2
    # A group cut in two keeps its prefix length: the common prefix of a part is no shorter.
    hi, lo = (None, None) if share is None else ((share[0][half:], share[1][half:]),
                                                 (share[0][:half], share[1][:half]))
    stack.append((idx[half:], hi))
    stack.append((idx[:half], lo))
