"""Several runs in one `eval` (paired tests against the first), `export` to TREC and `fuse`, each
checked against an independent computation on the real ARC-Challenge qrels: pytrec_eval's
per-query values, scipy's ttest_rel, a sign-flip randomization test and Holm's correction
written here, and fusion by hand."""

from __future__ import annotations

import itertools
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytrec_eval
from scipy.stats import ttest_rel

from conftest import ROOT, run_cli, shared

QRELS = shared("ARC-Challenge.qrels.txt")
MEASURES = {"ndcg@10": "ndcg_cut_10", "map": "map", "mrr": "recip_rank", "p@1": "P_1", "recall@3": "recall_3"}
METRICS = ",".join(MEASURES)


def _qrels(path=QRELS) -> dict:
    out = {}
    for line in open(path):
        q, _, d, r = line.split()
        out.setdefault(q, {})[d] = int(r)
    return out


def _arc_runs(n_queries: int | None = None) -> dict[str, dict]:
    """Three runs of the real ARC-Challenge pairs: the input order, a noisy reranker that favours
    the right answer, and a random one with many ties."""
    t = pq.read_table(shared("ARC-Challenge.long.parquet"), columns=["query_id", "doc_id", "relevance"])
    rows = list(zip(*(t.column(c).to_pylist() for c in t.column_names)))
    if n_queries:
        keep = sorted({q for q, _, _ in rows})[:n_queries]
        rows = [r for r in rows if r[0] in keep]
    rng = random.Random(7)
    order, good, ties = {}, {}, {}
    for q, d, rel in rows:
        order.setdefault(q, {})[d] = -float(d.rsplit("-d", 1)[1])
        good.setdefault(q, {})[d] = rng.random() + (0.6 if rel == 1 else 0.0)
        ties.setdefault(q, {})[d] = rng.choice([0.1, 0.2, 0.2, 0.5])
    return {"order": order, "good": good, "ties": ties}


def _write_parquet(run: dict, path) -> None:
    rows = [(q, d, s) for q, docs in run.items() for d, s in docs.items()]
    pq.write_table(pa.table({"query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows],
                             "score": pa.array([r[2] for r in rows], pa.float32())}), path)


def _write_trec(run: dict, path) -> None:
    with open(path, "w") as f:
        for q, docs in run.items():
            for i, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]), 1):
                f.write(f"{q} Q0 {d} {i} {s!r} handmade\n")


def _float32(run: dict) -> dict:
    return {q: {d: float(np.float32(s)) for d, s in docs.items()} for q, docs in run.items()}


def _sign_flip_p(diff: np.ndarray) -> float:
    """Exact two-sided randomization test: every sign assignment, |mean| at least the observed."""
    obs = abs(diff.mean())
    hits = sum(abs((diff * np.array(signs)).mean()) >= obs - 1e-12
               for signs in itertools.product([1, -1], repeat=len(diff)))
    return hits / 2 ** len(diff)


def _sampled_sign_flip_p(diff: np.ndarray, n: int = 20_000) -> float:
    rng = np.random.default_rng(12345)
    signs = rng.choice([-1.0, 1.0], size=(n, len(diff)))
    return float((np.abs((signs * diff).mean(axis=1)) >= abs(diff.mean()) - 1e-12).mean())


def _holm(ps: list[float]) -> list[float]:
    m, order = len(ps), np.argsort(ps, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate([(m - i) * ps[j] for i, j in enumerate(order)]))
    out = [0.0] * m
    for i, j in enumerate(order):
        out[j] = float(adj[i])
    return out


