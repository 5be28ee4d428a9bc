"""Prefix sharing on the GPU, one process: the shared-prefix kernel against an explicit dense mask,
bf16 scores with sharing on/off against float32, and the bench rows sharing off vs on
(model only and end to end, alternating, repeated), written to $OUT/prefix_sharing.json.

    python tests_gpu/prefix_sharing.py [--smoke]   (--smoke: CPU, tiny model, few pairs)
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from pipeline.bench import throughput as bench  # noqa: E402
from pipeline.engines import prefix  # noqa: E402
from pipeline.engines.attention import packed_attention  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engines.score import engine_from_model  # noqa: E402

SMOKE = "--smoke" in sys.argv
DEV = torch.device("cpu" if SMOKE else "cuda")
OUT = os.environ.get("OUT", ".")
REC: dict = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__}
T0 = time.time()


def save(key, value):
    REC[key] = value
    REC["elapsed_s"] = round(time.time() - T0, 1)
    with open(os.path.join(OUT, "prefix_sharing.json"), "w") as f:
        json.dump(REC, f, indent=1, default=float)
    print(f"[{REC['elapsed_s']:7.1f}s] {key}: {json.dumps(value, default=float)[:600]}", flush=True)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def cmp(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "spearman": spearman(a, b), "n": len(d)}


# -- 1. the kernel: shared layout vs an explicit dense mask ----------------------------------------
def kernel_check():
    torch.manual_seed(0)
    H, Hkv, D = 16, 8, 128
    rng = np.random.default_rng(0)
    seqs, keys = [], []
    for g in range(6):
        p = int(rng.integers(50, 200))
        pre = rng.integers(0, 1000, p)
        for _ in range(int(rng.integers(1, 8))):
            seqs.append(np.r_[pre, rng.integers(1000, 2000, int(rng.integers(1, 120)))])
            keys.append(g)
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    ids = np.concatenate(seqs).astype(np.int32)
    keys = np.asarray(keys, np.int64)
    idx = np.arange(len(seqs))
    plen = prefix.prefix_lengths(ids, offsets, idx, keys)
    b = prefix.gather_shared(ids, offsets, idx, plen, keys)
    # q/k/v of a token are a function of (token id, position): equal for equal prefix rows.
    gen = torch.Generator().manual_seed(1)
    basis_q, basis_k, basis_v = (torch.randn(2000, n, D, generator=gen) for n in (H, Hkv, Hkv))
    pos_q = torch.randn(1200, H, D, generator=gen) * 0.5

    def rows(tok, pos):
        t, p_ = torch.from_numpy(tok.astype(np.int64)), torch.from_numpy(pos.astype(np.int64))
        return basis_q[t] + pos_q[p_], basis_k[t] + pos_q[p_, :Hkv], basis_v[t] - pos_q[p_, Hkv:]

    q, k, v = rows(b.ids, b.pos)
    scale = D ** -0.5
    res = {}
    kernels = ["sdpa"] + ([] if SMOKE else ["torch_varlen"])
    for kern in kernels:
        for dt in ([torch.float32] if kern == "sdpa" else [torch.bfloat16]):
            dq, dk, dv = (x.to(DEV, dt) for x in (q, k, v))
            sh = (torch.from_numpy(b.kv_idx).to(DEV), torch.from_numpy(b.cu_k).to(DEV, torch.int32),
                  int(np.diff(b.cu_k).max()))
            out = packed_attention(dq, dk, dv, torch.from_numpy(b.cu_q).to(DEV, torch.int32),
                                   int(np.diff(b.cu_q).max()), scale, kern, sh).float().cpu()
            # Dense float64 reference per pair: the full unshared sequence, plain causal mask.
            worst, worst_plain = 0.0, 0.0
            for j, s in enumerate(seqs):
                L = len(s)
                uq, uk, uv = rows(s, np.arange(L))
                rep = H // Hkv
                sc = torch.einsum("qhd,khd->hqk", uq.double(), uk.double().repeat_interleave(rep, 1)) * scale
                sc = sc.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
                ref = torch.einsum("hqk,khd->qhd", sc.softmax(-1), uv.double().repeat_interleave(rep, 1))
                r = L - int(plen[j])
                got = out[int(b.last[j]) - r + 1:int(b.last[j]) + 1].double()
                worst = max(worst, float((got - ref[L - r:]).abs().max()))
                if kern != "sdpa" and j < 8:
                    # The same kernel without sharing, for the bf16 rounding scale.
                    cu = torch.tensor([0, L], dtype=torch.int32, device=DEV)
                    o2 = packed_attention(uq.to(DEV, dt), uk.to(DEV, dt), uv.to(DEV, dt), cu, L, scale, kern)
                    worst_plain = max(worst_plain, float((o2.double().cpu() - ref).abs().max()))
            res[f"{kern}_{str(dt)[6:]}"] = {"max_abs_vs_dense_float64": worst,
                                            **({"unshared_same_kernel": worst_plain} if kern != "sdpa" else {})}
    save("kernel_vs_dense_mask", res)


# -- 2. scores: bf16 on/off against float32 --------------------------------------------------------
def engines(model, tok, modes=("off", "on"), **kw):
    """{mode: engine} over one forward: the prefix sharing mode is each engine's config."""
    return bench.sharing_engines(model, tok, {"model": "<mem>", "device": str(DEV), **kw}, DEV, modes)


