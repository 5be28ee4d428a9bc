"""Ranking metrics of trec_eval (through pytrec_eval, trec_eval's own code): per query, then the
mean over the queries present in both the run and the qrels.

trec_eval's conventions: documents are ordered by score descending and ties by
document id descending (string order); a document is relevant when its relevance is >= 1;
nDCG uses the relevance values as gains (negative ones count as 0) with a log2(rank + 1)
discount, its ideal ranking built from the qrels; AP and map@k divide by all relevant documents
of the query, retrieved or not; P@k divides by k.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.errors import InputError, first_line
from pipeline.evaluation.text import text_lines

log = logging.getLogger(__name__)

METRIC = re.compile(r"^(ndcg|map|mrr|recall|p)(?:@(\d+))?$")


@dataclass(frozen=True)
class Metric:
    name: str  # as the user wrote it, e.g. "ndcg@10"
    kind: str  # ndcg, map, mrr, recall, p
    k: int | None


MAX_CUTOFF = 1_000_000  # far above any run's depth; trec_eval reads cutoffs as C ints


def parse_metrics(spec: str) -> list[Metric]:
    out = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        m = METRIC.match(raw.lower())
        if not m:
            raise InputError(
                f"--metrics: {raw!r} is not a metric; use ndcg@k, ndcg, map, map@k, mrr, mrr@k, recall@k, p@k"
            )
        kind, k = m.group(1), int(m.group(2)) if m.group(2) else None
        if kind in ("recall", "p") and k is None:
            raise InputError(f"--metrics: {raw!r} needs a cutoff; write {kind}@10")
        if k is not None and k < 1:
            raise InputError(f"--metrics: {raw!r}: the cutoff must be at least 1")
        if k is not None and k > MAX_CUTOFF:
            raise InputError(f"--metrics: {raw!r}: the cutoff must be at most {MAX_CUTOFF:,}; write "
                             f"{kind}@{MAX_CUTOFF} or less")
        out.append(Metric(raw, kind, k))
    if not out:
        raise InputError("--metrics is empty; give e.g. ndcg@10,map,mrr")
    return out


def read_qrels(path: str) -> pl.DataFrame:
    """qrels as (query_id, doc_id, relevance) from TREC text, a BEIR TSV or Parquet; a document
    judged twice for one query keeps its last judgement (as pytrec_eval's dict does): counted
    twice, it made P@1 2.0."""
    df = _read_qrels(path)
    unique = df.unique(subset=["query_id", "doc_id"], keep="last", maintain_order=True)
    if unique.height < df.height:
        log.warning("%s: %d duplicate (query, document) judgements; the last of each is used",
                    path, df.height - unique.height)
    return unique


# Grades are small (0-3 in TREC); the bound keeps them in the 32-bit integers trec_eval reads.
MAX_GRADE = 2**31 - 1


def _read_qrels_parquet(path: str) -> pl.DataFrame:
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars' and pyarrow's many error types
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)}); pass qrels as Parquet or TREC "
                         "text") from None
    missing = {"query_id", "doc_id", "relevance"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: qrels Parquet needs columns query_id, doc_id, relevance "
                         f"(missing {', '.join(sorted(missing))})")
    for c in ("query_id", "doc_id", "relevance"):
        dtype = df.schema[c]
        ok = (dtype.is_integer() or dtype == pl.Boolean if c == "relevance"  # as eval --relevance-col takes
              else dtype.is_integer() or dtype in (pl.String, pl.Categorical))
        if not ok:
            what = "whole-number grades such as 0, 1, 2" if c == "relevance" else "strings or whole numbers"
            raise InputError(f"{path}: column {c!r} holds {dtype}; qrels need {what} there")
        if df[c].null_count():
            row = df.with_row_index().filter(pl.col(c).is_null())["index"][0]
            raise InputError(f"{path}: row {row} (from 0): column {c!r} is null; fill it or drop the row")
    if df.height and df["relevance"].cast(pl.Int64).abs().max() > MAX_GRADE:
        raise InputError(f"{path}: column 'relevance' holds grades beyond {MAX_GRADE:,}; grades are whole numbers "
                         "such as 0, 1, 2")
    return df.select(pl.col("query_id").cast(pl.String), pl.col("doc_id").cast(pl.String),
                     pl.col("relevance").cast(pl.Int64))


def _read_qrels(path: str) -> pl.DataFrame:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such qrels file; check the path")
    if path.endswith(".parquet"):
        return _read_qrels_parquet(path)
    rows = []
    for n, line in text_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 4:  # TREC: qid iter docid rel
            qid, _, did, rel = parts
        elif len(parts) == 3:  # BEIR TSV: query-id corpus-id score (with a header line)
            qid, did, rel = parts
        else:
            raise InputError(f"{path}: line {n} has {len(parts)} fields; qrels lines are "
                             "'qid 0 docid rel' (TREC) or 'qid docid rel' (BEIR TSV)")
        try:
            grade = int(float(rel))
        except ValueError:
            if n == 1:
                continue  # a header such as query-id corpus-id score
            raise InputError(f"{path}: line {n}: relevance {rel!r} is not a number") from None
        except OverflowError:  # inf
            grade = None
        if grade is None or abs(grade) > MAX_GRADE:
            raise InputError(f"{path}: line {n}: relevance {rel!r} is out of range; grades are whole numbers such "
                             "as 0, 1, 2")
        rows.append((qid, did, grade))
    return pl.DataFrame(rows, schema={"query_id": pl.String, "doc_id": pl.String, "relevance": pl.Int64},
                        orient="row")


def rank_run(run: pl.DataFrame, score_col: str, descending: bool = True) -> pl.DataFrame:
    """Ranks per query in trec_eval's order: score (best first), then doc id descending."""
    return (
        run.sort(["query_id", score_col, "doc_id"], descending=[False, descending, True], nulls_last=True)
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("query_id"))
    )


