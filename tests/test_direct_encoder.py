"""BERT and XLM-R cross-encoders load without transformers (engines/direct_encoder.py): the same
float32 scores as the transformers-loaded run and the padded AutoModelForSequenceClassification
forward (CLI and Python API), transformers never imported on that path, and each checkpoint the
direct loader does not take going to transformers exactly as before (or failing as before)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _corpus, cut_in_half, real_pairs, run_cli, transformers_modules_after
from pipeline.config import RunConfig
from pipeline.engines import direct_encoder, loading
from pipeline.engines.resolve import inspect_model
from pipeline.errors import ModelError
from pipeline.reranker import Reranker
from test_families import _ref_cross_encoder

TOL = 1e-5
LABELS = {"bert": 1, "xlm-roberta": 2}  # one relevance logit, and (not relevant, relevant)
PREFIX = {"bert": "bert.", "xlm-roberta": "roberta."}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from pipeline.bench.synthetic import build_cross_encoder

    return {a: str(build_cross_encoder(tmp_path_factory.mktemp(a), a, _corpus(), num_labels=n))
            for a, n in LABELS.items()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    p = tmp_path_factory.mktemp("encd") / "pairs.parquet"
    pq.write_table(real_pairs(30), p)  # 90 real pairs, short and long
    return p


def _cfg(model, pairs, **kw):
    return RunConfig(inputs=(str(pairs),), model=model, device="cpu", **kw)


def _direct(model, pairs, **kw):
    cfg = _cfg(model, pairs, **kw)
    tok = loading.cross_encoder_tokenizer(cfg)
    return direct_encoder.load_encoder(cfg, inspect_model(cfg), tok, torch.device("cpu"), torch.float32)


def _cli_scores(tmp_path, pairs, model, monkeypatch, direct: bool, *args, max_length: int = 48):
    """The CLI's scores of `pairs` in input order, with the direct load on or off."""
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1" if direct else "0")
    out = tmp_path / f"o-{direct}-{len(args)}.parquet"
    r = run_cli(["run", pairs, "--model", model, "--device", "cpu", "--max-length", max_length, "-o", out, "-q",
                 "--overwrite", *args])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    got = dict(zip(t.column("doc_id").to_pylist(), t.column("score").to_numpy()))
    return np.array([got[k] for k in pq.read_table(pairs).column("doc_id").to_pylist()])


def _reference(model, pairs):
    src = pq.read_table(pairs)
    return _ref_cross_encoder(model, src.column("query").to_pylist(), src.column("document").to_pylist(), 48)


@pytest.mark.parametrize("arch", list(LABELS))
def test_cli_scores_equal_transformers_loaded_and_reference(tmp_path, encoders, pairs, monkeypatch, arch):
    model = encoders[arch]
    m = _direct(model, pairs)
    assert isinstance(m, direct_encoder.DirectEncoder)  # the path RERANK_DIRECT_LOAD=1 takes
    direct = _cli_scores(tmp_path, pairs, model, monkeypatch, True)
    hf = _cli_scores(tmp_path, pairs, model, monkeypatch, False)
    ref = _reference(model, pairs)
    assert ref.std() > 0.02
    assert np.abs(direct - hf).max() <= TOL, np.abs(direct - hf).max()
    assert np.abs(direct - ref).max() <= TOL, np.abs(direct - ref).max()


