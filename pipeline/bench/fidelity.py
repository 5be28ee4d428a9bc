"""How far a precision moves scores and rankings from float32's, on real texts: each query of the
RAR-b sets with a fixed number of candidates, scored by a random Qwen3 reranker whose RMSNorm
weights are spread as a trained model's (synthetic.trained_like_norms), in float32, bf16 and
fp8 (as it runs, with every layer in fp8, and with the smoothing of fp8_smooth.py). On the CPU
the fp8 GEMM is emulated in float32 (fp8.emulated_linear): the same quantized numbers as on a GPU.

Used by tests_gpu/fp8_bench.py (its fidelity table, on a GPU or with --device cpu) and by
tests/test_fp8.py (the fidelity floor).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from pipeline.bench import synthetic
from pipeline.config import FP8_DTYPES, RunConfig
from pipeline.engines import forwards, fp8, fp8_smooth, loading
from pipeline.engines.score import engine_from_model

SETS = ("ARC-Challenge", "physicaliqa", "spartqa")
# All of them, float32 last (its engine runs over the model itself, the others over copies).
DTYPES = ("fp8", "fp8_fast_accum", "fp8_all_layers", "fp8_smoothed", "bfloat16", "float32")


def real_queries(data_dir: str, per_set: int, candidates: int = 20):
    """(instructions, queries, documents, group) of the first `per_set` queries of each RAR-b set,
    each with `candidates` candidates: its own answers, then answers of other queries of its set
    (drawn with a fixed seed)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    I, Q, D, G = [], [], [], []
    for name in SETS:
        t = pq.read_table(os.path.join(data_dir, f"{name}.long.parquet")).to_pydict()
        docs = t["document"]
        order = {}
        for i, qid in enumerate(t["query_id"]):
            order.setdefault(qid, []).append(i)
        for qid in list(order)[:per_set]:
            own = order[qid][:candidates]
            others = rng.choice(len(docs), candidates - len(own), replace=False)
            for j in [*own, *others]:
                I.append(t["instruction"][own[0]])
                Q.append(t["query"][own[0]])
                D.append(docs[j])
                G.append(len(G) // candidates)
    return I, Q, D, np.asarray(G)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(got, ref, group) -> dict:
    """Scores `got` against `ref`: max and mean |delta|, and per query (`group`) the mean Spearman
    rho, its minimum, the mean top-10 overlap and the share of queries with the same top 1."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    d = np.abs(got - ref)
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


# fp8 as it runs, and variants for comparison: --dtype fp8-fast (the GEMMs' fast accumulation, on
# CUDA; the CPU emulation accumulates in float32 either way), every layer's projections in fp8 (none kept bf16,
# as fp8 was first), and the smoothing of fp8_smooth.py turned on.
VARIANTS = {"fp8": {}, "fp8_fast_accum": {"dtype": "fp8-fast"}, "fp8_all_layers": {"bf16_layers": 0},
            "fp8_smoothed": {"smooth": True}}


@contextlib.contextmanager
def variant(name: str):
    """fp8 engines built inside follow VARIANTS[name] (nothing changes for other names)."""
    v = VARIANTS.get(name, {})
    keep = fp8.BF16_LAYERS, fp8_smooth.ENABLED
    fp8.BF16_LAYERS = v.get("bf16_layers", fp8.BF16_LAYERS)
    fp8_smooth.ENABLED = v.get("smooth", fp8_smooth.ENABLED)
    try:
        yield
    finally:
        fp8.BF16_LAYERS, fp8_smooth.ENABLED = keep


def engine(model, tok, dtype: str, device: torch.device, **kw):
    """An engine over `model` in `dtype` ("float32", "bfloat16", or "fp8" and its VARIANTS). Off
    CUDA fp8 is refused by design; there its forward is chosen as on a GPU, over the emulated GEMM
    (bf16 everywhere else, as on a GPU)."""
    fp8 = dtype.startswith("fp8")
    cfg = RunConfig(inputs=(), output="", model="<random>", device=str(device),
                    dtype=VARIANTS.get(dtype, {}).get("dtype", dtype if dtype in FP8_DTYPES else "fp8") if fp8 else dtype,
                    **kw)
    with variant(dtype):
        if fp8 and device.type != "cuda":
            cfg = dataclasses.replace(cfg, dtype="bfloat16")
            m = dataclasses.replace(loading.prepare(model, tok, cfg, device), fp8=True)
            return engine_from_model(model, tok, cfg, device, forward=forwards.choose(m, cfg))
        return engine_from_model(model, tok, cfg, device)


def random_model(texts, shape: dict, device: torch.device, workdir: str, init_std: float = 0.02, seed: int = 0):
    """(model in float32, tokenizer): a random Qwen3ForCausalLM of `shape` (synthetic.ARCHS' keys,
    vocab_size and tie_word_embeddings optional) with a tokenizer trained on `texts` (real words
    as tokens, not bytes), its norms spread as a trained model's."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    synthetic.train_tokenizer(workdir, texts=texts, vocab_size=8000)
    tok = AutoTokenizer.from_pretrained(workdir)
    shape = dict(shape)
    shape.pop("vocab_size", None)
    tie = shape.pop("tie_word_embeddings", True)
    config = Qwen3Config(vocab_size=len(tok), tie_word_embeddings=tie, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=40960, attention_bias=False, initializer_range=init_std,
                         architectures=["Qwen3ForCausalLM"], **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).eval()
    synthetic.trained_like_norms(model, seed)
    return model, tok


def measure(data_dir: str, per_set: int, shape: dict, device: torch.device, candidates: int = 20,
            dtypes=DTYPES, init_std: float = 0.02, log=print) -> dict:
    """The fidelity record: each of `dtypes` but float32 compared with float32 (`compare`), over
    `per_set` queries of each RAR-b set with `candidates` candidates each."""
    I, Q, D, group = real_queries(data_dir, per_set, candidates)
    scores, seconds = {}, {}
    with tempfile.TemporaryDirectory() as wd:
        model32, tok = random_model(Q[::candidates] + D, shape, device, wd, init_std)
        for dtype in (*[d for d in dtypes if d != "float32"], "float32"):
            m = model32 if dtype == "float32" else copy.deepcopy(model32).to(torch.bfloat16)
            # float32 uncompiled: the reference, as exact as the engine runs
            e = engine(m, tok, dtype, device, **({"compile": "off"} if dtype == "float32" else {}))
            enc = e.encoder.encode(I, Q, D)
            t0 = time.perf_counter()
            scores[dtype] = e.score(enc)
            seconds[dtype] = round(time.perf_counter() - t0, 1)
            log(f"  fidelity: {dtype} scored {len(enc)} pairs in {seconds[dtype]} s")
            del e, m
    ref = scores["float32"]
    out = {"model": {k: v for k, v in shape.items() if k != "vocab_size"}, "init_std": init_std,
           "pairs": len(ref), "queries": int(group.max()) + 1, "candidates_per_query": candidates,
           "tokens": int(enc.offsets[-1]), "float32_score_std": float(ref.std()), "seconds": seconds,
           "smooth_alpha": fp8_smooth.ALPHA, "bf16_layers": fp8.BF16_LAYERS,
           "vs_float32": {k: compare(scores[k], ref, group) for k in dtypes if k != "float32"}}
    if "fp8" in scores and "bfloat16" in scores:
        out["fp8_vs_bf16"] = compare(scores["fp8"], scores["bfloat16"], group)
    return out
