"""The q/k norm and RoPE kernel (engines/qk_rope.py) against the step it replaces."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import compiled, fused_qwen3, qk_rope

CUDA = torch.device("cuda")
SHAPES = [(16, 8, 128), (32, 8, 128), (3, 1, 64), (40, 8, 128), (4, 2, 16)]  # 0.6B, 4B/8B, odd, tiny


def _inputs(t, h, hkv, d, dtype, seed=0, width_pad=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    wide = (torch.randn(t, (h + 2 * hkv) * d + width_pad, device=CUDA, generator=g) * 3).to(dtype)
    qkv = wide[:, :(h + 2 * hkv) * d]  # a row stride wider than the rows when width_pad > 0
    qw = (torch.randn(d, device=CUDA, generator=g) * 0.5 + 1).to(dtype)
    kw = (torch.randn(d, device=CUDA, generator=g) * 0.5 + 1).to(dtype)
    pos = torch.arange(t, device=CUDA, dtype=torch.float32)[:, None]
    inv = 1e6 ** (-torch.arange(d // 2, device=CUDA, dtype=torch.float32) / (d // 2))
    ang = torch.cat([pos * inv, pos * inv], -1)
    return qkv, qw, kw, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("h,hkv,d", SHAPES)
@pytest.mark.parametrize("t", [1, 67, 4099])
def test_in_float32_the_kernel_equals_the_eager_step(h, hkv, d, t):
    args = _inputs(t, h, hkv, d, torch.float32, seed=t)
    got = qk_rope.qk_norm_rope(*args, 1e-6, h, hkv, d)
    want = fused_qwen3.qk_norm_rope(*args, 1e-6, h, hkv, d)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert got[2].data_ptr() == args[0].data_ptr() + (h + hkv) * d * 4  # v: a view, not a copy


@pytest.mark.parametrize("h,hkv,d", SHAPES)
def test_in_bf16_the_kernel_is_no_further_from_float32_than_the_recipe(h, hkv, d):
    """The kernel rounds where the recipe's Qwen3RMSNorm casts (the normalized head, before the
    weight) and once at the store. The eager recipe rounds after every step and lands further from
    float32; Inductor may keep the cast's value in float32 and land a little nearer. The kernel
    must be no further than the recipe, and within a couple of bf16 steps of the compiled step."""
    t = 2048
    args = _inputs(t, h, hkv, d, torch.bfloat16, seed=h)
    exact = fused_qwen3.qk_norm_rope(*(a.float() for a in args), 1e-6, h, hkv, d)
    got = qk_rope.qk_norm_rope(*args, 1e-6, h, hkv, d)
    eager = fused_qwen3.qk_norm_rope(*args, 1e-6, h, hkv, d)
    step = compiled.compile_rows(fused_qwen3.qk_norm_rope)(*args, 1e-6, h, hkv, d)
    for g, r, s, e in zip(got[:2], eager[:2], step[:2], exact[:2]):
        err_kernel, err_recipe, err_step = ((x.float() - e).abs() for x in (g, r, s))
        assert err_kernel.mean() <= err_recipe.mean()
        assert err_kernel.max() <= max(err_recipe.max(), 2 * err_step.max())
        assert torch.allclose(g.float(), s.float(), rtol=2 ** -6, atol=2 ** -6 * float(s.float().abs().max()))
    assert qk_rope.check(compiled.compile_rows(fused_qwen3.qk_norm_rope), CUDA, torch.bfloat16, h, hkv, d, 1e-6)


def test_strided_rows_and_no_rows():
    h, hkv, d = 16, 8, 128
    args = _inputs(300, h, hkv, d, torch.bfloat16, width_pad=64)
    assert not args[0].is_contiguous()
    got = qk_rope.qk_norm_rope(*args, 1e-6, h, hkv, d)
    dense = qk_rope.qk_norm_rope(args[0].contiguous(), *args[1:], 1e-6, h, hkv, d)
    assert all(torch.equal(a, b) for a, b in zip(got, dense))
    empty = qk_rope.qk_norm_rope(*_inputs(0, h, hkv, d, torch.bfloat16), 1e-6, h, hkv, d)
    assert [tuple(x.shape) for x in empty] == [(0, h, d), (0, hkv, d), (0, hkv, d)]


def test_a_wrong_reference_is_caught_and_odd_heads_are_refused():
    def wrong(qkv, qw, kw, cos, sin, eps, h, hkv, d):  # halves not rotated
        q, k, v = fused_qwen3.qk_norm_rope(qkv, qw, kw, torch.ones_like(cos), torch.zeros_like(sin), eps, h, hkv, d)
        return q, k, v

    assert not qk_rope.check(wrong, CUDA, torch.bfloat16, 16, 8, 128, 1e-6)
    assert not qk_rope.usable(16, 8, 96)  # half of 96 is not a power of two
    assert not qk_rope.check(fused_qwen3.qk_norm_rope, CUDA, torch.bfloat16, 16, 8, 96, 1e-6)
    assert not qk_rope.check(fused_qwen3.qk_norm_rope, torch.device("cpu"), torch.bfloat16, 16, 8, 128, 1e-6)


def test_the_compiled_forward_takes_the_kernel_and_keeps_its_scores(models):
    """A Qwen3 forward built with compile on, on CUDA, runs the kernel for its q/k step, and its
    hidden states stay as close to the eager forward's as the compiled step's do."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models["tied"], dtype=torch.bfloat16).to(CUDA).eval()
    fused = fused_qwen3.FusedQwen3.from_hf(hf, hf.model, "torch_varlen", compile=True)
    assert fused._qk is qk_rope.qk_norm_rope
    lengths = [5, 300, 17, 1, 64]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=CUDA, dtype=torch.int32)
    ids = torch.randint(0, hf.config.vocab_size, (int(cu[-1]),), device=CUDA,
                        generator=torch.Generator(device=CUDA).manual_seed(0))
    pos = torch.cat([torch.arange(n, device=CUDA) for n in lengths])
    last = cu[1:].long() - 1
    with_kernel = fused.last_hidden(ids, pos, cu, max(lengths), last)
    fused._qk = compiled.compile_rows(fused_qwen3.qk_norm_rope)
    with_step = fused.last_hidden(ids, pos, cu, max(lengths), last)
    fused.use_eager()
    eager = fused.last_hidden(ids, pos, cu, max(lengths), last)
    assert (with_kernel.float() - eager.float()).abs().max() <= 2 * (with_step.float() - eager.float()).abs().max() + 0.05
