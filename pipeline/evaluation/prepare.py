"""Build pairs Parquet for `rerank-batch run` from common evaluation layouts.

- BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) plus a TREC run file of
  first-stage candidates: one row per (query, candidate), keeping the first-stage score and rank.
- Multiple-choice retrieval (a query, a list of candidates, the index of the right one), as in
  the RAR-b sets: one row per candidate, relevance 1 for the right one.
"""

from __future__ import annotations

import json
import os

import polars as pl
import pyarrow as pa

from pipeline.data.read import open_parquet
from pipeline.errors import InputError
from pipeline.evaluation.metrics import read_qrels
from pipeline.evaluation.text import text_lines
from pipeline.storage.atomic import atomic_write_parquet


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; {what}")
    return path


def read_trec_run(path: str) -> pl.DataFrame:
    """TREC run lines 'qid Q0 docid rank score tag' as (query_id, doc_id, first_stage_score)."""
    rows = []
    for n, line in text_lines(_need(path, "pass a TREC run file ('qid Q0 docid rank score tag')")):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InputError(f"{path}: line {n} has {len(parts)} fields; a TREC run line is "
                             "'qid Q0 docid rank score tag'")
        try:
            rows.append((parts[0], parts[2], float(parts[4])))
        except ValueError:
            raise InputError(f"{path}: line {n}: score {parts[4]!r} is not a number") from None
    return pl.DataFrame(rows, schema={"query_id": pl.String, "doc_id": pl.String, "first_stage_score": pl.Float64},
                        orient="row")


def _read_jsonl(path: str, keep=None) -> dict[str, dict]:
    out = {}
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {n} is not a JSON object; BEIR files hold one object per line")
        key = str(obj.get("_id"))
        if keep is None or key in keep:
            out[key] = obj
    return out


def _qrels_split(beir_dir: str, split: str | None) -> str | None:
    """The qrels file of `split` (see prepare_beir), or None where the folder has no judgments."""
    qrels_dir = os.path.join(beir_dir, "qrels")
    path = os.path.join(qrels_dir, f"{split or 'test'}.tsv")
    if os.path.isfile(path):
        return path
    if not os.path.isdir(qrels_dir):
        if split is None:
            return None
        raise InputError(f"{path}: no such file, and {beir_dir} has no qrels/ folder; drop --split to write the "
                         "pairs with no relevance")
    have = sorted(n[:-4] for n in os.listdir(qrels_dir) if n.endswith(".tsv"))
    fix = f"pass --split {' or --split '.join(have)}" if have else "put the split's judgments there"
    raise InputError(f"{path}: no such file (qrels/ holds {', '.join(have) or 'no .tsv file'}); {fix}")


