"""ModernBERT cross-encoders load without transformers (engines/direct_encoder.py): the float32
scores of the transformers-loaded run and of the padded AutoModelForSequenceClassification forward
(first-token and mean pooling, with and without biases, sequences longer than the local window,
packed batches of many pairs), the same tensors as transformers reads from the same config.json,
transformers never imported on that path, and every checkpoint the direct load does not take
going to transformers with its reason."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import _corpus, cut_in_half, real_pairs, run_cli, transformers_modules_after
from pipeline.engines import direct_encoder, loading
from pipeline.engines.fused_encoder import ModernBertWeights
from pipeline.errors import ModelError
from test_direct_encoder import _cfg, _copy, _direct, _edit_config, _edit_weights, api_scores_equal_reference
from test_direct_encoder import _cli_scores as cli_scores
from test_families import _ref_cross_encoder

TOL = 1e-5
MAX_LEN = 160  # well past both variants' local windows (±32, ±20 tokens)
# "cls": ModernBertForSequenceClassification as the published rerankers (gte-reranker-modernbert-base):
# no biases, one logit. "mean": every bias on, two labels, mean pooling, the tanh GELUs, three layers
# (full, sliding, sliding), its own eps and window.
VARIANTS = {
    "cls": dict(num_labels=1),
    "mean": dict(num_labels=2, classifier_pooling="mean", norm_bias=True, attention_bias=True, mlp_bias=True,
                 classifier_bias=True, hidden_activation="gelu_pytorch_tanh", classifier_activation="gelu_new",
                 norm_eps=1e-6, num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=40),
}


def _spread(t: dict) -> None:
    """Biases and LayerNorm scales away from their init (0 and 1), so that a bias or norm read
    wrongly, or not at all, changes the scores."""
    g = torch.Generator().manual_seed(7)
    for k, v in t.items():
        if k.endswith(".bias"):
            t[k] = torch.randn(v.shape, generator=g) * 0.2
        elif "norm.weight" in k:
            t[k] = 1 + torch.randn(v.shape, generator=g) * 0.3


@pytest.fixture(scope="module")
def modernberts(tmp_path_factory):
    from pipeline.bench.synthetic import build_cross_encoder

    out = {}
    for name, kw in VARIANTS.items():
        d = str(build_cross_encoder(tmp_path_factory.mktemp(name), "modernbert", _corpus(), **kw))
        _edit_weights(d, _spread)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    p = tmp_path_factory.mktemp("mbp") / "pairs.parquet"
    pq.write_table(real_pairs(30), p)  # 90 real pairs, short and long
    return p


def _hub_style(d: str, global_theta=80_000.0, local_theta=5_000.0) -> None:
    """config.json as the hub's ModernBERT configs (written by transformers 4) have it: no
    layer_types or rope_parameters, the bases as global_rope_theta / local_rope_theta, and keys
    ModernBERT does not read."""
    p = os.path.join(d, "config.json")
    with open(p, encoding="utf-8") as f:
        c = json.load(f)
    every = 3 if c["num_hidden_layers"] == 3 else 2
    for k in ("layer_types", "rope_parameters"):
        c.pop(k)
    c.update(global_attn_every_n_layers=every, global_rope_theta=global_theta, local_rope_theta=local_theta,
             reference_compile=True, layer_norm_eps=1e-5, position_embedding_type="absolute")
    with open(p, "w", encoding="utf-8") as f:
        json.dump(c, f)


def _cli_scores(tmp_path, pairs, model, monkeypatch, direct: bool, summary=None):
    extra = ["--summary", summary] if summary else []
    return cli_scores(tmp_path, pairs, model, monkeypatch, direct, "--max-batch-tokens", 1024, *extra,
                      max_length=MAX_LEN)


def _reference(model, pairs):
    src = pq.read_table(pairs)
    return _ref_cross_encoder(model, src.column("query").to_pylist(), src.column("document").to_pylist(), MAX_LEN)


def _reason(caplog, d, pairs, **kw) -> str:
    """The reason the direct load logs for declining `d` (it must decline)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipeline.engines.direct_encoder"):
        assert _direct(d, pairs, **kw) is None
    lines = [r.getMessage() for r in caplog.records if "loading through transformers" in r.getMessage()]
    assert lines, caplog.text
    return lines[-1]


