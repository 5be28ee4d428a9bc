"""Exact attention of packed sequences through one padded SDPA call (CPU, or float32 on CUDA).

A packed batch (T, H, D) is scattered into (n, L, H, D) rows of its longest sequence, SDPA runs
once with a mask that hides the padding (and, for causal or sliding-window layers, what those
hide), and the real rows are gathered back. The numbers are those of the padded reference
forward; there is no per-sequence Python loop, and batches are length-sorted, so little is padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid(cu: torch.Tensor, max_len: int) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).to(torch.long)
    return torch.arange(max_len, device=cu.device)[None, :] < lens[:, None]  # (n, L)


def _mask(valid, max_len: int, causal: bool, window: int | None):
    mask = valid[:, None, None, :]  # keys that exist
    if causal or window is not None:
        i = torch.arange(max_len, device=valid.device)
        rel = i[None, :] - i[:, None]  # key minus query
        band = torch.ones(max_len, max_len, dtype=torch.bool, device=valid.device)
        if causal:
            band &= rel <= 0
        if window is not None:
            band &= rel.abs() <= window
        mask = mask & band[None, None]
    return mask


def padded_sdpa_qkv(qkv, cu, max_len: int, scale: float, window: int | None = None):
    """Bidirectional attention from fused q/k/v rows (T, 3, H, D): one scatter for all three
    instead of a copy and a scatter each."""
    valid = _valid(cu, max_len)
    n = valid.shape[0]
    pad = qkv.new_zeros(n, max_len, *qkv.shape[1:])
    pad[valid] = qkv
    q, k, v = (pad[:, :, j].transpose(1, 2) for j in range(3))  # (n, H, L, D) views
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(valid, max_len, False, window), scale=scale)
    return out.transpose(1, 2)[valid]


def padded_sdpa(q, k, v, cu, max_len: int, scale: float, causal: bool, window: int | None = None):
    """q (T, H, D), k/v (T, Hkv, D), cu (n+1,) -> (T, H, D). `window`: keys at most that far
    from the query on either side (ModernBERT's local layers)."""
    valid = _valid(cu, max_len)
    n = valid.shape[0]

    def pad(x):
        out = x.new_zeros(n, max_len, x.shape[1], x.shape[2])
        out[valid] = x
        return out.transpose(1, 2)  # (n, H, L, D)

    if causal and window is None:
        # Right padding: a real query's keys (those before it) are all real, so the causal mask
        # alone is exact for the rows kept, and SDPA needs no mask tensor (its fast kernel).
        mask, is_causal = None, True
    else:
        mask, is_causal = _mask(valid, max_len, causal, window), False
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[valid]
