"""The memory budget: how many tokens a packed batch may hold on this device.

On CUDA it comes from the memory free after loading (or --gpu-memory-limit, which the allocator
then enforces) and from a probe batch of real shape, run through the forward, that measures what
a token costs in activations; on CPU it is a fixed size. An OOM later shrinks it (engines/oom.py).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.engines.packing import gather_packed
from pipeline.errors import ScoringError

log = logging.getLogger(__name__)

CPU_BATCH_TOKENS = 8192
# Past this many tokens a packed batch gains no speed, only memory risk.
MAX_BATCH_TOKENS = 65536
PROBE_TOKENS = 4096
# The budget never goes below this many tokens (nor does an OOM shrink it further).
MIN_BATCH_TOKENS = 512


def size_budget(forward, m, cfg) -> int:
    """Tokens per batch for `forward` (forwards.Forward) over the loaded model `m` (loading.Loaded)
    on its device."""
    dev = m.device
    if dev.type != "cuda":
        return cfg.max_batch_tokens or CPU_BATCH_TOKENS
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    base = torch.cuda.memory_allocated(dev)
    if cfg.gpu_memory_limit:
        if cfg.gpu_memory_limit <= base:
            raise ScoringError(
                f"--gpu-memory-limit {cfg.gpu_memory_limit / 2**30:.2f} GiB is less than the model "
                f"needs ({base / 2**30:.2f} GiB); raise the limit"
            )
        # The caching allocator refuses to reserve past this fraction: the cap is enforced,
        # and going past it is an OOM that the batch splitter handles.
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_limit / total), index)
        ceiling = min(cfg.gpu_memory_limit, base + free)
    else:
        ceiling = base + free
    # Measure what a token costs in activations with a probe batch of real shape.
    seq = 512
    if m.kind.family == "seq-cls-encoder":  # learned positions end at max_position_embeddings
        seq = min(512, getattr(m.model.config, "max_position_embeddings", 512) - 2)
    n = PROBE_TOKENS // seq
    ids = np.random.default_rng(0).integers(0, m.tokenizer.vocab_size, n * seq).astype(np.int32)
    offsets = np.arange(0, n * seq + 1, seq, dtype=np.int64)
    torch.cuda.reset_peak_memory_stats(dev)
    forward.logits(gather_packed(ids, offsets, np.arange(n)))
    torch.cuda.synchronize(dev)
    per_token = max(1.0, (torch.cuda.max_memory_allocated(dev) - base) / (n * seq))
    # Keep 10% and 256 MiB back for fragmentation and the allocator's rounding.
    room = (ceiling - base) * 0.9 - 256 * 2**20
    budget = int(room / per_token)
    if cfg.max_batch_tokens:
        budget = min(budget, cfg.max_batch_tokens)
    budget = max(MIN_BATCH_TOKENS, min(budget, MAX_BATCH_TOKENS))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    log.info("batch budget %d tokens (%.1f KiB/token, %.2f GiB usable)", budget, per_token / 1024,
             room / 2**30)
    return budget
