"""Packed (varlen) attention on the H100: torch's FlashAttention-2 kernel against cuDNN's
(`aten._cudnn_attention_forward` with cumulative sequence offsets), at a 65,536-token batch of
pairs 100-500 tokens long, for the XLM-R large shape (16 heads of 64, bidirectional) and the
Qwen3 0.6B shape (16 query heads, 8 key/value heads of 128, causal): cuDNN with the key/value
heads as they are, and repeated to the query heads. Each case's time and its largest difference
from FlashAttention's output. Writes $OUT/cudnn_attention_probe.json."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_probe import ms  # noqa: E402  (this folder: the same timing)

DEV, BF = torch.device("cuda"), torch.bfloat16
REC: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
             "cudnn": torch.backends.cudnn.version()}


def lengths(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    out[-1] -= sum(out) - total
    return out


def flash(q, k, v, cu, mx, causal):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False,
                                                   scale=q.shape[-1] ** -0.5)[0]


def cudnn(q, k, v, cu, mx, causal):
    # cuDNN reads the token-major (T, heads, dim) rows as [T, H, D]; its output has q's layout.
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, False, 0.0, causal, False,
                                                   scale=q.shape[-1] ** -0.5)[0]


for name, hq, hkv, d, causal in (("xlmr_large", 16, 16, 64, False), ("qwen3_0.6b", 16, 8, 128, True)):
    ls = lengths(65536, 100, 500)
    cu = torch.tensor([0] + ls, device=DEV, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mx, t = max(ls), sum(ls)
    q = torch.randn(t, hq, d, device=DEV, dtype=BF)
    k, v = (torch.randn(t, hkv, d, device=DEV, dtype=BF) for _ in range(2))
    kx, vx = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    r = {"tokens": t, "sequences": len(ls), "q_heads": hq, "kv_heads": hkv, "head_dim": d, "causal": causal}
    ref = flash(q, k, v, cu, mx, causal)
    r["flash_ms"] = round(ms(lambda: flash(q, k, v, cu, mx, causal)), 3)
    cases = {"cudnn": (q, k, v)} if hq == hkv else {"cudnn_gqa": (q, k, v), "cudnn_repeated_kv": (q, kx, vx)}
    if hq == hkv:  # q, k and v as views of one (T, 3, heads, dim) block, as the encoders pass them
        qkv = torch.stack((q, k, v), dim=1)
        cases["cudnn_qkv_views"] = (qkv[:, 0], qkv[:, 1], qkv[:, 2])
        r["flash_qkv_views_ms"] = round(ms(lambda: flash(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, mx, causal)), 3)
    for case, (qq, kk, vv) in cases.items():
        try:
            got = cudnn(qq, kk, vv, cu, mx, causal)
            r[f"{case}_max_abs_diff"] = float((got.float() - ref.float()).abs().max())
            r[f"{case}_ms"] = round(ms(lambda: cudnn(qq, kk, vv, cu, mx, causal)), 3)
        except Exception as exc:  # noqa: BLE001  (a case this build does not run: recorded)
            r[f"{case}_error"] = repr(exc)[:300]
    if hq != hkv:
        r["repeat_kv_ms"] = round(ms(lambda: (k.repeat_interleave(hq // hkv, dim=1),
                                             v.repeat_interleave(hq // hkv, dim=1))), 3)
    REC[name] = r
    print(name, json.dumps(r), flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "cudnn_attention_probe.json"), "w") as f:
    json.dump(REC, f, indent=2)
