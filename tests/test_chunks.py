"""Long documents as overlapping windows (--chunk-tokens): scores equal the reference recipe run on
the windows (float32, CPU, 1e-5), aggregated per row; a document of one window is scored as itself;
the options, the fingerprint, the window-scores file, nested input, --top-k, other families, the
Python API and eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import _corpus, real_pairs, reference_scores, run_cli, shared
from pipeline.config import RunConfig
from pipeline.run import run

TOL = 1e-5
N, M = 12, 3  # small windows, so that the real documents (3 to 244 tokens) really split


def reference_windows(model_dir, documents, n, m):
    """Each document's windows as the option says, written out with transformers' tokenizer:
    its ids alone (no special tokens), windows [jS, jS + N), their decoded text; one window: the
    document itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    s = n - m
    out = []
    for d in documents:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        k = 1 + (-(-(len(ids) - n) // s) if len(ids) > n else 0)
        out.append([d] if k == 1 else [tok.decode(ids[j * s:j * s + n]) for j in range(k)])
    return out


def aggregate_ref(scores, how):
    return {"max": max, "first": lambda s: s[0], "mean": lambda s: float(np.mean(np.asarray(s, np.float64)))}[how](
        scores)


@pytest.fixture(scope="module")
def data(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("chunks")
    src = real_pairs(40)  # 120 real pairs of three sets
    inp = d / "pairs.parquet"
    pq.write_table(src, inp)
    model = models["tied"]
    instr, queries, docs = (src.column(c).to_pylist() for c in ("instruction", "query", "document"))
    windows = reference_windows(model, docs, N, M)
    flat = [(i, q, w) for i, q, ws in zip(instr, queries, windows) for w in ws]
    ref = reference_scores(model, *zip(*flat))
    per_doc, pos = [], 0
    for ws in windows:
        per_doc.append([float(x) for x in ref[pos:pos + len(ws)]])
        pos += len(ws)
    return {"dir": d, "input": inp, "src": src, "model": model, "windows": windows, "ref": per_doc}


def _run(tmp_path, inp, model, name="out", **kw):
    cfg = RunConfig(inputs=(str(inp),), output=str(tmp_path / f"{name}.parquet"), model=model, device="cpu",
                    overwrite=True, restart=True, **kw)
    summary = run(cfg, progress=False)
    return pq.read_table(cfg.output), summary


def _by_doc(t):
    return {r["doc_id"]: r for r in t.to_pylist()}


@pytest.mark.parametrize("aggregate, engine", [("max", "fused"), ("first", "fused"), ("mean", "fused"),
                                               ("max", "transformers")])
def test_windows_score_as_the_reference_on_them(data, tmp_path, aggregate, engine):
    split = sum(len(w) > 1 for w in data["windows"])
    assert split > 40 and max(len(w) for w in data["windows"]) >= 5  # the documents really split
    cs = tmp_path / "cs.parquet"
    out, summary = _run(tmp_path, data["input"], data["model"], chunk_tokens=N, aggregate=aggregate,
                        chunk_scores=str(cs), window_pairs=25, engine=engine)
    assert out.num_rows == 120
    assert out.column_names[-4:] == ["score", "chunks", "best_chunk", "rank"]
    got = _by_doc(out)
    worst = 0.0
    for doc_id, ref in zip(data["src"].column("doc_id").to_pylist(), data["ref"]):
        row = got[doc_id]
        assert row["chunks"] == len(ref)
        worst = max(worst, abs(row["score"] - aggregate_ref(ref, aggregate)))
        order = sorted(ref, reverse=True)
        if len(ref) == 1 or order[0] - order[1] > 1e-4:  # a clear best window
            assert row["best_chunk"] == int(np.argmax(ref))
        else:
            assert ref[row["best_chunk"]] >= order[0] - TOL
    assert worst <= TOL, worst
    assert np.std([s for r in data["ref"] for s in r]) > 0.02  # the scores spread: equality means something
    # Every window's score, in input order then window order, with its first token.
    t = pq.read_table(cs)
    assert t.schema.names == ["query_id", "doc_id", "chunk", "start_token", "score"]
    want = [(q, d, j, j * (N - M)) for q, d, ref in zip(data["src"].column("query_id").to_pylist(),
                                                        data["src"].column("doc_id").to_pylist(), data["ref"])
            for j in range(len(ref))]
    assert list(zip(*(t.column(c).to_pylist() for c in ("query_id", "doc_id", "chunk", "start_token")))) == want
    flat_ref = np.array([s for r in data["ref"] for s in r], dtype=np.float32)
    assert np.abs(t.column("score").to_numpy() - flat_ref).max() <= TOL
    ch = summary.extra["chunking"]
    assert ch == {"documents": 120, "split": sum(len(w) > 1 for w in data["windows"]),
                  "windows": sum(len(w) for w in data["windows"])}
    assert summary.pairs_scored == ch["windows"] and summary.rows == 120


def test_default_overlap_is_a_quarter_of_the_window(data, tmp_path):
    out, _ = _run(tmp_path, data["input"], data["model"], chunk_tokens=N)  # M = N // 4 = 3
    got = _by_doc(out)
    for doc_id, ref in zip(data["src"].column("doc_id").to_pylist(), data["ref"]):
        assert got[doc_id]["chunks"] == len(ref)
        assert abs(got[doc_id]["score"] - max(ref)) <= TOL


def test_a_document_of_one_window_is_scored_as_itself(data, tmp_path):
    plain, _ = _run(tmp_path, data["input"], data["model"], "plain", window_pairs=25)
    whole, _ = _run(tmp_path, data["input"], data["model"], "whole", window_pairs=25, chunk_tokens=4096)
    # Every document fits: the same pairs, batches and scores as a run without chunking.
    assert whole.drop_columns(["chunks", "best_chunk"]).equals(plain)
    assert set(whole.column("chunks").to_pylist()) == {1} and set(whole.column("best_chunk").to_pylist()) == {0}
    # In a run that splits others, a document that fits keeps its unchunked score.
    split, _ = _run(tmp_path, data["input"], data["model"], "split", window_pairs=25, chunk_tokens=N, chunk_overlap=M)
    p, s = _by_doc(plain), _by_doc(split)
    ones = [d for d in p if s[d]["chunks"] == 1]
    assert len(ones) > 20
    assert max(abs(p[d]["score"] - s[d]["score"]) for d in ones) <= 1e-6


def test_windows_of_a_row_share_the_query_prefix(data, tmp_path):
    """The windows of one row are candidates of one (instruction, query) group, so the prefix-sharing
    path computes their prompt prefix once per batch: same scores, fewer tokens through the model."""
    from pipeline.data.chunks import Chunking, expand
    from pipeline.data.pairs import UnitPairs
    from pipeline.engines.score import load_engine

    src = data["src"].slice(0, 6)
    scorer = load_engine(RunConfig(inputs=(), output="", model=data["model"], device="cpu"))
    base = UnitPairs(src, src.column("instruction").to_pylist(), src.column("query").to_pylist(),
                     src.column("document").to_pylist(), np.ones(6, bool))
    pairs = expand(base, Chunking(N, M, "max"), scorer.encoder.tokenizer)
    enc = scorer.encoder.encode(pairs.instructions, pairs.queries, pairs.documents)
    owner = np.repeat(np.arange(6), pairs.chunks.counts)
    for r in range(6):
        assert len(set(enc.keys[owner == r].tolist())) == 1
    on, s_on = _run(tmp_path, data["input"], data["model"], "on", chunk_tokens=N, chunk_overlap=M,
                    prefix_sharing="on")
    off, s_off = _run(tmp_path, data["input"], data["model"], "off", chunk_tokens=N, chunk_overlap=M,
                      prefix_sharing="off")
    a, b = _by_doc(on), _by_doc(off)
    assert max(abs(a[d]["score"] - b[d]["score"]) for d in a) <= TOL
    assert s_on.extra["tokens_after_sharing"] < 0.6 * s_off.extra["tokens_after_sharing"]
    assert s_on.tokens == s_off.tokens


def test_nested_input_gives_the_long_forms_windows(tmp_path, models):
    nested = pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 25)
    long = pq.read_table(shared("ARC-Challenge.long.parquet"))
    long = long.filter(pc.is_in(long.column("query_id"), nested.column("query_id").combine_chunks()))
    pn, pl_ = tmp_path / "n.parquet", tmp_path / "l.parquet"
    pq.write_table(nested, pn)
    pq.write_table(long, pl_)
    csn, csl = tmp_path / "csn.parquet", tmp_path / "csl.parquet"
    on, _ = _run(tmp_path, pn, models["tied"], "on", window_pairs=7, chunk_tokens=N, chunk_scores=str(csn))
    ol, _ = _run(tmp_path, pl_, models["tied"], "ol", chunk_tokens=N, chunk_scores=str(csl))
    assert on.num_rows == long.num_rows
    n = {f"{r['query_id']}-d{r['doc_index']}": r for r in on.to_pylist()}
    lo = _by_doc(ol)
    assert set(n) == set(lo) and any(r["chunks"] > 1 for r in lo.values())
    for k, r in lo.items():
        assert n[k]["chunks"] == r["chunks"] and abs(n[k]["score"] - r["score"]) <= TOL
    # Without a doc_id column the file names a nested document by its doc_index.
    tn = pq.read_table(csn)
    assert tn.schema.field("doc_id").type == pa.int32()
    keyed = {(q, f"{q}-d{i}", j): s for q, i, j, s in zip(*(tn.column(c).to_pylist()
                                                           for c in ("query_id", "doc_id", "chunk", "score")))}
    tl = pq.read_table(csl)
    other = {(q, d, j): s for q, d, j, s in zip(*(tl.column(c).to_pylist() for c in ("query_id", "doc_id", "chunk",
                                                                                       "score")))}
    assert set(keyed) == set(other) and max(abs(keyed[k] - other[k]) for k in other) <= TOL


def test_top_k_ranks_by_the_aggregate(data, tmp_path):
    full, _ = _run(tmp_path, data["input"], data["model"], "full", chunk_tokens=N, chunk_overlap=M)
    top, _ = _run(tmp_path, data["input"], data["model"], "top", chunk_tokens=N, chunk_overlap=M, top_k=2)
    want = full.filter(pc.less_equal(full.column("rank"), 2))
    assert top.equals(want)
    # Ranks follow the aggregate score within each query.
    for q in set(full.column("query_id").to_pylist()):
        rows = [r for r in full.to_pylist() if r["query_id"] == q]
        assert [r["rank"] for r in sorted(rows, key=lambda r: -r["score"])] == list(range(1, len(rows) + 1))


def test_long_form_without_ids_names_rows(tmp_path, models):
    src = real_pairs(10).select(["query", "document"])
    inp = tmp_path / "noid.parquet"
    pq.write_table(src, inp)
    cs = tmp_path / "cs.parquet"
    out, _ = _run(tmp_path, inp, models["tied"], chunk_tokens=N, chunk_scores=str(cs), window_pairs=7)
    t = pq.read_table(cs)
    assert t.schema.field("doc_id").type == pa.int64()
    counts = {}
    for q, d in zip(t.column("query_id").to_pylist(), t.column("doc_id").to_pylist()):
        assert q == src.column("query")[d].as_py()  # the query text, and the 0-based input row
        counts[d] = counts.get(d, 0) + 1
    by_text = {r["document"]: r["chunks"] for r in out.to_pylist()}
    assert [counts[i] for i in range(src.num_rows)] == [by_text[d] for d in src.column("document").to_pylist()]


def test_skipped_nulls_and_empty_lists_have_null_windows(tmp_path, models):
    inp = tmp_path / "nulls.parquet"
    long_doc = " ".join(["the cat sat on the mat"] * 10)
    pq.write_table(pa.table({"query": ["q", "q", "q"], "document": [long_doc, None, ""]}), inp)
    cs = tmp_path / "cs.parquet"
    out, s = _run(tmp_path, inp, models["tied"], chunk_tokens=N, on_null="skip", chunk_scores=str(cs))
    rows = out.to_pylist()
    assert [r["document"] for r in rows[:2]] in ([long_doc, ""], ["", long_doc]) and rows[2]["document"] is None
    assert rows[2]["score"] is None and rows[2]["chunks"] is None and rows[2]["best_chunk"] is None
    by = {r["document"]: r for r in rows[:2]}
    assert by[long_doc]["chunks"] > 3 and by[""]["chunks"] == 1
    assert pq.read_table(cs).num_rows == by[long_doc]["chunks"] + 1
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "documents": [[long_doc, "x"], []]}), nested)
    out, s = _run(tmp_path, nested, models["tied"], "n", chunk_tokens=N)
    assert out.column("chunks").to_pylist()[-1] is None and s.empty_lists == 1


