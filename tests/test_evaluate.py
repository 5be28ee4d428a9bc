"""`rerank-batch eval` equals trec_eval (pytrec_eval) to 1e-9; `prepare` builds the pairs."""

from __future__ import annotations

import json
import os
import random

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytrec_eval

from conftest import ROOT, run_cli, shared
from pipeline.evaluation.metrics import evaluate, parse_metrics, read_qrels

METRICS = "ndcg@10,ndcg@3,ndcg,map,map@5,mrr,mrr@3,recall@5,recall@100,p@1,p@5"
# Our name -> pytrec_eval measure; mrr@k is trec_eval's recip_rank on the run cut at k.
TREC = {"ndcg@10": "ndcg_cut_10", "ndcg@3": "ndcg_cut_3", "ndcg": "ndcg", "map": "map", "map@5": "map_cut_5",
        "mrr": "recip_rank", "recall@5": "recall_5", "recall@100": "recall_100", "p@1": "P_1", "p@5": "P_5"}


def _trec(run: dict, qrels: dict) -> dict:
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.3,10", "ndcg", "map", "map_cut.5", "recip_rank",
                                                "recall.5,100", "P.1,5"})
    return ev.evaluate(run)


def _mrr_at(run: dict, qrels: dict, k: int) -> dict:
    # Cut each query's run at k in trec_eval's order (score desc, doc id desc), then recip_rank.
    cut = {}
    for q, docs in run.items():
        order = sorted(docs.items(), key=lambda x: x[0], reverse=True)
        order = sorted(order, key=lambda x: -x[1])[:k]
        cut[q] = dict(order)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    return {q: v["recip_rank"] for q, v in ev.evaluate(cut).items()}


def _compare(run: dict, qrels: dict):
    df = pl.DataFrame([(q, d, s) for q, docs in run.items() for d, s in docs.items()],
                      schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float64}, orient="row")
    qr = pl.DataFrame([(q, d, r) for q, docs in qrels.items() for d, r in docs.items()],
                      schema={"query_id": pl.String, "doc_id": pl.String, "relevance": pl.Int64}, orient="row")
    means, per_q = evaluate(df, qr, parse_metrics(METRICS))
    ref = _trec(run, qrels)
    mrr3 = _mrr_at(run, qrels, 3)
    assert set(per_q["query_id"].to_list()) == set(ref)
    for row in per_q.iter_rows(named=True):
        q = row["query_id"]
        for ours, theirs in TREC.items():
            assert abs(row[ours] - ref[q][theirs]) <= 1e-9, (q, ours, row[ours], ref[q][theirs])
        assert abs(row["mrr@3"] - mrr3[q]) <= 1e-9
    for ours, theirs in TREC.items():
        mean = sum(v[theirs] for v in ref.values()) / len(ref)
        assert abs(means[ours] - mean) <= 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_with_ties_graded_relevance_and_empty_queries(seed):
    rng = random.Random(seed)
    run, qrels = {}, {}
    for q in range(40):
        qid = f"q{q:02d}"
        docs = [f"d{rng.randrange(200):03d}" for _ in range(rng.randrange(1, 30))]
        # Few distinct scores: many ties, broken by doc id as trec_eval does.
        run[qid] = {d: float(rng.choice([0.1, 0.25, 0.5, 0.5, 0.75, rng.random()])) for d in docs}
        if q % 7 == 3:
            continue  # in the run only: not evaluated
        judged = rng.sample(sorted(set(docs)), k=min(len(set(docs)), rng.randrange(0, 6)))
        judged += [f"x{rng.randrange(50)}" for _ in range(rng.randrange(0, 3))]  # relevant, never retrieved
        qrels[qid] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if q % 5 == 0:
            qrels[qid] = {d: 0 for d in judged} or {"zz": 0}  # no relevant document at all
    qrels["only-in-qrels"] = {"d001": 1}
    _compare(run, qrels)