@pytest.mark.parametrize("config", ["as-saved", "hub-style"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cli_scores_equal_transformers_loaded_and_reference(tmp_path, modernberts, pairs, monkeypatch, variant,
                                                            config):
    model = modernberts[variant]
    if config == "hub-style":
        model = _copy(model, tmp_path)
        _hub_style(model)
    m = _direct(model, pairs)
    assert isinstance(m, direct_encoder.DirectEncoder) and isinstance(m.weights, ModernBertWeights)
    assert {lw.layer_type for lw in m.weights.layers} == {"full_attention", "sliding_attention"}
    # Pairs longer than the local window (so the sliding layers' mask matters), many to a batch.
    tok = loading.cross_encoder_tokenizer(_cfg(model, pairs))
    src = pq.read_table(pairs)
    lens = [len(x) for x in tok(src.column("query").to_pylist(), src.column("document").to_pylist(),
                                truncation="longest_first", max_length=MAX_LEN)["input_ids"]]
    assert sum(n > 2 * m.weights.window + 1 for n in lens) > 20, lens
    summary = tmp_path / "s.json"
    direct = _cli_scores(tmp_path, pairs, model, monkeypatch, True, summary)
    s = json.loads(summary.read_text())
    assert s["attention"] != "padded-sdpa" and s["batches"] > 5  # packed, several pairs a batch
    assert {"startup_tokenizer_s", "startup_weights_s", "startup_model_setup_s"} <= set(s["extra"])
    hf = _cli_scores(tmp_path, pairs, model, monkeypatch, False)
    ref = _reference(model, pairs)
    assert ref.std() > 0.02
    assert np.abs(direct - hf).max() <= TOL, np.abs(direct - hf).max()
    assert np.abs(direct - ref).max() <= TOL, np.abs(direct - ref).max()


def _same(p, q) -> bool:
    if p is None or q is None:
        return p is None and q is None
    return torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q


def _same_weights(a: ModernBertWeights, b: ModernBertWeights) -> None:
    """Field by field: tensors equal (or both absent), the same rotary tables and activations."""
    x = torch.randn(8, 64, dtype=torch.float32) * 3
    for name in ModernBertWeights.__dataclass_fields__:
        u, v = getattr(a, name), getattr(b, name)
        if name == "layers":
            assert len(u) == len(v)
            for i, (lu, lv) in enumerate(zip(u, v)):
                for f in lu.__dataclass_fields__:
                    assert _same(getattr(lu, f), getattr(lv, f)), (i, f)
        elif name == "rope":
            assert u.keys() == v.keys()
            for t in u:
                assert torch.equal(u[t][0], v[t][0]) and u[t][1] == v[t][1], t
        elif name in ("act", "head_act"):
            assert torch.equal(u(x), v(x)), name
        else:
            assert _same(u, v), name


def _drop_keys(d, *keys):
    p = os.path.join(d, "config.json")
    with open(p, encoding="utf-8") as f:
        c = json.load(f)
    for k in keys:
        c.pop(k, None)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(c, f)


# config.json edits whose settings both loads must read alike: ModernBertConfig's defaults for
# absent keys, the legacy keys, rope_parameters for one layer type only, other layer patterns.
# (variant, edit)
SETTINGS = {
    "as-saved": ("mean", lambda d: None),
    "hub-style": ("mean", _hub_style),
    "defaults": ("cls", lambda d: _drop_keys(d, "layer_types", "rope_parameters", "global_attn_every_n_layers",
                                             "local_attention", "norm_eps", "norm_bias", "attention_bias", "mlp_bias",
                                             "classifier_bias", "hidden_activation", "classifier_activation",
                                             "classifier_pooling")),
    "one-rope-type": ("mean", lambda d: (_drop_keys(d, "layer_types"),
                                         _edit_config(d, rope_parameters={"sliding_attention": {"rope_theta": 1234.0}},
                                                      global_rope_theta=4321.0, global_attn_every_n_layers=2))),
    "empty-rope-type": ("mean", lambda d: _edit_config(d, rope_parameters={"sliding_attention": {}})),
    "all-global": ("mean", lambda d: (_drop_keys(d, "layer_types"), _edit_config(d, global_attn_every_n_layers=1))),
    "layer-types": ("mean", lambda d: _edit_config(d, layer_types=["sliding_attention", "full_attention",
                                                                   "sliding_attention"])),
    "odd-window": ("mean", lambda d: _edit_config(d, local_attention=37)),
}


@pytest.mark.parametrize("edit", list(SETTINGS))
def test_direct_weights_are_the_ones_transformers_builds(tmp_path, modernberts, pairs, edit):
    """Every tensor and setting the direct load derives from config.json equals what transformers'
    model holds (ModernBertWeights.from_hf, the transformers path's own reading)."""
    from transformers import AutoModelForSequenceClassification

    variant, fn = SETTINGS[edit]
    d = _copy(modernberts[variant], tmp_path)
    fn(d)
    m = _direct(d, pairs)
    assert isinstance(m, direct_encoder.DirectEncoder)
    hf = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    _same_weights(m.weights, ModernBertWeights.from_hf(hf))
    if edit == "defaults":  # the class's defaults, not the saved values
        assert (m.weights.window, m.weights.pooling, m.weights.eps) == (64, "cls", 1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_python_api_scores_equal_reference(modernberts, pairs, monkeypatch, variant):
    api_scores_equal_reference(modernberts[variant], pairs, monkeypatch, MAX_LEN)


def test_direct_path_imports_no_transformers(tmp_path, modernberts, pairs):
    code = (
        "import sys\nimport numpy as np\nfrom pipeline.config import RunConfig\nfrom pipeline.run import run\n"
        "from pipeline.reranker import Reranker\n"
        f"for i, m in enumerate({list(modernberts.values())!r}):\n"
        f"    s = run(RunConfig(inputs=({str(pairs)!r},), output={str(tmp_path)!r} + f'/o{{i}}.parquet', model=m,\n"
        "                      device='cpu', max_length=64), progress=False)\n"
        "    assert s.pairs_scored == 90\n"
        "    r = Reranker(m, device='cpu', max_length=64)\n"
        "    assert r.scorer.info.forward == 'fused-encoder'\n"
        "    assert np.isfinite(r.predict([('a b', 'c d')])).all()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    assert transformers_modules_after(code) == []


# config.json settings the direct load does not take, and the reason it logs: transformers reads
# them (its own way, which our run then scores exactly), or refuses them.
DECLINED = {
    "hidden_activation": ({"hidden_activation": "silu"}, "hidden_activation 'silu' is not one of"),
    "classifier_activation": ({"classifier_activation": "quick_gelu"}, "classifier_activation 'quick_gelu'"),
    # ModernBertConfig's sliding_window property sets local_attention = 2 * sliding_window.
    "sliding_window": ({"sliding_window": 8}, "sliding window settings"),
    "local_attention": ({"local_attention": 0}, "sliding window settings"),
    "rope_linear": ({"rope_parameters": {t: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
                                         for t in ("full_attention", "sliding_attention")}}, "RoPE is not the default"),
    "rope_dynamic": ({"rope_parameters": {t: {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
                                          for t in ("full_attention", "sliding_attention")}}, "RoPE is not the default"),
    "rope_scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE is not the default"),
    "rope_type": ({"rope_parameters": {"full_attention": {"rope_type": "linear"}}}, "RoPE is not the default"),
    "legacy_layer_type": ({"layer_types": ["attention", "sliding_attention"]}, "layer_types"),
    "null_rope_type": ({"rope_parameters": {"full_attention": None}}, "RoPE is not the default"),
    "int_eps": ({"norm_eps": 1}, "norm_eps 1 is not a positive float"),
    "head_dim": ({"head_dim": 8}, "head_dim"),
    "pooling": ({"classifier_pooling": "max"}, "classifier_pooling 'max'"),
    "missing_size": ("intermediate_size", "config.json lacks intermediate_size"),
    "default_pad_id": ("pad_token_id", "pad_token_id 50283 lies outside the vocabulary"),  # the class's default
    "bias_not_bool": ({"mlp_bias": "yes"}, "mlp_bias 'yes' is not true or false"),
    "remote_code": ({}, "remote code"),
}
# Those transformers loads and scores (the others it refuses, or cannot build from this checkpoint).
TRANSFORMERS_SCORES = {"hidden_activation", "classifier_activation", "sliding_window", "rope_linear",
                       "rope_dynamic", "legacy_layer_type"}


@pytest.mark.parametrize("edit", list(DECLINED))
def test_settings_not_understood_load_through_transformers(tmp_path, modernberts, pairs, monkeypatch, caplog, edit):
    d = _copy(modernberts["cls"], tmp_path)
    fields, why = DECLINED[edit]
    kw = {"trust_remote_code": True} if edit == "remote_code" else {}
    if isinstance(fields, str):
        _drop_keys(d, fields)
    else:
        _edit_config(d, **fields)
    assert why in _reason(caplog, d, pairs, **kw)
    if edit not in TRANSFORMERS_SCORES:
        return
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1")
    m = loading.load(_cfg(d, pairs))
    assert not isinstance(m.model, direct_encoder.DirectEncoder) and hasattr(m.model, "classifier")
    # Dynamic RoPE recomputes its tables per call: the padded transformers forward runs it.
    assert (m.kernel == "padded-sdpa") == (edit == "rope_dynamic")
    got = _cli_scores(tmp_path, pairs, d, monkeypatch, True)
    ref = _reference(d, pairs)
    assert ref.std() > 0.02
    assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()


def test_an_extra_tensor_loads_through_transformers(tmp_path, modernberts, pairs, monkeypatch, caplog):
    # Layer 0 has no attn_norm in transformers (an Identity): it ignores the tensor; so do its scores.
    d = _copy(modernberts["cls"], tmp_path)
    _edit_weights(d, lambda t: t.update({"model.layers.0.attn_norm.weight": torch.full((64,), 3.0)}))
    assert "checkpoint keys differ" in _reason(caplog, d, pairs)
    got = _cli_scores(tmp_path, pairs, d, monkeypatch, True)
    assert np.abs(got - _reference(d, pairs)).max() <= TOL


@pytest.mark.parametrize("what", ["config_says_bias", "classifier"])
def test_missing_weights_give_the_existing_error(tmp_path, modernberts, pairs, monkeypatch, caplog, what):
    d = _copy(modernberts["cls"], tmp_path)
    if what == "config_says_bias":  # attention_bias on, the checkpoint without the biases: 2 per layer
        _edit_config(d, attention_bias=True)
        n = 4
    else:
        _edit_weights(d, lambda t: [t.pop(k) for k in ("classifier.weight", "classifier.bias")])
        n = 2
    assert "checkpoint keys differ" in _reason(caplog, d, pairs)
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1")
    r = run_cli(["run", pairs, "--model", d, "--device", "cpu", "-o", tmp_path / "x.parquet", "-q", "--max-length", 48])
    assert r.exit_code == 2, r.output
    assert f"the checkpoint lacks {n} weights the seq-cls-encoder head needs" in r.output
    assert not (tmp_path / "x.parquet").exists()


def test_a_wrong_shape_falls_back_and_fails_as_before(tmp_path, modernberts, pairs, monkeypatch, caplog):
    d = _copy(modernberts["cls"], tmp_path)
    _edit_weights(d, lambda t: t.update({"model.layers.1.mlp.Wi.weight": torch.zeros(128, 64)}))
    assert "model.layers.1.mlp.Wi.weight has shape (128, 64), not (256, 64)" in _reason(caplog, d, pairs)
    for direct in ("1", "0"):  # transformers refuses the shape either way, with the same message
        monkeypatch.setenv("RERANK_DIRECT_LOAD", direct)
        with pytest.raises(ModelError, match="cannot load safetensors weights") as err:
            loading.load(_cfg(d, pairs))
        assert "\n" not in str(err.value)


def test_a_truncated_safetensors_file_is_a_one_line_model_error(tmp_path, modernberts, pairs):
    d = _copy(modernberts["mean"], tmp_path)
    cut_in_half(os.path.join(d, "model.safetensors"))
    with pytest.raises(ModelError, match="cannot load safetensors weights") as err:
        _direct(d, pairs)
    assert "\n" not in str(err.value) and d in str(err.value)


def test_compiled_steps_score_as_the_reference(modernberts, pairs):
    """--compile on (CPU here; --compile auto on CUDA): the rotary, residual-and-norm and gate
    steps compile while the model loads (its warm-up), the batches of several sizes that follow
    (one pair included) compile nothing more, and the scores stay within TOL of the reference for both variants
    (biases or none, each activation, first-token and mean pooling)."""
    from torch._dynamo.utils import counters

    from pipeline.reranker import Reranker

    torch._dynamo.reset()  # graphs compiled earlier in this process would hide the warm-up's
    src = pq.read_table(pairs)
    q, d = src.column("query").to_pylist(), src.column("document").to_pylist()
    for variant, model in modernberts.items():
        start = counters["stats"]["unique_graphs"]
        r = Reranker(model, device="cpu", max_length=MAX_LEN, compile="on", max_batch_tokens=1024)
        assert r.scorer.info.forward == "fused-encoder" and r.scorer.info.compiled, r.scorer.info
        loaded = counters["stats"]["unique_graphs"]
        assert loaded > start, f"{variant}: the warm-up compiled nothing"
        got = np.asarray(r.predict(list(zip(q, d))))
        ref = _reference(model, pairs)
        assert np.abs(got - ref).max() <= TOL, (variant, np.abs(got - ref).max())
        assert counters["stats"]["unique_graphs"] == loaded, (variant, counters["stats"]["unique_graphs"] - loaded)
        one = r.predict([(q[0], d[0])])[0]  # a batch of one pair: its last layer runs on one scored row
        assert abs(one - got[0]) <= TOL, (variant, one, got[0])
        assert counters["stats"]["unique_graphs"] == loaded, (variant, "one pair compiled again")