# -- options, checkpoints ------------------------------------------------------------------------

BAD = [
    (["--chunk-tokens", "4"], "--chunk-tokens 4: a window must hold at least 8 tokens; pass --chunk-tokens 8 or more"),
    # once an overflow traceback in the window arithmetic, after the model had loaded
    (["--chunk-tokens", "99999999999999999999"], "--chunk-tokens 99999999999999999999: a window holds at most "
     "16,777,216 tokens; pass --chunk-tokens 16777216 or less (a document shorter than N is one window)"),
    (["--chunk-tokens", "16", "--chunk-overlap", "16"],
     "--chunk-overlap 16: consecutive windows must share from 0 to 15 tokens (fewer than --chunk-tokens 16); pass "
     "--chunk-overlap 0 to 15"),
    (["--chunk-tokens", "16", "--chunk-overlap", "-1"], "--chunk-overlap -1: consecutive windows must share from 0"),
    (["--chunk-tokens", "16", "--aggregate", "bogus"],
     "--aggregate 'bogus': not a way to aggregate windows; pass max (the best window's score), first or mean"),
    (["--chunk-overlap", "4"], "--chunk-overlap needs --chunk-tokens: pass --chunk-tokens N to score long documents "
     "as windows of N tokens, or drop --chunk-overlap"),
    (["--aggregate", "mean"], "--aggregate needs --chunk-tokens"),
    (["--chunk-scores", "{d}/cs.parquet"], "--chunk-scores needs --chunk-tokens"),
    (["--chunk-tokens", "16", "--chunk-scores", "{d}/exists.parquet"],
     "--chunk-scores {d}/exists.parquet: exists; pass --overwrite to replace it"),
    (["--chunk-tokens", "16", "--chunk-scores", "{d}"], "--chunk-scores {d}: is a directory; pass a file path"),
    (["--chunk-tokens", "16", "--chunk-scores", "{d}/in.parquet"], "--chunk-scores {d}/in.parquet: is also the input"),
    (["--chunk-tokens", "16", "--chunk-scores", "{d}/nowhere/cs.parquet"],
     "--chunk-scores {d}/nowhere/cs.parquet: the directory {d}/nowhere does not exist"),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_exit_2_with_one_line(tmp_path, extra, expected):
    d = str(tmp_path)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["q"], "document": ["d"]}), inp)
    (tmp_path / "exists.parquet").write_bytes(b"x")
    out = tmp_path / "out.parquet"
    r = run_cli(["run", inp, "--model", "sample_data/tiny-qwen3-reranker", "-o", out,
                 *[a.replace("{d}", d) for a in extra]])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected.replace("{d}", d) in errors[0], r.output
    assert "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["exists.parquet", "in.parquet"]  # no output, checkpoint or temp file