def test_shared_qrels_with_real_scores(tmp_path, tied_model):
    """The tiny model's scores on a real set, evaluated against its TREC qrels."""
    inp = tmp_path / "arc.parquet"
    pq.write_table(pq.read_table(shared("ARC-Challenge.long.parquet")).slice(0, 900), inp)
    out = tmp_path / "ranked.parquet"
    assert run_cli(["run", inp, "--model", tied_model, "-o", out, "-q", "--device", "cpu"]).exit_code == 0
    t = pq.read_table(out)
    run = {}
    for q, d, s in zip(t.column("query_id").to_pylist(), t.column("doc_id").to_pylist(), t.column("score").to_pylist()):
        run.setdefault(q, {})[d] = float(s)
    qrels = {}
    for r in read_qrels(shared("ARC-Challenge.qrels.txt")).iter_rows():
        qrels.setdefault(r[0], {})[r[1]] = r[2]
    _compare(run, qrels)
    # And through the CLI: JSON keys exactly as given, per-query values apart.
    js = tmp_path / "e.json"
    r = run_cli(["eval", out, "--qrels", shared("ARC-Challenge.qrels.txt"), "--metrics", "NDCG@10,map,mrr",
                 "--json", js])
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_text())
    assert {"NDCG@10", "map", "mrr", "per_query", "queries"} <= set(rec)
    ref = _trec(run, qrels)
    assert abs(rec["map"] - sum(v["map"] for v in ref.values()) / len(ref)) <= 1e-9
    assert rec["queries"] == len(ref) and set(rec["per_query"]) == set(ref)
    # The same qrels as Parquet (query_id, doc_id, relevance) give the same numbers.
    qp = tmp_path / "qrels.parquet"
    read_qrels(shared("ARC-Challenge.qrels.txt")).write_parquet(qp)
    js2 = tmp_path / "e2.json"
    assert run_cli(["eval", out, "--qrels", qp, "--metrics", "NDCG@10,map,mrr", "--json", js2]).exit_code == 0
    assert json.loads(js2.read_text()) == rec