def api_scores_equal_reference(model, pairs, monkeypatch, max_length: int) -> None:
    """The Python API over a directly loaded model, and over a transformers model (engine_from_model:
    the packed forward reads its weights as tensors too), both within TOL of the reference."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.engines.cross_tokenizer import load as load_tokenizer

    src = pq.read_table(pairs)
    qd = list(zip(src.column("query").to_pylist(), src.column("document").to_pylist()))
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1")
    r = Reranker(model, device="cpu", max_length=max_length)
    assert r.scorer.info.forward == "fused-encoder"
    direct = np.asarray(r.predict(qd))
    ref = _ref_cross_encoder(model, src.column("query").to_pylist(), src.column("document").to_pylist(), max_length)
    assert np.abs(direct - ref).max() <= TOL, np.abs(direct - ref).max()
    hf = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32)
    built = np.asarray(Reranker.from_model(hf, load_tokenizer(model)[0], device="cpu",
                                           max_length=max_length).predict(qd))
    assert np.abs(built - ref).max() <= TOL, np.abs(built - ref).max()


@pytest.mark.parametrize("arch", list(LABELS))
def test_python_api_scores_equal_reference(encoders, pairs, monkeypatch, arch):
    api_scores_equal_reference(encoders[arch], pairs, monkeypatch, 48)


def test_direct_path_imports_no_transformers(tmp_path, encoders, pairs):
    code = (
        "import sys\nimport numpy as np\nfrom pipeline.config import RunConfig\nfrom pipeline.run import run\n"
        "from pipeline.reranker import Reranker\n"
        f"for i, m in enumerate({list(encoders.values())!r}):\n"
        f"    s = run(RunConfig(inputs=({str(pairs)!r},), output={str(tmp_path)!r} + f'/o{{i}}.parquet', model=m,\n"
        "                      device='cpu', max_length=48), progress=False)\n"
        "    assert s.pairs_scored == 90\n"
        "    assert np.isfinite(Reranker(m, device='cpu', max_length=48).predict([('a b', 'c d')])).all()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    assert transformers_modules_after(code) == []


def _copy(src, tmp_path) -> str:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(src, d)
    return str(d)


def _edit_config(d, **fields):
    p = os.path.join(d, "config.json")
    with open(p, encoding="utf-8") as f:
        c = json.load(f)
    c.update(fields)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(c, f)


def _edit_weights(d, fn):
    p = os.path.join(d, "model.safetensors")
    t = load_file(p)
    fn(t)
    save_file(t, p, metadata={"format": "pt"})


@pytest.mark.parametrize("arch", list(LABELS))
@pytest.mark.parametrize("edit", ["hidden_act", "extra_key", "legacy_names", "remote_code"])
def test_what_is_not_understood_loads_through_transformers(tmp_path, encoders, pairs, monkeypatch, arch, edit):
    d = _copy(encoders[arch], tmp_path)
    p = PREFIX[arch]
    kw = {}
    if edit == "hidden_act":  # a transformers activation the direct load does not map
        _edit_config(d, hidden_act="gelu_fast")
    elif edit == "extra_key":  # a tensor transformers' classes do not have: not ours to interpret
        _edit_weights(d, lambda t: t.update({p + "encoder.layer.0.attention.self.rel": torch.zeros(4)}))
    elif edit == "legacy_names":  # LayerNorm.gamma / beta: transformers renames them, we do not
        def rename(t):
            t[p + "embeddings.LayerNorm.gamma"] = t.pop(p + "embeddings.LayerNorm.weight")
            t[p + "embeddings.LayerNorm.beta"] = t.pop(p + "embeddings.LayerNorm.bias")
        _edit_weights(d, rename)
    else:
        kw["trust_remote_code"] = True
    assert _direct(d, pairs, **kw) is None
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1")
    m = loading.load(_cfg(d, pairs, **kw))
    assert not isinstance(m.model, direct_encoder.DirectEncoder) and hasattr(m.model, "classifier")
    if edit != "remote_code":  # transformers' own reading, through our run, equals its padded forward
        got = _cli_scores(tmp_path, pairs, d, monkeypatch, True)
        assert np.abs(got - _reference(d, pairs)).max() <= TOL


@pytest.mark.parametrize("how", ["env", "engine"])
def test_direct_load_off_loads_through_transformers(encoders, pairs, monkeypatch, how):
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "0" if how == "env" else "1")
    kw = {"engine": "transformers"} if how == "engine" else {}
    m = loading.load(_cfg(encoders["bert"], pairs, **kw))
    assert not isinstance(m.model, direct_encoder.DirectEncoder) and hasattr(m.model, "classifier")
    assert m.kernel == ("padded-sdpa" if how == "engine" else m.kernel)


def test_a_wrong_shape_falls_back_and_fails_as_before(tmp_path, encoders, pairs, monkeypatch):
    d = _copy(encoders["bert"], tmp_path)
    _edit_weights(d, lambda t: t.update({"bert.pooler.dense.bias": torch.zeros(3)}))
    assert _direct(d, pairs) is None
    for direct in ("1", "0"):  # transformers refuses the shape either way, with the same message
        monkeypatch.setenv("RERANK_DIRECT_LOAD", direct)
        with pytest.raises(ModelError, match="cannot load safetensors weights") as err:
            loading.load(_cfg(d, pairs))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", list(LABELS))
@pytest.mark.parametrize("what", ["classifier", "layer_weight"])
def test_missing_weights_give_the_existing_error(tmp_path, encoders, pairs, monkeypatch, arch, what):
    d = _copy(encoders[arch], tmp_path)
    drop = "classifier." if what == "classifier" else PREFIX[arch] + "encoder.layer.1.output.dense.bias"
    _edit_weights(d, lambda t: [t.pop(k) for k in [k for k in t if k.startswith(drop)]])
    assert _direct(d, pairs) is None
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1")
    r = run_cli(["run", pairs, "--model", d, "--device", "cpu", "-o", tmp_path / "x.parquet", "-q", "--max-length", 48])
    assert r.exit_code == 2, r.output
    n = {"classifier": 2 if arch == "bert" else 4, "layer_weight": 1}[what]
    assert f"the checkpoint lacks {n} weights the seq-cls-encoder head needs" in r.output
    assert "check --family, or pass a reranker checkpoint" in r.output
    assert not (tmp_path / "x.parquet").exists()


def test_old_checkpoints_buffers_are_ignored_as_transformers_ignores_them(tmp_path, encoders, pairs, monkeypatch):
    d = _copy(encoders["bert"], tmp_path)
    _edit_weights(d, lambda t: t.update({"bert.embeddings.position_ids": torch.arange(512)[None]}))
    assert isinstance(_direct(d, pairs), direct_encoder.DirectEncoder)
    got = _cli_scores(tmp_path, pairs, d, monkeypatch, True)
    assert np.abs(got - _reference(d, pairs)).max() <= TOL


def test_a_truncated_safetensors_file_is_a_one_line_model_error(tmp_path, encoders, pairs):
    d = _copy(encoders["xlm-roberta"], tmp_path)
    p = os.path.join(d, "model.safetensors")
    cut_in_half(p)
    with pytest.raises(ModelError, match="cannot load safetensors weights") as err:
        _direct(d, pairs)
    assert "\n" not in str(err.value) and d in str(err.value)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_are_transformers_own(act):
    from transformers.activations import ACT2FN

    x = torch.randn(64, 37, dtype=torch.float32) * 3
    assert torch.equal(direct_encoder.ACTIVATIONS[act](x), ACT2FN[act](x))


def test_mapped_activations_load_directly_and_score_as_transformers(tmp_path, encoders, pairs, monkeypatch):
    d = _copy(encoders["bert"], tmp_path)
    _edit_config(d, hidden_act="gelu_new")
    assert isinstance(_direct(d, pairs), direct_encoder.DirectEncoder)
    got = _cli_scores(tmp_path, pairs, d, monkeypatch, True)
    assert np.abs(got - _reference(d, pairs)).max() <= TOL
