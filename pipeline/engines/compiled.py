"""torch.compile for functions over token rows: compiled once, with the row count symbolic.

With the default automatic dynamism a function is compiled for the first batch's exact token
count (the memory probe's), then compiled again when the second count differs: two compilations
before the first real batch. Marking dimension 0 of every matrix argument dynamic from the first
call gives the kernels that automatic dynamism settles on, in one compilation. Inductor's on-disk
caches (FX graphs, autotuning; on by default) then serve later processes. They live in a stable
directory, `cache_dir()`, rather than Inductor's default under the temp directory, which tmp
cleaners and reboots empty; TORCHINDUCTOR_CACHE_DIR overrides it.
"""

from __future__ import annotations

import os

import torch

from pipeline.runtime import user_cache


def _inductor_default() -> str | None:
    try:
        # torch's internals, which move between versions: imported where a failure is a plain answer.
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # another torch layout: nothing to tell apart
        return None


def cache_dir() -> str:
    """TORCHINDUCTOR_CACHE_DIR, else <user cache>/inductor (runtime/user_cache.path; '' where no
    home directory resolves). Inductor writes its own default into the variable once it has looked
    (importing torch._dynamo may), so that value counts as unset."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != _inductor_default():
        return env
    return user_cache.path("inductor")


def use_cache_dir() -> str:
    """Point Inductor (it reads the variable when it first compiles) at `cache_dir()`; '' where
    that cannot be created or written (Inductor's own default then)."""
    path = user_cache.usable(cache_dir())
    if not path:
        return ""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


# Cross-encoders this narrow (MiniLM's 384) run eagerly under --compile auto: their one compiled
# step, the residual add and LayerNorm, spares the device little on rows this short, while its
# compile adds seconds to every start and its calls take more of the launching thread's time.
# On an H100, MiniLM-L6 over 60,000 pairs ran in 11.4 s eagerly against 18.6 s compiled (startup
# 4.8-5.3 s against 9.1-10.9 s) and scored 11,071 pairs/s against 10,174 (docs/PERFORMANCE.md).
EAGER_ENCODER_WIDTH = 384


def wanted(cfg, device, encoder_width: int | None = None) -> bool:
    """--compile: on; auto: on CUDA, except for a cross-encoder (`encoder_width`: its hidden size)
    no wider than EAGER_ENCODER_WIDTH."""
    if cfg.compile == "on":
        return True
    if cfg.compile != "auto" or device.type != "cuda":
        return False
    return encoder_width is None or encoder_width > EAGER_ENCODER_WIDTH


def scored_rows(idx: torch.Tensor) -> torch.Tensor:
    """The rows a last layer runs on (its scored rows), at least two: a single index is doubled
    and the caller keeps the first output row. torch.compile specialises a dimension of size 1,
    so a batch of one pair (a one-pair `predict`, a run's last batch) would otherwise compile
    a one-row variant of every step of that layer in the middle of the run."""
    return idx.repeat(2) if idx.shape[0] == 1 else idx


_COMPILED: dict = {}


def compile_rows(fn):
    """`fn` compiled with dimension 0 of its 2-D+ tensor arguments symbolic, the others constants;
    raises if torch.compile is unavailable (the caller falls back to eager). One wrapper per function and process, so a
    warm-up call (fused_qwen3.warm_up) compiles the kernels that the model's calls then use."""
    if fn in _COMPILED:
        return _COMPILED[fn]
    use_cache_dir()
    # Each width (and dtype, and 1-row call) of a function is a compilation of its own, counted
    # against torch's recompile limit (8): a process that loads several model shapes (the Python
    # API, the benches) passes it, and under fullgraph=True the next call raises instead of
    # running eagerly.
    conf = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(conf, name, 64) < 64:
            setattr(conf, name, 64)
    compiled = torch.compile(fn, dynamic=None, fullgraph=True)
    mark, static = torch._dynamo.maybe_mark_dynamic, torch._dynamo.mark_static

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() >= 2:
                mark(a, 0)
                # A function called at several widths (several models in one process) gets a
                # kernel per width: left to automatic dynamism, the second width would make the
                # feature dimension symbolic too, and such a generic kernel measured up to half as
                # fast on an H100.
                for d in range(1, a.dim()):
                    static(a, d)
        return compiled(*args)

    call.__wrapped__ = fn
    _COMPILED[fn] = call
    return call