def test_an_input_column_the_output_adds_is_refused(tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["q"], "document": ["d"], "chunks": [3]}), inp)
    r = run_cli(["run", inp, "--model", "sample_data/tiny-qwen3-reranker", "-o", tmp_path / "o.parquet",
                 "--chunk-tokens", "16"])
    assert r.exit_code == 2
    assert "the input already has a column 'chunks', which the output adds; rename or drop it first" in r.output
    # Without chunking the column is just another column.
    r = run_cli(["run", inp, "--model", "sample_data/tiny-qwen3-reranker", "-o", tmp_path / "o.parquet", "-q"])
    assert r.exit_code == 0, r.output


def test_the_fingerprint_holds_the_chunking_options(data, tmp_path):
    from pipeline.errors import Interrupted

    out = tmp_path / "o.parquet"
    done = tmp_path / "o.parquet.ckpt" / "done"

    def stop():  # once a unit is committed
        return done.is_dir() and any(done.iterdir())
    stop.signum = 15
    with pytest.raises(Interrupted):
        run(RunConfig(inputs=(str(data["input"]),), output=str(out), model=data["model"], device="cpu",
                      window_pairs=20, chunk_tokens=N, chunk_overlap=M), progress=False, should_stop=stop)
    fp = json.loads((tmp_path / "o.parquet.ckpt" / "fingerprint.json").read_text())
    assert fp["options"]["chunking"] == [N, M, "max"]
    base = ["run", data["input"], "--model", data["model"], "--device", "cpu", "--window", 20, "-o", out, "-q"]
    cases = [
        ([], "the checkpoint was made with --chunk-tokens 12 --chunk-overlap 3 --aggregate max, this run has no "
             "--chunk-tokens; rerun with --chunk-tokens 12 --chunk-overlap 3 --aggregate max to resume, or pass "
             "--restart to start over"),
        (["--chunk-tokens", N, "--chunk-overlap", 2], "the checkpoint was made with --chunk-tokens 12 --chunk-overlap 3 --aggregate max, "
                                "this run has --chunk-tokens 12 --chunk-overlap 2 --aggregate max; rerun with"),
        (["--chunk-tokens", N, "--chunk-overlap", M, "--aggregate", "mean"],
         "this run has --chunk-tokens 12 --chunk-overlap 3 --aggregate mean; rerun with --chunk-tokens 12 "
         "--chunk-overlap 3 --aggregate max to resume"),
    ]
    for extra, message in cases:
        r = run_cli(base + extra)
        assert r.exit_code == 2 and message in r.output, r.output
    # --chunk-scores is an output, not a score option: the same run resumes with it.
    r = run_cli(base + ["--chunk-tokens", N, "--chunk-overlap", M, "--chunk-scores", tmp_path / "cs.parquet"])
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "cs.parquet").num_rows == sum(len(r) for r in data["ref"])


