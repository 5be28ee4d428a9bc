"""SiLU·mul and its per-token fp8 quantization in one pass over the gate/up rows (CUDA, Triton).

An fp8 layer's down projection takes silu(gate) * up quantized per token (fp8.quantize_rows). Left
to torch.compile, the row's absolute maximum and the quantization become two kernels, each reading
the gate/up rows from memory: on the 0.6B and 4B shapes that pair cost 1.4-1.7x SiLU·mul alone.
Here one program per row reads its gate/up values, takes the maximum, then goes over the row again
to quantize: the second read comes from L2 (a row is 12-48 KB), so the rows cross HBM once. The
kernel itself is in triton_kernels.py.

The arithmetic is the eager fused_qwen3.swiglu_q's, step for step: silu(gate) rounded to the
model's dtype, times up rounded again (as the eager product is), then amax / 448 as the scale and
the values divided by it, clamped, and rounded to float8_e4m3fn. `check` compares it with that
eager function once per engine, on random rows; a mismatch (or no Triton) leaves the compiled
function in place.
"""

from __future__ import annotations

import logging

import torch

from pipeline.engines import fp8
from pipeline.errors import first_line

log = logging.getLogger(__name__)

BLOCK = 1024


def swiglu_quantize(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of silu(gate) * up for gate/up rows `gu` [T, 2I] (CUDA): q [T, I] float8_e4m3fn,
    scale [T, 1] float32, as fp8.quantize_rows(fused_qwen3.swiglu(gu)) gives them."""
    from pipeline.engines import triton_kernels as kernels  # Triton only where this runs
    t, n2 = gu.shape
    n = n2 // 2
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    q = torch.empty(t, n, device=gu.device, dtype=fp8.FP8)
    scale = torch.empty(t, 1, device=gu.device, dtype=torch.float32)
    if t:
        with torch.cuda.device(gu.device):  # Triton launches on the current device, not the tensor's
            kernels.swiglu_quantize_kernel[(t,)](gu, q, scale, n, gu.stride(0), q.stride(0), fp8.FP8_MAX,
                                                fp8.MIN_SCALE, BLOCK=BLOCK)
    return q, scale


def check(reference, device: torch.device, dtype: torch.dtype, width: int) -> bool:
    """True where swiglu_quantize runs on `device` and agrees with `reference` (the eager
    fused_qwen3.swiglu_q) on random rows of the model's `width` (2I): the scales within two
    steps of the model's dtype (the row maxima are bf16 values; kernels' SiLU may differ in its
    last bit), the quantized values within one fp8 step."""
    if device.type != "cuda":
        return False
    try:
        with torch.inference_mode():
            g = torch.Generator(device=device).manual_seed(0)
            gu = (torch.randn(67, width, device=device, generator=g) * 3).to(dtype)
            q, s = swiglu_quantize(gu)
            rq, rs = reference(gu)
            torch.cuda.synchronize(device)
            scale_ok = torch.allclose(s, rs, rtol=8e-3, atol=0)
            step = (q.float() - rq.float()).abs() / rq.float().abs().clamp_min(2.0 ** -6)
            values_ok = bool((step <= 0.13).all())  # e4m3 has 3 mantissa bits: one step is <= 1/8
        if scale_ok and values_ok:
            return True
        log.warning("the fused SiLU·mul fp8 kernel disagrees with the reference here; using the compiled steps")
    except Exception as exc:  # no Triton, or a compiler problem: the compiled steps are the same numbers
        log.warning("the fused SiLU·mul fp8 kernel is unavailable (%s); using the compiled steps",
                    first_line(exc))
    return False
