"""fp8 linear layers for the fused Qwen3 forward (`--dtype fp8`, CUDA compute capability 8.9+).

The weights of the q/k/v, o, gate/up and down projections are held in float8_e4m3fn, one float32
scale per output channel (row of W, which is [out, in]): amax / 448, quantized once at load. The
activations entering each of them are quantized per token on the fly the same way, and the
product runs as a row-wise scaled fp8 GEMM (torch._scaled_mm) with a bfloat16 result:

    y[m, n] = sa[m] * sw[n] * sum_k qa[m, k] * qw[n, k]

Everything else (embeddings, norms, RoPE, attention, the head) stays in the run's bf16, and so do
the projections of the first BF16_LAYERS layers.

`Fp8Weight` holds a quantized matrix; `linear_for(device, dtype)` picks, once, the function the fused
forward calls in place of F.linear: `scaled_mm_linear` on CUDA, `emulated_linear` elsewhere (the
same arithmetic in float32, for the tests and CPU smoke runs: the command line refuses fp8 off
CUDA, `check_device`). Either takes the activations as a bf16 matrix, or already quantized as a
`Quantized` (q, scale) pair: the fused forward quantizes the outputs of its RMSNorms and of SiLU·mul
inside those kernels (fused_qwen3.py), so that three of a layer's four activation matrices are
never written in bf16 and read back only to be quantized.

`--dtype fp8-fast` runs the same GEMMs with Hopper's fast fp8 accumulation (use_fast_accum), which
skips the periodic promotion of partial sums to float32: on an H100, 6-7% faster than fp8 on the
0.6B shape, 9% on the 4B and 12% on the 8B, its scores about as far from float32's (docs/FP8.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.errors import InputError, ModelError, first_line

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row of zeros gets this scale instead of 0 (its quantized values are 0 whatever the scale).
MIN_SCALE = 1e-12
MIN_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) have fp8 tensor cores
FIX = "use --dtype bfloat16, or a GPU of compute capability 8.9 or newer (Ada, Hopper)"
# The first layers whose projections stay bf16. The first layer's fp8 rounding moved scores more
# than that of all the other layers together (docs/FP8.md, Fidelity): keeping it costs 1/28 of
# the 0.6B's projection FLOPs at bf16 speed (1/36 of the 4B's and 8B's).
BF16_LAYERS = 1


def check_device(device: torch.device, name: str = "fp8") -> None:
    """InputError (exit 2) unless fp8 GEMMs run on `device`: CUDA, compute capability >= 8.9.
    `name`: the --dtype asked for (fp8 or fp8-fast)."""
    if device.type != "cuda":
        raise InputError(f"--dtype {name} runs on CUDA GPUs only, and this run's device is {device.type}; {FIX}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise InputError(f"--dtype {name} needs a GPU of compute capability 8.9 or newer, and {device} "
                         f"({torch.cuda.get_device_name(device)}) has {cap[0]}.{cap[1]}; {FIX}")


def check_engine(engine: str, family: str, name: str = "fp8") -> None:
    """InputError unless the model runs in the fused Qwen3 engine, the only one with fp8 layers."""
    if family == "seq-cls-encoder":
        raise InputError(f"--dtype {name} supports Qwen3 rerankers only, and this model is a cross-encoder; "
                         "use --dtype bfloat16")
    if engine == "transformers":
        raise InputError(f"--dtype {name} runs in the fused Qwen3 engine, and --engine transformers runs transformers' "
                         "own modules; drop --engine transformers, or use --dtype bfloat16")


@dataclass(frozen=True)
class Fp8Weight:
    """A weight W [out, in] as float8_e4m3fn rows `q` (row-major) and their float32 scales
    `scale`, shaped [1, out] as torch._scaled_mm's row-wise scale_b: W ~= q * scale.T."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """W as float32, as the fp8 GEMM sees it."""
        return self.q.to(torch.float32) * self.scale.reshape(-1, 1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): each row of the 2-D `x` as float8_e4m3fn and its float32 scale [rows, 1],
    amax / 448, so that x ~= q * scale. The clamp keeps rounding at the edge finite (e4m3fn has
    no infinity: a value past 448 would become NaN)."""
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """W [out, in] quantized per output channel (the rows of W)."""
    if w.dim() != 2:
        raise ValueError(f"a weight matrix is 2-D, not {tuple(w.shape)}")
    q, scale = quantize_rows(w)
    return Fp8Weight(q.contiguous(), scale.reshape(1, -1).contiguous())


class Quantized(NamedTuple):
    """Activation rows already quantized: `q` [rows, in] float8_e4m3fn and their float32 scales
    `scale` [rows, 1] (quantize_rows), so that x ~= q * scale."""

    q: torch.Tensor
    scale: torch.Tensor


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def scaled_mm_linear(x, w: Fp8Weight, out_dtype: torch.dtype = torch.bfloat16,
                     quantize=quantize_rows, fast_accum: bool = False) -> torch.Tensor:
    """x @ W.T through torch._scaled_mm with row-wise scales: the activations quantized per
    token (here, or before: `x` a Quantized pair); the second operand column-major (q.t() of the
    row-major [out, in] rows), as the Hopper kernels take it. K and N must be multiples of 16
    (check_shapes)."""
    if isinstance(x, Quantized):
        (qa, sa), lead = x, x.q.shape[:-1]
    else:
        qa, sa = quantize(_rows(x))
        lead = x.shape[:-1]
    y = torch._scaled_mm(qa, w.q.t(), scale_a=sa, scale_b=w.scale, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return y.reshape(*lead, w.q.shape[0])


def emulated_linear(x, w: Fp8Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What scaled_mm_linear computes, in float32 arithmetic: (qa * sa) @ (qw * sw).T, cast to x's
    dtype (`out_dtype` for a Quantized `x`). The reference of the fp8 design, and the fp8 forward
    off CUDA (tests)."""
    if isinstance(x, Quantized):
        (qa, sa), lead, dtype = x, x.q.shape[:-1], out_dtype or torch.float32
    else:
        qa, sa = quantize_rows(_rows(x))
        lead, dtype = x.shape[:-1], x.dtype
    y = (qa.to(torch.float32) * sa) @ w.dequantize().T
    return y.to(dtype).reshape(*lead, w.q.shape[0])


