"""Benchmark: the naive Hugging Face recipe against our engine, model only and end to end, in one process.

Random-weight models of the real Qwen3-Reranker architectures are built from config (no
download); workloads are synthetic token lengths (drawn with seed 0; WORKLOADS below). Figures:
pairs/s, real tokens/s, MFU against a bf16 matmul peak measured in the same run, peak GPU
memory, the fraction of time the GPU was busy, and the speed-up over the naive recipe.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import profiler
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from pipeline.bench.synthetic import ARCHS, spread_norms, train_tokenizer
from pipeline.config import FP8_DTYPES, RunConfig
from pipeline.engines import fp8
from pipeline.engines.resolve import dtype_label, resolve_device, resolve_dtype
from pipeline.engines.score import engine_from_model
from pipeline.engines.template import QWEN3_RERANKER
from pipeline.engines.tokenize import Encoded, PairEncoder
from pipeline.run import run

log = logging.getLogger(__name__)

TEMPLATE_TOKENS = 70


@dataclass(frozen=True)
class Workload:
    name: str
    pairs: int
    query: tuple[int, int]
    doc_median: float
    doc_sigma: float
    doc_clip: tuple[int, int]
    queries: int | None = None  # candidates per query = pairs / queries
    # Query tokens lognormal (median, sigma), clipped to `query`; None: uniform over `query`.
    query_lognormal: tuple[float, float] | None = None


WORKLOADS = {
    "w-mixed": Workload("w-mixed", 6000, (6, 20), 150, 0.8, (10, 4000)),
    "w-short": Workload("w-short", 10000, (6, 12), 60, 0.5, (10, 400), queries=100),
    "w-long": Workload("w-long", 1000, (6, 20), 1200, 0.7, (100, 8000)),
    # Retrieval-augmented generation style: long queries, many candidates each (prefix sharing's case).
    "w-longq": Workload("w-longq", 10000, (20, 600), 100, 0.6, (10, 1000), queries=200,
                        query_lognormal=(120, 0.5)),
    # Long documents for --chunk-tokens (bench/longdoc.py): 20 short queries x 50 candidates of
    # 2k-8k tokens.
    "w-longdoc": Workload("w-longdoc", 1000, (6, 12), 4000, 0.4, (2000, 8000), queries=20),
}


def draw_lengths(w: Workload, pairs: int | None = None, seed: int = 0):
    """(query_tokens, doc_tokens) per pair; candidates of one query share its length."""
    rng = np.random.default_rng(seed)
    n = pairs or w.pairs
    per = w.pairs // w.queries if w.queries else 1
    if w.query_lognormal:
        med, sigma = w.query_lognormal
        qd = np.clip(np.round(rng.lognormal(np.log(med), sigma, -(-n // per))), *w.query).astype(np.int64)
    else:
        qd = rng.integers(w.query[0], w.query[1] + 1, -(-n // per))
    q = np.repeat(qd, per)[:n]
    d = np.clip(np.round(rng.lognormal(np.log(w.doc_median), w.doc_sigma, n)), *w.doc_clip).astype(np.int64)
    return q, d


def synthetic_encoded(w: Workload, vocab: int, pairs: int | None = None, seed: int = 0) -> Encoded:
    """Token ids of a workload (template + query + document per pair), random ids; every pair
    begins with the same template ids and the candidates of a query with the same query ids, so
    prefix sharing sees what it sees in real input."""
    q, d = draw_lengths(w, pairs, seed)
    lengths = TEMPLATE_TOKENS + q + d
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.random.default_rng(seed + 1).integers(0, vocab, int(offsets[-1])).astype(np.int32)
    per = w.pairs // w.queries if w.queries else 1
    group = np.arange(len(lengths)) // per
    head = offsets[group * per]  # the first candidate of the pair's query
    pre = TEMPLATE_TOKENS + q
    within = np.arange(int(pre.sum())) - np.repeat(np.cumsum(pre) - pre, pre)
    dst = np.repeat(offsets[:-1], pre) + within
    src = np.repeat(head, pre) + within
    src = np.where(within < TEMPLATE_TOKENS, within, src)  # the template: pair 0's ids everywhere
    ids[dst] = ids[src]
    return Encoded(ids, offsets, np.zeros(len(lengths), dtype=bool), keys=group.astype(np.int64))


WORDS = [w for w in (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy process music market sense nation plan "
    "college interest death experience effect use class control care field development role effort rate "
    "heart drug show leader light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director position player record "
    "paper space ground form event official matter center couple site project activity star table need "
    "court oil situation cost industry figure street image phone data picture practice piece land product "
    "doctor wall patient worker news test movie north love support technology step baby computer type "
    "attention film tree source organization hair window evidence population site river energy"
).split()]


def workload_table(w: Workload, pairs: int | None = None, seed: int = 0):
    """A Parquet-ready table of texts whose token counts follow the workload (one word, one
    token, with a tokenizer trained on WORDS)."""
    q, d = draw_lengths(w, pairs, seed)
    rng = np.random.default_rng(seed + 2)
    words = np.array(WORDS)
    per = w.pairs // w.queries if w.queries else 1
    qid = [f"q{i // per}" for i in range(len(q))]
    queries, docs = {}, []
    for i in range(len(q)):
        if qid[i] not in queries:
            queries[qid[i]] = " ".join(rng.choice(words, int(q[i])))
        docs.append(" ".join(rng.choice(words, int(d[i]))))
    return pa.table({"query_id": qid, "query": [queries[k] for k in qid], "document": docs})


def non_embedding_params(arch: dict) -> int:
    h, i, n = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    qd = arch["num_attention_heads"] * arch["head_dim"]
    kvd = arch["num_key_value_heads"] * arch["head_dim"]
    return n * (h * (qd + 2 * kvd) + qd * h + 3 * h * i)


def model_flops(lengths: np.ndarray, arch: dict) -> float:
    """Useful FLOPs of scoring: 2 x non-embedding params per token, plus causal attention
    (QK^T and PV over the lower triangle: 2 * L^2 * head_dim per head and layer)."""
    lengths = lengths.astype(np.float64)
    dense = 2.0 * non_embedding_params(arch) * lengths.sum()
    attn = 2.0 * arch["num_hidden_layers"] * arch["num_attention_heads"] * arch["head_dim"] * (lengths ** 2).sum()
    return dense + attn


def computed_flops(tokens: int, attention_area: int, arch: dict) -> float:
    """FLOPs actually computed: 2 x non-embedding params per token that went through the model
    (after prefix sharing), plus attention over the blocks' real score areas (ScoreStats)."""
    return (2.0 * non_embedding_params(arch) * tokens
            + 2.0 * arch["num_hidden_layers"] * arch["num_attention_heads"] * arch["head_dim"] * attention_area)