def test_three_runs_against_pytrec_eval_scipy_and_a_hand_written_randomization_test(tmp_path):
    runs = _arc_runs()
    _write_trec(runs["order"], tmp_path / "order.trec")  # a TREC run, told apart by content
    _write_parquet(runs["good"], tmp_path / "good.ranked.parquet")
    _write_parquet(runs["ties"], tmp_path / "ties.parquet")
    js = tmp_path / "e.json"
    r = run_cli(["eval", tmp_path / "order.trec", tmp_path / "good.ranked.parquet", tmp_path / "ties.parquet",
                 "--qrels", QRELS, "--metrics", METRICS, "--json", js])
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_text())
    assert list(rec["runs"]) == ["order", "good.ranked", "ties"] and list(rec["comparisons"]) == ["good.ranked", "ties"]
    qrels = _qrels()
    ref = {}
    for name, run in zip(rec["runs"], (runs["order"], _float32(runs["good"]), _float32(runs["ties"]))):
        ref[name] = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map", "recip_rank", "P.1", "recall.3"}
                                                   ).evaluate(run)
        assert set(rec["per_query"][name]) == set(ref[name])
        for q, vals in ref[name].items():
            for ours, theirs in MEASURES.items():
                assert abs(rec["per_query"][name][q][ours] - vals[theirs]) <= 1e-9, (name, q, ours)
        for ours, theirs in MEASURES.items():
            assert abs(rec["runs"][name][ours] - np.mean([v[theirs] for v in ref[name].values()])) <= 1e-9
    assert rec["queries"] == 1172
    raw, keys = [], []
    for name in ("good.ranked", "ties"):
        for ours, theirs in MEASURES.items():
            qs = sorted(ref[name])
            a = np.array([ref[name][q][theirs] for q in qs])
            b = np.array([ref["order"][q][theirs] for q in qs])
            got = rec["comparisons"][name][ours]
            assert abs(got["delta"] - (a - b).mean()) <= 1e-9
            assert abs(got["p_ttest"] - ttest_rel(a, b).pvalue) <= 1e-9 * max(1.0, got["p_ttest"])
            # 10,000 seeded draws against 20,000 of ours: a few hundredths apart at most.
            assert abs(got["p_randomization"] - _sampled_sign_flip_p(a - b)) <= 0.03, (name, ours)
            raw.append(got["p_randomization"])
            keys.append((name, ours))
    for (name, ours), p in zip(keys, _holm(raw)):
        assert abs(rec["comparisons"][name][ours]["p_corrected"] - p) <= 1e-12
    # The reranker that favours the right answer is far better than the input order: marked.
    assert rec["comparisons"]["good.ranked"]["map"]["p_corrected"] < 0.05
    delta_line = r.output.splitlines()[3]
    assert delta_line.startswith("  Δ") and delta_line.count("*") == len(MEASURES), r.output
    # Seeded: the same command gives the same p-values.
    r2 = run_cli(["eval", tmp_path / "order.trec", tmp_path / "good.ranked.parquet", tmp_path / "ties.parquet",
                  "--qrels", QRELS, "--metrics", METRICS, "--json", tmp_path / "e2.json"])
    assert r2.exit_code == 0 and json.loads((tmp_path / "e2.json").read_text()) == rec


def test_exact_randomization_test_bonferroni_and_plot(tmp_path):
    """On 12 queries scipy enumerates all 4,096 sign flips: equal to the exact test written here."""
    runs = _arc_runs(12)
    for name in runs:
        _write_parquet(runs[name], tmp_path / f"{name}.parquet")
    js, png = tmp_path / "e.json", tmp_path / "c.png"
    r = run_cli(["eval", *(tmp_path / f"{n}.parquet" for n in runs), "--qrels", QRELS, "--metrics", "map,p@1",
                 "--correction", "bonferroni", "--name", "base", "--name", "a", "--name", "b", "--json", js,
                 "--plot", png])
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_text())
    assert rec["queries"] == 12 and list(rec["runs"]) == ["base", "a", "b"]
    for name in ("a", "b"):
        for m in ("map", "p@1"):
            qs = sorted(rec["per_query"]["base"])
            diff = np.array([rec["per_query"][name][q][m] - rec["per_query"]["base"][q][m] for q in qs])
            got = rec["comparisons"][name][m]
            want = _sign_flip_p(diff) if diff.any() else 1.0
            assert abs(got["p_randomization"] - want) <= 1e-9, (name, m, got, want)
            assert abs(got["p_corrected"] - min(1.0, 4 * got["p_randomization"])) <= 1e-12
    assert "Bonferroni-corrected over 4 comparisons" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # --test ttest corrects the t-test's p-values; a run that lacks a query is compared on the rest.
    del runs["ties"][sorted(runs["ties"])[0]]
    _write_parquet(runs["ties"], tmp_path / "ties.parquet")
    r = run_cli(["eval", *(tmp_path / f"{n}.parquet" for n in runs), "--qrels", QRELS, "--metrics", "map,p@1",
                 "--test", "ttest", "--correction", "holm", "--json", js])
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_text())
    assert rec["queries"] == 11 and len(rec["per_query"]["ties"]) == 11 and len(rec["per_query"]["good"]) == 12
    keys = [(n, m) for n in ("good", "ties") for m in ("map", "p@1")]
    for (n, m), p in zip(keys, _holm([rec["comparisons"][n][m]["p_ttest"] for n, m in keys])):
        assert abs(rec["comparisons"][n][m]["p_corrected"] - p) <= 1e-12
    qs = sorted(rec["per_query"]["ties"])
    a = np.array([rec["per_query"]["ties"][q]["map"] for q in qs])
    b = np.array([rec["per_query"]["order"][q]["map"] for q in qs])
    assert abs(rec["comparisons"]["ties"]["map"]["p_ttest"] - ttest_rel(a, b).pvalue) <= 1e-12
    assert "(good: Δ and p over the 12 judged queries it shares with order)" in r.output  # all three share 11
    assert "paired t-test, Holm-corrected over 4 comparisons" in r.output


