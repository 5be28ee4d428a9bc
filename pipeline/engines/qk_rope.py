"""Qwen3's per-head q/k RMSNorm and RoPE in one pass over the q/k/v rows (CUDA, Triton).

After the q/k/v projection each layer normalizes every q and k head (RMSNorm over the head's
128 values, in float32) and rotates it (RoPE). Left to torch.compile, that step became one
kernel for q and one for k, each a per-row reduction over 128-value rows whose reads and writes
ran at a fraction of the memory's speed: on the 0.6B's W-mixed profile the two took about a
sixth of the GPU time, more than any other step but the GEMMs and attention. Here one program
takes one token: it reads the token's q and k heads as two halves each (RoPE pairs value i with
value i + D/2), takes each head's mean square, normalizes, scales and rotates, and writes q and k
contiguous. v stays a view of the q/k/v rows, as in fused_qwen3.qk_norm_rope.

The arithmetic is the compiled step's: values in float32, the normalized head rounded to the
model's dtype before the norm weight (as Qwen3RMSNorm casts back before scaling), the rest in
float32 and one rounding at the store. `check` compares the kernel with the compiled (or eager)
step once per engine on random rows of the model's shapes; a mismatch, or no Triton, leaves
that step in place.
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import first_line

log = logging.getLogger(__name__)


def usable(h: int, hkv: int, d: int) -> bool:
    """The shapes the kernel handles: an even head size whose half is a power of two (Triton's
    ranges), as every Qwen3 size has (128)."""
    half = d // 2
    return d % 2 == 0 and half >= 4 and half & (half - 1) == 0 and h >= 1 and hkv >= 1


def qk_norm_rope(qkv, qw, kw, cos, sin, eps: float, h: int, hkv: int, d: int):
    """fused_qwen3.qk_norm_rope on CUDA in one kernel: q (T, h, d) and k (T, hkv, d) contiguous,
    v (T, hkv, d) a view of `qkv`."""
    from pipeline.engines import triton_kernels as kernels  # Triton only where this runs
    kernel, pow2 = kernels.qk_norm_rope_kernel, kernels.triton.next_power_of_2
    t = qkv.shape[0]
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    q = torch.empty(t, h, d, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(t, hkv, d, device=qkv.device, dtype=qkv.dtype)
    if t:
        with torch.cuda.device(qkv.device):  # Triton launches on the current device, not the tensor's
            kernel[(t,)](qkv, qw, kw, cos, sin, q, k, qkv.stride(0), cos.stride(0), sin.stride(0), eps,
                         H=h, HKV=hkv, BLOCK_H=pow2(h), BLOCK_HKV=pow2(hkv), D=d, HALF=d // 2)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    return q, k, v


def check(reference, device: torch.device, dtype: torch.dtype, h: int, hkv: int, d: int, eps: float) -> bool:
    """True where qk_norm_rope runs on `device` and agrees with `reference` (the step it replaces:
    fused_qwen3.qk_norm_rope, compiled or eager) on random rows of these shapes, within two
    steps of the model's dtype (both compute in float32 and round once; their rsqrt and
    summation order may differ in the last bit)."""
    if device.type != "cuda" or not usable(h, hkv, d):
        return False
    try:
        with torch.inference_mode():
            g = torch.Generator(device=device).manual_seed(0)

            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

            t = 67
            qkv = rnd(t, (h + 2 * hkv) * d, scale=3.0)
            qw, kw = rnd(d, scale=0.5) + 1, rnd(d, scale=0.5) + 1
            angle = torch.rand(t, d // 2, device=device, generator=g) * 6.3
            cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype)
            sin = torch.cat([angle.sin(), angle.sin()], -1).to(dtype)
            got = qk_norm_rope(qkv, qw, kw, cos, sin, eps, h, hkv, d)
            want = reference(qkv, qw, kw, cos, sin, eps, h, hkv, d)
            torch.cuda.synchronize(device)
            step = torch.finfo(dtype).eps
            ok = all(torch.allclose(a.float(), b.float(), rtol=2 * step, atol=2 * step * b.float().abs().max().item())
                     for a, b in zip(got[:2], want[:2])) and torch.equal(got[2], want[2])
        if ok:
            return True
        log.warning("the fused q/k norm and RoPE kernel disagrees with the reference here; using the compiled step")
    except Exception as exc:  # no Triton, or a compiler problem: the compiled step gives the same numbers
        log.warning("the fused q/k norm and RoPE kernel is unavailable (%s); using the compiled step", first_line(exc))
    return False
