"""Scores equal the official recipe (float32, CPU) to 1e-5 on real pairs, on every path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import DEFAULT_INSTRUCTION, real_pairs, reference_scores, shared
from pipeline.config import RunConfig
from pipeline.run import run

TOL = 1e-5


def _run(tmp_path, inp, model, name="out", **kw):
    # float32 on the CPU, also where a GPU is present ("auto" would pick CUDA and bfloat16).
    cfg = RunConfig(inputs=(str(inp),), output=str(tmp_path / f"{name}.parquet"), model=model, device="cpu",
                    **kw)
    run(cfg, progress=False)
    return pq.read_table(cfg.output)


def _by(table, key="doc_id"):
    return dict(zip(table.column(key).to_pylist(), table.column("score").to_numpy()))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(real_pairs(120), path)  # 360 real pairs from three sets
    return path


@pytest.mark.parametrize("engine", ["fused", "transformers"])
@pytest.mark.parametrize("which", ["tied", "untied"])
@pytest.mark.parametrize("max_length", [8192, 120])
def test_scores_equal_reference(tmp_path, models, pairs_file, which, max_length, engine):
    model = models[which]
    out = _run(tmp_path, pairs_file, model, max_length=max_length, window_pairs=100, engine=engine)
    src = pq.read_table(pairs_file)
    ref = reference_scores(model, src.column("instruction").to_pylist(), src.column("query").to_pylist(),
                           src.column("document").to_pylist(), max_length=max_length)
    got = _by(out)
    ours = np.array([got[d] for d in src.column("doc_id").to_pylist()])
    assert len(ours) == 360
    # The model's scores must spread, or equality would prove nothing.
    assert ref.std() > 0.02, ref.std()
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()
    if max_length == 120:
        from transformers import AutoTokenizer

        # The small max length must really truncate a good share of these pairs.
        tok = AutoTokenizer.from_pretrained(model)
        lens = [len(x) for x in tok([f"{q}{d}" for q, d in zip(src.column("query").to_pylist(),
                                                               src.column("document").to_pylist())])["input_ids"]]
        assert sum(n > 60 for n in lens) > 50


def test_default_instruction_path(tmp_path, tied_model, pairs_file):
    src = pq.read_table(pairs_file).drop_columns(["instruction"]).slice(0, 150)
    path = tmp_path / "noinstr.parquet"
    pq.write_table(src, path)
    out = _run(tmp_path, path, tied_model)
    ref = reference_scores(tied_model, [DEFAULT_INSTRUCTION] * src.num_rows, src.column("query").to_pylist(),
                           src.column("document").to_pylist())
    got = _by(out)
    ours = np.array([got[d] for d in src.column("doc_id").to_pylist()])
    assert np.abs(ours - ref).max() <= TOL


def test_null_instruction_falls_back_to_option(tmp_path, tied_model, pairs_file):
    src = pq.read_table(pairs_file).slice(0, 40)
    instr = src.column("instruction").to_pylist()
    instr[::2] = [None] * len(instr[::2])
    src = src.set_column(src.schema.get_field_index("instruction"), "instruction", pa.array(instr, pa.large_string()))
    path = tmp_path / "nullinstr.parquet"
    pq.write_table(src, path)
    out = _run(tmp_path, path, tied_model, instruction="Pick the right answer.")
    ref = reference_scores(tied_model, [i or "Pick the right answer." for i in instr],
                           src.column("query").to_pylist(), src.column("document").to_pylist())
    got = _by(out)
    assert np.abs(np.array([got[d] for d in src.column("doc_id").to_pylist()]) - ref).max() <= TOL


@pytest.mark.parametrize("engine", ["fused", "transformers"])
def test_scores_do_not_depend_on_batch_composition(tmp_path, tied_model, pairs_file, engine):
    one = _by(_run(tmp_path, pairs_file, tied_model, "one", max_batch_tokens=1, window_pairs=7, engine=engine))
    big = _by(_run(tmp_path, pairs_file, tied_model, "big", max_batch_tokens=65536, window_pairs=100000,
                   engine=engine))
    a = np.array([one[k] for k in sorted(one)])
    b = np.array([big[k] for k in sorted(big)])
    assert len(a) == 360
    assert np.abs(a - b).max() <= 1e-6


def test_nested_input_gives_the_long_scores(tmp_path, tied_model):
    nested = pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 60)
    long = pq.read_table(shared("ARC-Challenge.long.parquet"))
    ids = set(nested.column("query_id").to_pylist())
    long = long.filter(pc.is_in(long.column("query_id"), pa.array(list(ids), pa.large_string())))
    pn, pl_ = tmp_path / "n.parquet", tmp_path / "l.parquet"
    pq.write_table(nested, pn)
    pq.write_table(long, pl_)
    out_n = _run(tmp_path, pn, tied_model, "on", window_pairs=50)
    out_l = _run(tmp_path, pl_, tied_model, "ol")
    assert out_n.num_rows == long.num_rows
    # doc_id in the long file is <query_id>-d<doc_index>.
    n_scores = {f"{q}-d{i}": s for q, i, s in zip(out_n.column("query_id").to_pylist(),
                                                   out_n.column("doc_index").to_pylist(),
                                                   out_n.column("score").to_numpy())}
    l_scores = _by(out_l)
    assert set(n_scores) == set(l_scores)
    assert max(abs(n_scores[k] - l_scores[k]) for k in l_scores) <= TOL
    # The exploded documents are the list elements, in order.
    first = out_n.filter(pc.equal(out_n.column("query_id"), nested.column("query_id")[0]))
    docs = dict(zip(first.column("doc_index").to_pylist(), first.column("document").to_pylist()))
    assert [docs[i] for i in range(len(docs))] == nested.column("documents")[0].as_py()


def test_tokens_equal_the_recipe_at_the_seams(models):
    """The body is tokenized as one string: ids equal prefix + tokenizer(body) + suffix."""
    from transformers import AutoTokenizer

    from conftest import PREFIX, SUFFIX
    from pipeline.engines.template import QWEN3_RERANKER
    from pipeline.engines.tokenize import PairEncoder

    tok = AutoTokenizer.from_pretrained(models["tied"])
    enc = PairEncoder(tok, QWEN3_RERANKER, 110)
    t = real_pairs(30)
    e = enc.encode(t.column("instruction").to_pylist(), t.column("query").to_pylist(),
                   t.column("document").to_pylist())
    p = tok.encode(PREFIX, add_special_tokens=False)
    s = tok.encode(SUFFIX, add_special_tokens=False)
    for k, (i, q, d) in enumerate(zip(t.column("instruction").to_pylist(), t.column("query").to_pylist(),
                                      t.column("document").to_pylist())):
        body = tok(f"<Instruct>: {i}\n<Query>: {q}\n<Document>: {d}", truncation="longest_first",
                   max_length=110 - len(p) - len(s), add_special_tokens=False)["input_ids"]
        assert e.ids[e.offsets[k]:e.offsets[k + 1]].tolist() == p + body + s
    assert e.truncated.any() and not e.truncated.all()
