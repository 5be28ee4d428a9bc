"""Other reranker families against the plain transformers forward, float32 on CPU, to 1e-5:
BERT, XLM-R and ModernBERT cross-encoders, a Qwen3 seq-cls conversion, and a Gemma-style causal
LM through the bge-reranker-v2-gemma template. Detection, templates and the fingerprint too."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import PREFIX, SUFFIX, _corpus, real_pairs, run_cli
from pipeline.config import RunConfig
from pipeline.run import run
from pipeline.engines.template import BGE_RERANKER_V2_GEMMA

TOL = 1e-5


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from pipeline.bench.synthetic import build_cross_encoder, build_gemma_reranker, build_qwen3_seq_cls

    texts = _corpus()
    d = {}
    for arch, labels in (("bert", 1), ("xlm-roberta", 1), ("modernbert", 2)):
        d[arch] = str(build_cross_encoder(tmp_path_factory.mktemp(arch), arch, texts, num_labels=labels))
    d["qwen3-seq-cls"] = str(build_qwen3_seq_cls(tmp_path_factory.mktemp("q3cls"), texts))
    d["gemma"] = str(build_gemma_reranker(tmp_path_factory.mktemp("gemma"), texts))
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    p = tmp_path_factory.mktemp("fam") / "pairs.parquet"
    pq.write_table(real_pairs(70), p)  # 210 real pairs, short and long
    return p


def _ours(tmp_path, pairs, model, **kw):
    out = tmp_path / "out.parquet"
    run(RunConfig(inputs=(str(pairs),), output=str(out), model=model, device="cpu", window_pairs=64,
                  overwrite=True, restart=True, **kw), progress=False)
    t = pq.read_table(out)
    got = dict(zip(t.column("doc_id").to_pylist(), t.column("score").to_numpy()))
    src = pq.read_table(pairs)
    return np.array([got[k] for k in src.column("doc_id").to_pylist()]), src


def _ref_cross_encoder(model_dir, queries, docs, max_length):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    def trunc(q, d):  # only_second, or longest_first where the query alone is too long
        try:
            tok(q, d, truncation="only_second", max_length=max_length)
            return "only_second"
        except Exception:
            return "longest_first"

    out = []
    for k in range(0, len(queries), 16):
        feats = [tok(q, d, truncation=trunc(q, d), max_length=max_length)
                 for q, d in zip(queries[k:k + 16], docs[k:k + 16])]
        inputs = tok.pad(feats, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        out.append(torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, 1])
    return torch.cat(out).numpy()


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "modernbert"])
@pytest.mark.parametrize("max_length", [512, 48])
def test_cross_encoders_equal_transformers(tmp_path, family_models, pairs, arch, max_length):
    ours, src = _ours(tmp_path, pairs, family_models[arch], max_length=max_length)
    ref = _ref_cross_encoder(family_models[arch], src.column("query").to_pylist(),
                             src.column("document").to_pylist(), max_length)
    assert ref.std() > 0.02
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()


def _template_ids(tok, template, instr, q, d, max_length):
    pre = tok.encode(template.prefix, add_special_tokens=False)
    suf = tok.encode(template.suffix, add_special_tokens=False)
    body = tok(template.format_body(instr, q, d), truncation="longest_first",
               max_length=max_length - len(pre) - len(suf), add_special_tokens=False)["input_ids"]
    return pre + body + suf


def _left_padded(tok, seqs):
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def test_qwen3_seq_cls_equals_transformers(tmp_path, family_models, pairs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.engines.template import QWEN3_RERANKER

    m = family_models["qwen3-seq-cls"]
    for engine in ("fused", "transformers"):
        ours, src = _ours(tmp_path, pairs, m, engine=engine, max_length=200)
        tok = AutoTokenizer.from_pretrained(m)
        model = AutoModelForSequenceClassification.from_pretrained(m, dtype=torch.float32).eval()
        seqs = [_template_ids(tok, QWEN3_RERANKER, i, q, d, 200) for i, q, d in zip(
            src.column("instruction").to_pylist(), src.column("query").to_pylist(), src.column("document").to_pylist())]
        ref = []
        for k in range(0, len(seqs), 16):
            ids, mask = _left_padded(tok, seqs[k:k + 16])
            with torch.no_grad():
                ref.append(torch.sigmoid(model(input_ids=ids, attention_mask=mask).logits[:, 0]))
        ref = torch.cat(ref).numpy()
        assert ref.std() > 0.02
        assert np.abs(ours - ref).max() <= TOL, (engine, np.abs(ours - ref).max())


def test_gemma_style_yes_only_template_equals_transformers(tmp_path, family_models, pairs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = family_models["gemma"]
    ours, src = _ours(tmp_path, pairs, m)  # the template comes from model_type gemma
    tok = AutoTokenizer.from_pretrained(m)
    model = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
    yes = tok.convert_tokens_to_ids("Yes")
    seqs = [_template_ids(tok, BGE_RERANKER_V2_GEMMA, "", q, d, 8192) for q, d in zip(
        src.column("query").to_pylist(), src.column("document").to_pylist())]
    assert seqs[0][0] == tok.convert_tokens_to_ids("<bos>")
    ref = []
    for k in range(0, len(seqs), 16):
        ids, mask = _left_padded(tok, seqs[k:k + 16])
        with torch.no_grad():
            ref.append(model(input_ids=ids, attention_mask=mask).logits[:, -1, yes])
    ref = torch.cat(ref).numpy()
    assert np.abs(ours - 1 / (1 + np.exp(-ref))).max() <= TOL
    raw, _ = _ours(tmp_path, pairs, m, activation="none")
    assert np.abs(raw - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert ref.std() > 0.05


def test_template_file_and_yes_no_raw_logits(tmp_path, tied_model, pairs):
    # The built-in Qwen3 template written out as a file gives the built-in's scores.
    spec = {"prefix": PREFIX, "body": "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
            "suffix": SUFFIX, "positive": "yes", "negative": "no"}
    f = tmp_path / "t.json"
    f.write_text(json.dumps(spec))
    a, _ = _ours(tmp_path, pairs, tied_model)
    b, _ = _ours(tmp_path, pairs, tied_model, template=str(f))
    assert np.abs(a - b).max() == 0
    raw, _ = _ours(tmp_path, pairs, tied_model, activation="none")  # log-odds yes vs no
    assert np.abs(1 / (1 + np.exp(-raw)) - a).max() <= TOL


def test_family_detection_override_and_fingerprint(tmp_path, family_models, tied_model, pairs):
    from pipeline.engines.resolve import inspect_model

    kinds = {k: inspect_model(RunConfig(inputs=(), output="", model=v)).family for k, v in family_models.items()}
    assert kinds == {"bert": "seq-cls-encoder", "xlm-roberta": "seq-cls-encoder", "modernbert": "seq-cls-encoder",
                     "qwen3-seq-cls": "seq-cls-causal", "gemma": "yes-no"}
    # --family seq-cls on a causal LM has no classification head to load: a clear model error.
    r = run_cli(["run", pairs, "--model", tied_model, "--family", "seq-cls", "-o", tmp_path / "x.parquet", "-q"])
    assert r.exit_code == 2
    assert "the checkpoint lacks 1 weights the seq-cls-causal head needs (e.g. score.weight); check --family" in r.output
    # The family and activation are part of the fingerprint.
    out = tmp_path / "o.parquet"
    from pipeline.errors import Interrupted

    done = tmp_path / "o.parquet.ckpt" / "done"

    def stop():  # once a unit is committed: a run that scored nothing leaves no checkpoint
        return done.is_dir() and any(done.iterdir())
    stop.signum = 15
    with pytest.raises(Interrupted):
        run(RunConfig(inputs=(str(pairs),), output=str(out), model=tied_model, device="cpu", window_pairs=40),
            progress=False, should_stop=stop)
    r = run_cli(["run", pairs, "--model", tied_model, "--device", "cpu", "--window", 40, "-o", out, "-q",
                 "--activation", "none"])
    assert r.exit_code == 2, r.output
    assert ("the checkpoint was made with --activation auto, this run has --activation none; rerun with "
            "--activation auto to resume, or pass --restart to start over") in r.output


def test_packed_encoder_equals_padded_engine(tmp_path, family_models, pairs):
    # The packed forward (fused_encoder.py) and the padded transformers forward, through our
    # whole pipeline: same scores, so either engine is the reference for the other.
    packed, _ = _ours(tmp_path, pairs, family_models["bert"], max_length=128)
    padded, _ = _ours(tmp_path, pairs, family_models["bert"], max_length=128, engine="transformers")
    assert packed.std() > 0.02
    assert np.abs(packed - padded).max() <= TOL


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (False, 3)])
def test_padded_sdpa_equals_one_sdpa_per_sequence(causal, window):
    import torch.nn.functional as F

    from pipeline.engines.padded_attention import padded_sdpa

    torch.manual_seed(0)
    lens = [5, 1, 9, 4]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    q, k, v = torch.randn(sum(lens), 4, 8), torch.randn(sum(lens), 2, 8), torch.randn(sum(lens), 2, 8)
    got = padded_sdpa(q, k, v, cu, max(lens), 0.3, causal=causal, window=window)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(e - s)
        mask = torch.ones(e - s, e - s, dtype=torch.bool)
        if causal:
            mask &= i[None, :] <= i[:, None]
        if window is not None:
            mask &= (i[None, :] - i[:, None]).abs() <= window
        ref = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                             attn_mask=mask, scale=0.3, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(got[s:e], ref, atol=1e-6)