def score_with(engs, enc, mode):
    return engs[mode].score(enc)


def parity_tiny():
    """The tiny test model on real pairs: CPU float32 off vs CUDA bf16 off/on and float32 on."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import _corpus, shared
    from pipeline.bench.synthetic import build_reranker

    d = tempfile.mkdtemp()
    build_reranker(d, arch="tiny", tie_word_embeddings=True, texts=_corpus(), init_std=0.1, seed=1)
    tok = AutoTokenizer.from_pretrained(d)
    n = 200 if SMOKE else 2000
    ts = [pq.read_table(shared(f"{x}.long.parquet")).slice(0, n) for x in ("ARC-Challenge", "physicaliqa", "spartqa")]
    I = [i for t in ts for i in t.column("instruction").to_pylist()]
    Q = [q for t in ts for q in t.column("query").to_pylist()]
    D = [x for t in ts for x in t.column("document").to_pylist()]
    out = {}
    ref_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cpu = engine_from_model(ref_model, tok, RunConfig(inputs=(), output="", model=d, device="cpu",
                                                       prefix_sharing="off"), torch.device("cpu"))
    enc = cpu.encoder.encode(I, Q, D)
    ref = cpu.score(enc)
    for dtype in (["float32"] if SMOKE else ["bfloat16", "float32"]):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).to(DEV).eval()
        engs = engines(m, tok, dtype=dtype, compile="off")
        for mode in ("off", "on"):
            c0 = engs[mode].stats().tokens_computed
            s = score_with(engs, enc, mode)
            out[f"{dtype}_{mode}"] = {**cmp(s, ref), "tokens_computed": engs[mode].stats().tokens_computed - c0}
        if dtype == "bfloat16":  # the transformers engine (HF modules with our attention) too
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(DEV).eval()
            st = engines(m, tok, dtype=dtype, engine="transformers")
            for mode in ("off", "on"):
                out[f"transformers_bf16_{mode}"] = cmp(score_with(st, enc, mode), ref)
        out["tokens_unshared"] = int(enc.offsets[-1])
    out["ref_std"] = float(ref.std())
    save("parity_tiny_real_pairs_vs_cpu_float32", out)


def parity_06b(arch):
    """The 0.6B architecture (random weights) on slices of the short and long-query workloads:
    bf16 off/on against float32 off on the same device."""
    with tempfile.TemporaryDirectory() as wd:
        model32, tok, shape = bench.build_model(arch, DEV, torch.float32, wd)
        model16 = copy.deepcopy(model32).to(torch.bfloat16)
        vocab = shape.get("vocab_size", len(tok)) if arch != "tiny" else len(tok)
        s32 = engines(model32, tok, dtype="float32", compile="off")
        s16 = engines(model16, tok, dtype="bfloat16", compile="off")
        res = {}
        for wname, n in (("w-short", 1000), ("w-longq", 500)):
            enc = bench.synthetic_encoded(bench.WORKLOADS[wname], vocab, pairs=120 if SMOKE else n)
            ref = score_with(s32, enc, "off")
            res[wname] = {"float32_on": cmp(score_with(s32, enc, "on"), ref),
                          "bf16_off": cmp(score_with(s16, enc, "off"), ref),
                          "bf16_on": cmp(score_with(s16, enc, "on"), ref), "ref_std": float(ref.std())}
        del model32, model16, s32, s16
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    save(f"parity_{arch}_vs_float32", res)


# -- 3. bench rows -----------------------------------------------------------------------------------
def bench_rows(arch):
    import pyarrow.parquet as pq

    from pipeline.run import run

    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    rows = {}
    with tempfile.TemporaryDirectory() as wd:
        model, tok, shape = bench.build_model(arch, DEV, dtype, wd)
        peak = bench.measure_matmul_peak(DEV) if DEV.type == "cuda" else None
        REC["matmul_peak_tflops"] = peak and round(peak / 1e12, 1)
        vocab = shape.get("vocab_size", len(tok)) if arch != "tiny" else len(tok)
        engs = engines(model, tok, ("off", "on", "auto"), dtype="auto")
        sc = engs["off"]
        REC["engine"], REC["attention"], REC["budget"] = sc.info.forward, sc.info.kernel, sc.token_budget
        reps = 1 if SMOKE else 3
        for wname in ("w-short", "w-longq", "w-mixed"):
            w = bench.WORKLOADS[wname]
            npairs = 200 if SMOKE else None
            enc = bench.synthetic_encoded(w, vocab, npairs)
            modes = ("off", "auto") if wname == "w-mixed" else ("off", "on")
            for m in ("on", "off"):  # warm-up
                engs[m].score(bench.Encoded(enc.ids, enc.offsets[:513], enc.truncated, keys=enc.keys[:512]))
            r = {m: {"model_s": [], "e2e_s": []} for m in modes}
            for _ in range(reps):
                for m in modes:
                    st0 = engs[m].stats()
                    bench.sync(DEV)
                    t0 = time.perf_counter()
                    engs[m].score(enc)
                    bench.sync(DEV)
                    r[m]["model_s"].append(time.perf_counter() - t0)
                    st = engs[m].stats()
                    r[m]["tokens_computed"] = st.tokens_computed - st0.tokens_computed
                    r[m]["area"] = st.attention_area - st0.attention_area
                    r[m]["tokens"] = st.tokens - st0.tokens
            table = bench.workload_table(w, npairs)
            inp = os.path.join(wd, f"{wname}.parquet")
            pq.write_table(table, inp)
            for _ in range(reps):
                for m in modes:
                    cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, "o.parquet"), overwrite=True,
                                    restart=True, model="<mem>", device=str(DEV), prefix_sharing=m)
                    c0 = engs[m].stats().tokens_computed
                    t0 = time.perf_counter()
                    summ = run(cfg, progress=False, scorer=engs[m])
                    r[m]["e2e_s"].append(time.perf_counter() - t0)
                    r[m]["e2e_tokens"] = [summ.extra["tokens_before_sharing"], engs[m].stats().tokens_computed - c0]
            out = {}
            for m in modes:
                x = r[m]
                ms, es = float(np.median(x["model_s"])), float(np.median(x["e2e_s"]))
                row = {"pairs": len(enc), "tokens_unshared": x["tokens"], "tokens_computed": x["tokens_computed"],
                       "model_s_all": [round(v, 3) for v in x["model_s"]], "e2e_s_all": [round(v, 3) for v in x["e2e_s"]],
                       "model_pairs_per_s": round(len(enc) / ms, 1), "e2e_pairs_per_s": round(table.num_rows / es, 1),
                       "e2e_tokens_before_after": x["e2e_tokens"]}
                if peak:
                    row["mfu_unshared"] = round(bench.model_flops(enc.lengths, shape) / ms / peak, 4)
                    row["mfu_computed"] = round(bench.computed_flops(x["tokens_computed"], x["area"], shape) / ms / peak, 4)
                out[m] = row
            on = modes[1]
            out["speedup_model_only"] = round(out[on]["model_pairs_per_s"] / out["off"]["model_pairs_per_s"], 3)
            out["speedup_e2e"] = round(out[on]["e2e_pairs_per_s"] / out["off"]["e2e_pairs_per_s"], 3)
            rows[wname] = out
            save(f"bench_{arch}_{wname}", out)
        REC["oom_retries"] = sum(e.stats().oom_retries for e in engs.values())


if __name__ == "__main__":
    arch = "tiny" if SMOKE else "0.6b"
    steps = [("kernel", kernel_check), ("bench", lambda: bench_rows(arch)), ("p06b", lambda: parity_06b(arch)),
             ("tiny", parity_tiny)]
    for name, fn in steps:
        try:
            fn()
        except Exception as exc:  # keep going: later steps still report
            import traceback

            traceback.print_exc()
            save(f"error_{name}", repr(exc))
    print(json.dumps({k: v for k, v in REC.items() if k.startswith("bench")}, indent=1, default=float))