def check_shapes(weights: dict[str, torch.Tensor], name: str = "fp8") -> None:
    """ModelError unless every matrix's in and out sizes are multiples of 16 (torch._scaled_mm's
    condition); real Qwen3 sizes all are. `name`: the --dtype asked for."""
    for what, w in weights.items():
        if any(n % 16 for n in w.shape):
            raise ModelError(f"--dtype {name}: the {what} weight is {tuple(w.shape)}, and fp8 GEMMs need sizes that "
                             "are multiples of 16; use --dtype bfloat16")


def linear_for(device: torch.device, dtype: torch.dtype, compile: bool = False, widths: tuple[int, ...] = (),
               fast_accum: bool = False):
    """The linear the fused forward calls, linear(x, Fp8Weight) with `x` a `dtype` matrix or a
    Quantized pair, returning `dtype`: the fp8 GEMM on CUDA (`fast_accum`: with the fast fp8
    accumulation, --dtype fp8-fast), its float32 emulation elsewhere.
    `compile`: the per-token activation quantization (where `x` comes unquantized) is compiled
    into one kernel (torch.compile), warmed up here on dummy rows of each input width in
    `widths`; it runs eagerly where that fails."""
    if device.type != "cuda":
        return lambda x, w: emulated_linear(x, w, dtype)
    quantize = quantize_rows
    if compile:
        try:
            from pipeline.engines import compiled

            quantize = compiled.compile_rows(quantize_rows)
            with torch.inference_mode():
                for k in widths:
                    quantize(torch.zeros(16, k, device=device, dtype=dtype))
        except Exception as exc:  # no Triton, no compiler: eager is the same arithmetic, only slower
            log.warning("torch.compile of the fp8 activation quantization failed (%s); running it eagerly",
                        first_line(exc))
            quantize = quantize_rows

    def linear(x, w):
        return scaled_mm_linear(x, w, dtype, quantize, fast_accum)

    return linear
