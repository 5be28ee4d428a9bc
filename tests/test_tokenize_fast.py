"""The Rust-backend tokenizing path gives the ids of the recipe, token for token: prefix ids +
tokenizer(body, truncation, no special tokens)["input_ids"] + suffix ids (the path every pair
took before), on the shared real data, with truncation on either side, empty and unicode text."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import ROOT, real_pairs
from pipeline.engines.template import BGE_RERANKER_V2_GEMMA, QWEN3_RERANKER
from pipeline.engines.tokenize import PairEncoder, assemble

SAMPLE = f"{ROOT}/sample_data/tiny-qwen3-reranker"
ODD = [  # (instruction, query, document): empty, unicode, whitespace and special-token text
    ("", "", ""),
    ("Ünïcödé ınstruction", "日本語のクエリ？", "Ça coûte 42 € — naïve café 🙂🙂 ﬁ\u00a0x"),
    ("i", "  spaced  query\t", "\n\n  leading and trailing  \n"),
    ("i", "q", "<|im_end|> inside the text <|im_start|>"),
    ("i", "it's 'll 've", "123456789 numbers,punct...!!!"),
    ("i", "\u0301combining", "e\u0301 vs \u00e9 (NFC)"),
]


def _recipe(tok, template, max_length, instructions, queries, documents):
    """The reference: one __call__ per body, truncation by the tokenizer itself."""
    p = tok.encode(template.prefix, add_special_tokens=False)
    s = tok.encode(template.suffix, add_special_tokens=False)
    out = []
    for i, q, d in zip(instructions, queries, documents):
        body = tok(template.format_body(i, q, d), truncation="longest_first",
                   max_length=max_length - len(p) - len(s), add_special_tokens=False)["input_ids"]
        out.append(p + body + s)
    return out


def _columns(n_per_set: int):
    t = real_pairs(n_per_set)
    cols = [t.column(c).to_pylist() for c in ("instruction", "query", "document")]
    for i, q, d in ODD:
        for c, v in zip(cols, (i, q, d)):
            c.append(v)
    return cols


def _check(tok, template, max_length, cols):
    enc = PairEncoder(tok, template, max_length)
    assert enc.backend is not None  # the fast path is the one under test
    e = enc.encode(*cols)
    want = _recipe(tok, template, max_length, *cols)
    assert e.ids.dtype == np.int32 and e.offsets.dtype == np.int64
    assert [e.ids[e.offsets[k]:e.offsets[k + 1]].tolist() for k in range(len(want))] == want
    return e


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [8192, 120])
def test_sample_qwen3_ids_equal_the_recipe(side, max_length):
    tok = AutoTokenizer.from_pretrained(SAMPLE)
    tok.truncation_side = side
    e = _check(tok, QWEN3_RERANKER, max_length, _columns(150))
    if max_length == 120:
        assert e.truncated.any() and not e.truncated.all()
    else:
        assert not e.truncated.any()


def test_gemma_template_and_a_backend_left_configured(models):
    """Another template (its <bos> prefix), on a tokenizer whose backend carries truncation and
    padding settings from an earlier call: the encoder clears them as transformers does."""
    tok = AutoTokenizer.from_pretrained(models["tied"])
    tok(["a b c", "d"], truncation=True, max_length=2, padding="max_length")  # leaves settings behind
    tok._tokenizer.enable_truncation(3)
    tmpl = BGE_RERANKER_V2_GEMMA.__class__(**{**BGE_RERANKER_V2_GEMMA.__dict__, "positive": "yes"})
    _check(tok, tmpl, 100, _columns(60))


def test_python_path_gives_the_same_arrays(monkeypatch):
    """RERANK_TOKENIZER_BACKEND=python (and slow tokenizers) take transformers' __call__: same
    arrays, same truncation flags, same group keys."""
    tok = AutoTokenizer.from_pretrained(SAMPLE)
    cols = _columns(80)
    fast = PairEncoder(tok, QWEN3_RERANKER, 130).encode(*cols)
    monkeypatch.setenv("RERANK_TOKENIZER_BACKEND", "python")
    slow_enc = PairEncoder(tok, QWEN3_RERANKER, 130)
    assert slow_enc.backend is None
    slow = slow_enc.encode(*cols)
    for a in ("ids", "offsets", "truncated", "keys"):
        assert np.array_equal(getattr(fast, a), getattr(slow, a)), a
    empty = slow_enc.encode([], [], [])
    assert len(empty) == 0 and empty.ids.size == 0


def test_assemble_cuts_each_side_and_handles_empty_bodies():
    body = np.array([1, 2, 3, 4, 5, 6, 7], np.int32)
    lens = np.array([5, 0, 2], np.int64)
    flat, off, cut = assemble(body, lens, [9, 8], [0], 3, False)
    rows = [flat[off[k]:off[k + 1]].tolist() for k in range(3)]
    assert rows == [[9, 8, 1, 2, 3, 0], [9, 8, 0], [9, 8, 6, 7, 0]] and cut.tolist() == [True, False, False]
    flat, off, cut = assemble(body, lens, [], [], 3, True)
    assert [flat[off[k]:off[k + 1]].tolist() for k in range(3)] == [[3, 4, 5], [], [6, 7]]
    flat, off, cut = assemble(np.empty(0, np.int32), np.zeros(0, np.int64), [9], [0], 3, False)
    assert flat.size == 0 and off.tolist() == [0] and cut.size == 0


def test_a_backend_that_disagrees_on_the_probe_is_not_used(monkeypatch):
    """Where the backend's batch call would give other ids than __call__ (a class that changes
    the text first, say), the load-time probe sees it and the encoder keeps __call__."""
    from types import SimpleNamespace

    from pipeline.engines import tokenize

    class Shifted:
        truncation = padding = None
        encode_special_tokens = False

        def __init__(self, real):
            self.real = real

        def encode_batch(self, texts, add_special_tokens):
            return [SimpleNamespace(ids=[t + 1 for t in e.ids]) for e in self.real.encode_batch(texts, add_special_tokens=False)]

    tok = AutoTokenizer.from_pretrained(SAMPLE)
    monkeypatch.setattr(tokenize, "fast_backend", lambda t: Shifted(t._tokenizer))
    enc = PairEncoder(tok, QWEN3_RERANKER, 8192)
    assert enc.backend is None
    cols = _columns(5)
    e = enc.encode(*cols)
    want = _recipe(tok, QWEN3_RERANKER, 8192, *cols)
    assert [e.ids[e.offsets[k]:e.offsets[k + 1]].tolist() for k in range(len(want))] == want


def test_the_direct_loaders_tokenizer_takes_the_rust_batch_path_with_the_recipes_ids():
    """The tokenizer of the direct load (fast_tokenizer.py, no transformers) is the same backend
    behind the same call, so it takes the batch path too, with AutoTokenizer's recipe ids."""
    from pipeline.engines import fast_tokenizer

    tok, why = fast_tokenizer.load(SAMPLE)
    assert tok is not None, why
    e = PairEncoder(tok, QWEN3_RERANKER, 120)
    assert e.backend is tok.backend_tokenizer
    cols = _columns(150)
    got = e.encode(*cols)
    want = _recipe(AutoTokenizer.from_pretrained(SAMPLE), QWEN3_RERANKER, 120, *cols)
    assert [got.ids[got.offsets[k]:got.offsets[k + 1]].tolist() for k in range(len(want))] == want
