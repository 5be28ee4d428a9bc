"""Cross-encoder pairs tokenized by the Rust batch call (tokenize.py, CrossEncoderEncoder) with a
tokenizer read without transformers (cross_tokenizer.py) give transformers' ids and token types,
token for token, on the shared real data: BERT (WordPiece, lower-case, BertTokenizer), XLM-R
(Unigram, XLMRobertaTokenizer) and ModernBERT (byte-level BPE, PreTrainedTokenizerFast), with
queries longer than max_length, empty documents and max_length at its edges."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import ROOT, _corpus, real_pairs
from pipeline.bench.synthetic import train_cross_tokenizer
from pipeline.engines import cross_tokenizer
from pipeline.engines.tokenize import CrossEncoderEncoder

STYLES = ("bert", "xlmr", "modernbert")
LONG = " ".join(["the planet rotates faster after a meteorite impact"] * 40)  # ~300+ tokens
ODD = [  # (query, document)
    ("", ""),
    ("q", ""),
    (LONG, "a short document"),
    (LONG, ""),
    ("a short query", LONG),
    ("Ünïcödé QUERY 日本語のクエリ？", "Ça coûte 42 € — naïve café 🙂🙂 ﬁ\u00a0x"),
    ("  spaced  query\t", "\n\n  leading and trailing  \n"),
    ("[SEP] [CLS] <s> </s>", "text with [MASK] <mask> special tokens"),
]


@pytest.fixture(scope="module")
def tokenizers_dirs(tmp_path_factory):
    texts = _corpus()
    out = {}
    for style in STYLES:
        d = tmp_path_factory.mktemp(f"tok-{style}")
        train_cross_tokenizer(d, style, texts)
        out[style] = str(d)
    return out


def _pairs(per_set: int = 120):
    t = real_pairs(per_set)
    q, d = t.column("query").to_pylist(), t.column("document").to_pylist()
    return q + [a for a, _ in ODD], d + [b for _, b in ODD]


def _reference(tok, queries, documents, max_length):
    """transformers, pair by pair: only_second, longest_first where that raises."""
    ids, types = [], []
    for q, d in zip(queries, documents):
        kw = dict(max_length=max_length, return_attention_mask=False)
        try:
            one = tok([q], [d], truncation="only_second", **kw)
        except Exception:
            one = tok([q], [d], truncation="longest_first", **kw)
        ids.append(one["input_ids"][0])
        types.append(one["token_type_ids"][0] if "token_type_ids" in one else None)
    return ids, types


def _split(enc, k):
    a, b = enc.offsets[k], enc.offsets[k + 1]
    return enc.ids[a:b].tolist(), None if enc.type_ids is None else enc.type_ids[a:b].tolist()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("max_length", [512, 48, 7, 4, 3, 2])
def test_ids_and_types_equal_transformers(tokenizers_dirs, style, max_length):
    ours, why = cross_tokenizer.load(tokenizers_dirs[style])
    assert ours is not None, why
    ref = AutoTokenizer.from_pretrained(tokenizers_dirs[style])
    queries, documents = _pairs()
    want_ids, want_types = _reference(ref, queries, documents, max_length)
    for tok in (ours, ref):  # our load, and transformers' own tokenizer through the same fast path
        enc = CrossEncoderEncoder(tok, max_length)
        assert enc.backend is not None  # the batch call is the path under test
        e = enc.encode([None] * len(queries), queries, documents)
        assert e.ids.dtype == np.int32 and e.offsets.dtype == np.int64
        got = [_split(e, k) for k in range(len(queries))]
        assert [g[0] for g in got] == want_ids
        if style == "bert":  # BERT's token types go to the model; the others have none
            assert e.type_ids is not None and [g[1] for g in got] == want_types
        else:
            assert e.type_ids is None and "token_type_ids" not in ref.model_input_names
        assert e.truncated.tolist() == [len(x) >= max_length for x in want_ids]


def test_pair_templates_and_long_query(tokenizers_dirs):
    """The special tokens around each text, and a query longer than max_length cut while its short
    document stays whole ('longest_first'), in a window whose other pair keeps its whole query."""
    for style in STYLES:
        tok, _ = cross_tokenizer.load(tokenizers_dirs[style])
        b = tok.backend_tokenizer
        q, d, g = (b.encode(t, add_special_tokens=False).ids for t in ("alpha", "beta", "gamma"))
        first, sep = (tok.bos_token_id, [tok.eos_token_id] * 2) if style == "xlmr" else (tok.cls_token_id,
                                                                                         [tok.sep_token_id])
        e = CrossEncoderEncoder(tok, 32).encode([None, None], ["alpha", LONG], ["beta", "gamma"])
        ids, types = _split(e, 0)
        assert ids == [first] + q + sep + d + sep[:1]
        if style == "bert":
            assert types == [0] * (len(q) + 2) + [1] * (len(d) + 1)
        long_ids, _ = _split(e, 1)
        assert len(long_ids) == 32 and long_ids[-len(g) - 1:] == g + sep[:1]
        assert e.truncated.tolist() == [False, True]


def test_xlmr_file_pipeline_rebuilt_as_transformers_does(tmp_path, tokenizers_dirs):
    """XLMRobertaTokenizer ignores tokenizer.json's normalizer steps and pre-tokenizer (it
    rebuilds them); a file whose own pipeline differs still gives transformers' ids."""
    d = tmp_path / "xlmr-edited"
    d.mkdir()
    for name in os.listdir(tokenizers_dirs["xlmr"]):
        (d / name).write_bytes(open(os.path.join(tokenizers_dirs["xlmr"], name), "rb").read())
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, why = cross_tokenizer.load(str(d))
    assert ours is not None, why
    ref = AutoTokenizer.from_pretrained(str(d))
    queries, documents = _pairs(30)
    e = CrossEncoderEncoder(ours, 96).encode([None] * len(queries), queries, documents)
    assert [_split(e, k)[0] for k in range(len(queries))] == _reference(ref, queries, documents, 96)[0]
    # the file's Lowercase step is not applied, as transformers does not apply it
    assert ours.backend_tokenizer.encode("An Apple").ids == ref("An Apple")["input_ids"]
    assert ours.backend_tokenizer.encode("An Apple").ids != ours.backend_tokenizer.encode("an apple").ids


