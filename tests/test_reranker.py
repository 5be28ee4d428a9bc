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
import torch

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


def test_cross_encoder_arguments_on_a_yes_no_model(tied_model):
    """CrossEncoder's arguments on a yes/no causal reranker: activation_fn sees its one logit, yes
    minus no (the raw score of `--activation none`); sigmoid of it is the default score;
    apply_softmax and batch_size change nothing; a single pair gives one score."""
    from pipeline import Reranker

    t = real_pairs(4)
    pairs = list(zip(t.column("query").to_pylist(), t.column("document").to_pylist()))
    rr = Reranker(tied_model, max_length=200, max_batch_tokens=1024)
    default = rr.predict(pairs)
    raw = Reranker(tied_model, max_length=200, max_batch_tokens=1024, activation="none").predict(pairs)
    assert raw.std() > 1e-2
    logit = rr.predict(pairs, activation_fn=torch.nn.Identity())
    assert logit.dtype == np.float32 and logit.shape == (len(pairs),)
    assert np.abs(logit - raw).max() <= 1e-6
    assert np.abs(1 / (1 + np.exp(-raw.astype(np.float64))) - default).max() <= 1e-6
    assert np.abs(rr.predict(pairs, activation_fn=torch.sigmoid) - default).max() <= 1e-6
    for same in (rr.predict(pairs, apply_softmax=True), rr.predict(pairs, batch_size=1)):
        assert np.abs(same - default).max() <= 1e-6
    one = rr.predict(pairs[2])
    assert isinstance(one, np.float32) and abs(one - default[2]) <= 1e-6
    tensor = rr.predict(pairs, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (len(pairs),)
    rows = rr.predict(pairs, convert_to_numpy=False)
    assert isinstance(rows, list) and all(isinstance(r, torch.Tensor) and r.ndim == 0 for r in rows)
    assert np.abs(torch.stack(rows).numpy() - default).max() <= 1e-6
    q = pairs[0][0]
    docs = [d for _, d in pairs]
    hits = rr.rank(q, docs, activation_fn=torch.nn.Identity(), batch_size=8)
    want = rr.predict([(q, d) for d in docs], activation_fn=torch.nn.Identity())
    assert [h["corpus_id"] for h in hits] == list(np.argsort(-want, kind="stable"))
    assert all(abs(h["score"] - want[h["corpus_id"]]) <= 1e-6 for h in hits)


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

    # The list names only the options a Reranker uses: not the file or executor ones.
    with pytest.raises(TypeError) as err:
        Reranker(tied_model, batch_size=32)
    assert str(err.value) == (
        "Reranker() got unknown options batch_size; it takes: activation, activation_fn, aggregate, attention, "
        "chunk_overlap, chunk_tokens, compile, device, dtype, empty_cache_every, engine, family, gpu_memory_limit, "
        "instruction, max_batch_tokens, max_length, prefix_sharing, template, trust_remote_code, window_pairs")
    # Executor options at their defaults pass (a dict shared with run()); others would be ignored, so refused.
    with pytest.raises(TypeError, match=r"^Reranker\(devices='all'\): a Reranker scores in this process on one "
                                        r"device; devices is an option of `rerank-batch run` \(pipeline.run.run\); "
                                        r"pass device='cuda:N' here$"):
        Reranker(tied_model, devices="all", executor="local")
    rr = Reranker(tied_model, executor="local", devices=None, workers=None, device=None)  # device=None: auto
    assert rr.device.type == "cpu"
    with pytest.raises(InputError, match=r"pairs\[1\]: the document is NoneType"):
        rr.predict([("q", "d"), ("q", None)])
    with pytest.raises(InputError, match=r"^pair: the document is NoneType"):
        rr.predict(("q", None))
    with pytest.raises(InputError, match=r"^pair: expected \(query, document\) or \(query, document, "
                                        r"instruction\), got a list of 1$"):
        rr.predict(["q"])  # a list of strings is one pair, as in CrossEncoder
    with pytest.raises(InputError, match=r"^pairs\[1\]: expected \(query, document\) or \(query, document, "
                                        r"instruction\), got str$"):
        rr.predict([("q", "d"), "q"])
    with pytest.raises(InputError, match=r"^predict\(pairs\): got one string; pass a \(query, document\) pair "
                                        r"or a list of them$"):
        rr.predict("q")
    for bad in (0, -1, 2.5, True):
        for call in (lambda: rr.predict([("q", "d")], batch_size=bad), lambda: rr.rank("q", ["d"], batch_size=bad)):
            with pytest.raises(InputError, match=rf"^(predict|rank)\(batch_size={bad!r}\): pass a whole number of at "
                                                 r"least 1 \(it sizes nothing here: the token budget, "
                                                 r"max_batch_tokens=, does\)$"):
                call()
    with pytest.raises(TypeError, match="activation_fn returned ndarray, not a torch.Tensor"):
        rr.predict([("q", "d")], activation_fn=lambda x: x.numpy())
    # Two pairs once came back as one score: an aggregate is not a score per pair.
    with pytest.raises(TypeError, match=r"activation_fn returned shape \(\) for 2 pairs; pass an elementwise"):
        rr.predict([("q", "d"), ("q", "e")], activation_fn=lambda x: x.mean())
    with pytest.raises(TypeError, match=r"activation_fn returned shape \(1,\) for 2 pairs"):
        rr.predict([("q", "d"), ("q", "e")], activation_fn=lambda x: x.reshape(-1)[:1])
    # A lone surrogate has no UTF-8 form: it was the tokenizer's TypeError, naming no pair.
    with pytest.raises(InputError, match=r"^pairs\[1\]: the document is not valid Unicode text \(a lone surrogate at "
                                        r"character 2\); decode the text as UTF-8, or drop such characters$"):
        rr.predict([("q", "d"), ("q", "ab\ud800")])
    with pytest.raises(InputError, match=r"^pairs\[0\]: the instruction is not valid Unicode"):
        rr.predict([("q", "d", "\udcff")])
    with pytest.raises(InputError, match=r"^rank\(activation_fn=.*\): it gives 2 scores per document and rank "
                                        r"orders by one"):
        rr.rank("q", ["a", "b"], activation_fn=lambda x: torch.cat([x, -x], 1))
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
