"""Benchmark: long documents scored as windows (`run --chunk-tokens`) against the same windows
scored as independent pairs through `Reranker.predict`, in one process, on one model in memory.

Rows (each the median of `repeats`, interleaved so that a busy machine slows all alike):
  - `run`: `rerank-batch run` as a library call, Parquet in, ranked Parquet out, with
    --chunk-tokens/--chunk-overlap/--aggregate: reading, window expansion (per unit, in the
    prefetch thread, overlapping the device), scoring, aggregation, rank and write;
  - `expand`: the windows' texts alone (documents tokenized alone, windows decoded): what a user of
    `predict` computes first;
  - `predict`: `Reranker.predict` over every (query, window) pair in one call, then the
    aggregate per document (NumPy);
  - `predict_per_query`: the same, one `predict` call per query (its 50 documents' windows), as a
    serving loop calls it.
`speedup` is (expand + predict) / run and predict / run. Both paths have the same weights (two copies:
an engine fuses its model's weights in place), the same engine options and token budget, and the
workload's texts; their scores are compared (max abs difference).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import numpy as np
import torch

from pipeline.config import RunConfig


def run_longdoc_bench(arch: str = "0.6b", workload: str = "w-longdoc", *, device: str = "auto",
                      pairs: int | None = None, chunk_tokens: int = 512, chunk_overlap: int | None = None,
                      aggregate: str = "max", repeats: int = 3, per_query: bool = True, compile: str = "auto",
                      attention: str = "auto", max_batch_tokens: int | None = None, engine: str = "auto",
                      prefix_sharing: str = "auto", gpu_memory_limit: int | None = None,
                      window: int | None = None) -> dict:
    import pyarrow.parquet as pq

    from pipeline.bench.throughput import WORKLOADS, BusySampler, build_model, workload_table
    from pipeline.data.chunks import Chunking, aggregate as aggregate_windows, check_options, expand_texts
    from pipeline.engines.doc_tokens import for_tokenizer
    from pipeline.engines.resolve import resolve_device
    from pipeline.engines.score import engine_from_model
    from pipeline.reranker import Reranker
    from pipeline.run import run

    check_options(chunk_tokens, chunk_overlap, aggregate)
    chunking = Chunking.make(chunk_tokens, chunk_overlap, aggregate)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    w = WORKLOADS[workload]
    rec = {"arch": arch, "workload": workload, "chunk_tokens": chunking.tokens, "chunk_overlap": chunking.overlap,
           "aggregate": chunking.aggregate, "window": window, "prefix_sharing": prefix_sharing,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with tempfile.TemporaryDirectory() as wd:
        model, tok, _ = build_model(arch, dev, dtype, wd)
        table = workload_table(w, pairs)
        inp = os.path.join(wd, "longdoc.parquet")
        pq.write_table(table, inp)
        out = os.path.join(wd, "longdoc.ranked.parquet")
        cfg_kw = dict(model=f"<random {arch}>", device=str(dev), compile=compile, attention=attention, engine=engine,
                      max_batch_tokens=max_batch_tokens, gpu_memory_limit=gpu_memory_limit,
                      prefix_sharing=prefix_sharing)
        twin = copy.deepcopy(model)  # for the Reranker: the engine fuses its model's weights in place
        scorer = engine_from_model(model, tok, RunConfig(inputs=(), output="", **cfg_kw), dev)
        # The same token budget for both (the second would size its own from less free memory).
        reranker = Reranker.from_model(twin, tok, **{**cfg_kw, "max_batch_tokens": scorer.token_budget})
        rec.update(engine_impl=scorer.info.forward, attention=scorer.info.kernel, batch_token_budget=scorer.token_budget,
                   predict_batch_token_budget=reranker.scorer.token_budget)
        qids = table.column("query_id").to_pylist()
        queries, docs = table.column("query").to_pylist(), table.column("document").to_pylist()
        instr = RunConfig(inputs=(), output="").instruction
        rec["documents"] = len(docs)
        rec["queries"] = len(set(qids))

        def timed_run():
            # `window`: documents per unit (the run's --window; None: its default).
            unit = {} if window is None else {"window_pairs": window}
            cfg = RunConfig(inputs=(inp,), output=out, overwrite=True, restart=True, chunk_tokens=chunking.tokens,
                            chunk_overlap=chunking.overlap, aggregate=chunking.aggregate, **unit, **cfg_kw)
            t0 = time.perf_counter()
            summary = run(cfg, progress=False, scorer=scorer)
            sync()
            return time.perf_counter() - t0, summary

        def timed_expand():
            t0 = time.perf_counter()
            texts, counts = expand_texts(docs, chunking, for_tokenizer(reranker.scorer.encoder.tokenizer))
            return time.perf_counter() - t0, texts, counts

        def timed_predict(texts, counts, by_query: bool):
            owner = np.repeat(np.arange(len(docs)), counts)
            window_pairs = [(queries[i], t, instr) for i, t in zip(owner.tolist(), texts)]
            t0 = time.perf_counter()
            if by_query:
                starts = np.flatnonzero(np.r_[True, np.array(qids[1:]) != np.array(qids[:-1])])  # rows come by query
                bounds = np.searchsorted(owner, np.r_[starts, len(docs)])
                scores = np.concatenate([reranker.predict(window_pairs[a:b], show_progress_bar=False)
                                         for a, b in zip(bounds[:-1], bounds[1:])])
            else:
                scores = reranker.predict(window_pairs, show_progress_bar=False)
            row, _ = aggregate_windows(scores, counts, chunking.aggregate)
            sync()
            return time.perf_counter() - t0, row

        # Warm-up (compilation, allocator, caches) on a few documents' windows, both paths.
        _, texts, counts = timed_expand()
        few = int(np.searchsorted(np.cumsum(counts), min(64, int(counts.sum()))) + 1)
        reranker.predict([(queries[0], t, instr) for t in texts[:int(counts[:few].sum())]], show_progress_bar=False)
        rows: dict[str, list[float]] = {"run": [], "expand": [], "predict": []}
        if per_query:
            rows["predict_per_query"] = []
        busy: dict[str, list] = {k: [] for k in rows}
        for _ in range(repeats):
            with BusySampler(dev) as b:
                dt, summary = timed_run()
            rows["run"].append(dt)
            busy["run"].append(b.busy)
            dt, texts, counts = timed_expand()
            rows["expand"].append(dt)
            with BusySampler(dev) as b:
                dt, ours_predict = timed_predict(texts, counts, by_query=False)
            rows["predict"].append(dt)
            busy["predict"].append(b.busy)
            if per_query:
                with BusySampler(dev) as b:
                    dt, _ = timed_predict(texts, counts, by_query=True)
                rows["predict_per_query"].append(dt)
                busy["predict_per_query"].append(b.busy)
        ranked = pq.read_table(out)
        by_doc = {(q, d): s for q, d, s in zip(ranked.column("query_id").to_pylist(),
                                                ranked.column("document").to_pylist(), ranked.column("score").to_pylist())}
        run_scores = np.array([by_doc[(q, d)] for q, d in zip(qids, docs)], dtype=np.float32)
        rec["run_vs_predict_max_abs_diff"] = float(np.abs(run_scores - ours_predict).max())
        windows = int(counts.sum())
        rec["windows"] = windows
        rec["windows_split_documents"] = int((counts > 1).sum())
        rec["run_summary"] = {k: summary.extra.get(k) for k in ("tokens_before_sharing", "tokens_after_sharing")}
        rec["run_summary"].update(pairs_scored=summary.pairs_scored, tokens=summary.tokens,
                                  peak_gpu_memory_bytes=summary.peak_gpu_memory_bytes)
    for name, ts in rows.items():
        med = float(np.median(ts))
        b = [x for x in busy.get(name, []) if x is not None]
        rec[name] = {"seconds": round(med, 4), "seconds_all": [round(t, 4) for t in ts],
                     "documents_per_s": round(len(docs) / med, 2), "windows_per_s": round(windows / med, 1),
                     "gpu_busy": round(float(np.median(b)), 3) if b else None}
    run_s = rec["run"]["seconds"]
    rec["speedup_over_expand_and_predict"] = round((rec["expand"]["seconds"] + rec["predict"]["seconds"]) / run_s, 3)
    rec["speedup_over_predict"] = round(rec["predict"]["seconds"] / run_s, 3)
    if per_query:
        rec["speedup_over_expand_and_predict_per_query"] = round(
            (rec["expand"]["seconds"] + rec["predict_per_query"]["seconds"]) / run_s, 3)
    return rec


def format_longdoc_table(rec: dict) -> str:
    rs = rec["run_summary"]
    lines = [f"{rec['arch']} {rec['workload']} on {rec['device']}: {rec['documents']} documents, {rec['queries']} "
             f"queries, windows of {rec['chunk_tokens']} tokens overlapping by {rec['chunk_overlap']} "
             f"({rec['windows']} windows; {rec['engine_impl']}, {rec['attention']}, budget "
             f"{rec['batch_token_budget']} tokens, prefix sharing {rec['prefix_sharing']}: "
             f"{rs['tokens_before_sharing']} -> {rs['tokens_after_sharing']} tokens)",
             f"{'row':<18} {'seconds':>9} {'docs/s':>9} {'windows/s':>10} {'busy':>6}"]
    for name in ("run", "expand", "predict", "predict_per_query"):
        r = rec.get(name)
        if not r:
            continue
        busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "-"
        lines.append(f"{name:<18} {r['seconds']:>9.3f} {r['documents_per_s']:>9.1f} {r['windows_per_s']:>10.1f} "
                     f"{busy:>6}")
    lines.append(f"run --chunk-tokens vs expand + predict: {rec['speedup_over_expand_and_predict']}x; vs predict "
                 f"alone: {rec['speedup_over_predict']}x"
                 + (f"; vs expand + predict per query: {rec['speedup_over_expand_and_predict_per_query']}x"
                    if "speedup_over_expand_and_predict_per_query" in rec else ""))
    lines.append(f"run vs predict scores: max abs difference {rec['run_vs_predict_max_abs_diff']:.2e}")
    return "\n".join(lines)