def prepare_beir(beir_dir: str, run_path: str, output: str, *, depth: int | None = None, split: str | None = None,
                 title_sep: str = " ") -> int:
    """Pairs for the first `depth` candidates of each query in `run_path`; returns rows written.
    `relevance` comes from qrels/<split>.tsv, which must exist when `split` is named. Unnamed:
    qrels/test.tsv; a folder with no qrels/ gives null relevance (unjudged pairs to rerank), and
    one whose qrels/ lacks test.tsv is refused, naming the splits it has."""
    if not os.path.isdir(beir_dir):
        raise InputError(f"{beir_dir}: not a directory; pass a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    run = read_trec_run(run_path)
    # trec_eval's order: score descending, ties by doc id descending; the rank is the position.
    run = (run.sort(["query_id", "first_stage_score", "doc_id"], descending=[False, True, True])
           .with_columns(first_stage_rank=pl.int_range(1, pl.len() + 1).over("query_id").cast(pl.Int32)))
    if depth:
        run = run.filter(pl.col("first_stage_rank") <= depth)
    queries = _read_jsonl(_need(os.path.join(beir_dir, "queries.jsonl"), "a BEIR folder holds queries.jsonl"))
    docs = _read_jsonl(_need(os.path.join(beir_dir, "corpus.jsonl"), "a BEIR folder holds corpus.jsonl"),
                       keep=set(run["doc_id"].to_list()))
    missing_q = set(run["query_id"].unique().to_list()) - set(queries)
    if missing_q:
        raise InputError(f"{run_path}: query {sorted(missing_q)[0]!r} is not in queries.jsonl "
                         f"({len(missing_q)} such); is the run for this dataset?")
    missing_d = set(run["doc_id"].unique().to_list()) - set(docs)
    if missing_d:
        raise InputError(f"{run_path}: document {sorted(missing_d)[0]!r} is not in corpus.jsonl "
                         f"({len(missing_d)} such); is the run for this dataset?")
    qrels_path = _qrels_split(beir_dir, split)
    if qrels_path:
        run = run.join(read_qrels(qrels_path), on=["query_id", "doc_id"], how="left")
    else:
        run = run.with_columns(relevance=pl.lit(None, pl.Int64))

    def text(d):
        t, body = (docs[d].get("title") or "").strip(), docs[d].get("text") or ""
        return f"{t}{title_sep}{body}" if t else body

    ids = run["doc_id"].to_list()
    table = pa.table({
        "query_id": run["query_id"].to_list(),
        "doc_id": ids,
        "query": [queries[q]["text"] for q in run["query_id"].to_list()],
        "title": [docs[d].get("title") or "" for d in ids],
        "document": [text(d) for d in ids],
        "first_stage_score": pa.array(run["first_stage_score"].to_list(), pa.float64()),
        "first_stage_rank": pa.array(run["first_stage_rank"].to_list(), pa.int32()),
        "relevance": pa.array(run["relevance"].to_list(), pa.int32()),
    })
    atomic_write_parquet(table, output)
    return table.num_rows


def _read_table(path: str) -> pa.Table:
    _need(path, "pass a multiple-choice Parquet or JSONL file")
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise InputError(f"{path}: line {n} is not JSON") from None
        return pa.Table.from_pylist(rows)
    return open_parquet(path).read()


def prepare_mc(path: str, output: str, *, query_col: str = "query", docs_col: str = "documents",
               label_col: str = "label", id_col: str = "query_id", qrels_out: str | None = None) -> int:
    """One row per candidate with doc_id '<query_id>-d<i>' and relevance 1 for the right one(s)."""
    t = _read_table(path)
    for col, opt in ((query_col, "--query-col"), (docs_col, "--docs-col"), (label_col, "--label-col")):
        if col not in t.column_names:
            raise InputError(f"{path}: no column {col!r} (columns: {', '.join(t.column_names)}); pass {opt} NAME")
    dtype = t.schema.field(docs_col).type
    if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
        raise InputError(f"{path}: column {docs_col!r} is {dtype}, not a list of candidates; pass --docs-col NAME")
    qids = t.column(id_col).to_pylist() if id_col in t.column_names else [f"q{i}" for i in range(t.num_rows)]
    first: dict = {}
    for i, qid in enumerate(qids):  # the ids name the qrels' queries: one question each
        if qid is None:
            raise InputError(f"{path}: row {i} (from 0): {id_col!r} is null; give every question an id")
        if str(qid) in first:
            raise InputError(f"{path}: {id_col} {qid!r} is on rows {first[str(qid)]} and {i} (from 0); ids must be "
                             "unique, or pass --id-col NAME")
        first[str(qid)] = i
    rest = [c for c in t.column_names if c not in (docs_col, label_col, id_col, query_col)]
    for c in rest:
        if c in ("doc_id", "document", "doc_index", "relevance"):
            raise InputError(f"{path}: column {c!r} is one the pairs file writes; rename or drop it")
    out = {"query_id": [], "doc_id": [], "query": [], "document": [], "doc_index": [], "relevance": []}
    extra = {c: [] for c in rest}
    cols = {c: t.column(c).to_pylist() for c in [query_col, docs_col, label_col] + rest}
    for i, qid in enumerate(qids):
        docs, label = cols[docs_col][i], cols[label_col][i]
        if docs is None:
            raise InputError(f"{path}: row {i} (from 0): {docs_col!r} is null; give a list of candidates")
        labels = label if isinstance(label, list) else [label]
        bad = [x for x in labels if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < len(docs)]
        if bad or not labels:
            raise InputError(f"{path}: row {i} (from 0): {label_col} {label!r} is not the index of one of its "
                             f"{len(docs)} candidates (0 to {len(docs) - 1}); fix it or pass --label-col NAME")
        right = set(labels)
        for j, doc in enumerate(docs):
            out["query_id"].append(str(qid))
            out["doc_id"].append(f"{qid}-d{j}")
            out["query"].append(cols[query_col][i])
            out["document"].append(doc)
            out["doc_index"].append(j)
            out["relevance"].append(1 if j in right else 0)
            for c in rest:
                extra[c].append(cols[c][i])
    table = pa.table({**{k: out[k] for k in ("query_id", "doc_id")},
                      **{c: pa.array(extra[c], t.schema.field(c).type) for c in rest},
                      "query": out["query"], "document": out["document"],
                      "doc_index": pa.array(out["doc_index"], pa.int32()),
                      "relevance": pa.array(out["relevance"], pa.int32())})
    atomic_write_parquet(table, output)
    if qrels_out:
        with open(qrels_out, "w", encoding="utf-8") as f:
            for q, d, r in zip(out["query_id"], out["doc_id"], out["relevance"]):
                f.write(f"{q} 0 {d} {r}\n")
    return table.num_rows
