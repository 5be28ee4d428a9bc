"""The fused forward's compiled steps with the row count symbolic, unbounded (as compiled.py marks
it) and bounded (mark_dynamic with a maximum, which lets Inductor index in 32 bits), against static
shapes, at 65,536 rows of the 0.6B and 4B widths. Writes $OUT/kernel_probe_bounds.json."""
from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kernel_probe import ms  # noqa: E402  (this folder: the same timing)
from pipeline.engines import fp8  # noqa: E402
from pipeline.engines import fused_qwen3 as fq  # noqa: E402

DEV, BF, T = torch.device("cuda"), torch.bfloat16, 65536
REC: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": T}


def way(fn, mode):
    torch._dynamo.reset()
    c = torch.compile(fn, dynamic=False if mode == "static" else None, fullgraph=True)

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() >= 2:
                if mode == "unbounded":
                    torch._dynamo.maybe_mark_dynamic(a, 0)
                elif mode == "bounded":
                    torch._dynamo.mark_dynamic(a, 0, min=2, max=1 << 17)
        return c(*args)
    return call


for arch, hid, inter, h, hkv, d in (("0.6b", 1024, 3072, 16, 8, 128), ("4b", 2560, 9728, 32, 8, 128)):
    r = {}
    x, dl = (torch.randn(T, hid, device=DEV, dtype=BF) for _ in range(2))
    w = torch.ones(hid, device=DEV, dtype=BF)
    gu = torch.randn(T, 2 * inter, device=DEV, dtype=BF)
    qkv = torch.randn(T, (h + 2 * hkv) * d, device=DEV, dtype=BF)
    qw = torch.ones(d, device=DEV, dtype=BF)
    cos, sin = torch.randn(T, d, device=DEV, dtype=BF), torch.randn(T, d, device=DEV, dtype=BF)
    a3 = torch.randn(T, inter, device=DEV, dtype=BF)
    cases = {"swiglu": (fq.swiglu, (gu,)), "add_norm": (fq.add_norm, (x, dl, w, 1e-6)),
             "qk_norm_rope": (fq.qk_norm_rope, (qkv, qw, qw, cos, sin, 1e-6, h, hkv, d)),
             "quantize_inter": (fp8.quantize_rows, (a3,))}
    for name, (fn, args) in cases.items():
        for mode in ("unbounded", "bounded", "static"):
            # fresh tensors per mode: dynamo's marks stay on a tensor once set
            a = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in args)
            try:
                f = way(fn, mode)
                r[f"{name}_{mode}_ms"] = round(ms(lambda: f(*a)), 3)
            except Exception as exc:  # noqa: BLE001
                r[f"{name}_{mode}_ms"] = repr(exc)[:300]
    REC[arch] = r
    print(arch, json.dumps(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "kernel_probe_bounds.json"), "w") as f:
        json.dump(REC, f, indent=1)
    del x, dl, gu, qkv, a3
    torch.cuda.empty_cache()
