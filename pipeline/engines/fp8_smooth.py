"""Smoothing folded into a Qwen3 layer's weights before its projections are quantized to fp8
(fp8.py), from the weights alone: no calibration data. Off unless ENABLED (docs/FP8.md says why);
tests_gpu/fp8_bench.py measures it.

A projection y = W a quantizes a per token and W per output channel. Where a few input channels
of `a` are much larger than the rest (RMSNorm weights of trained decoders have such outliers),
they set each token's fp8 scale. Smoothing (SmoothQuant, Xiao et al. 2023) divides input channel
j of `a` by s_j and multiplies column j of W by s_j, which leaves W a unchanged in real
arithmetic and moves part of the range from the activations into the weights:

    s_j = amax_j(a) ** alpha / max_i |W_ij| ** (1 - alpha)

Every division is folded into the layer, so nothing is added to the forward:

- q/k/v and gate/up read RMSNorm outputs, gamma * x / rms(x): channel j's scale is |gamma_j|
  (x / rms(x) is of unit scale), and 1/s goes into gamma (the norm's weight).
- o_proj reads the attention output, a convex combination of V's rows per head: 1/s goes into
  v_proj's output rows, one s per K/V-head channel (the query heads of a group share it). V's
  channel j has the scale ||W_v[j] * gamma|| / sqrt(hidden).
- down_proj reads silu(gate) * up: 1/s goes into up_proj's output rows. Channel j's scale is
  that of up_j times the rms of silu over gate_j's spread, both from the weights as above.

Row scalings of v_proj and up_proj change nothing of their own fp8 quantization (one scale per
output row). All arithmetic is float32; the norm weights go back to their dtype, the matrices
stay float32 for fp8.quantize_weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Off: measured on real texts (docs/FP8.md, Fidelity), the smoothing moved fp8 scores further
# from float32's, not closer (e4m3 is a float format: an outlier channel does not coarsen the
# others' steps as it does an integer format's). tests_gpu/fp8_bench.py measures both.
ENABLED = False
# The migration strength: the share of an activation channel's range moved into the weights.
ALPHA = 0.5
_FLOOR = 1e-8  # a zero channel (gamma or a weight column of zeros) gets s from this, not a 0/0
# N(0, 1) at 256 evenly spaced quantiles: E[f(z)] as their mean (for the rms of silu).
_Z = torch.special.ndtri((torch.arange(256, dtype=torch.float64) + 0.5) / 256).to(torch.float32)


def scales(act: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = act_j ** alpha / w_absmax_j ** (1 - alpha), from each input channel's activation
    scale and its weight column's largest magnitude (float32)."""
    return act.clamp_min(_FLOOR).pow(alpha) / w_absmax.clamp_min(_FLOOR).pow(1 - alpha)


def _row_rms(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Each output channel's rms over unit-scale inputs scaled by gamma: ||W_j * gamma|| / sqrt(in)."""
    return (w * gamma).pow(2).mean(dim=1).sqrt()


def _silu_rms(sigma: torch.Tensor) -> torch.Tensor:
    """The rms of silu(g) for g ~ N(0, sigma^2), one value per entry of `sigma`."""
    g = sigma[:, None] * _Z.to(sigma.device)[None, :]
    return F.silu(g).pow(2).mean(dim=1).sqrt()


def smooth_layer(ln1, ln2, w_qkv, w_o, w_gu, w_down, heads: int, kv_heads: int, head_dim: int,
                 alpha: float | None = None):
    """(ln1, ln2, w_qkv, w_o, w_gu, w_down) with the smoothing folded in: the same function of the
    layer's input in real arithmetic. `w_qkv` is q, k, v stacked by rows, `w_gu` gate then up.
    The norm weights come back in their own dtype (an nn.Parameter stays one), the four matrices
    in float32. `alpha`: None for ALPHA."""
    alpha = ALPHA if alpha is None else alpha
    g1, g2 = ln1.detach().float(), ln2.detach().float()
    # copies: the folds below work in place, and a float32 model's own weights must not change
    qkv, o, gu, down = (w.detach().to(torch.float32, copy=True) for w in (w_qkv, w_o, w_gu, w_down))
    v0 = (heads + kv_heads) * head_dim
    inter = gu.shape[0] // 2

    # o_proj's inputs, through v_proj's rows: scales estimated before q/k/v are smoothed (the
    # product W_v * gamma is the same after).
    a_v = _row_rms(qkv[v0:], g1).reshape(kv_heads, head_dim)
    w_max = o.abs().reshape(o.shape[0], kv_heads, heads // kv_heads, head_dim).amax(dim=(0, 2))
    t_v = scales(a_v, w_max, alpha)  # [kv_heads, head_dim]
    qkv[v0:] /= t_v.reshape(-1, 1)
    o *= t_v[:, None, :].expand(kv_heads, heads // kv_heads, head_dim).reshape(1, -1)

    # down_proj's inputs, through up_proj's rows.
    a_d = _row_rms(gu[inter:], g2) * _silu_rms(_row_rms(gu[:inter], g2))
    t_d = scales(a_d, down.abs().amax(dim=0), alpha)
    gu[inter:] /= t_d[:, None]
    down *= t_d[None, :]

    # q/k/v and gate/up, through the norms.
    s1 = scales(g1.abs(), qkv.abs().amax(dim=0), alpha)
    s2 = scales(g2.abs(), gu.abs().amax(dim=0), alpha)
    qkv *= s1[None, :]
    gu *= s2[None, :]
    return _like(ln1, g1 / s1), _like(ln2, g2 / s2), qkv, o, gu, down


def _like(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x` in `ref`'s dtype, an nn.Parameter where `ref` is one (compiled steps guard on the type)."""
    x = x.to(ref.dtype)
    return torch.nn.Parameter(x, requires_grad=False) if isinstance(ref, torch.nn.Parameter) else x