def test_a_plain_tokenizer_file_loads_as_transformers_reads_it(tmp_path, tokenizers_dirs):
    """A PreTrainedTokenizerFast file (ModernBERT's) is read by the library as it is; its own
    truncation and padding are dropped and a missing post-processor gets transformers' template,
    as transformers' load does: the same ids and token types as transformers' call."""
    d = tmp_path / "modernbert-edited"
    d.mkdir()
    for name in os.listdir(tokenizers_dirs["modernbert"]):
        (d / name).write_bytes(open(os.path.join(tokenizers_dirs["modernbert"], name), "rb").read())
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = None
    tj["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                     "pad_type_id": 0, "pad_token": "[PAD]"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, why = cross_tokenizer.load(str(d))
    assert ours is not None, why
    b = ours.backend_tokenizer
    assert b.truncation is None and b.padding is None and b.post_processor is not None
    ref = AutoTokenizer.from_pretrained(str(d))
    queries, documents = _pairs(30)
    e = CrossEncoderEncoder(ours, 96).encode([None] * len(queries), queries, documents)
    want = _reference(ref, queries, documents, 96)
    assert [_split(e, k)[0] for k in range(len(queries))] == want[0]
    assert b.encode("alpha", "beta").type_ids == ref("alpha", "beta", return_token_type_ids=True)["token_type_ids"]


@pytest.mark.parametrize("edit, reason", [
    ({"tokenizer_class": "RobertaTokenizer"},
     "tokenizer class 'RobertaTokenizer' is not one we read without transformers"),
    ({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}, "remote code or another tokenizer backend"),
    ({"add_eos_token": False}, "tokenizer options we do not reproduce (add_eos_token)"),
    ({"split_special_tokens": True}, "tokenizer options we do not reproduce (split_special_tokens)"),
    ({"sep_token": "[NOT-THERE]"}, "sep_token '[NOT-THERE]' is not an unnormalized special token of tokenizer.json"),
])
def test_load_refuses_what_it_does_not_reproduce(tmp_path, tokenizers_dirs, caplog, edit, reason):
    from pipeline.config import RunConfig
    from pipeline.engines.loading import cross_encoder_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    src = tokenizers_dirs["bert"]
    for name in os.listdir(src):
        (d / name).write_bytes(open(os.path.join(src, name), "rb").read())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(edit)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, why = cross_tokenizer.load(str(d))
    assert tok is None and why == reason
    with caplog.at_level(logging.INFO, logger="pipeline.engines.loading"):
        assert cross_encoder_tokenizer(RunConfig(inputs=(), output="", model=str(d))) is None
    assert f"model {d}: tokenizer loaded through transformers ({reason})" in caplog.text


def test_probe_disagreement_falls_back_to_the_call(tokenizers_dirs, monkeypatch, caplog):
    tok, _ = cross_tokenizer.load(tokenizers_dirs["bert"])
    queries, documents = _pairs(10)
    want = CrossEncoderEncoder(tok, 64).encode([None] * len(queries), queries, documents)

    def off_by_one(self, q, d):
        e = CrossEncoderEncoder.encode_by_call(self, q, d)
        e.ids[0] += 1
        return e

    monkeypatch.setattr(CrossEncoderEncoder, "_encode_fast", off_by_one)
    with caplog.at_level(logging.INFO, logger="pipeline.engines.tokenize"):
        enc = CrossEncoderEncoder(tok, 64)
    assert enc.backend is None
    assert ("tokenizer: its Rust batch call over pairs and its __call__ disagree on a probe; using __call__"
            in caplog.text)
    got = enc.encode([None] * len(queries), queries, documents)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.type_ids, want.type_ids)


