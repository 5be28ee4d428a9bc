"""torch.compile for functions over token rows: compiled once, with the row count symbolic.

With the default automatic dynamism a function is compiled for the first batch's exact token
count (the memory probe's), then compiled again when the second count differs: two compilations
before the first real batch. Marking dimension 0 of every matrix argument dynamic from the first
call gives the kernels that automatic dynamism settles on, in one compilation. Inductor's on-disk
cache (on by default) then serves later processes.
"""

from __future__ import annotations

import torch


def compile_rows(fn):
    """`fn` compiled with dimension 0 of its 2-D+ tensor arguments symbolic; raises if torch.compile
    is unavailable (the caller falls back to eager)."""
    compiled = torch.compile(fn, dynamic=None, fullgraph=True)
    mark = torch._dynamo.maybe_mark_dynamic

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() >= 2:
                mark(a, 0)
        return compiled(*args)

    call.__wrapped__ = fn
    return call
