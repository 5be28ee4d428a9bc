"""The engine seam: what the rest of the pipeline may know of a loaded reranker.

A run, a worker, the Python API and the benchmark hold an `Engine` and use only what this
protocol names; how the forward is chosen (forwards.choose), batched, split on out-of-memory
(oom.py) and sized (budget.py) is the engine package's own business (compare TEI's `Backend`:
`max_batch_size`, `predict(batch)`). `score.load_engine` builds one, once per process;
`score.engine_from_model` builds one over a model already in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    """What a run reports of its engine: the model kind, the forward and where it runs."""

    kind: object  # engines.resolve.ModelKind
    forward: str  # "fused", "fused-encoder", "transformers", "transformers-padded"
    kernel: str  # attention kernel: "flash_attn", "torch_varlen", "sdpa", "padded-sdpa"
    device: str  # "cuda", "cuda:1", "cpu"
    dtype: str  # "bfloat16", "float32"
    sharing: str  # prefix sharing in effect: "off", "on", "auto" (where it saves enough; prefix.py)
    compiled: bool = False  # the forward's fused steps run compiled (torch.compile), not eagerly


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters since it was loaded (returned, never written to)."""

    batches: int = 0
    oom_retries: int = 0
    tokens: int = 0  # tokens of the pairs scored (before prefix sharing)
    tokens_computed: int = 0  # tokens that went through the model (after prefix sharing)
    attention_area: int = 0  # sum over attention blocks of 2*Lq*Lk - Lq^2 (for FLOP counts)


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo
    encoder: object  # encode(instructions, queries, documents) -> tokenize.Encoded

    @property
    def token_budget(self) -> int:
        """Tokens per batch the engine packs (sized once at load by a memory probe; an OOM
        shrinks it)."""

    def score(self, enc, *, on_batch=None, stop=None) -> np.ndarray:
        """float32 scores of every pair in `enc`, in order (an engine loaded with logits=True: the
        head's logits, (pairs, 1 or 2)). `on_batch(pairs, tokens)` after each batch; `stop`
        (runtime.stop.StopToken or None) is checked between batches."""

    def score_stream(self, chunks, *, on_batch=None, stop=None, commit=None) -> np.ndarray:
        """Scores of pairs that arrive in chunks of Encoded, in order; `commit` (due(),
        __call__(idx, scores)) is handed scores between batches and at a stop."""

    def stats(self) -> EngineStats: ...

    def synchronize(self) -> None:
        """Wait for the device's queued work (for timings); a no-op on the CPU."""

    def reset_peak_memory(self) -> None:
        """Start counting peak device memory afresh; a no-op on the CPU."""

    def peak_memory_bytes(self) -> int:
        """Peak device memory reserved since the last reset; 0 on the CPU."""
