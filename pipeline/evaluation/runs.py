"""Runs to evaluate, fuse or export: a scored Parquet file (the output of `rerank-batch run`, or
any file with query id, document id and score columns) or a TREC run file
('qid Q0 docid rank score tag'), told apart by content. A run is read as (query_id, doc_id,
score) with string ids; the rank column of a TREC file is ignored, as trec_eval ignores it.
"""

from __future__ import annotations

import os

import polars as pl

from pipeline.errors import InputError, first_line
from pipeline.evaluation.text import text_lines
from pipeline.storage.atomic import atomic_write_text

from .metrics import rank_run

# Stripped from the end of a file name to name its run: mini.ranked.parquet -> mini.ranked.
RUN_SUFFIXES = (".parquet", ".pq", ".trec", ".run", ".txt", ".res", ".tsv")


def run_name(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    stripped = True
    while stripped:
        stripped = False
        for s in RUN_SUFFIXES:
            if name.lower().endswith(s) and len(name) > len(s):
                name, stripped = name[: -len(s)], True
    return name


def run_names(paths: list[str], names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The name of each run: its file name without extensions, or the --name given for it."""
    if names and len(names) != len(paths):
        raise InputError(f"--name was given {len(names)} times for {len(paths)} runs; give it once per run, "
                         "in the order of the runs, or not at all")
    out = list(names) if names else [run_name(p) for p in paths]
    seen = {}
    for p, n in zip(paths, out):
        if n in seen:
            raise InputError(f"{seen[n]} and {p} are both named {n!r}; pass --name once per run to tell them apart")
        seen[n] = p
    return out


def is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def read_run(path: str, query_id_col: str = "query_id", doc_id_col: str = "doc_id",
             score_col: str = "score") -> pl.DataFrame:
    """(query_id, doc_id, score) of a run file."""
    df = load_run(path, query_id_col, doc_id_col, [score_col])
    return df.select("query_id", "doc_id", pl.col(score_col).cast(pl.Float64).fill_nan(None).alias("score"))


def load_run(path: str, query_id_col: str, doc_id_col: str, columns) -> pl.DataFrame:
    """query_id and doc_id (strings) and `columns` under their own names. `columns` is a list, or
    {column: the option that named it} so that a missing one is told with its option; the first
    is the score. A TREC run has one column, its score, given the name columns[0]. A (query,
    document) pair given twice is an InputError: trec_eval would count the document twice."""
    options = dict(columns) if isinstance(columns, dict) else {}
    columns = list(columns)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; pass a scored Parquet file (the output of rerank-batch run) "
                         "or a TREC run")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; pass a file")
    if is_parquet(path):
        df = _read_parquet_run(path, query_id_col, doc_id_col, columns, options)
        where = "rows"
    else:
        if len(set(columns)) > 1:
            other = next(c for c in columns if c != columns[0])
            raise InputError(f"{path}: a TREC run has one score per document, no column {other!r}; "
                             "pass the scored Parquet file instead")
        df = read_trec(path).rename({"score": columns[0]})
        where = "lines"
    dup = (df.with_row_index("_row").group_by(["query_id", "doc_id"], maintain_order=True)
           .agg(pl.col("_row").head(2), pl.len()).filter(pl.col("len") > 1))
    if dup.height:
        q, d, rows = dup.row(0)[:3]
        first, second = (r + (1 if where == "lines" else 0) for r in rows)
        fix = "keep one line per (query, document)"
        if where == "rows" and {"chunk", "start_token"} <= set(pl.read_parquet_schema(path)):
            fix = "this is a --chunk-scores file (a row per window): evaluate the run's ranked output instead"
        raise InputError(f"{path}: document {d!r} is given twice for query {q!r} ({where} {first} and {second}"
                         f"{', from 0' if where == 'rows' else ''}); {fix}")
    return df


def _read_parquet_run(path, query_id_col, doc_id_col, columns, options) -> pl.DataFrame:
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    if columns and columns[0] not in schema:  # a pairs file not scored yet, most often
        raise InputError(f"{path}: no score column {columns[0]!r}; run `rerank-batch run` on it first, or name "
                         f"its score column with --score-col (columns: {', '.join(schema)})")
    need = list(dict.fromkeys([query_id_col, doc_id_col] + columns))
    missing = [c for c in need if c not in schema]
    if missing:
        option = options.get(missing[0]) or ("--query-id-col" if missing[0] == query_id_col else
                                             "--doc-id-col" if missing[0] == doc_id_col else "--score-col")
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(schema)}); pass {option} NAME")
    for c in columns:  # the scores (a relevance column has its own check, with its own message)
        option = options.get(c) or "--score-col"
        if option != "--relevance-col" and not schema[c].is_numeric():
            raise InputError(f"{path}: column {c!r} holds {schema[c]}, not scores; pass {option} with a column of "
                             "numbers")
    for c, given in ((query_id_col, "--query-id-col"), (doc_id_col, "--doc-id-col")):
        if not (schema[c].is_integer() or schema[c] in (pl.String, pl.Categorical)):
            raise InputError(f"{path}: column {c!r} holds {schema[c]}, not ids; pass {given} with a column of "
                             "strings or whole numbers")
    df = pl.read_parquet(path, columns=need).with_columns(
        query_id=pl.col(query_id_col).cast(pl.String), doc_id=pl.col(doc_id_col).cast(pl.String))
    for c, given in (("query_id", query_id_col), ("doc_id", doc_id_col)):
        nulls = df[c].null_count()
        if nulls:
            raise InputError(f"{path}: {nulls} rows have no {given!r}; every row of a run needs a query id "
                             "and a document id")
    return df


def read_trec(path: str) -> pl.DataFrame:
    """TREC run lines 'qid Q0 docid rank score tag' as (query_id, doc_id, score)."""
    qs, ds, ss = [], [], []
    for n, line in text_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InputError(f"{path}: line {n} has {len(parts)} fields, not a TREC run line "
                             "('qid Q0 docid rank score tag'); pass a TREC run or a scored Parquet file")
        try:
            score = float(parts[4])
        except ValueError:
            raise InputError(f"{path}: line {n}: score {parts[4]!r} is not a number; a TREC run line is "
                             "'qid Q0 docid rank score tag'") from None
        if score != score:
            raise InputError(f"{path}: line {n}: score is NaN; give every document a number")
        qs.append(parts[0])
        ds.append(parts[2])
        ss.append(score)
    if not qs:
        raise InputError(f"{path}: empty; a TREC run has one 'qid Q0 docid rank score tag' line per document")
    return pl.DataFrame({"query_id": qs, "doc_id": ds, "score": ss},
                        schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float64})


def trec_text(run: pl.DataFrame, tag: str) -> str:
    """TREC run lines of a run with query_id, doc_id, score and rank columns (metrics.rank_run). Scores
    are written with Python's repr, which reads back as the same float: ties and order survive."""
    if any(c.isspace() for c in tag) or not tag:
        raise InputError(f"--tag {tag!r}: a TREC tag is one word without spaces")
    for col in ("query_id", "doc_id"):
        bad = run.filter(pl.col(col).str.contains(r"\s") | (pl.col(col) == ""))
        if bad.height:
            raise InputError(f"{col} {bad[col][0]!r} is empty or has spaces, which a TREC run line cannot hold")
    lines = [f"{q} Q0 {d} {r} {float(s)!r} {tag}\n"
             for q, d, s, r in run.select("query_id", "doc_id", "score", "rank").iter_rows()]
    return "".join(lines)


def require_scores(run: pl.DataFrame, path: str) -> pl.DataFrame:
    """The run, refused when a document has no score (it has no place in a ranking file)."""
    missing = run.filter(pl.col("score").is_null())
    if missing.height:
        q, d = missing.row(0)[:2]
        raise InputError(f"{path}: {missing.height} documents have no score (first: query {q!r}, document {d!r}); "
                         "score every row or drop the unscored ones")
    return run


def export_trec(path: str, output: str, *, tag: str | None = None, score_col: str = "score",
                query_id_col: str = "query_id", doc_id_col: str = "doc_id") -> int:
    """Write the run in `path` as a TREC run file; returns the lines written."""
    run = require_scores(read_run(path, query_id_col, doc_id_col, score_col), path)
    text = trec_text(rank_run(run, "score"), tag or run_name(path))
    atomic_write_text(text, output)
    return run.height
