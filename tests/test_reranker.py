"""`from pipeline import Reranker`: the CrossEncoder-style library API scores exactly as
`rerank-batch run` (the same engine), keeps input order, ranks best first, refuses bad pairs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, real_pairs, run_cli

from pipeline.errors import InputError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real pairs with their per-row instructions, shuffled so queries mix across windows."""
    t = real_pairs(40)
    t = t.take(pa.array(np.random.default_rng(3).permutation(t.num_rows)))
    p = tmp_path_factory.mktemp("rr") / "pairs.parquet"
    pq.write_table(t, p)
    return p, t


def _cli_scores(tmp_path, inp, model, *extra):
    out = tmp_path / "out.parquet"
    r = run_cli(["run", inp, "--model", model, "-o", out, "-q", "--overwrite", *extra])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    return dict(zip(t.column("doc_id").to_pylist(), t.column("score").to_numpy()))


def test_predict_equals_the_run_command_on_real_data(tmp_path, data, tied_model):
    from pipeline import Reranker

    inp, t = data
    cli = _cli_scores(tmp_path, inp, tied_model, "--window", 50, "--max-length", 160)
    rr = Reranker(tied_model, window_pairs=50, max_length=160)
    triples = list(zip(t.column("query").to_pylist(), t.column("document").to_pylist(),
                       t.column("instruction").to_pylist()))
    got = rr.predict(triples)
    assert got.dtype == np.float32 and got.shape == (t.num_rows,)
    want = np.array([cli[k] for k in t.column("doc_id").to_pylist()], dtype=np.float32)
    assert np.abs(got - want).max() <= 1e-6
    assert got.std() > 1e-3  # the scores spread, so equal arrays mean something
    # Pairs without an instruction take the `instruction` option, like rows without the column.
    cli2 = _cli_scores(tmp_path, _without_instruction(tmp_path, t), tied_model, "--window", 50, "--max-length", 160,
                       "--instruction", "Judge the passage")
    rr2 = Reranker(tied_model, window_pairs=50, max_length=160, instruction="Judge the passage")
    got2 = rr2.predict([(q, d) for q, d, _ in triples])
    want2 = np.array([cli2[k] for k in t.column("doc_id").to_pylist()], dtype=np.float32)
    assert np.abs(got2 - want2).max() <= 1e-6
    assert np.abs(got2 - got).max() > 1e-4  # the instruction matters


def _without_instruction(tmp_path, t):
    p = tmp_path / "noinstr.parquet"
    pq.write_table(t.drop_columns(["instruction"]), p)
    return p


def test_predict_keeps_input_order_and_rank_sorts(tied_model):
    from pipeline import Reranker

    t = real_pairs(12)
    q = t.column("query")[0].as_py()
    docs = t.column("document").to_pylist()
    rr = Reranker(tied_model, max_batch_tokens=512, max_length=200)  # several batches, sorted by length
    alone = np.array([rr.predict([(q, d)])[0] for d in docs])
    together = rr.predict([(q, d) for d in docs])
    assert np.abs(together - alone).max() <= 1e-6
    hits = rr.rank(q, docs)
    assert [h["corpus_id"] for h in hits] == list(np.argsort(-together, kind="stable"))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all("text" not in h for h in hits)
    top = rr.rank(q, docs, top_k=3, return_documents=True)
    assert [h["corpus_id"] for h in top] == [h["corpus_id"] for h in hits[:3]]
    assert [h["text"] for h in top] == [docs[h["corpus_id"]] for h in top]
    assert rr.predict([]).shape == (0,) and rr.rank(q, []) == []


def test_cross_encoder_family_equals_the_run_command(tmp_path, data):
    from pipeline import Reranker
    from pipeline.bench.synthetic import build_cross_encoder

    inp, t = data
    model = str(build_cross_encoder(tmp_path / "bert", "bert", t.column("document").to_pylist(), num_labels=1))
    cli = _cli_scores(tmp_path, inp, model, "--max-length", 96)
    got = Reranker(model, max_length=96).predict(list(zip(t.column("query").to_pylist(),
                                                         t.column("document").to_pylist())))
    want = np.array([cli[k] for k in t.column("doc_id").to_pylist()], dtype=np.float32)
    assert np.abs(got - want).max() <= 1e-6


def test_bad_pairs_and_options_are_refused(tied_model):
    from pipeline import Reranker

    with pytest.raises(TypeError, match="unknown options batch_size"):
        Reranker(tied_model, batch_size=32)
    rr = Reranker(tied_model)
    with pytest.raises(InputError, match=r"pairs\[1\]: the document is NoneType"):
        rr.predict([("q", "d"), ("q", None)])
    with pytest.raises(InputError, match="not a single pair"):
        rr.predict(("q", "d"))
    with pytest.raises(InputError, match=r"pairs\[0\]: expected \(query, document\)"):
        rr.predict(["q"])
    with pytest.raises(InputError, match="documents is one string"):
        rr.rank("q", "one document")
    # Numbers and devices the CLI's option types refuse are refused in Python too (they were a
    # ValueError, a RuntimeError, or a ranking short of its last document for top_k=-1).
    for bad, match in (({"window_pairs": 0}, "window_pairs=0: must be a whole number of at least 1"),
                       ({"max_length": -5}, "max_length=-5"), ({"device": "gpu"}, "device='gpu': not a device")):
        with pytest.raises(InputError, match=match):
            Reranker(tied_model, **bad)
    for k in (0, -1):
        with pytest.raises(InputError, match=f"rank\\(top_k={k}\\)"):
            rr.rank("q", ["a", "b"], top_k=k)
    from pipeline.config import RunConfig
    from pipeline.run import run

    with pytest.raises(InputError, match="top_k=0"):
        RunConfig(inputs=(), output="", top_k=0)
    with pytest.raises(InputError, match="no input given"):
        run(RunConfig(inputs=[], output="/tmp/none.parquet", model=tied_model))


def test_importing_the_config_stays_light():
    code = ("import sys, pipeline, pipeline.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert out.strip() == "[]"