def test_fingerprint_without_chunking_is_unchanged():
    """A checkpoint made before the options existed has no such keys: None on both sides."""
    from pipeline.storage.fingerprint import diff_fingerprints

    fields = RunConfig(inputs=(), output="x").score_fields()
    assert fields["chunking"] is None
    old = {k: v for k, v in fields.items() if k != "chunking"}
    assert diff_fingerprints({"options": old}, {"options": fields}) is None


# -- tokenizers: a document's ids and a window's text as transformers gives them ----------------------

@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from pipeline.bench.synthetic import build_cross_encoder, build_qwen3_seq_cls

    texts = _corpus()
    d = {arch: str(build_cross_encoder(tmp_path_factory.mktemp(arch), arch, texts, num_labels=labels))
         for arch, labels in (("bert", 1), ("xlm-roberta", 1), ("modernbert", 2))}
    d["qwen3-seq-cls"] = str(build_qwen3_seq_cls(tmp_path_factory.mktemp("q3cls"), texts))
    return d


@pytest.mark.parametrize("which", ["qwen", "bert", "xlm-roberta", "modernbert"])
def test_document_ids_and_window_text_equal_transformers(models, family_models, which):
    from transformers import AutoTokenizer

    from pipeline.engines import loading
    from pipeline.engines.doc_tokens import DocumentTokens

    model = models["tied"] if which == "qwen" else family_models[which]
    cfg = RunConfig(inputs=(), output="", model=model, device="cpu")
    ours = loading.load(cfg).tokenizer  # the tokenizer a run uses (read without transformers where it can)
    assert type(ours).__module__.startswith("pipeline.engines.")  # the path under test
    ref = AutoTokenizer.from_pretrained(model)
    docs = real_pairs(60).column("document").to_pylist() + ["  Two  spaces , and 'quotes' aren't .", ""]
    dt = DocumentTokens(ours)
    flat, lens = dt.tokenize(docs)
    want = [ref(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert lens.tolist() == [len(w) for w in want] and flat.tolist() == [t for w in want for t in w]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    a = starts + lens // 3
    b = np.minimum(a + 7, starts + lens)
    texts = dt.decode(flat, a, b)
    assert texts == [ref.decode(flat[x:y].tolist()) for x, y in zip(a, b)]
    # The transformers tokenizer itself goes through its own decode.
    assert DocumentTokens(ref).decode(flat, a, b) == texts


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "modernbert"])
def test_cross_encoder_window_is_the_second_segment(tmp_path, family_models, arch):
    from test_families import _ref_cross_encoder

    model = family_models[arch]
    src = real_pairs(25)
    inp = tmp_path / "p.parquet"
    pq.write_table(src, inp)
    out, _ = _run(tmp_path, inp, model, chunk_tokens=8, chunk_overlap=2, window_pairs=30, max_length=96)
    windows = reference_windows(model, src.column("document").to_pylist(), 8, 2)
    queries = [q for q, ws in zip(src.column("query").to_pylist(), windows) for _ in ws]
    ref = _ref_cross_encoder(model, queries, [w for ws in windows for w in ws], 96)
    got = _by_doc(out)
    pos, worst = 0, 0.0
    for doc_id, ws in zip(src.column("doc_id").to_pylist(), windows):
        assert got[doc_id]["chunks"] == len(ws)
        worst = max(worst, abs(got[doc_id]["score"] - float(ref[pos:pos + len(ws)].max())))
        pos += len(ws)
    assert sum(len(w) > 1 for w in windows) > 20 and ref.std() > 0.02
    assert worst <= TOL, worst