def test_baseline_relevance_col_and_plot(tmp_path):
    # The sample flow: prepare (BEIR) -> run -> eval, before and after.
    beir = os.path.join(ROOT, "sample_data", "beir-mini")
    pairs, ranked = tmp_path / "pairs.parquet", tmp_path / "ranked.parquet"
    r = run_cli(["prepare", "beir", beir, "--run", os.path.join(beir, "first-stage.trec"), "--depth", 4, "-o", pairs])
    assert r.exit_code == 0, r.output
    p = pq.read_table(pairs)
    assert p.num_rows == 24 and max(p.column("first_stage_rank").to_pylist()) == 4
    assert {"first_stage_score", "first_stage_rank", "relevance", "query", "document"} <= set(p.schema.names)
    tiny = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
    assert run_cli(["run", pairs, "--model", tiny, "-o", ranked, "-q"]).exit_code == 0
    js, png = tmp_path / "e.json", tmp_path / "d.png"
    r = run_cli(["eval", ranked, "--qrels", os.path.join(beir, "qrels", "test.tsv"), "--metrics", "ndcg@10,map",
                 "--baseline-col", "first_stage_rank", "--baseline-ascending", "--json", js, "--plot", png])
    assert r.exit_code == 0, r.output
    assert "before" in r.output and "delta" in r.output
    rec = json.loads(js.read_text())
    assert abs(rec["delta"]["map"] - (rec["map"] - rec["baseline"]["map"])) < 1e-12
    # Ranking by first-stage rank ascending equals ranking by first-stage score descending.
    r2 = run_cli(["eval", ranked, "--qrels", os.path.join(beir, "qrels", "test.tsv"), "--metrics", "ndcg@10,map",
                  "--baseline-col", "first_stage_score", "--json", tmp_path / "e2.json"])
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "e2.json").read_text())["baseline"] == rec["baseline"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # Where the PNG and the JSON went, and over which queries the means are.
    tail = [line.split(" ", 1)[1] if line[:1].isdigit() else line for line in r.output.splitlines()[-3:]]
    assert tail == ["(6 queries in both the run and the qrels)",
                    f"rerank-batch: wrote {png} (the per-query change of ndcg@10)", f"rerank-batch: wrote {js}"]
    # --relevance-col: judgments from the file itself (unjudged candidates count as 0), no qrels.
    r = run_cli(["eval", ranked, "--relevance-col", "relevance", "--metrics", "p@1", "--json", tmp_path / "r.json"])
    assert r.exit_code == 0, r.output
    assert "(6 queries, relevance from column 'relevance')" in r.output.splitlines()
    assert "qrels" not in r.output


def test_an_unscored_file_says_to_score_it(tmp_path):
    beir = os.path.join(ROOT, "sample_data", "beir-mini")
    pairs = tmp_path / "pairs.parquet"
    r = run_cli(["prepare", "beir", beir, "--run", os.path.join(beir, "first-stage.trec"), "--depth", 2, "-o", pairs])
    assert r.exit_code == 0, r.output
    r = run_cli(["eval", pairs, "--qrels", os.path.join(beir, "qrels", "test.tsv")])
    assert r.exit_code == 2
    assert r.output == (f"Error: {pairs}: no score column 'score'; run `rerank-batch run` on it first, or name its "
                        "score column with --score-col (columns: query_id, doc_id, query, title, document, "
                        "first_stage_score, first_stage_rank, relevance)\n")


def test_prepare_beir_split_must_exist_where_judgments_are_kept(tmp_path):
    """A mistyped or absent split once wrote every row with null relevance and exit 0: an
    evaluation set with no judgments, found out only at eval time."""
    import shutil

    beir = tmp_path / "beir"
    shutil.copytree(os.path.join(ROOT, "sample_data", "beir-mini"), beir)
    trec, out = str(beir / "first-stage.trec"), tmp_path / "pairs.parquet"

    def prepare(*extra):
        return run_cli(["prepare", "beir", beir, "--run", trec, "-o", out, "--overwrite", *extra])

    r = prepare("--split", "dev")
    assert r.exit_code == 2
    assert r.output == f"Error: {beir}/qrels/dev.tsv: no such file (qrels/ holds test); pass --split test\n"
    assert not out.exists()
    r = prepare("--split", "test")  # named and there: judged rows
    assert r.exit_code == 0, r.output
    judged = pq.read_table(out).column("relevance").drop_null()
    assert len(judged) > 0
    shutil.move(beir / "qrels" / "test.tsv", beir / "qrels" / "dev.tsv")
    r = prepare()  # the default split is missing, another is there: the user picks
    assert r.exit_code == 2
    assert r.output == f"Error: {beir}/qrels/test.tsv: no such file (qrels/ holds dev); pass --split dev\n"
    r = prepare("--split", "dev")
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).column("relevance").drop_null().to_pylist() == judged.to_pylist()
    shutil.rmtree(beir / "qrels")
    r = prepare()  # no judgments at all: unjudged pairs to rerank
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).column("relevance").null_count == pq.read_metadata(out).num_rows > 0
    r = prepare("--split", "test")
    assert r.exit_code == 2
    assert r.output == (f"Error: {beir}/qrels/test.tsv: no such file, and {beir} has no qrels/ folder; drop "
                        "--split to write the pairs with no relevance\n")


def test_prepare_mc_reproduces_the_shared_long_form_and_qrels(tmp_path):
    out, qrels = tmp_path / "pairs.parquet", tmp_path / "qrels.txt"
    r = run_cli(["prepare", "mc", shared("physicaliqa.nested.parquet"), "-o", out, "--qrels-out", qrels])
    assert r.exit_code == 0, r.output
    got = pq.read_table(out)
    want = pq.read_table(shared("physicaliqa.long.parquet"))
    for col in ("query_id", "doc_id", "instruction", "query", "document", "relevance"):
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    assert sorted(open(qrels).read().split("\n")) == sorted(open(shared("physicaliqa.qrels.txt")).read().split("\n"))