def measure_matmul_peak(device) -> float:
    """bf16 matmul FLOP/s on this device (8192^3, random data, median of 10)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / float(np.median(times))


def measure_fp8_matmul_peak(device) -> float:
    """fp8 (e4m3, row-wise scaled, bf16 out) matmul FLOP/s on this device, as the fp8 forward runs
    its GEMMs (fp8.scaled_mm_linear; 8192^3, median of 10)."""
    n = 8192
    w = fp8.quantize_weight(torch.randn(n, n, device=device, dtype=torch.bfloat16))
    qa, sa = fp8.quantize_rows(torch.randn(n, n, device=device, dtype=torch.bfloat16))

    def mm():
        return torch._scaled_mm(qa, w.q.t(), scale_a=sa, scale_b=w.scale, out_dtype=torch.bfloat16)

    for _ in range(3):
        mm()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        mm()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    del w, qa, sa
    torch.cuda.empty_cache()
    return 2 * n ** 3 / float(np.median(times))


class BusySampler:
    """Fraction of time the GPU ran a kernel, sampled from NVML while a block runs."""

    def __init__(self, device):
        self.samples: list[int] = []
        self.handle = None
        try:
            import pynvml  # optional: without it, no busy fraction

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            pass

    def __enter__(self):
        self.stop = threading.Event()
        if self.handle is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self):
        while not self.stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        if self.handle is not None:
            self.thread.join()

    @property
    def busy(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


def sync(device):
    """Wait for the device's queued work (timings); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_way(model, encoder, enc: Encoded, device, pairs: int) -> dict:
    """The naive recipe, as a per-request service runs it: input order, batches of 16, fp16, left
    padding, full-vocabulary logits, the cache emptied after each batch. The record calls it "seed"."""
    m = copy.deepcopy(model).to(device=device, dtype=torch.float16)
    m.set_attn_implementation("sdpa")
    pad = 0
    yes, no = encoder.positive_id, encoder.negative_id
    n = min(pairs, len(enc))
    lens = enc.lengths[:n]

    def batches():
        for k in range(0, n, 16):
            rows = [enc.ids[enc.offsets[i]:enc.offsets[i + 1]] for i in range(k, min(n, k + 16))]
            L = max(len(r) for r in rows)
            ids = np.full((len(rows), L), pad, dtype=np.int64)
            mask = np.zeros((len(rows), L), dtype=np.int64)
            for j, r in enumerate(rows):
                ids[j, L - len(r):] = r
                mask[j, L - len(r):] = 1
            yield torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    out = []
    with torch.inference_mode():
        first = next(batches())  # warm-up
        m(input_ids=first[0], attention_mask=first[1])
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with BusySampler(device) as busy:
            for ids, mask in batches():
                logits = m(input_ids=ids, attention_mask=mask).logits[:, -1, :]
                s = torch.nn.functional.log_softmax(torch.stack([logits[:, no], logits[:, yes]], 1), 1)[:, 1].exp()
                out.append(s.float().cpu())  # the naive recipe hands scores back per batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # after every batch, as such services do
            sync(device)
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"pairs": n, "tokens": int(lens.sum()), "seconds": dt, "peak_gpu_memory_bytes": int(peak),
            "gpu_busy": busy.busy, "lengths": lens, "scores": torch.cat(out).numpy()}


