"""--dtype fp8 on the GPU, one process: speed and fidelity against bf16, written to $OUT/fp8_bench.json.

    python tests_gpu/fp8_bench.py [--smoke] [--budget-s 360] [--pairs 4000] [--fidelity-queries 150]
                                  [--archs 0.6b,4b,8b]

1. gemm: the fp8 GEMM the forward runs (fp8.scaled_mm_linear, bf16 out) against its float32
   emulation on the same quantized operands; fp8 and bf16 matmul peaks.
2. speed: per architecture (random weights of the real shapes, built as `rerank-batch bench` builds
   them), model-only pairs/s and MFU (against the bf16 peak) on the first --pairs pairs of W-mixed,
   bf16 and fp8 engines interleaved, 2 timed passes each (median); memory freed between architectures.
3. fidelity: real RAR-b texts (RERANK_SHARED_DATA, else ../shared/data, else ./shared-data), each
   query with 20 candidates (its own answers and others of its set), scored by a 0.6B random model
   whose RMSNorm weights are spread like trained ones (log-normal per channel, a few outlier
   channels) in float32, bf16 and fp8: max |delta| against float32, mean per-query Spearman rho,
   mean top-10 overlap, top-1 agreement.

Steps past --budget-s are skipped (recorded). --smoke: CPU, tiny model, a few pairs, the fp8 GEMM
emulated (tests/test_fp8.py runs it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from pipeline.bench.synthetic import ARCHS, train_tokenizer  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engines import forwards, fp8, loading  # noqa: E402
from pipeline.engines.score import engine_from_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few pairs (the fp8 GEMM emulated)")
ap.add_argument("--budget-s", type=float, default=360, help="skip the steps that would start after this")
ap.add_argument("--pairs", type=int, default=4000, help="W-mixed pairs per speed measurement")
ap.add_argument("--fidelity-queries", type=int, default=150, help="queries (x20 candidates) for fidelity")
ap.add_argument("--archs", default="0.6b,4b,8b")
ARGS = ap.parse_args()
SMOKE = ARGS.smoke
DEV = torch.device("cpu" if SMOKE else "cuda")
OUT = os.environ.get("OUT", ".")
REC: dict = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__,
             "args": vars(ARGS)}
T0 = time.time()
CANDIDATES = 20


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
    """An engine over `model` in `dtype` ("float32", "bfloat16" or "fp8"). On the CPU (--smoke) fp8
    is refused by design; its forward is chosen as on a GPU, over the emulated GEMM."""
    cfg = RunConfig(inputs=(), output="", model="<random>", device=str(DEV), dtype=dtype, **kw)
    if dtype == "fp8" and DEV.type == "cpu":
        cfg = dataclasses.replace(cfg, dtype="bfloat16")
        m = dataclasses.replace(loading.prepare(model, tok, cfg, DEV), fp8=True)
        return engine_from_model(model, tok, cfg, DEV, forward=forwards.choose(m, cfg))
    return engine_from_model(model, tok, cfg, DEV)


# -- 1. the GEMM ------------------------------------------------------------------------------------
def gemm_check():
    g = torch.Generator(device=DEV).manual_seed(0)
    out = {}
    for m_, k, n in ((37, 64, 96), (130, 128, 64)) if SMOKE else ((37, 1024, 4096), (4096, 3072, 1024)):
        x = torch.randn(m_, k, device=DEV, generator=g).to(torch.bfloat16)
        w = fp8.quantize_weight((torch.randn(n, k, device=DEV, generator=g) * 0.02).to(torch.bfloat16))
        got = fp8.scaled_mm_linear(x, w).float()
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
        engs = {"fp8": engine(model_b, tok, "fp8"), "bfloat16": engine(model_a, tok, "bfloat16")}
        del model_a, model_b
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
                       # the engine's own label ("fp8" on CUDA; the CPU smoke's emulation says bfloat16)
                       "compiled": e.info.compiled, "label": e.info.dtype}
        rows["speedup_fp8_over_bf16"] = round(rows["fp8"]["pairs_per_s"] / rows["bfloat16"]["pairs_per_s"], 3)
        rows["max_abs_fp8_vs_bf16_scores"] = float(np.abs(scores["fp8"] - scores["bfloat16"]).max())
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


def real_queries(per_set: int):
    """(instructions, queries, documents, group) of `per_set` queries of each RAR-b set, each with
    CANDIDATES candidates: its own answers, then answers of other queries of its set."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    I, Q, D, G = [], [], [], []
    for name in ("ARC-Challenge", "physicaliqa", "spartqa"):
        t = pq.read_table(os.path.join(shared_data(), f"{name}.long.parquet")).to_pydict()
        docs = t["document"]
        order = {}
        for i, qid in enumerate(t["query_id"]):
            order.setdefault(qid, []).append(i)
        for qid in list(order)[:per_set]:
            own = order[qid]
            others = rng.choice(len(docs), CANDIDATES - len(own), replace=False)
            for j in [*own, *others]:
                I.append(t["instruction"][own[0]])
                Q.append(t["query"][own[0]])
                D.append(docs[j])
                G.append(len(G) // CANDIDATES)
    return I, Q, D, np.asarray(G)


def trained_like_norms(model, seed: int = 0):
    """RMSNorm weights spread as in trained decoders: log-normal per channel, and in the hidden
    norms a few outlier channels 8-20x larger (which make the per-token fp8 scales of the
    projections' inputs coarse for every other channel)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1 or "norm" not in name:
                continue
            sigma = 0.3 if ("q_norm" in name or "k_norm" in name) else 0.5
            w = torch.exp(torch.randn(p.shape[0], generator=g) * sigma)
            if "q_norm" not in name and "k_norm" not in name:
                idx = torch.randperm(p.shape[0], generator=g)[: max(1, p.shape[0] // 256)]
                w[idx] *= 8 + 12 * torch.rand(len(idx), generator=g)
            p.copy_(w.to(p.dtype))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(got, ref, group) -> dict:
    d = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    rho, top10, top1 = [], [], []
    for g in np.unique(group):
        i = np.flatnonzero(group == g)
        a, b = got[i], ref[i]
        rho.append(spearman(a, b))
        k = min(10, len(i))
        top10.append(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k)
        top1.append(float(np.argmax(a) == np.argmax(b)))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "spearman_per_query": float(np.mean(rho)),
            "spearman_min": float(np.min(rho)), "top10_overlap": float(np.mean(top10)),
            "top1_agreement": float(np.mean(top1))}


def fidelity():
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    I, Q, D, group = real_queries(2 if SMOKE else ARGS.fidelity_queries // 3)
    arch = "tiny" if SMOKE else "0.6b"
    with tempfile.TemporaryDirectory() as wd:
        # A tokenizer trained on these texts: real words as tokens, not bytes.
        train_tokenizer(wd, texts=Q[::CANDIDATES] + D, vocab_size=8000)
        tok = AutoTokenizer.from_pretrained(wd)
        shape = dict(ARCHS[arch])
        shape.pop("vocab_size", None)
        tie = shape.pop("tie_word_embeddings", True)
        config = Qwen3Config(vocab_size=len(tok), tie_word_embeddings=tie, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                             max_position_embeddings=40960, attention_bias=False,
                             initializer_range=0.02 if arch != "tiny" else 0.1, architectures=["Qwen3ForCausalLM"],
                             **shape)
        torch.manual_seed(0)
        with torch.device(DEV):
            model32 = Qwen3ForCausalLM(config).eval()
        trained_like_norms(model32)
        scores = {}
        for dtype in ("fp8", "bfloat16", "float32"):  # float32 last: it uses the model itself
            m = model32 if dtype == "float32" else copy.deepcopy(model32).to(torch.bfloat16)
            # float32 uncompiled: the reference, as exact as the engine runs
            e = engine(m, tok, dtype, **({"compile": "off"} if dtype == "float32" else {}))
            enc = e.encoder.encode(I, Q, D)
            scores[dtype] = e.score(enc)
            del e, m
            free()
    ref = scores["float32"]
    out = {"pairs": len(ref), "queries": int(group.max()) + 1, "candidates_per_query": CANDIDATES,
           "tokens": int(enc.offsets[-1]), "float32_score_std": float(ref.std()),
           "vs_float32": {k: compare(scores[k], ref, group) for k in ("bfloat16", "fp8")},
           "fp8_vs_bf16": compare(scores["fp8"], scores["bfloat16"], group)}
    save("fidelity", out)


if __name__ == "__main__":
    archs = ["tiny"] if SMOKE else ARGS.archs.split(",")
    steps = [("gemm", gemm_check), ("fidelity", fidelity)] + [(f"speed_{a}", lambda a=a: speed(a)) for a in archs]
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
    lines = [f"{'arch':<6} {'dtype':<9} {'pairs/s':>9} {'tokens/s':>10} {'MFU':>7} {'budget':>7}"]
    for arch, rows in REC.get("speed", {}).items():
        for k in ("bfloat16", "fp8"):
            r = rows[k]
            mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "-"
            lines.append(f"{arch:<6} {k:<9} {r['pairs_per_s']:>9.1f} {r['tokens_per_s']:>10} {mfu:>7} "
                         f"{r['batch_token_budget']:>7}")
        lines.append(f"{arch:<6} fp8/bf16  {rows['speedup_fp8_over_bf16']:.3f}x")
    f = REC.get("fidelity")
    if f:
        lines.append(f"fidelity ({f['pairs']} real pairs, {f['queries']} queries x {f['candidates_per_query']}) "
                     "against float32:")
        lines.append(f"{'dtype':<9} {'max|d|':>8} {'mean|d|':>8} {'rho/query':>10} {'top10':>7} {'top1':>7}")
        for k, c in f["vs_float32"].items():
            lines.append(f"{k:<9} {c['max_abs']:>8.4f} {c['mean_abs']:>8.4f} {c['spearman_per_query']:>10.4f} "
                         f"{c['top10_overlap']:>7.3f} {c['top1_agreement']:>7.3f}")
    print("\n".join(lines))