@pytest.mark.parametrize("args, message", [
    (["eval", "{s}"], "give exactly one of --qrels FILE and --relevance-col COL"),
    (["eval", "{s}", "--qrels", "{q}", "--metrics", "ndcg@10,foo"], "--metrics: 'foo' is not a metric"),
    (["eval", "{s}", "--qrels", "{q}", "--metrics", "recall"], "--metrics: 'recall' needs a cutoff; write recall@10"),
    (["eval", "{s}", "--qrels", "nope.txt"], "nope.txt: no such qrels file; check the path"),
    (["eval", "{s}", "--qrels", "{q}", "--plot", "x.png"], "--plot draws the change against a baseline; add --baseline-col"),
    (["eval", "{s}", "--qrels", "{q}", "--doc-id-col", "nope"],
     "{s}: no column 'nope' (columns: query_id, doc_id, score); pass --doc-id-col NAME"),
    (["eval", "{s}", "--qrels", "{q}", "--baseline-col", "bm25"],
     "{s}: no column 'bm25' (columns: query_id, doc_id, score); pass --baseline-col NAME"),
    # An unscored file (a pairs file from prepare): the fix is to score it, not the id columns.
    (["eval", "{s}", "--qrels", "{q}", "--score-col", "rerank"],
     "{s}: no score column 'rerank'; run `rerank-batch run` on it first, or name its score column with "
     "--score-col (columns: query_id, doc_id, score)"),
    (["prepare", "beir", "nodir", "--run", "r.trec", "-o", "o.parquet"], "nodir: not a directory; pass a BEIR folder"),
    # Files a job writes never replace what it reads (they did: the input became JSON or qrels).
    (["eval", "{s}", "--qrels", "{q}", "--json", "{s}"], "--json {s}: is also the input {s}"),
    (["eval", "{s}", "--qrels", "{q}", "--json", "{q}"], "--json {q}: is also the input {q}"),
    (["eval", "{s}", "--qrels", "{q}", "--json", "{d}"], "--json {d}: is a directory"),
    (["prepare", "mc", "{m}", "-o", "{m}", "--overwrite"], "-o {m}: is also the input {m}"),
    (["prepare", "mc", "{m}", "-o", "{d}/p.parquet", "--qrels-out", "{m}", "--overwrite"],
     "--qrels-out {m}: is also the input {m}"),
    (["prepare", "mc", "{m}", "-o", "{d}/p.parquet", "--qrels-out", "{d}/p.parquet", "--overwrite"],
     "--qrels-out {d}/p.parquet: is also the output {d}/p.parquet"),
    (["prepare", "mc", "{m}", "-o", "{d}/p.parquet", "--qrels-out", "{q}"], "--qrels-out {q}: exists; pass --overwrite"),
    # Malformed text files: one line naming the file, not a traceback.
    (["eval", "{s}", "--qrels", "{d}/latin1.txt"], "{d}/latin1.txt: not UTF-8 text (invalid continuation byte); save the file as UTF-8"),
    (["eval", "{s}", "--qrels", "{d}"], "{d}: is a directory; pass a file"),
])
def test_eval_and_prepare_errors_exit_2(tmp_path, args, message):
    s = tmp_path / "s.parquet"
    pq.write_table(pa.table({"query_id": ["a"], "doc_id": ["x"], "score": [0.5]}), s)
    q = tmp_path / "q.txt"
    q.write_text("a 0 x 1\n")
    m = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"query": ["a?"], "documents": [["x", "y"]], "label": [0]}), m)
    (tmp_path / "latin1.txt").write_bytes("a 0 x 1\nb 0 caf\u00e9 1\n".encode("latin-1"))
    subst = {"{s}": str(s), "{q}": str(q), "{m}": str(m), "{d}": str(tmp_path)}
    fill = lambda a: __import__("functools").reduce(lambda x, kv: x.replace(*kv), subst.items(), a)  # noqa: E731
    before = {f: f.read_bytes() for f in (s, q, m)}
    r = run_cli([fill(a) for a in args])
    assert r.exit_code == 2, r.output
    assert fill(message) in r.output
    assert {f: f.read_bytes() for f in (s, q, m)} == before


