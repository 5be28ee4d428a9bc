"""Ranking metrics, exact to trec_eval: per query, then the mean over the queries present in both
the run and the qrels.

trec_eval's conventions, followed here: documents are ordered by score descending and ties by
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

log = logging.getLogger(__name__)

METRIC = re.compile(r"^(ndcg|map|mrr|recall|p)(?:@(\d+))?$")


@dataclass(frozen=True)
class Metric:
    name: str  # as the user wrote it, e.g. "ndcg@10"
    kind: str  # ndcg, map, mrr, recall, p
    k: int | None


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


def _read_qrels(path: str) -> pl.DataFrame:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such qrels file; check the path")
    if path.endswith(".parquet"):
        df = pl.read_parquet(path)
        missing = {"query_id", "doc_id", "relevance"} - set(df.columns)
        if missing:
            raise InputError(f"{path}: qrels Parquet needs columns query_id, doc_id, relevance "
                             f"(missing {', '.join(sorted(missing))})")
        return df.select(pl.col("query_id").cast(pl.String), pl.col("doc_id").cast(pl.String),
                         pl.col("relevance").cast(pl.Int64))
    from pipeline.evaluation.prepare import text_lines

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
            rows.append((qid, did, int(float(rel))))
        except ValueError:
            if n == 1:
                continue  # a header such as query-id corpus-id score
            raise InputError(f"{path}: line {n}: relevance {rel!r} is not a number") from None
    return pl.DataFrame(rows, schema={"query_id": pl.String, "doc_id": pl.String, "relevance": pl.Int64},
                        orient="row")


def rank_run(run: pl.DataFrame, score_col: str, descending: bool = True) -> pl.DataFrame:
    """Ranks per query in trec_eval's order: score (best first), then doc id descending."""
    return (
        run.sort(["query_id", score_col, "doc_id"], descending=[False, descending, True], nulls_last=True)
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("query_id"))
    )


def per_query(run: pl.DataFrame, qrels: pl.DataFrame, metrics: list[Metric], score_col: str = "score",
              descending: bool = True) -> pl.DataFrame:
    """One row per query present in both the run and the qrels, one column per metric."""
    dup = run.group_by(["query_id", "doc_id"]).len().filter(pl.col("len") > 1)
    if dup.height:
        q, d = dup.row(0)[:2]
        raise InputError(f"the run has document {d!r} twice for query {q!r}; give each pair once")
    queries = run.select("query_id").unique().join(qrels.select("query_id").unique(), on="query_id")
    ranked = rank_run(run.join(queries, on="query_id"), score_col, descending)
    ranked = ranked.join(qrels, on=["query_id", "doc_id"], how="left").with_columns(
        pl.col("relevance").fill_null(0))
    ranked = ranked.with_columns(
        rel=(pl.col("relevance") >= 1).cast(pl.Int64),
        gain=pl.col("relevance").clip(lower_bound=0).cast(pl.Float64),
        disc=1.0 / (pl.col("rank").cast(pl.Float64) + 1.0).log(2),
    ).with_columns(cum_rel=pl.col("rel").cum_sum().over("query_id"))
    judged = qrels.join(queries, on="query_id")
    num_rel = judged.group_by("query_id").agg(num_rel=(pl.col("relevance") >= 1).sum().cast(pl.Float64))
    ideal = (judged.filter(pl.col("relevance") > 0)
             .sort(["query_id", "relevance"], descending=[False, True])
             .with_columns(irank=pl.int_range(1, pl.len() + 1).over("query_id"))
             .with_columns(idg=pl.col("relevance").cast(pl.Float64) / (pl.col("irank").cast(pl.Float64) + 1).log(2)))

    out = queries.join(num_rel, on="query_id", how="left").with_columns(pl.col("num_rel").fill_null(0.0))
    for m in metrics:
        top = pl.col("rank") <= m.k if m.k else pl.lit(True)
        if m.kind == "p":
            agg = ((pl.col("rel") * top).sum() / m.k).alias(m.name)
            out = out.join(ranked.group_by("query_id").agg(agg), on="query_id", how="left")
        elif m.kind == "recall":
            agg = (pl.col("rel") * top).sum().alias("_hits")
            out = out.join(ranked.group_by("query_id").agg(agg), on="query_id", how="left").with_columns(
                pl.when(pl.col("num_rel") > 0).then(pl.col("_hits") / pl.col("num_rel")).otherwise(0.0)
                .alias(m.name)).drop("_hits")
        elif m.kind == "map":
            agg = (pl.col("rel") * top * pl.col("cum_rel") / pl.col("rank")).sum().alias("_ap")
            out = out.join(ranked.group_by("query_id").agg(agg), on="query_id", how="left").with_columns(
                pl.when(pl.col("num_rel") > 0).then(pl.col("_ap") / pl.col("num_rel")).otherwise(0.0)
                .alias(m.name)).drop("_ap")
        elif m.kind == "mrr":
            first = ranked.filter((pl.col("rel") == 1) & top).group_by("query_id").agg(
                (1.0 / pl.col("rank").min()).alias(m.name))
            out = out.join(first, on="query_id", how="left")
        elif m.kind == "ndcg":
            dcg = ranked.group_by("query_id").agg((pl.col("gain") * pl.col("disc") * top).sum().alias("_dcg"))
            itop = pl.col("irank") <= m.k if m.k else pl.lit(True)
            idcg = ideal.group_by("query_id").agg((pl.col("idg") * itop).sum().alias("_idcg"))
            out = (out.join(dcg, on="query_id", how="left").join(idcg, on="query_id", how="left")
                   .with_columns(pl.when(pl.col("_idcg") > 0).then(pl.col("_dcg") / pl.col("_idcg"))
                                 .otherwise(0.0).alias(m.name)).drop("_dcg", "_idcg"))
        out = out.with_columns(pl.col(m.name).fill_null(0.0).cast(pl.Float64))
    return out.drop("num_rel").sort("query_id")


def evaluate(run: pl.DataFrame, qrels: pl.DataFrame, metrics: list[Metric], score_col: str = "score",
             descending: bool = True) -> tuple[dict, pl.DataFrame]:
    """(means by metric name, per-query table)."""
    pq_ = per_query(run, qrels, metrics, score_col, descending)
    means = {m.name: (float(pq_[m.name].mean()) if pq_.height else math.nan) for m in metrics}
    return means, pq_


def load_scored(path: str, query_id_col: str, doc_id_col: str, columns, score_col: str | None = None
                ) -> pl.DataFrame:
    """`columns`: the columns to read (with the ids), or {column: the option that named it}, so
    that a missing one is told with its option. A missing `score_col` means an unscored file."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; pass the output of rerank-batch run")
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    options = columns if isinstance(columns, dict) else {}
    need = list(dict.fromkeys([query_id_col, doc_id_col, *columns]))
    if score_col is not None and score_col not in schema:
        raise InputError(f"{path}: no score column {score_col!r}; run `rerank-batch run` on it first, or name "
                         f"its score column with --score-col (columns: {', '.join(schema)})")
    missing = [c for c in need if c not in schema]
    if missing:
        option = options.get(missing[0]) or ("--query-id-col" if missing[0] == query_id_col else "--doc-id-col")
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(schema)}); pass {option} NAME")
    df = pl.read_parquet(path, columns=need)
    return df.with_columns(query_id=pl.col(query_id_col).cast(pl.String), doc_id=pl.col(doc_id_col).cast(pl.String))


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
    try:
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
