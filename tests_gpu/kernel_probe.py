"""Kernel timings behind the fused forward's elementwise steps and fp8 GEMMs, on one CUDA GPU.

    OUT=dir python tests_gpu/kernel_probe.py

Per step, each way it can run (eager, compiled as the engine compiles it, compiled with static
shapes, a hand-written Triton kernel), in ms and GB/s at 65,536 token rows of the 0.6B and 4B
widths; the fp8 GEMMs (row-wise and tensor-wise scaled, with and without fast accumulation)
against bf16 at the projections' shapes. Writes $OUT/kernel_probe.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipeline.engines import compiled, fp8  # noqa: E402
from pipeline.engines import fused_qwen3 as fq  # noqa: E402

DEV = torch.device("cuda")
BF = torch.bfloat16
T = 65536
REC: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": T}


def ms(fn, reps=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    out.sort()
    return out[len(out) // 2]


def save(k, v):
    REC[k] = v
    print(k, json.dumps(v), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "kernel_probe.json"), "w") as f:
        json.dump(REC, f, indent=1)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_kernel(gu, out, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(gu + row * 2 * n + cols, mask=m).to(tl.float32)
        u = tl.load(gu + row * 2 * n + n + cols, mask=m).to(tl.float32)
        tl.store(out + row * n + cols, (g / (1 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=m)

    def swiglu_triton(gu):
        t, n2 = gu.shape
        n = n2 // 2
        out = torch.empty(t, n, device=gu.device, dtype=gu.dtype)
        _swiglu_kernel[(t, triton.cdiv(n, 1024))](gu, out, n, BLOCK=1024)
        return out
except Exception as exc:  # noqa: BLE001
    swiglu_triton = None
    REC["triton_error"] = repr(exc)


def add_norm_q(x, delta, w, eps: float):
    y = x + delta
    h = fq.rms_norm(y, w, eps)
    q, s = fp8.quantize_rows(h)
    return y, q, s


def swiglu_q(gu):
    return fp8.quantize_rows(fq.swiglu(gu))


def steps():
    for arch, hid, inter, qkv_n, att in (("0.6b", 1024, 3072, 4096, 2048), ("4b", 2560, 9728, 6144, 4096)):
        r = {}
        gu = torch.randn(T, 2 * inter, device=DEV, dtype=BF)
        gb = (gu.numel() * 2 + T * inter * 2) / 1e9
        ways = {"eager": fq.swiglu, "compiled_rows": compiled.compile_rows(fq.swiglu),
                "compiled_static": torch.compile(fq.swiglu, dynamic=False)}
        if swiglu_triton:
            ways["triton"] = swiglu_triton
        ref = fq.swiglu(gu).float()
        for k, fn in ways.items():
            try:
                t = ms(lambda: fn(gu))
                r[f"swiglu_{k}"] = {"ms": round(t, 3), "GBps": round(gb / t * 1e3), "max_abs_vs_eager": float((fn(gu).float() - ref).abs().max())}
            except Exception as exc:  # noqa: BLE001
                r[f"swiglu_{k}"] = repr(exc)[:300]
        del gu, ref
        x, d = (torch.randn(T, hid, device=DEV, dtype=BF) for _ in range(2))
        w = torch.ones(hid, device=DEV, dtype=BF)
        an = compiled.compile_rows(fq.add_norm)
        r["add_norm_compiled"] = {"ms": round(ms(lambda: an(x, d, w, 1e-6)), 3)}
        for K in (hid, att, inter):
            a = torch.randn(T, K, device=DEV, dtype=BF)
            qc = compiled.compile_rows(fp8.quantize_rows)
            t = ms(lambda: qc(a))
            r[f"quantize_{K}_compiled"] = {"ms": round(t, 3), "GBps": round(T * K * 3 / t / 1e6)}
            r[f"quantize_{K}_eager"] = {"ms": round(ms(lambda: fp8.quantize_rows(a)), 3)}
            del a
        anq = compiled.compile_rows(add_norm_q)
        r["add_norm_quantize_fused_compiled"] = {"ms": round(ms(lambda: anq(x, d, w, 1e-6)), 3)}
        gu = torch.randn(T, 2 * inter, device=DEV, dtype=BF)
        sq = compiled.compile_rows(swiglu_q)
        r["swiglu_quantize_fused_compiled"] = {"ms": round(ms(lambda: sq(gu)), 3)}
        del gu, x, d
        # GEMMs at the projections' shapes
        for name, K, N in (("qkv", hid, qkv_n), ("o", att, hid), ("gate_up", hid, 2 * inter), ("down", inter, hid)):
            a = torch.randn(T, K, device=DEV, dtype=BF)
            wt = torch.randn(N, K, device=DEV, dtype=BF) * 0.02
            fl = 2 * T * K * N / 1e12
            g = {"bf16": fl / ms(lambda: F.linear(a, wt)) * 1e3}
            qw = fp8.quantize_weight(wt)
            qa, sa = fp8.quantize_rows(a)
            for acc in (False, True):
                g[f"fp8_rowwise_fastacc{int(acc)}"] = fl / ms(lambda: torch._scaled_mm(qa, qw.q.t(), scale_a=sa, scale_b=qw.scale, out_dtype=BF, use_fast_accum=acc)) * 1e3
            one = torch.ones((), device=DEV)
            for acc in (False, True):
                try:
                    g[f"fp8_tensorwise_fastacc{int(acc)}"] = fl / ms(lambda: torch._scaled_mm(qa, qw.q.t(), scale_a=one, scale_b=one, out_dtype=BF, use_fast_accum=acc)) * 1e3
                except Exception as exc:  # noqa: BLE001
                    g[f"fp8_tensorwise_fastacc{int(acc)}"] = repr(exc)[:200]
            r[f"gemm_{name}_{K}x{N}_tflops"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in g.items()}
            del a, wt, qw, qa, sa
        torch.cuda.empty_cache()
        save(arch, r)


if __name__ == "__main__":
    steps()