def test_loads_and_encodes_without_transformers(tokenizers_dirs):
    code = ("import sys; from pipeline.engines import cross_tokenizer; from pipeline.engines.tokenize import "
            "CrossEncoderEncoder\n"
            "for d in sys.argv[1:]:\n"
            "    tok, why = cross_tokenizer.load(d); assert tok is not None, why\n"
            "    e = CrossEncoderEncoder(tok, 16).encode([None, None], ['a query', 'q'], ['a document', ''])\n"
            "    assert len(e) == 2 and e.lengths.min() > 2\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "print('ok')")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code, *tokenizers_dirs.values()], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_peer_bench_reports_tokenizer_load_and_cli_vs_st(tmp_path, tokenizers_dirs):
    """`bench --peer`'s tokenizer rows load in fresh processes (ours without transformers, the
    reason where ours falls back), its ids check tells equal from different, and its table prints
    them with the CLI's rate against predict's."""
    from pipeline.bench.peer import format_peer_table, ids_equal_transformers, tokenizer_load_rows

    rows = tokenizer_load_rows(tokenizers_dirs["modernbert"], True, 1)
    assert rows["ours"]["loaded"] and rows["transformers"]["loaded"] and "fallback_reason" not in rows["ours"]
    assert 0 < rows["ours"]["load_s"] == rows["ours"]["load_s_min"]
    queries, documents = _pairs(20)
    tok, _ = cross_tokenizer.load(tokenizers_dirs["modernbert"])
    enc = CrossEncoderEncoder(tok, 40).encode(None, queries, documents)
    assert ids_equal_transformers(tokenizers_dirs["modernbert"], enc, queries, documents, 40)
    enc.ids[-1] += 1
    assert not ids_equal_transformers(tokenizers_dirs["modernbert"], enc, queries, documents, 40)
    d = tmp_path / "roberta"
    d.mkdir()
    for name in os.listdir(tokenizers_dirs["bert"]):
        (d / name).write_bytes(open(os.path.join(tokenizers_dirs["bert"], name), "rb").read())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "RobertaTokenizer"}))
    fell = tokenizer_load_rows(str(d), True, 1)["ours"]
    assert not fell["loaded"]
    assert fell["fallback_reason"] == "tokenizer class 'RobertaTokenizer' is not one we read without transformers"

    row = {"pairs_per_s": 10.0, "pairs_per_s_min": 9.0, "pairs_per_s_max": 11.0}
    rec = {"arch": "minilm-l6", "workload": "w-mixed", "device": "cpu", "dtype": "float32", "pairs": 64, "repeats": 1,
           "engine": row, "engine_tok": row, "st_bs32": row, "st_best": "st_bs32", "ratio_model_only_vs_st": 1.0,
           "ratio_with_tokenize_vs_st": 1.0, "max_abs_diff_vs_st": 0.0, "tokenizer_class": "BertTokenizer",
           "tokenizer_load": {"ours": rows["ours"], "transformers": rows["transformers"]}, "st_load_s": 0.5,
           "tokenizer_path": "rust-batch", "tokenizer_ids_equal_transformers": True,
           "ratio_cli_scoring_vs_st": 2.5, "ratio_cli_wall_vs_st": 0.8,
           "cli": {"runs": [{"startup_tokenizer_s": 0.2}], "wall_s": 8.0, "wall_s_min": 8.0, "wall_s_max": 8.0,
                   "pairs_per_s": 25.0, "pairs_per_s_min": 24.0, "pairs_per_s_max": 26.0, "wall_pairs_per_s": 8.0,
                   "startup_tokenizer_s": 0.2, "wall_over_scoring": 3.1}}
    table = format_peer_table(rec)
    assert "tokenizing: rust-batch, ids equal to transformers': True" in table
    assert (f"tokenizer load, fresh process (BertTokenizer): ours {rows['ours']['load_s']:.3f} s "
            f"[{rows['ours']['load_s_min']:.3f}-{rows['ours']['load_s_max']:.3f}], transformers ") in table
    assert ("cli scoring (64 pairs): 25.0 pairs/s [24.0-26.0], wall 8.0 pairs/s, tokenizer stage 0.20 s; vs "
            "sentence-transformers (st_bs32, load 0.50 s): 2.5x scoring, 0.8x wall") in table
    # With --cli-pairs the line names the CLI row's own count.
    assert "cli scoring (640 pairs): 25.0 pairs/s" in format_peer_table({**rec, "cli_pairs": 640})
