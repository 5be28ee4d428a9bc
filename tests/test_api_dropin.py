"""`Reranker` as a drop-in for sentence-transformers' `CrossEncoder`: the same calls on one saved
random-weight BERT cross-encoder (one label, and two) give the same scores (to 1e-5, float32 on
CPU) in the same structures and types: arrays, scalars for a single pair, tensors, lists of
tensors, `activation_fn`, `apply_softmax`, `batch_size`, and `rank`'s hits."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

TOL = 1e-5
QUERY = "what is the capital of france?"
DOCS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog.",
    "France is a country in Western Europe; its capital is Paris, on the Seine.",
    "",
    "Numbers 0123456789 and punctuation: ,.;:!?()[]{}",
    "Le cœur a ses raisons que la raison ne connaît point.",
]
PAIRS = [(QUERY, d) for d in DOCS] + [("who jumps over the lazy dog?", DOCS[2]), ("capital of germany", DOCS[1])]
TEXTS = [QUERY, *DOCS, "who jumps over the lazy dog?", "capital of germany"] * 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{labels: (CrossEncoder, Reranker)} over the same saved BERT cross-encoder."""
    from sentence_transformers import CrossEncoder

    from pipeline import Reranker
    from pipeline.bench.synthetic import build_cross_encoder

    out = {}
    for labels in (1, 2):
        path = str(build_cross_encoder(tmp_path_factory.mktemp(f"bert{labels}"), "bert", TEXTS, num_labels=labels))
        out[labels] = (CrossEncoder(path, device="cpu"), Reranker(path, device="cpu", max_length=512), path)
    return out


