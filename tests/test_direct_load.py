"""Plain Qwen3 rerankers load without transformers (engines/direct.py, engines/fast_tokenizer.py):
the same token ids as AutoTokenizer on real data (truncation included), the same float32 scores
as the transformers-loaded model, transformers never imported on that path, and the fallback to
transformers for what the direct loader does not understand."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, _corpus, real_pairs, transformers_modules_after
from pipeline.config import RunConfig
from pipeline.engines import fast_tokenizer
from pipeline.engines.template import QWEN3_RERANKER
from pipeline.engines.tokenize import PairEncoder
from pipeline.run import run

TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
    from pipeline.bench.synthetic import build_qwen3_seq_cls

    return str(build_qwen3_seq_cls(tmp_path_factory.mktemp("q3cls"), _corpus()))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    p = tmp_path_factory.mktemp("direct") / "pairs.parquet"
    pq.write_table(real_pairs(40), p)  # 120 real pairs of the three sets, short and long
    return p


def _scores(tmp_path, pairs, model, monkeypatch, direct: bool, **kw):
    monkeypatch.setenv("RERANK_DIRECT_LOAD", "1" if direct else "0")
    out = tmp_path / f"out-{direct}.parquet"
    s = run(RunConfig(inputs=(str(pairs),), output=str(out), model=model, device="cpu", window_pairs=50,
                      overwrite=True, restart=True, **kw), progress=False)
    return pq.read_table(out).column("score").to_numpy(), s


@pytest.mark.parametrize("which", ["sample", "tied", "untied", "seq_cls"])
def test_ids_equal_autotokenizer_on_real_data(which, models, seq_cls):
    from transformers import AutoTokenizer

    path = {"sample": TINY, "seq_cls": seq_cls}.get(which) or models[which]
    ours, why = fast_tokenizer.load(path)
    assert ours is not None, why
    ref = AutoTokenizer.from_pretrained(path)
    # The backend is the same pipeline, vocabulary and added tokens, not only the same ids here.
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for attr in ("vocab_size", "pad_token_id", "unk_token_id", "eos_token_id", "truncation_side"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    t = real_pairs(150)
    cols = [t.column(c).to_pylist() for c in ("instruction", "query", "document")]
    for max_length in (96, 8192):  # most pairs cut at 96, none at 8192
        a = PairEncoder(ours, QWEN3_RERANKER, max_length).encode(*cols)
        b = PairEncoder(ref, QWEN3_RERANKER, max_length).encode(*cols)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(a.truncated, b.truncated)
        assert (a.truncated.mean() > 0.5) == (max_length == 96)
    one = cols[2][7]
    assert ours(one)["input_ids"] == ref(one)["input_ids"]
    assert ours.convert_tokens_to_ids("yes") == ref.convert_tokens_to_ids("yes")


@pytest.mark.parametrize("which", ["tied", "untied", "seq_cls"])
def test_scores_equal_transformers_loaded(tmp_path, pairs, models, seq_cls, monkeypatch, which):
    model = seq_cls if which == "seq_cls" else models[which]
    kw = {"max_length": 160}  # some pairs truncated
    direct, s1 = _scores(tmp_path, pairs, model, monkeypatch, True, **kw)
    ref, s2 = _scores(tmp_path, pairs, model, monkeypatch, False, **kw)
    assert ref.std() > 0.02 and s1.truncated > 0
    assert np.abs(direct - ref).max() <= 1e-6, np.abs(direct - ref).max()
    # The direct path is the one that ran with RERANK_DIRECT_LOAD=1.
    import torch

    from pipeline.engines import direct
    from pipeline.engines.resolve import inspect_model

    cfg = RunConfig(inputs=(str(pairs),), model=model, device="cpu")
    loaded = direct.load_qwen3(cfg, inspect_model(cfg), torch.device("cpu"), torch.float32)
    assert loaded is not None and isinstance(loaded[0], direct.DirectQwen3)


def test_cli_imports_no_transformers(tmp_path):
    code = (
        "import sys; from pipeline.config import RunConfig; from pipeline.run import run; "
        f"s = run(RunConfig(inputs=({os.path.join(ROOT, 'sample_data', 'pairs.parquet')!r},), "
        f"output={str(tmp_path / 'o.parquet')!r}, model={TINY!r}, device='cpu'), progress=False); "
        "assert s.pairs_scored == 28; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    assert transformers_modules_after(code) == []


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_fallback_without_tokenizer_json(tmp_path, pairs, models, monkeypatch):
    """vocab.json + merges.txt only: the direct tokenizer declines, transformers loads it, and the
    scores are the direct path's of the full directory."""
    full = models["tied"]
    d = _copy(full, tmp_path / "m")
    with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    m = tj["model"]
    # The added tokens (<|im_start|>, ...) live in tokenizer.json; without it, in tokenizer_config.json.
    p = os.path.join(d, "tokenizer_config.json")
    with open(p, encoding="utf-8") as f:
        c = json.load(f)
    c["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tj["added_tokens"]}
    with open(p, "w", encoding="utf-8") as f:
        json.dump(c, f)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(m["vocab"], f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(x if isinstance(x, str) else " ".join(x) for x in m["merges"]) + "\n")
    os.remove(os.path.join(d, "tokenizer.json"))
    tok, why = fast_tokenizer.load(d)
    assert tok is None and "tokenizer.json" in why
    got, _ = _scores(tmp_path, pairs, d, monkeypatch, True, max_length=160)
    want, _ = _scores(tmp_path, pairs, full, monkeypatch, True, max_length=160)
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("edit", ["tokenizer_class", "extra_weight"])
def test_fallback_when_not_understood(tmp_path, pairs, models, monkeypatch, edit):
    from pipeline.engines import direct
    from pipeline.engines.resolve import inspect_model

    full = models["untied"]
    d = _copy(full, tmp_path / "m")
    if edit == "tokenizer_class":
        p = os.path.join(d, "tokenizer_config.json")
        with open(p, encoding="utf-8") as f:
            c = json.load(f)
        c["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(p, "w", encoding="utf-8") as f:
            json.dump(c, f)
    else:  # a tensor transformers' Qwen3 does not have: not ours to interpret
        import torch
        from safetensors.torch import load_file, save_file

        p = os.path.join(d, "model.safetensors")
        t = load_file(p)
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(t["model.layers.0.self_attn.q_proj.weight"].shape[0])
        save_file(t, p, metadata={"format": "pt"})
    cfg = RunConfig(inputs=(str(pairs),), model=d, device="cpu")
    import torch

    assert direct.load_qwen3(cfg, inspect_model(cfg), torch.device("cpu"), torch.float32) is None
    if edit == "tokenizer_class":  # transformers reads it as a plain fast tokenizer: same ids, same scores
        got, _ = _scores(tmp_path, pairs, d, monkeypatch, True, max_length=160)
        want, _ = _scores(tmp_path, pairs, full, monkeypatch, True, max_length=160)
        assert np.abs(got - want).max() <= 1e-6


def test_json_config_reads_as_autoconfig(models, seq_cls):
    from transformers import AutoConfig

    from pipeline.engines.model_files import read_config
    from pipeline.engines.resolve import inspect_model

    for path in (TINY, models["tied"], models["untied"], seq_cls):
        ours, ref = read_config(path), AutoConfig.from_pretrained(path)
        assert ours is not None
        for attr in ("architectures", "model_type", "num_labels", "max_position_embeddings", "tie_word_embeddings",
                     "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps"):
            assert getattr(ours, attr) == getattr(ref, attr), (path, attr)
        cfg = RunConfig(inputs=(os.path.join(ROOT, "sample_data", "pairs.parquet"),), model=path)
        assert inspect_model(cfg, ours) == inspect_model(cfg, ref)
