"""Timings of the q/k norm and RoPE step at 65,536 token rows, on one CUDA GPU.

    OUT=dir python tests_gpu/qk_rope_probe.py

Each way the step can run: eager, compiled as the engine compiles it (first called on 16 rows,
as fused_qwen3.warm_up does), compiled with its first call on all the rows, and the Triton
kernel (engines/qk_rope.py); a plain copy of the same bytes for the memory's speed. In ms and
GB/s (the q and k parts of the q/k/v rows read, q and k written, the RoPE tables read) for the
0.6B and 4B/8B head counts. Writes $OUT/qk_rope_probe.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipeline.engines import compiled, qk_rope  # noqa: E402
from pipeline.engines import fused_qwen3 as fq  # noqa: E402
from kernel_probe import ms  # noqa: E402  (this folder is on the path when run as a script)

DEV = torch.device("cuda")
BF = torch.bfloat16
T = 65536
REC: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": T}


def main():
    d = 128
    for arch, h, hkv in (("0.6b", 16, 8), ("4b_8b", 32, 8)):
        g = torch.Generator(device=DEV).manual_seed(0)
        qkv = torch.randn(T, (h + 2 * hkv) * d, device=DEV, generator=g).to(BF)
        qw = torch.ones(d, device=DEV, dtype=BF)
        kw = torch.ones(d, device=DEV, dtype=BF)
        cos = torch.randn(T, d, device=DEV, generator=g).to(BF)
        sin = torch.randn(T, d, device=DEV, generator=g).to(BF)
        args = (qw, kw, cos, sin, 1e-6, h, hkv, d)
        gb = (2 * (h + hkv) * d * 2 + 2 * d * 2) * T / 1e9  # q/k read and written, cos and sin read
        row = {}
        torch._dynamo.reset()
        small = compiled.compile_rows(fq.qk_norm_rope)
        small(qkv[:16].clone(), *args[:2], cos[:16].clone(), sin[:16].clone(), *args[4:])  # as the engine warms up
        fns = {"eager": lambda: fq.qk_norm_rope(qkv, *args),
               "compiled_warmed_on_16_rows": lambda: small(qkv, *args)}
        for name, fn in fns.items():
            row[name] = ms(fn, reps=20)
        torch._dynamo.reset()
        big = compiled.compile_rows(fq.qk_norm_rope)
        big(qkv, *args)
        row["compiled_first_call_on_all_rows"] = ms(lambda: big(qkv, *args), reps=20)
        row["triton_kernel"] = ms(lambda: qk_rope.qk_norm_rope(qkv, *args), reps=20)
        src = qkv[:, :(h + hkv) * d].contiguous()
        dst = torch.empty_like(src)
        row["copy_of_the_q_k_bytes"] = ms(lambda: dst.copy_(src), reps=20)
        rec = {k: {"ms": round(v, 4), "GB_per_s": round(gb / (v / 1e3), 1)} for k, v in row.items()}
        rec["copy_of_the_q_k_bytes"]["GB_per_s"] = round(2 * src.numel() * 2 / 1e9 / (row["copy_of_the_q_k_bytes"] / 1e3), 1)
        REC[arch] = rec
        print(arch, json.dumps(rec), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "qk_rope_probe.json"), "w") as f:
        json.dump(REC, f, indent=1)


if __name__ == "__main__":
    main()
