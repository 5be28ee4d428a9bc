"""--dtype fp8 on the GPU, one process: speed and fidelity against bf16, written to $OUT/fp8_bench.json.

    python tests_gpu/fp8_bench.py [--smoke] [--budget-s 360] [--pairs 4000] [--fidelity-queries 150]
                                  [--archs 0.6b,4b,8b] [--device cuda|cpu] [--steps gemm,fidelity,speed]
                                  [--fidelity-layers N] [--candidates 20] [--smooth-alpha 0.5]

1. gemm: the fp8 GEMM the forward runs (fp8.scaled_mm_linear, bf16 out) against its float32
   emulation on the same quantized operands; fp8 and bf16 matmul peaks.
2. speed: per architecture (random weights of the real shapes, built as `rerank-batch bench` builds
   them), model-only pairs/s and MFU (against the bf16 peak) on the first --pairs pairs of W-mixed,
   bf16 and fp8 engines interleaved, 2 timed passes each (median); memory freed between architectures.
3. fidelity: real RAR-b texts (RERANK_SHARED_DATA, else ../shared/data, else ./shared-data), each
   query with 20 candidates (its own answers and others of its set), scored by a 0.6B random model
   whose RMSNorm weights are spread like trained ones (log-normal per channel, a few outlier
   channels) in float32, bf16, fp8, fp8 with every layer in fp8 (fp8.BF16_LAYERS 0, as fp8 was
   first) and fp8 with the smoothing of fp8_smooth.py on (pipeline/bench/fidelity.py):
   max |delta| against float32, mean per-query Spearman rho, mean top-10 overlap, top-1 agreement.

--device cpu runs the same steps on the CPU with the fp8 GEMM emulated in float32 (the same
quantized numbers); for the fidelity step alone, on fewer layers and queries there:

    python tests_gpu/fp8_bench.py --device cpu --steps fidelity --fidelity-layers 6 --fidelity-queries 12

Steps past --budget-s are skipped (recorded). --smoke: CPU, tiny model, a few pairs, the fp8 GEMM
emulated (tests/test_fp8.py runs it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.bench import throughput as bench  # noqa: E402
from pipeline.bench import fidelity as fid  # noqa: E402
from pipeline.bench.synthetic import ARCHS  # noqa: E402
from pipeline.engines import fp8, fp8_smooth  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few pairs (the fp8 GEMM emulated)")
ap.add_argument("--budget-s", type=float, default=360, help="skip the steps that would start after this")
ap.add_argument("--pairs", type=int, default=4000, help="W-mixed pairs per speed measurement")
ap.add_argument("--fidelity-queries", type=int, default=150, help="queries (x20 candidates) for fidelity")
ap.add_argument("--archs", default="0.6b,4b,8b")
ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                help="cpu: the fp8 GEMM emulated in float32 (the same quantized numbers)")
ap.add_argument("--steps", default="gemm,fidelity,speed", help="which of gemm, fidelity, speed to run")
ap.add_argument("--fidelity-layers", type=int, default=None,
                help="layers of the fidelity model (default: all of the 0.6B's 28; fewer for a CPU run)")
ap.add_argument("--candidates", type=int, default=20, help="candidates per fidelity query")
ap.add_argument("--smooth-alpha", type=float, default=None,
                help="alpha of the fp8_smoothed row (default: fp8_smooth.ALPHA)")
ARGS = ap.parse_args()
SMOKE = ARGS.smoke
DEV = torch.device("cpu" if SMOKE or ARGS.device == "cpu" else "cuda")
OUT = os.environ.get("OUT", ".")
REC: dict = {"device": "cpu" if DEV.type == "cpu" else torch.cuda.get_device_name(0), "torch": torch.__version__,
             "args": vars(ARGS)}
T0 = time.time()
if ARGS.smooth_alpha is not None:
    fp8_smooth.ALPHA = ARGS.smooth_alpha
CANDIDATES = ARGS.candidates


def save(key, value):
    REC[key] = value
    REC["elapsed_s"] = round(time.time() - T0, 1)
    with open(os.path.join(OUT, "fp8_bench.json"), "w") as f:
        json.dump(REC, f, indent=1, default=float)
    print(f"[{REC['elapsed_s']:7.1f}s] {key}: {json.dumps(value, default=float)[:800]}", flush=True)


def free():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def engine(model, tok, dtype: str, **kw):
    """An engine over `model` in `dtype` ("float32", "bfloat16" or "fp8"; off CUDA, fp8 over the
    emulated GEMM: fidelity.engine)."""
    return fid.engine(model, tok, dtype, DEV, **kw)


# -- 1. the GEMM ------------------------------------------------------------------------------------
def gemm_check():
    g = torch.Generator(device=DEV).manual_seed(0)
    out = {}
    for m_, k, n in ((37, 64, 96), (130, 128, 64)) if SMOKE else ((37, 1024, 4096), (4096, 3072, 1024)):
        x = torch.randn(m_, k, device=DEV, generator=g).to(torch.bfloat16)
        w = fp8.quantize_weight((torch.randn(n, k, device=DEV, generator=g) * 0.02).to(torch.bfloat16))
        # off CUDA there is no fp8 GEMM: the emulation in bf16 out stands in for it
        got = (fp8.scaled_mm_linear(x, w) if DEV.type == "cuda" else fp8.emulated_linear(x, w)).float()
        emu = fp8.emulated_linear(x.float(), w)
        exact = x.float() @ w.dequantize().T  # no activation rounding: what fp8 activations cost
        out[f"{m_}x{k}x{n}"] = {
            "max_rel_vs_emulated": float(((got - emu).abs() / emu.abs().clamp_min(1e-3)).max()),
            "max_abs_vs_emulated": float((got - emu).abs().max()),
            "rel_fro_vs_unquantized_activations": float((emu - exact).norm() / exact.norm())}
    if DEV.type == "cuda":
        out["bf16_matmul_peak_tflops"] = round(bench.measure_matmul_peak(DEV) / 1e12, 1)
        out["fp8_matmul_peak_tflops"] = round(bench.measure_fp8_matmul_peak(DEV) / 1e12, 1)
        REC["peak"] = out["bf16_matmul_peak_tflops"] * 1e12
    save("gemm", out)


# -- 2. speed ---------------------------------------------------------------------------------------
def speed(arch: str):
    reps = 2
    with tempfile.TemporaryDirectory() as wd:
        model_a, tok, shape = bench.build_model(arch, DEV, torch.bfloat16, wd)
        model_b = copy.deepcopy(model_a)
        vocab = len(tok) if arch == "tiny" else shape.get("vocab_size", len(tok))
        # fp8 first: its copy's bf16 projections are freed before the bf16 engine sizes its batch
        # budget, so both budgets are sized with the same memory in use.
        model_c = copy.deepcopy(model_a)
        engs = {"fp8": engine(model_b, tok, "fp8"), "fp8_fast_accum": engine(model_c, tok, "fp8_fast_accum"),
                "bfloat16": engine(model_a, tok, "bfloat16")}
        del model_a, model_b, model_c
        free()
        enc = bench.synthetic_encoded(bench.WORKLOADS["w-mixed"], vocab, 48 if SMOKE else ARGS.pairs)
        warm = bench.Encoded(enc.ids, enc.offsets[:65], enc.truncated, keys=enc.keys[:64])
        for e in engs.values():
            e.score(warm)  # compiles
            e.synchronize()
        times = {k: [] for k in engs}
        scores = {}
        for _ in range(reps):
            for k, e in engs.items():
                bench.sync(DEV)
                t0 = time.perf_counter()
                scores[k] = e.score(enc)
                e.synchronize()
                times[k].append(time.perf_counter() - t0)
        peak = REC.get("peak")
        rows = {}
        for k, e in engs.items():
            s = float(np.median(times[k]))
            rows[k] = {"pairs": len(enc), "tokens": int(enc.offsets[-1]),
                       "seconds_all": [round(t, 4) for t in times[k]],
                       "pairs_per_s": round(len(enc) / s, 1), "tokens_per_s": round(int(enc.offsets[-1]) / s),
                       "mfu_vs_bf16_peak": round(bench.model_flops(enc.lengths, shape) / s / peak, 4) if peak else None,
                       "batch_token_budget": e.token_budget, "engine": e.info.forward, "kernel": e.info.kernel,
                       # the engine's own label ("fp8" or "fp8-fast" on CUDA; the CPU smoke's emulation
                       # says bfloat16)
                       "compiled": e.info.compiled, "label": e.info.dtype}
        for k in ("fp8", "fp8_fast_accum"):
            rows[f"speedup_{k}_over_bf16"] = round(rows[k]["pairs_per_s"] / rows["bfloat16"]["pairs_per_s"], 3)
            rows[f"max_abs_{k}_vs_bf16_scores"] = float(np.abs(scores[k] - scores["bfloat16"]).max())
        del engs
        free()
    REC.setdefault("speed", {})[arch] = rows
    save(f"speed_{arch}", rows)


# -- 3. fidelity ------------------------------------------------------------------------------------
def shared_data() -> str:
    for d in (os.environ.get("RERANK_SHARED_DATA"), os.path.join(os.path.dirname(ROOT), "shared", "data"),
              os.path.join(ROOT, "shared-data")):
        if d and os.path.isdir(d):
            return d
    raise FileNotFoundError("the RAR-b data: set RERANK_SHARED_DATA, or put it in ../shared/data or ./shared-data")


def fidelity():
    """pipeline/bench/fidelity.py's measure: float32, bf16, fp8 and its variants."""
    shape = dict(ARCHS["tiny" if SMOKE else "0.6b"])
    if ARGS.fidelity_layers:
        shape["num_hidden_layers"] = ARGS.fidelity_layers
    out = fid.measure(shared_data(), 2 if SMOKE else max(1, ARGS.fidelity_queries // 3), shape, DEV,
                      candidates=CANDIDATES, init_std=0.1 if SMOKE else 0.02,
                      log=lambda m: print(m, flush=True))
    out["device"] = REC["device"]
    save("fidelity", out)


if __name__ == "__main__":
    archs = ["tiny"] if SMOKE else ARGS.archs.split(",")
    wanted = ARGS.steps.split(",")
    steps = [("gemm", gemm_check), ("fidelity", fidelity)] + [(f"speed_{a}", lambda a=a: speed(a)) for a in archs]
    steps = [(n, fn) for n, fn in steps if n.split("_")[0] in wanted]
    for name, fn in steps:
        if time.time() - T0 > ARGS.budget_s:
            save(f"skipped_{name}", f"time budget of {ARGS.budget_s:g} s spent")
            continue
        try:
            fn()
        except Exception as exc:  # keep going: later steps still report
            import traceback

            traceback.print_exc()
            save(f"error_{name}", repr(exc))
        free()
    lines = [f"{'arch':<6} {'dtype':<15} {'pairs/s':>9} {'tokens/s':>10} {'MFU':>7} {'budget':>7}"]
    for arch, rows in REC.get("speed", {}).items():
        for k in ("bfloat16", "fp8", "fp8_fast_accum"):
            r = rows[k]
            mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "-"
            lines.append(f"{arch:<6} {k:<15} {r['pairs_per_s']:>9.1f} {r['tokens_per_s']:>10} {mfu:>7} "
                         f"{r['batch_token_budget']:>7}")
        lines.append(f"{arch:<6} fp8/bf16  {rows['speedup_fp8_over_bf16']:.3f}x, with fast accumulation "
                     f"{rows['speedup_fp8_fast_accum_over_bf16']:.3f}x")
    f = REC.get("fidelity")
    if f:
        lines.append(f"fidelity ({f['pairs']} real pairs, {f['queries']} queries x {f['candidates_per_query']}; "
                     f"{f['model']['num_hidden_layers']} layers of width {f['model']['hidden_size']}; "
                     f"{f['device']}) against float32:")
        lines.append(f"{'dtype':<16} {'max|d|':>8} {'mean|d|':>8} {'rho/query':>10} {'top10':>7} {'top1':>7}")
        for k, c in f["vs_float32"].items():
            lines.append(f"{k:<16} {c['max_abs']:>8.4f} {c['mean_abs']:>8.4f} {c['spearman_per_query']:>10.4f} "
                         f"{c['top10_overlap']:>7.3f} {c['top1_agreement']:>7.3f}")
    print("\n".join(lines))