def test_a_document_judged_twice_keeps_its_last_judgement(tmp_path):
    """Duplicate qrels lines once counted a relevant document twice (P@1 2.0, map 1.5); the
    last judgement of each (query, document) is kept, as pytrec_eval's dict keeps it."""
    from pipeline.evaluation.metrics import read_qrels

    q = tmp_path / "dup.txt"
    q.write_text("q1 0 d0 1\nq1 0 d0 1\nq1 0 d1 2\nq1 0 d1 0\nq2 0 d5 1\n")
    qr = read_qrels(str(q))
    assert qr.height == 3
    qrels = {"q1": {"d0": 1, "d1": 0}, "q2": {"d5": 1}}  # the file as pytrec_eval reads it: last wins
    run = {"q1": {"d0": 0.9, "d1": 0.5, "d2": 0.1}, "q2": {"d4": 0.8, "d5": 0.7}}
    df = pl.DataFrame([(k, d, s) for k, docs in run.items() for d, s in docs.items()],
                      schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float64}, orient="row")
    means, per_q = evaluate(df, qr, parse_metrics(METRICS))
    ref = _trec(run, qrels)
    for row in per_q.iter_rows(named=True):
        for ours, theirs in TREC.items():
            assert abs(row[ours] - ref[row["query_id"]][theirs]) <= 1e-9, (row["query_id"], ours)
    assert per_q["p@1"].max() <= 1.0 and per_q["map"].max() <= 1.0


@pytest.mark.parametrize("table, message", [
    ({"query": ["a?"], "documents": ["Paris is big"], "label": [0]}, "column 'documents' is string, not a list"),
    ({"query": ["a?"], "documents": [["x", "y"]], "label": [2]}, "label 2 is not the index of one of its 2 candidates"),
    ({"query": ["a?"], "documents": [["x", "y"]], "label": [-1]}, "label -1 is not the index"),
    ({"query": ["a?"], "documents": [["x", "y"]], "label": ["1"]}, "label '1' is not the index"),
    ({"query": ["a?"], "documents": [["x", "y"]], "label": [None]}, "label None is not the index"),
    ({"query": ["a?", "b?"], "documents": [["x"], ["y"]], "label": [0, 0], "query_id": ["q", "q"]},
     "query_id 'q' is on rows 0 and 1 (from 0); ids must be unique"),
    ({"query": ["a?"], "documents": [["x"]], "label": [0], "query_id": [None]}, "'query_id' is null"),
    ({"query": ["a?"], "documents": [["x"]], "label": [0], "doc_id": ["mine"]}, "column 'doc_id' is one the pairs"),
])
def test_prepare_mc_refuses_what_would_write_wrong_labels(tmp_path, table, message):
    """Each of these wrote a pairs file and qrels with exit 0: a string split into characters, a
    question with no right answer, two questions merged, or ids that no longer match the qrels."""
    m = tmp_path / "mc.parquet"
    pq.write_table(pa.table(table), m)
    r = run_cli(["prepare", "mc", str(m), "-o", str(tmp_path / "p.parquet"), "--qrels-out", str(tmp_path / "q.txt")])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "q.txt").exists()


def test_a_relevance_column_that_is_not_grades_is_one_line(tmp_path):
    from conftest import run_cli

    scored = tmp_path / "s.parquet"
    pq.write_table(pa.table({"query_id": ["q1", "q1"], "doc_id": ["a", "b"], "score": [0.9, 0.1],
                             "document": ["x", "y"]}), scored)
    r = run_cli(["eval", scored, "--relevance-col", "document"])
    assert r.exit_code == 2, r.output
    assert r.output == (f"Error: {scored}: --relevance-col 'document' holds String, not relevance grades; name a "
                        "column of integers (0 = not relevant)\n")
