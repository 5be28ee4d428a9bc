"""Variable-length causal attention over packed sequences, registered with transformers.

A packed batch is one row of T tokens holding many sequences; `cu_seq_lens_q` marks where each
starts. On CUDA the kernel is flash-attn's varlen function when that package imports, else
torch's own FlashAttention-2 (`torch.nn.attention.varlen`). Elsewhere an exact fallback runs
one masked SDPA over the batch padded to its longest sequence (padded_attention.py), which gives
the same numbers as the padded reference.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from pipeline.engines.padded_attention import padded_sdpa

log = logging.getLogger(__name__)

NAME = "rerank_varlen"


def flash_attn_varlen():
    """flash-attn's varlen function, or None where the package does not import."""
    try:
        from flash_attn import flash_attn_varlen_func  # optional extra
    except Exception:
        return None
    return flash_attn_varlen_func


def torch_varlen():
    """torch's varlen FlashAttention (torch.nn.attention.varlen), or None in torch versions without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # newer torch versions only
    except Exception:
        return None
    return varlen_attn


_TORCH_VARLEN_GQA = None


def _torch_varlen_call(q, k, v, cu, max_len, scale, cu_k=None, max_k=None):
    global _TORCH_VARLEN_GQA
    fn = torch_varlen()
    if _TORCH_VARLEN_GQA is None:
        _TORCH_VARLEN_GQA = "enable_gqa" in inspect.signature(fn).parameters
    kw = {"enable_gqa": q.shape[1] != k.shape[1]} if _TORCH_VARLEN_GQA else {}
    cu_k = cu if cu_k is None else cu_k
    max_k = max_len if max_k is None else max_k
    # Causal (-1, 0) in FlashAttention-2 is aligned to the end of the keys when a sequence has
    # more keys than queries (query i of Lq sees keys <= i + Lk - Lq): what shared prefixes need.
    return fn(q, k, v, cu, cu_k, max_len, max_k, scale=scale, window_size=(-1, 0), **kw)


def causal_mask_bottom_right(lq: int, lk: int, device=None) -> torch.Tensor:
    """Boolean (lq, lk) mask: query i sees keys j <= i + lk - lq (causal aligned to the end of
    the keys; for lq == lk the usual lower triangle)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _sdpa_per_block(q, k, v, cu_q, cu_k, scale):
    # Shared prefixes: block b's queries q[cu_q[b]:cu_q[b+1]] attend to the gathered keys
    # k[cu_k[b]:cu_k[b+1]] (its group's prefix, then its own rows) with an explicit
    # bottom-right causal mask; SDPA's is_causal would align top-left when lq != lk.
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for (qs, qe), (ks, ke) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()),
                                  zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        if qe == qs:
            continue
        lq, lk = qe - qs, ke - ks
        kw = {"is_causal": True} if lq == lk else {"attn_mask": causal_mask_bottom_right(lq, lk, q.device)}
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1),
            scale=scale, enable_gqa=gqa, **kw,
        )
        out[qs:qe] = o.transpose(0, 1)
    return out


def packed_attention(q, k, v, cu, max_len: int, scale: float, kernel: str, shared=None):
    """Causal attention of packed sequences. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    `shared` = (kv_idx, cu_k, max_k) for batches with shared prefixes (see prefix.py): block b
    of the queries attends to the key rows kv_idx[cu_k[b]:cu_k[b+1]], causally aligned to their
    end. None: every sequence attends to itself (cu_k = cu).
    """
    if shared is not None:
        kv_idx, cu_k, max_k = shared
        k = k.index_select(0, kv_idx)
        v = v.index_select(0, kv_idx)
        if kernel == "flash_attn":
            return flash_attn_varlen()(q, k, v, cu, cu_k, max_len, max_k, softmax_scale=scale, causal=True)
        if kernel == "torch_varlen":
            return _torch_varlen_call(q, k, v, cu, max_len, scale, cu_k, max_k)
        return _sdpa_per_block(q, k, v, cu, cu_k, scale)
    if kernel == "flash_attn":
        return flash_attn_varlen()(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    if kernel == "torch_varlen":
        return _torch_varlen_call(q, k, v, cu, max_len, scale)
    # One padded SDPA call: exact, and no per-sequence Python loop.
    return padded_sdpa(q, k, v, cu, max_len, scale, causal=True)


def _transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # transformers hands (1, H, T, D); the kernels take (T, H, D).
    cu = kwargs["cu_seq_lens_q"]
    max_len = kwargs["max_length_q"]
    kv_idx = kwargs.get("rerank_kv_idx")
    shared = None if kv_idx is None else (kv_idx, kwargs["cu_seq_lens_k"], kwargs["max_length_k"])
    kernel = kwargs.get("rerank_kernel", "sdpa")  # the forward's kernel (forwards.TransformersDecoder)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if kernel != "sdpa":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = packed_attention(q, k, v, cu, max_len, scaling, kernel, shared)
    return out.unsqueeze(0), None


_registered = False


def register() -> str:
    """Register the packed attention with transformers once; return its implementation name."""
    global _registered
    if not _registered:
        # Here, not at the top: a direct load (direct.py) runs without importing transformers.
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _transformers_attention)
        _registered = True
    return NAME