# Our metric kind -> trec_eval's measure (the request, then the key of its per-query value).
TREC_MEASURE = {"ndcg": ("ndcg_cut.{k}", "ndcg_cut_{k}"), "map": ("map_cut.{k}", "map_cut_{k}"),
                "recall": ("recall.{k}", "recall_{k}"), "p": ("P.{k}", "P_{k}")}
WHOLE = {"ndcg": "ndcg", "map": "map", "mrr": "recip_rank"}


def per_query(run: pl.DataFrame, qrels: pl.DataFrame, metrics: list[Metric], score_col: str = "score",
              descending: bool = True) -> pl.DataFrame:
    """One row per query present in both the run and the qrels, one column per metric, computed
    by trec_eval itself (pytrec_eval). mrr@k is trec_eval's recip_rank of the run cut at k, the
    cut made in trec_eval's order. A null relevance counts as 0 (judged not relevant)."""
    import pytrec_eval  # its C extension loads only when metrics are computed

    dup = run.group_by(["query_id", "doc_id"]).len().filter(pl.col("len") > 1)
    if dup.height:
        q, d = dup.row(0)[:2]
        raise InputError(f"the run has document {d!r} twice for query {q!r}; give each pair once")
    judged = qrels.with_columns(pl.col("relevance").fill_null(0).cast(pl.Int64))
    truth: dict[str, dict[str, int]] = {}
    for q, docs, rels in judged.group_by("query_id").agg("doc_id", "relevance").iter_rows():
        truth[q] = dict(zip(docs, rels))
    # trec_eval ranks by score descending: an ascending baseline is negated, and a null score
    # (a document the column did not score) goes last, as rank_run puts it.
    sign = 1.0 if descending else -1.0
    scored = run.filter(pl.col("query_id").is_in(list(truth))).select(
        "query_id", "doc_id", (pl.col(score_col).cast(pl.Float64).fill_nan(None) * sign)
        .fill_null(float("-inf")).alias("_s"))

    def as_dict(frame: pl.DataFrame) -> dict[str, dict[str, float]]:
        return {q: dict(zip(docs, scores))
                for q, docs, scores in frame.group_by("query_id").agg("doc_id", "_s").iter_rows()}

    whole = as_dict(scored)
    requests, keys = set(), {}
    cut_mrr = sorted({m.k for m in metrics if m.kind == "mrr" and m.k})
    for m in metrics:
        if m.kind == "mrr" and m.k:
            continue
        if m.k is None:
            requests.add(WHOLE[m.kind])
            keys[m.name] = WHOLE[m.kind]
        else:
            ask, key = TREC_MEASURE[m.kind]
            requests.add(ask.format(k=m.k))
            keys[m.name] = key.format(k=m.k)
    values = {q: {} for q in whole}
    if requests:
        for q, vals in pytrec_eval.RelevanceEvaluator(truth, requests).evaluate(whole).items():
            values[q].update({name: vals[key] for name, key in keys.items()})
    for k in cut_mrr:
        top = rank_run(scored, "_s").filter(pl.col("rank") <= k)
        for q, vals in pytrec_eval.RelevanceEvaluator(truth, {"recip_rank"}).evaluate(as_dict(top)).items():
            values[q].update({m.name: vals["recip_rank"] for m in metrics if m.kind == "mrr" and m.k == k})
    names = [m.name for m in metrics]
    schema = {"query_id": pl.String, **{n: pl.Float64 for n in dict.fromkeys(names)}}
    rows = [(q, *(values[q][n] for n in schema if n != "query_id")) for q in sorted(values)]
    return pl.DataFrame(rows, schema=schema, orient="row")