def test_seq_cls_decoder_windows(tmp_path, family_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.engines.template import QWEN3_RERANKER
    from test_families import _left_padded, _template_ids

    m = family_models["qwen3-seq-cls"]
    src = real_pairs(15)
    inp = tmp_path / "p.parquet"
    pq.write_table(src, inp)
    out, _ = _run(tmp_path, inp, m, chunk_tokens=N, chunk_overlap=M, aggregate="first")
    windows = reference_windows(m, src.column("document").to_pylist(), N, M)
    tok = AutoTokenizer.from_pretrained(m)
    model = AutoModelForSequenceClassification.from_pretrained(m, dtype=torch.float32).eval()
    got = _by_doc(out)
    for row, ws in zip(src.to_pylist(), windows):
        ids, mask = _left_padded(tok, [_template_ids(tok, QWEN3_RERANKER, row["instruction"], row["query"], ws[0],
                                                     8192)])
        with torch.no_grad():
            first = torch.sigmoid(model(input_ids=ids, attention_mask=mask).logits[0, 0]).item()
        assert got[row["doc_id"]]["chunks"] == len(ws)
        assert abs(got[row["doc_id"]]["score"] - first) <= TOL


# -- Python API, eval --------------------------------------------------------------------------------

def test_reranker_predict_and_rank_with_windows(data, tmp_path):
    from pipeline.errors import InputError
    from pipeline.reranker import Reranker

    r = Reranker(data["model"], device="cpu")
    src = data["src"]
    triples = list(zip(src.column("query").to_pylist(), src.column("document").to_pylist(),
                       src.column("instruction").to_pylist()))
    scores = r.predict(triples, chunk_tokens=N, chunk_overlap=M)
    ref = np.array([max(s) for s in data["ref"]], dtype=np.float32)
    assert scores.dtype == np.float32 and np.abs(scores - ref).max() <= TOL
    mean = r.predict(triples, chunk_tokens=N, chunk_overlap=M, aggregate="mean")
    assert np.abs(mean - np.array([np.mean(s) for s in data["ref"]])).max() <= TOL
    # The run's scores, to 1e-6: the same windows in the same batches.
    out, _ = _run(tmp_path, data["input"], data["model"], chunk_tokens=N, chunk_overlap=M)
    got = _by_doc(out)
    assert max(abs(got[d]["score"] - s) for d, s in zip(src.column("doc_id").to_pylist(), scores)) <= 1e-6
    # Whole documents without chunk_tokens, as before.
    assert np.abs(r.predict(triples[:5]) - reference_scores(data["model"], *zip(*[(i, q, d) for q, d, i in
                                                                                  triples[:5]]))).max() <= TOL
    q = triples[0][0]
    docs = [t[1] for t in triples[:4]]
    hits = r.rank(q, docs, chunk_tokens=N, chunk_overlap=M, instruction=triples[0][2], return_documents=True)
    windows = [len(w) for w in data["windows"][:4]]
    assert [h["chunks"] for h in sorted(hits, key=lambda h: h["corpus_id"])] == windows
    assert all(h["text"] == docs[h["corpus_id"]] and 0 <= h["best_chunk"] < h["chunks"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # A default for every call, and the same checks as the command's, named as keywords.
    r2 = Reranker(data["model"], device="cpu", chunk_tokens=N, chunk_overlap=M)
    assert np.abs(r2.predict(triples[:10]) - scores[:10]).max() <= 1e-6
    with pytest.raises(InputError, match=r"chunk_tokens=4: a window must hold at least 8 tokens"):
        r.predict(triples[:2], chunk_tokens=4)
    with pytest.raises(InputError, match=r"aggregate='median': not a way to aggregate"):
        r.predict(triples[:2], chunk_tokens=N, aggregate="median")
    with pytest.raises(InputError, match=r"chunk_overlap needs chunk_tokens"):
        r.predict(triples[:2], chunk_overlap=3)


def test_eval_reads_a_chunked_run(tmp_path, models):
    src = pq.read_table(shared("ARC-Challenge.long.parquet")).slice(0, 200)
    inp = tmp_path / "arc.parquet"
    pq.write_table(src, inp)
    out = tmp_path / "ranked.parquet"
    r = run_cli(["run", inp, "--model", models["tied"], "-o", out, "-q", "--chunk-tokens", N,
                 "--chunk-scores", tmp_path / "cs.parquet"])
    assert r.exit_code == 0, r.output
    j = tmp_path / "m.json"
    r = run_cli(["eval", out, "--qrels", shared("ARC-Challenge.qrels.txt"), "--json", j, "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads(j.read_text())
    assert m["queries"] == len(set(src.column("query_id").to_pylist())) and 0 < m["mrr"] <= 1
    # The window file is one row per window, not a run: eval says so and names the file to give.
    r = run_cli(["eval", tmp_path / "cs.parquet", "--qrels", shared("ARC-Challenge.qrels.txt")])
    assert r.exit_code == 2
    assert "is given twice for query" in r.output
    assert "this is a --chunk-scores file (a row per window): evaluate the run's ranked output instead" in r.output