def engine_model_only(scorer, enc: Encoded, device, repeats: int = 1) -> dict:
    n = min(len(enc), 512)
    keys = enc.keys[:n] if enc.keys is not None else None
    scorer.score(Encoded(enc.ids, enc.offsets[: n + 1], enc.truncated, keys=keys))  # warm-up/compile
    scorer.synchronize()
    scorer.reset_peak_memory()
    times = []
    st0 = scorer.stats()
    with BusySampler(device) as busy:
        for _ in range(repeats):
            t0 = time.perf_counter()
            scores = scorer.score(enc)
            scorer.synchronize()
            times.append(time.perf_counter() - t0)
    peak = scorer.peak_memory_bytes()
    st = scorer.stats()
    return {"pairs": len(enc), "tokens": int(enc.offsets[-1]), "seconds": float(np.median(times)),
            "seconds_all": times, "peak_gpu_memory_bytes": int(peak), "gpu_busy": busy.busy,
            "lengths": enc.lengths, "scores": scores,
            "tokens_computed": (st.tokens_computed - st0.tokens_computed) // repeats,
            "attention_area": (st.attention_area - st0.attention_area) // repeats}


def profile_engine(scorer, enc: Encoded, top: int = 25) -> str:
    """Top CUDA kernels of one model-only pass, by total device time."""
    activities = [profiler.ProfilerActivity.CPU, profiler.ProfilerActivity.CUDA]
    with profiler.profile(activities=activities) as prof:
        scorer.score(enc)
        scorer.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def engine_end_to_end(scorer, table, cfg_kw: dict, device, workdir: str) -> dict:
    inp = os.path.join(workdir, "bench-input.parquet")
    pq.write_table(table, inp)
    out = os.path.join(workdir, "bench-output.parquet")
    cfg = RunConfig(inputs=(inp,), output=out, overwrite=True, restart=True, **cfg_kw)
    t0 = time.perf_counter()
    with BusySampler(device) as busy:
        summary = run(cfg, progress=False, scorer=scorer)
    dt = time.perf_counter() - t0
    return {"pairs": summary.pairs_scored, "tokens": summary.tokens, "seconds": dt,
            "peak_gpu_memory_bytes": summary.peak_gpu_memory_bytes, "gpu_busy": busy.busy,
            "rows_written": summary.rows, "lengths": None}


def sharing_engines(model, tok, cfg_kw: dict, device, modes=("off", "on"), forward=None) -> dict:
    """One engine per prefix sharing mode over one model in memory, {mode: engine}: the mode is
    each engine's config (`prefix_sharing`), and all run one forward (the first engine's, or
    `forward`), so the model's weights are held once."""
    out = {}
    for mode in modes:
        cfg = RunConfig(inputs=(), output="", **{**cfg_kw, "prefix_sharing": mode})
        out[mode] = engine_from_model(model, tok, cfg, device, forward=forward)
        forward = out[mode].forward
    return out


def build_model(arch: str, device, dtype, workdir: str, num_hidden_layers: int | None = None):
    """Random-weight Qwen3 reranker of `arch` built in memory (on the device), with a tokenizer
    trained on the benchmark's words; saved to `workdir` only for the tiny smoke model."""
    tok_dir = os.path.join(workdir, "tokenizer")
    train_tokenizer(tok_dir, texts=[" ".join(WORDS)] * 5)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    shape = dict(ARCHS[arch])
    vocab = shape.pop("vocab_size", None) or len(tok)
    tie = shape.pop("tie_word_embeddings", True)
    if num_hidden_layers:
        shape["num_hidden_layers"] = num_hidden_layers
    config = Qwen3Config(vocab_size=vocab, tie_word_embeddings=tie, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=40960, attention_bias=False,
                         initializer_range=0.02 if arch != "tiny" else 0.1,
                         architectures=["Qwen3ForCausalLM"], **shape)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    if arch == "tiny":
        spread_norms(model)
    return model.eval(), tok, shape


def run_bench(arch: str, workload: str, *, device: str = "auto", seed_pairs: int = 1500, e2e: bool = True,
              gpu_memory_limit: int | None = None, pairs: int | None = None, repeats: int = 3,
              compile: str = "auto", attention: str = "auto", max_batch_tokens: int | None = None,
              profile: bool = False, engine: str = "auto", prefix_sharing: str = "auto",
              dtype: str = "auto") -> dict:
    """`dtype`: the engine's (--dtype; "fp8" and "fp8-fast": fp8 projections, refused off CUDA 8.9+); the
    naive recipe's is fp16 whatever it is."""
    dev = resolve_device(device)
    run_dtype = dtype
    dtype = resolve_dtype(run_dtype, dev)  # the model's: bf16 for fp8 (the forward quantizes its projections)
    w = WORKLOADS[workload]
    record = {"arch": arch, "workload": workload, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": dtype_label(run_dtype, dtype)}
    with tempfile.TemporaryDirectory() as workdir:
        model, tok, shape = build_model(arch, dev, dtype, workdir)
        record["non_embedding_params"] = non_embedding_params(shape)
        peak = measure_matmul_peak(dev) if dev.type == "cuda" else None
        record["matmul_peak_tflops"] = round(peak / 1e12, 1) if peak else None
        if run_dtype in FP8_DTYPES:  # MFU stays against the bf16 peak; this one tells how far fp8 could go
            record["fp8_matmul_peak_tflops"] = round(measure_fp8_matmul_peak(dev) / 1e12, 1)
        cfg_kw = dict(model=f"<random {arch}>", device=str(dev), compile=compile, attention=attention, engine=engine,
                      max_batch_tokens=max_batch_tokens, gpu_memory_limit=gpu_memory_limit,
                      prefix_sharing=prefix_sharing, dtype=run_dtype)
        enc = synthetic_encoded(w, len(tok) if arch == "tiny" else shape.get("vocab_size", len(tok)), pairs)
        encoder = PairEncoder(tok, QWEN3_RERANKER, 8192)
        results = {}
        if seed_pairs:
            results["seed"] = seed_way(model, encoder, enc, dev, seed_pairs)
        scorer = engine_from_model(model, tok, RunConfig(inputs=(), output="", **cfg_kw), dev)
        record["engine_impl"] = scorer.info.forward
        record["prefix_sharing"] = prefix_sharing
        record["attention"] = scorer.info.kernel
        record["batch_token_budget"] = scorer.token_budget
        results["engine"] = engine_model_only(scorer, enc, dev, repeats=repeats)
        if profile and dev.type == "cuda":
            record["profile"] = profile_engine(scorer, enc)
        if e2e:
            results["e2e"] = engine_end_to_end(scorer, workload_table(w, pairs), cfg_kw, dev, workdir)
        record["oom_retries"] = scorer.stats().oom_retries
    for name, r in results.items():
        row = {"pairs": r["pairs"], "tokens": r["tokens"], "seconds": round(r["seconds"], 4),
               "pairs_per_s": round(r["pairs"] / r["seconds"], 1),
               "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
               "peak_gpu_memory_gib": round(r["peak_gpu_memory_bytes"] / 2**30, 3),
               "gpu_busy": r["gpu_busy"]}
        if r.get("lengths") is not None and peak:
            # mfu: the useful FLOPs of the unshared pairs (as if no prefix were shared);
            # mfu_computed: the FLOPs that ran (tokens after sharing). Equal without sharing.
            row["mfu"] = round(model_flops(r["lengths"], shape) / r["seconds"] / peak, 4)
            if r.get("tokens_computed"):
                row["mfu_computed"] = round(computed_flops(r["tokens_computed"], r["attention_area"], shape)
                                            / r["seconds"] / peak, 4)
        if r.get("tokens_computed"):
            row["tokens_computed"] = r["tokens_computed"]
        if name == "e2e":
            row["rows_written"] = r["rows_written"]
        record[name] = row
    if "seed" in results:
        record["speedup_model_only"] = round(record["engine"]["pairs_per_s"] / record["seed"]["pairs_per_s"], 2)
        if "e2e" in record:
            record["speedup_end_to_end"] = round(record["e2e"]["pairs_per_s"] / record["seed"]["pairs_per_s"], 2)
        # The same pairs, scored two ways: how far bf16 packed is from fp16 padded.
        n = results["seed"]["pairs"]
        record["seed_vs_engine_max_abs_diff"] = float(np.abs(results["seed"]["scores"] - results["engine"]["scores"][:n]).max())
    if "e2e" in record:
        record["e2e_over_model_only"] = round(record["e2e"]["tokens_per_s"] / record["engine"]["tokens_per_s"], 3)
    return record


def format_table(rec: dict) -> str:
    peak = rec.get("matmul_peak_tflops")
    # The peak (and so MFU) is measured on CUDA only.
    peak_text = f"matmul peak {peak} TFLOP/s" if peak else "no matmul peak off CUDA, so no MFU"
    if rec.get("fp8_matmul_peak_tflops"):
        peak_text += f"; fp8 matmul peak {rec['fp8_matmul_peak_tflops']} TFLOP/s, MFU against the bf16 peak"
    lines = [f"{rec['arch']} {rec['workload']} on {rec['device']} in {rec.get('dtype')} ({rec.get('engine_impl')}, "
             f"{rec.get('attention')}, budget {rec.get('batch_token_budget')} tokens, {peak_text})",
             f"{'way':<8} {'pairs/s':>10} {'tokens/s':>12} {'MFU':>7} {'MFUc':>7} {'peak GiB':>9} {'busy':>6}"]
    for name in ("seed", "engine", "e2e"):
        r = rec.get(name)
        if not r:
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "-"
        mfuc = f"{100 * r['mfu_computed']:.1f}%" if r.get("mfu_computed") is not None else "-"
        lines.append(f"{'naive' if name == 'seed' else name:<8} {r['pairs_per_s']:>10.1f} {r['tokens_per_s']:>12.0f} {mfu:>7} {mfuc:>7} "
                     f"{r['peak_gpu_memory_gib']:>9.2f} {busy:>6}")
    if "speedup_model_only" in rec:
        lines.append(f"speed-up over the naive recipe: {rec['speedup_model_only']}x model only"
                     + (f", {rec['speedup_end_to_end']}x end to end" if "speedup_end_to_end" in rec else ""))
    if "e2e_over_model_only" in rec:
        lines.append(f"end to end / model only (tokens/s): {rec['e2e_over_model_only']}")
    lines.append(f"prefix sharing {rec.get('prefix_sharing')}; MFU on the unshared pairs' tokens, "
                 "MFUc on the tokens computed after sharing")
    return "\n".join(lines)
