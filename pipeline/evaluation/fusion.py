"""Fusion of runs, per query, over the union of their documents.

- rrf: reciprocal rank fusion (Cormack et al., 2009), score = sum over the runs that hold the
  document of 1 / (k + rank), rank 1-based in trec_eval's order (score descending, ties by
  document id descending).
- combsum: sum of the normalized scores (a run without the document adds 0).
- combmnz: combsum times the number of runs that hold the document (Fox & Shaw, 1994).
Normalization, per query and run: minmax (s - min) / (max - min), 1 when all scores are equal;
zscore (s - mean) / std (population std), 0 when all are equal; none.
"""

from __future__ import annotations

import polars as pl

from pipeline.errors import InputError
from pipeline.storage.atomic import atomic_write_parquet, atomic_write_text

from .metrics import rank_run
from .runs import read_run, require_scores, trec_text

METHODS = ("rrf", "combsum", "combmnz")
NORMS = ("minmax", "zscore", "none")


def normalize(run: pl.DataFrame, norm: str) -> pl.Series:
    s, q = pl.col("score"), "query_id"
    if norm == "minmax":
        lo, hi = s.min().over(q), s.max().over(q)
        expr = pl.when(hi > lo).then((s - lo) / (hi - lo)).otherwise(1.0)
    elif norm == "zscore":
        mean, std = s.mean().over(q), s.std(ddof=0).over(q)
        expr = pl.when(std > 0).then((s - mean) / std).otherwise(0.0)
    elif norm == "none":
        expr = s
    else:
        raise ValueError(norm)
    return run.select(expr.alias("_n"))["_n"]


def fuse(runs: list[pl.DataFrame], method: str = "rrf", k: float = 60.0, norm: str = "minmax") -> pl.DataFrame:
    """(query_id, doc_id, score, rank) of the fused run, ranked per query; each input run is
    (query_id, doc_id, score) without null scores."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    parts = []
    for run in runs:
        if method == "rrf":
            r = rank_run(run, "score")
            parts.append(r.select("query_id", "doc_id", (1.0 / (k + pl.col("rank").cast(pl.Float64))).alias("_c")))
        else:
            parts.append(run.select("query_id", "doc_id").with_columns(_c=normalize(run, norm)))
    fused = pl.concat(parts).group_by(["query_id", "doc_id"]).agg(
        pl.col("_c").sum().alias("score"), pl.len().alias("_hits"))
    if method == "combmnz":
        fused = fused.with_columns(score=pl.col("score") * pl.col("_hits"))
    return rank_run(fused.drop("_hits"), "score").select("query_id", "doc_id", "score", "rank")


def fuse_files(paths: list[str], output: str, *, method: str = "rrf", k: float = 60.0, norm: str = "minmax",
               tag: str = "fused", score_col: str = "score", query_id_col: str = "query_id",
               doc_id_col: str = "doc_id") -> int:
    """Fuse the run files in `paths` into `output` (Parquet, or TREC when it ends in .trec);
    returns the documents written."""
    runs = [require_scores(read_run(p, query_id_col, doc_id_col, score_col), p) for p in paths]
    fused = fuse(runs, method, k, norm)
    if output.endswith(".trec"):
        atomic_write_text(trec_text(fused, tag), output)
    else:
        atomic_write_parquet(fused.to_arrow(), output)
    return fused.height