def evaluate(run: pl.DataFrame, qrels: pl.DataFrame, metrics: list[Metric], score_col: str = "score",
             descending: bool = True) -> tuple[dict, pl.DataFrame]:
    """(means by metric name, per-query table)."""
    pq_ = per_query(run, qrels, metrics, score_col, descending)
    means = {m.name: (float(pq_[m.name].mean()) if pq_.height else math.nan) for m in metrics}
    return means, pq_


def format_table(means: dict, baseline: dict | None = None, n_queries: int = 0,
                 where: str = " in both the run and the qrels") -> str:
    """The metrics as a table, then how many queries they average over (`where`: which)."""
    names = list(means)
    w = max(8, *(len(n) for n in names))
    if baseline is None:
        lines = [f"{'metric':<{w}}  {'value':>8}"] + [f"{n:<{w}}  {means[n]:>8.4f}" for n in names]
    else:
        lines = [f"{'metric':<{w}}  {'before':>8}  {'after':>8}  {'delta':>8}"]
        lines += [f"{n:<{w}}  {baseline[n]:>8.4f}  {means[n]:>8.4f}  {means[n] - baseline[n]:>+8.4f}" for n in names]
    lines.append(f"({n_queries} {'query' if n_queries == 1 else 'queries'}{where})")
    return "\n".join(lines)


def plot_delta(per_q_after: pl.DataFrame, per_q_before: pl.DataFrame, metric: str, path: str) -> None:
    """Per-query change of `metric` (after - before), sorted, as a bar chart."""
    try:  # an optional dependency (the plot extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib; pip install 'rerank-batch[plot]'") from None
    j = per_q_after.select("query_id", pl.col(metric).alias("after")).join(
        per_q_before.select("query_id", pl.col(metric).alias("before")), on="query_id")
    delta = np.sort((j["after"] - j["before"]).to_numpy())[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    colors = np.where(delta > 0, "#2a9d8f", np.where(delta < 0, "#e76f51", "#999999"))
    ax1.bar(np.arange(len(delta)), delta, color=colors, width=1.0)
    ax1.axhline(0, color="black", linewidth=0.6)
    ax1.set_xlabel("queries, sorted by change")
    ax1.set_ylabel(f"Δ {metric} (reranked − baseline)")
    up, down = int((delta > 0).sum()), int((delta < 0).sum())
    ax1.set_title(f"Per-query Δ{metric}: {up} better, {down} worse, {len(delta) - up - down} unchanged")
    b, a = float(j["before"].mean()), float(j["after"].mean())
    ax2.bar(["baseline", "reranked"], [b, a], color=["#999999", "#2a9d8f"])
    for x, v in enumerate([b, a]):
        ax2.text(x, v, f"{v:.3f}", ha="center", va="bottom")
    ax2.set_title(f"mean {metric}")
    ax2.set_ylim(0, max(1e-9, max(a, b)) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
