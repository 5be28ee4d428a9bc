"""The Triton kernels of the fused Qwen3 forward (CUDA only).

Imported only where they run (qk_rope.py, fp8_swiglu.py import this module on first use), so
that a machine without Triton never imports it. Kept in one module because Triton resolves the
helpers a kernel calls among the module's globals.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(src, dst, w_ptr, c1, c2, s1, s2, eps, N: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr, HALF: tl.constexpr):
    """RMSNorm and RoPE of one token's N heads of D values at `src` into `dst` (contiguous)."""
    heads = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HALF)
    m = (heads < N)[:, None]
    at = heads[:, None] * D + cols[None, :]
    x1 = tl.load(src + at, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + at + HALF, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
    w1 = tl.load(w_ptr + cols).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)[None, :]
    # As Qwen3RMSNorm: normalized in float32, cast back to the model's dtype, then scaled.
    n1 = (x1 * r).to(dst.dtype.element_ty).to(tl.float32) * w1
    n2 = (x2 * r).to(dst.dtype.element_ty).to(tl.float32) * w2
    # rotate_half(x) = (-x2, x1): first half x1*cos - x2*sin, second half x2*cos + x1*sin.
    tl.store(dst + at, (n1 * c1 - n2 * s1).to(dst.dtype.element_ty), mask=m)
    tl.store(dst + at + HALF, (n2 * c2 + n1 * s2).to(dst.dtype.element_ty), mask=m)


@triton.jit
def qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
                        stride_qkv, stride_cos, stride_sin, eps,
                        H: tl.constexpr, HKV: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """One program per token: its q and k heads normalized and rotated (qk_rope.py)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + row * stride_cos + cols).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + row * stride_cos + HALF + cols).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row * stride_sin + cols).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row * stride_sin + HALF + cols).to(tl.float32)[None, :]
    src = qkv_ptr + row * stride_qkv
    _norm_rope_heads(src, q_ptr + row * (H * D), qw_ptr, c1, c2, s1, s2, eps, H, BLOCK_H, D, HALF)
    _norm_rope_heads(src + H * D, k_ptr + row * (HKV * D), kw_ptr, c1, c2, s1, s2, eps, HKV, BLOCK_HKV, D, HALF)


@triton.jit
def _silu_mul(gate, up, cols, m, dtype):
    """silu(gate) * up at `cols`, each product rounded to `dtype` as the eager steps round it."""
    g = tl.load(gate + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(up + cols, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (s * u).to(dtype).to(tl.float32)


@triton.jit
def swiglu_quantize_kernel(gu_ptr, q_ptr, s_ptr, n, stride_gu, stride_q, fp8_max, min_scale,
                           BLOCK: tl.constexpr):
    """One program per row: the row's amax of silu(gate) * up, then the values quantized by it
    (fp8_swiglu.py); the second pass reads the row again from L2."""
    row = tl.program_id(0).to(tl.int64)
    gate = gu_ptr + row * stride_gu
    up = gate + n
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _silu_mul(gate, up, cols, cols < n, gu_ptr.dtype.element_ty)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=0) / fp8_max, min_scale)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < n
        y = _silu_mul(gate, up, cols, m, gu_ptr.dtype.element_ty)
        q = tl.minimum(tl.maximum(y / scale, -fp8_max), fp8_max)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)