def same(got, want, where=""):
    """Same structure and type, scores equal to TOL."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, list):
        assert len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{where}[{k}]")
    elif isinstance(want, torch.Tensor):
        assert (got.dtype, tuple(got.shape), got.device) == (want.dtype, tuple(want.shape), want.device), where
        assert torch.allclose(got, want, rtol=0, atol=TOL), f"{where}: {got} != {want}"
    elif isinstance(want, (np.ndarray, np.generic)):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{where}: {got.dtype}{got.shape} != " \
                                                                   f"{want.dtype}{want.shape}"
        assert np.allclose(got, want, rtol=0, atol=TOL), f"{where}: {got} != {want}"
    else:
        raise AssertionError(f"{where}: unexpected {type(want).__name__}")


CALLS = [
    ("list", PAIRS, {}),
    ("list of lists", [list(p) for p in PAIRS], {}),
    ("single tuple", PAIRS[0], {}),
    ("single list", list(PAIRS[3]), {}),
    ("batch_size", PAIRS, {"batch_size": 2}),
    ("tensor", PAIRS, {"convert_to_tensor": True}),
    ("tensor, single", PAIRS[1], {"convert_to_tensor": True}),
    ("list of tensors", PAIRS, {"convert_to_numpy": False}),
    ("list of tensors, single", PAIRS[1], {"convert_to_numpy": False}),
    ("identity", PAIRS, {"activation_fn": torch.nn.Identity()}),
    ("sigmoid function", PAIRS, {"activation_fn": torch.sigmoid}),
    ("tanh module, tensor", PAIRS, {"activation_fn": torch.nn.Tanh(), "convert_to_tensor": True}),
    ("apply_softmax", PAIRS, {"apply_softmax": True}),
    ("apply_softmax, identity", PAIRS, {"apply_softmax": True, "activation_fn": torch.nn.Identity()}),
]


# A two-label model's default differs on purpose (test_two_label_default), so two labels run the
# calls that name an activation.
PREDICTS = [(1, *c) for c in CALLS] + [(2, *c) for c in CALLS if {"activation_fn", "apply_softmax"} & set(c[2])]


@pytest.mark.parametrize("labels,name,pairs,kw", PREDICTS, ids=[f"{p[0]}-{p[1]}" for p in PREDICTS])
def test_predict_as_cross_encoder(models, labels, name, pairs, kw):
    ce, rr, _ = models[labels]
    want = ce.predict(pairs, show_progress_bar=False, **kw)
    got = rr.predict(pairs, show_progress_bar=False, **kw)
    same(got, want, name)
    if labels == 2 and ("apply_softmax" in kw or "activation_fn" in kw):
        shape = tuple(got.shape) if hasattr(got, "shape") else (len(got),) + tuple(got[0].shape)
        assert shape[-1] == 2  # both labels came back, not one score


def test_predict_keeps_meaning_across_batchings(models):
    ce, rr, _ = models[1]
    scores = rr.predict(PAIRS)
    assert scores.std() > 1e-3  # the scores spread, so equal arrays mean something
    for k, p in enumerate(PAIRS):
        one = rr.predict(p)
        assert isinstance(one, np.float32) and abs(one - scores[k]) <= 1e-6


def test_two_label_default(models):
    """On a two-label model CrossEncoder returns both logits by default; Reranker keeps the score of
    `rerank-batch run` (softmax's second), and gives CrossEncoder's with activation_fn=Identity."""
    ce, rr, _ = models[2]
    got, logits = rr.predict(PAIRS), ce.predict(PAIRS)
    assert got.shape == (len(PAIRS),) and logits.shape == (len(PAIRS), 2)
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy(), rtol=0, atol=TOL)
    same(rr.predict(PAIRS, activation_fn=torch.nn.Identity()), logits, "identity")
    same(rr.predict(PAIRS[0], apply_softmax=True), ce.predict(PAIRS[0], apply_softmax=True), "single, softmax")


def test_constructor_activation_fn(models):
    from sentence_transformers import CrossEncoder

    from pipeline import Reranker

    *_, path = models[1]
    ce = CrossEncoder(path, device="cpu", activation_fn=torch.nn.Identity())
    rr = Reranker(path, device="cpu", activation_fn=torch.nn.Identity())
    same(rr.predict(PAIRS), ce.predict(PAIRS), "constructor identity")
    same(rr.predict(PAIRS, activation_fn=torch.sigmoid), ce.predict(PAIRS, activation_fn=torch.sigmoid), "override")


RANKS = [
    ("all", {}),
    ("top_k, documents, batch_size", {"top_k": 3, "return_documents": True, "batch_size": 8}),
    ("identity", {"activation_fn": torch.nn.Identity(), "return_documents": True}),
    ("ignored conversions", {"top_k": 4, "apply_softmax": True, "convert_to_tensor": True, "convert_to_numpy": False}),
]


@pytest.mark.parametrize("name,kw", RANKS, ids=[r[0] for r in RANKS])
def test_rank_as_cross_encoder(models, name, kw):
    ce, rr, _ = models[1]
    want = ce.rank(QUERY, DOCS, show_progress_bar=False, **kw)
    got = rr.rank(QUERY, DOCS, show_progress_bar=False, **kw)
    assert [h["corpus_id"] for h in got] == [h["corpus_id"] for h in want]
    assert [sorted(h) for h in got] == [sorted(h) for h in want]
    for g, w in zip(got, want):
        assert type(g["corpus_id"]) is type(w["corpus_id"]) is int
        assert type(g["score"]) is type(w["score"]) is float and abs(g["score"] - w["score"]) <= TOL
        assert g.get("text") == w.get("text")
    assert len(got) == kw.get("top_k", len(DOCS))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.reranker" and r.levelno == logging.WARNING]


def test_where_cross_encoder_defaults_to_another_activation_the_load_says_so(models, tmp_path, caplog):
    """A model whose sentence-transformers files name another default activation (the ms-marco
    MiniLM models name Identity) keeps the run's score by default; loading it warns once with
    the fix, and the fix gives CrossEncoder's default scores."""
    from sentence_transformers import CrossEncoder

    from pipeline import Reranker

    ce1, _, path = models[1]
    saved = tmp_path / "saved-by-st"  # version 6 writes config_sentence_transformers.json
    CrossEncoder(path, device="cpu", activation_fn=torch.nn.Identity()).save_pretrained(str(saved))
    legacy = tmp_path / "st-5"  # versions 4 and 5 wrote it into config.json
    shutil.copytree(path, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity", "version": "5.1.0"}
    (legacy / "config.json").write_text(json.dumps(config))
    for model in (saved, legacy):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.reranker"):
            rr = Reranker(str(model), device="cpu")
        assert _warnings(caplog) == [
            f"model {model}: sentence-transformers' CrossEncoder applies torch.nn.Identity() to its logits by "
            "default, Reranker gives the score of `rerank-batch run` (the sigmoid of the logit); pass "
            "activation_fn=torch.nn.Identity() for CrossEncoder's scores"]
        ce = CrossEncoder(str(model), device="cpu")
        same(rr.predict(PAIRS, activation_fn=torch.nn.Identity()), ce.predict(PAIRS), f"{model.name}: the fix")
        same(rr.predict(PAIRS), ce1.predict(PAIRS), f"{model.name}: the default")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.reranker"):
        Reranker(str(saved), device="cpu", activation_fn=torch.nn.Identity())  # asked for: nothing to say
        Reranker(path, device="cpu")  # CrossEncoder's default is the sigmoid too
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger="pipeline.reranker"):
        Reranker(models[2][2], device="cpu")
    assert _warnings(caplog) == [
        f"model {models[2][2]}: sentence-transformers' CrossEncoder applies torch.nn.Identity() to its logits by "
        "default, Reranker gives the score of `rerank-batch run` (the softmax's second label, one score per pair); "
        "pass activation_fn=torch.nn.Identity() for CrossEncoder's scores"]