def test_export_gives_the_numbers_of_the_parquet(tmp_path):
    runs = _arc_runs()
    scored = tmp_path / "ties.parquet"
    _write_parquet(runs["ties"], scored)  # ties everywhere: their order must survive the export
    trec = tmp_path / "ties.trec"
    r = run_cli(["export", scored, "-o", trec, "--tag", "mine"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()  # one log line (timestamped: not a terminal)
    assert len(lines) == 1 and lines[0].endswith(f"rerank-batch: wrote {trec} (4687 lines)"), r.output
    lines = [line.split() for line in trec.read_text().splitlines()]
    assert {line[5] for line in lines} == {"mine"} and {line[1] for line in lines} == {"Q0"}
    # Ranks 1..n per query in eval's order: score descending, ties by document id descending.
    want = _ranks(_float32(runs["ties"]))
    assert {(q, d): int(rank) for q, _, d, rank, _, _ in lines} == {(q, d): r for q in want for d, r in want[q].items()}
    outs = []
    for f in (scored, trec):
        js = tmp_path / f"{f.name}.json"
        assert run_cli(["eval", f, "--qrels", QRELS, "--metrics", METRICS, "--json", js]).exit_code == 0
        rec = json.loads(js.read_text())
        outs.append({k: v for k, v in rec.items() if k != "runs"})
    assert outs[0] == outs[1]
    # Refused when it exists, replaced with --overwrite.
    assert run_cli(["export", scored, "-o", trec]).exit_code == 2
    assert run_cli(["export", scored, "-o", trec, "--overwrite"]).exit_code == 0
    assert {line.split()[5] for line in trec.read_text().splitlines()} == {"ties"}


def _trec_dict(path) -> dict:
    out = {}
    for line in open(path):
        q, _, d, _, s, _ = line.split()
        out.setdefault(q, {})[d] = float(s)
    return out


def _ranks(run: dict) -> dict:
    out = {}
    for q, docs in run.items():
        order = sorted(docs, reverse=True)  # doc id descending, then a stable sort by score
        order = sorted(order, key=lambda d: -docs[d])
        out[q] = {d: i for i, d in enumerate(order, 1)}
    return out


def _minmax(run: dict) -> dict:
    out = {}
    for q, docs in run.items():
        lo, hi = min(docs.values()), max(docs.values())
        out[q] = {d: (s - lo) / (hi - lo) if hi > lo else 1.0 for d, s in docs.items()}
    return out


def test_fusion_by_hand_on_the_beir_sample_and_in_one_eval(tmp_path):
    beir = os.path.join(ROOT, "sample_data", "beir-mini")
    first = os.path.join(beir, "first-stage.trec")
    bm25 = _trec_dict(first)
    rng = random.Random(3)
    # The reranker scored the top 3 of each query only: the union has documents one run lacks.
    rer = {q: {d: rng.choice([0.3, 0.6, 0.9]) for d, r in ranks.items() if r <= 3} for q, ranks in _ranks(bm25).items()}
    _write_parquet(rer, tmp_path / "rer.parquet")
    rer = _float32(rer)
    out = tmp_path / "rrf.parquet"
    r = run_cli(["fuse", first, tmp_path / "rer.parquet", "--method", "rrf", "-o", out])
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    want = {}
    for run in (bm25, rer):
        for q, ranks in _ranks(run).items():
            for d, rank in ranks.items():
                want.setdefault(q, {}).setdefault(d, 0.0)
                want[q][d] += 1.0 / (60 + rank)
    assert len(got) == sum(len(v) for v in want.values()) == sum(len(v) for v in bm25.values())
    for row in got:
        assert abs(row["score"] - want[row["query_id"]][row["doc_id"]]) <= 1e-12
        assert row["rank"] == _ranks(want)[row["query_id"]][row["doc_id"]]
    # combsum and combmnz of min-max normalized scores, written as TREC.
    for method in ("combsum", "combmnz"):
        trec = tmp_path / f"{method}.trec"
        r = run_cli(["fuse", first, tmp_path / "rer.parquet", "--method", method, "-o", trec])
        assert r.exit_code == 0, r.output
        fused = _trec_dict(trec)
        a, b = _minmax(bm25), _minmax(rer)
        for q in bm25:
            for d in bm25[q]:
                s = a[q][d] + b.get(q, {}).get(d, 0.0)
                if method == "combmnz":
                    s *= 1 + (d in b.get(q, {}))
                assert abs(fused[q][d] - s) <= 1e-12, (method, q, d)
    # zscore and k change the result as their formulas say.
    r = run_cli(["fuse", first, tmp_path / "rer.parquet", "--method", "rrf", "--k", 1, "-o", tmp_path / "k1.parquet"])
    assert r.exit_code == 0
    q, d = next((q, d) for q in bm25 for d in bm25[q] if d not in rer[q])
    row = next(x for x in pq.read_table(tmp_path / "k1.parquet").to_pylist() if (x["query_id"], x["doc_id"]) == (q, d))
    assert abs(row["score"] - 1.0 / (1 + _ranks(bm25)[q][d])) <= 1e-12
    r = run_cli(["fuse", first, first, "--method", "combsum", "--norm", "zscore", "-o", tmp_path / "z.parquet"])
    assert r.exit_code == 0
    z = pq.read_table(tmp_path / "z.parquet").to_pylist()
    for q in bm25:
        s = np.array(list(bm25[q].values()))
        want_z = {d: 2 * (v - s.mean()) / s.std() for d, v in bm25[q].items()}
        for x in (x for x in z if x["query_id"] == q):
            assert abs(x["score"] - want_z[x["doc_id"]]) <= 1e-9
    # The first stage, the reranker and their fusion in one table.
    r = run_cli(["eval", first, tmp_path / "rer.parquet", out, "--qrels", os.path.join(beir, "qrels", "test.tsv")])
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.output.splitlines()[1:8]] == ["first-stage", "rer", "Δ", "p", "rrf", "Δ", "p"]


@pytest.mark.parametrize("args, message", [
    (["eval", "{s}", "{t}", "--qrels", "{q}", "--name", "a"],
     "--name was given 1 times for 2 runs; give it once per run, in the order of the runs, or not at all"),
    (["eval", "{s}", "{d}/s.trec", "--qrels", "{q}"],
     "{s} and {d}/s.trec are both named 's'; pass --name once per run to tell them apart"),
    (["eval", "{s}", "{t}", "--qrels", "{q}", "--baseline-col", "score"],
     "--baseline-col compares two columns of one run; with several runs the first RUN is the baseline"),
    (["eval", "{s}", "{t}", "--relevance-col", "rel"], "--relevance-col reads the judgments of one run"),
    (["eval", "{s}", "{t}"], "give --qrels FILE: several runs are judged against one set of qrels"),
    (["eval", "{s}", "{d}/unjudged.trec", "--qrels", "{q}"],
     "{d}/unjudged.trec: no query of the run is in the qrels; check --query-id-col and the qrels"),
    (["eval", "{d}/unjudged.trec", "--qrels", "{q}"],
     "{d}/unjudged.trec: no query of the run is in the qrels; check --query-id-col and the qrels"),
    (["eval", "{s}", "{d}/dup.trec", "--qrels", "{q}"],
     "{d}/dup.trec: document 'x' is given twice for query 'a' (lines 1 and 3); keep one line per (query, document)"),
    (["eval", "{d}/dup.parquet", "--qrels", "{q}"],
     "{d}/dup.parquet: document 'x' is given twice for query 'a' (rows 0 and 1, from 0); keep one line per"),
    (["eval", "{s}", "{d}/bad.trec", "--qrels", "{q}"],
     "{d}/bad.trec: line 2 has 4 fields, not a TREC run line ('qid Q0 docid rank score tag'); pass a TREC run"),
    (["eval", "{d}/badscore.trec", "--qrels", "{q}"],
     "{d}/badscore.trec: line 1: score 'high' is not a number; a TREC run line is 'qid Q0 docid rank score tag'"),
    (["eval", "{t}", "--qrels", "{q}", "--baseline-col", "first_stage"],
     "{t}: a TREC run has one score per document, no column 'first_stage'; pass the scored Parquet file instead"),
    (["export", "{d}/nope.parquet", "-o", "{d}/o.trec"], "{d}/nope.parquet: no such file"),
    (["export", "{d}/nulls.parquet", "-o", "{d}/o.trec"],
     "{d}/nulls.parquet: 1 documents have no score (first: query 'a', document 'y'); score every row"),
    (["export", "{s}", "-o", "{d}/o.trec", "--tag", "two words"], "--tag 'two words': a TREC tag is one word"),
    (["export", "{s}", "-o", "{s}"], "-o {s}: is also the input {s}"),
    (["fuse", "{s}", "--method", "rrf", "-o", "{d}/o.parquet"], "fuse needs two or more runs"),
    (["fuse", "{s}", "{t}", "--method", "rrf", "--norm", "zscore", "-o", "{d}/o.parquet"],
     "--norm applies to combsum and combmnz; rrf fuses ranks: drop --norm"),
    (["fuse", "{s}", "{t}", "--method", "combsum", "--k", "10", "-o", "{d}/o.parquet"],
     "--k applies to rrf; combsum and combmnz fuse scores: drop --k"),
    # Wrong column types and bad qrels were tracebacks (polars' cast errors, pytrec_eval's TypeError).
    (["eval", "{s}", "--qrels", "{q}", "--score-col", "query_id"],
     "{s}: column 'query_id' holds String, not scores; pass --score-col with a column of numbers"),
    (["eval", "{s}", "--qrels", "{q}", "--baseline-col", "query_id"],
     "{s}: column 'query_id' holds String, not scores; pass --baseline-col with a column of numbers"),
    (["export", "{s}", "-o", "{d}/o.trec", "--score-col", "doc_id"],
     "{s}: column 'doc_id' holds String, not scores; pass --score-col with a column of numbers"),
    (["eval", "{s}", "--qrels", "{d}/huge.txt"],
     "{d}/huge.txt: line 1: relevance '99999999999999999999' is out of range; grades are whole numbers such as 0"),
    (["eval", "{s}", "--qrels", "{d}/inf.txt"], "{d}/inf.txt: line 1: relevance 'inf' is out of range"),
    (["eval", "{s}", "--qrels", "{d}/nulldoc.parquet"],
     "{d}/nulldoc.parquet: row 1 (from 0): column 'doc_id' is null; fill it or drop the row"),
    (["eval", "{s}", "--qrels", "{d}/strrel.parquet"],
     "{d}/strrel.parquet: column 'relevance' holds String; qrels need whole-number grades such as 0, 1, 2 there"),
    (["eval", "{s}", "--qrels", "{d}/listqid.parquet"],
     "{d}/listqid.parquet: column 'query_id' holds List(String); qrels need strings or whole numbers there"),
    (["eval", "{s}", "--qrels", "{d}/garbage.parquet"], "{d}/garbage.parquet: not a readable Parquet file ("),
    (["eval", "{s}", "--qrels", "{q}", "--metrics", "ndcg@99999999999999999999"],
     "--metrics: 'ndcg@99999999999999999999': the cutoff must be at most 1,000,000; write ndcg@1000000 or less"),
    # nan passes a range check (every comparison with it is false): it once scored every row nan
    (["fuse", "{s}", "{t}", "--method", "rrf", "--k", "nan", "-o", "{d}/o.parquet"],
     "Invalid value for '--k': 'nan' is not a finite number; pass one like 60 or 0.05."),
    (["eval", "{s}", "--qrels", "{q}", "--alpha", "nan"],
     "Invalid value for '--alpha': 'nan' is not a finite number; pass one like 60 or 0.05."),
    (["fuse", "{s}", "{t}", "--method", "rrf", "--tag", "x", "-o", "{d}/o.parquet"],
     "--tag names the run in a TREC file; end -o in .trec or drop --tag"),
    (["fuse", "{s}", "{d}/bad.trec", "--method", "rrf", "-o", "{d}/o.parquet"], "{d}/bad.trec: line 2 has 4 fields"),
    (["fuse", "{s}", "{t}", "--method", "rrf", "-o", "{t}"], "-o {t}: is also the input {t}"),
])
def test_bad_runs_are_one_line_exit_2(tmp_path, args, message):
    s = tmp_path / "s.parquet"
    pq.write_table(pa.table({"query_id": ["a", "a"], "doc_id": ["x", "y"], "score": [0.5, 0.2]}), s)
    t = tmp_path / "t.trec"
    t.write_text("a Q0 x 1 2.5 bm25\na Q0 y 2 1.5 bm25\n")
    (tmp_path / "s.trec").write_text("a Q0 x 1 2.5 bm25\n")
    (tmp_path / "unjudged.trec").write_text("zz Q0 x 1 2.5 bm25\n")
    (tmp_path / "dup.trec").write_text("a Q0 x 1 2.5 bm25\na Q0 y 2 1.5 bm25\na Q0 x 3 1.0 bm25\n")
    (tmp_path / "bad.trec").write_text("a Q0 x 1 2.5 bm25\na Q0 y 2\n")
    (tmp_path / "badscore.trec").write_text("a Q0 x 1 high bm25\n")
    pq.write_table(pa.table({"query_id": ["a", "a"], "doc_id": ["x", "x"], "score": [0.5, 0.2]}), tmp_path / "dup.parquet")
    pq.write_table(pa.table({"query_id": ["a", "a"], "doc_id": ["x", "y"], "score": [0.5, None]}),
                   tmp_path / "nulls.parquet")
    q = tmp_path / "q.txt"
    q.write_text("a 0 x 1\n")
    (tmp_path / "huge.txt").write_text("a 0 x 99999999999999999999\n")
    (tmp_path / "inf.txt").write_text("a 0 x inf\n")
    pq.write_table(pa.table({"query_id": ["a", "a"], "doc_id": ["x", None], "relevance": [1, 0]}),
                   tmp_path / "nulldoc.parquet")
    pq.write_table(pa.table({"query_id": ["a"], "doc_id": ["x"], "relevance": ["abc"]}), tmp_path / "strrel.parquet")
    pq.write_table(pa.table({"query_id": [["a"]], "doc_id": ["x"], "relevance": [1]}), tmp_path / "listqid.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    fill = lambda a: str(a).replace("{s}", str(s)).replace("{t}", str(t)).replace("{q}", str(q)).replace(  # noqa: E731
        "{d}", str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    r = run_cli([fill(a) for a in args])
    assert r.exit_code == 2, r.output
    assert fill(message) in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing half-written


def test_parquet_qrels_take_whole_number_or_boolean_grades(tmp_path):
    from pipeline.evaluation.metrics import read_qrels

    for grades in ([True, False], [2, 0]):
        p = tmp_path / f"q{grades[0]}.parquet"
        pq.write_table(pa.table({"query_id": ["a", "b"], "doc_id": ["x", "y"], "relevance": grades}), p)
        assert read_qrels(str(p))["relevance"].to_list() == [int(g) for g in grades]
