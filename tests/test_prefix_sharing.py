"""Shared prompt prefixes: the mask is exactly the unshared causal one, the layout keeps true
positions, and scores with sharing forced on equal the plain recipe (float32, CPU) to 1e-5."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import real_pairs, reference_scores, shared
from pipeline.engines import prefix
from pipeline.engines.attention import causal_mask_bottom_right, packed_attention
from pipeline.config import RunConfig
from pipeline.run import run

TOL = 1e-5


def _flat(seqs):
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    return np.concatenate([np.asarray(s, np.int32) for s in seqs]), offsets


# -- prefixes, plans, layout ---------------------------------------------------------------------
def test_prefix_is_the_common_prefix_of_the_ids_keeping_one_token_each():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4], [7, 7], [1, 2, 3, 4, 5, 6]]
    keys = np.array([10, 10, 10, 11, 12])
    ids, off = _flat(seqs)
    pl = prefix.prefix_lengths(ids, off, np.arange(5), keys)
    # Group 10: common prefix [1, 2, 3]; groups of one share nothing.
    assert pl.tolist() == [3, 3, 3, 0, 0]
    # Equal sequences: the last token stays each candidate's own.
    ids, off = _flat([[4, 5, 6], [4, 5, 6]])
    assert prefix.prefix_lengths(ids, off, np.arange(2), np.array([1, 1])).tolist() == [2, 2]
    # The ids decide, not the key: a merged token at the seam ends the prefix there.
    ids, off = _flat([[1, 2, 30, 4], [1, 2, 3, 4]])
    assert prefix.prefix_lengths(ids, off, np.arange(2), np.array([5, 5])).tolist() == [2, 2]


def test_plan_keeps_groups_together_within_the_budget():
    rng = np.random.default_rng(0)
    keys = np.repeat(np.arange(6), [1, 9, 3, 20, 2, 5])
    plen = np.where(np.bincount(keys)[keys] > 1, 30, 0)
    lengths = plen + rng.integers(1, 40, len(keys))
    budget = 200
    batches = prefix.plan_shared(lengths, plen, keys, budget)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(keys)))
    for b in batches:
        k = keys[b]
        runs = k[np.r_[True, k[1:] != k[:-1]]]
        assert len(runs) == len(set(runs.tolist())), "a group's pairs must be in a row"
        computed = sum(int(plen[b][k == g][0]) for g in runs) + int((lengths[b] - plen[b]).sum())
        assert computed <= budget or len(b) == 1
    # Group 3 (20 pairs of ~50 tokens) cannot fit one batch: it was split.
    assert sum(1 for b in batches if (keys[b] == 3).any()) > 1


def test_layout_has_true_positions_and_reads_each_pair_back():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [6, 6, 6], [1, 2, 3, 4, 8, 8]]
    ids, off = _flat(seqs)
    idx = np.array([0, 1, 3, 2])
    keys = np.array([1, 1, 2, 1])
    plen = prefix.prefix_lengths(ids, off, np.arange(4), keys)[idx]
    b = prefix.gather_shared(ids, off, idx, plen, keys[idx])
    assert len(b.ids) == 3 + 2 + 1 + 3 + 3 and b.unshared_tokens == 18
    # Each pair = its group's prefix rows + its rest rows, positions 0..L-1 (true RoPE positions).
    qrows = {}
    for blk in range(len(b.cu_q) - 1):
        ks, ke = b.cu_k[blk], b.cu_k[blk + 1]
        qs, qe = b.cu_q[blk], b.cu_q[blk + 1]
        rows = b.kv_idx[ks:ke]
        assert rows[-(qe - qs):].tolist() == list(range(qs, qe))  # the block's own rows come last
        qrows[qe - 1] = rows
    for j, i in enumerate(idx):
        rows = qrows[b.last[j]]
        assert b.ids[rows].tolist() == seqs[i]
        assert b.pos[rows].tolist() == list(range(len(seqs[i])))


# -- the attention mask --------------------------------------------------------------------------
def test_bottom_right_mask():
    m = causal_mask_bottom_right(3, 5)
    want = torch.tensor([[j <= i + 2 for j in range(5)] for i in range(3)])
    assert torch.equal(m, want)
    assert torch.equal(causal_mask_bottom_right(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def _dense_reference(q, k, v, mask, scale):
    # Plain softmax attention with an explicit boolean mask, per head (GQA by repeating k/v).
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def test_shared_attention_equals_unshared_causal_attention():
    """Random q/k/v, float32: a candidate's rest rows attending to the shared prefix give what the
    full unshared sequence gives under a plain causal mask."""
    torch.manual_seed(0)
    H, Hkv, D = 4, 2, 8
    seqs_len = {"a": (7, [3, 5, 1]), "b": (4, [2, 6])}  # group: (prefix length, rest lengths)
    rows, unshared = {}, []
    for g, (p, rests) in seqs_len.items():
        pre = [torch.randn(p, H, D), torch.randn(p, Hkv, D), torch.randn(p, Hkv, D)]
        for r in rests:
            own = [torch.randn(r, H, D), torch.randn(r, Hkv, D), torch.randn(r, Hkv, D)]
            unshared.append((g, p, r, [torch.cat([x, y]) for x, y in zip(pre, own)]))
        rows[g] = pre
    # The packed shared layout, built by the same code the scorer uses.
    seqs = [list(range(p + r)) for _, p, r, _ in unshared]
    ids, off = _flat(seqs)
    keys = np.array([0 if g == "a" else 1 for g, *_ in unshared])
    plen = np.array([p for _, p, _, _ in unshared])
    idx = np.arange(len(unshared))
    b = prefix.gather_shared(ids, off, idx, plen, keys)
    # Fill q/k/v rows of the layout from each pair's unshared tensors (prefix rows are equal).
    T = len(b.ids)
    q, k, v = torch.zeros(T, H, D), torch.zeros(T, Hkv, D), torch.zeros(T, Hkv, D)
    for blk in range(len(b.cu_q) - 1):
        qs, qe = int(b.cu_q[blk]), int(b.cu_q[blk + 1])
        j = int(np.searchsorted(b.last, qe - 1)) if (qe - 1) in b.last else None
        src = unshared[j if j is not None else int(np.searchsorted(b.last, qe))][3]
        pos = b.pos[qs:qe]
        q[qs:qe], k[qs:qe], v[qs:qe] = src[0][pos], src[1][pos], src[2][pos]
    shared_t = (torch.from_numpy(b.kv_idx), torch.from_numpy(b.cu_k).int(), int(np.diff(b.cu_k).max()))
    out = packed_attention(q, k, v, torch.from_numpy(b.cu_q).int(), int(np.diff(b.cu_q).max()), D ** -0.5,
                           "sdpa", shared_t)
    for j, (_, p, r, (uq, uk, uv)) in enumerate(unshared):
        L = p + r
        ref = _dense_reference(uq, uk, uv, torch.ones(L, L, dtype=torch.bool).tril(), D ** -0.5)
        # The candidate's rest rows in the layout: the block ending at b.last[j].
        got = out[int(b.last[j]) - r + 1:int(b.last[j]) + 1]
        assert torch.allclose(got, ref[p:], atol=1e-6, rtol=0), (got - ref[p:]).abs().max()
    # The prefix rows (computed once per group) equal the unshared prefix rows too.
    first = {0: 0, 1: 3}
    for g, j in first.items():
        _, p, r, (uq, uk, uv) = unshared[j]
        ref = _dense_reference(uq, uk, uv, torch.ones(p + r, p + r, dtype=torch.bool).tril(), D ** -0.5)
        s = int(b.last[j]) - r + 1 - p
        assert torch.allclose(out[s:s + p], ref[:p], atol=1e-6, rtol=0)


# -- scores ---------------------------------------------------------------------------------------
def _run(tmp_path, inp, model, name, **kw):
    cfg = RunConfig(inputs=(str(inp),), output=str(tmp_path / f"{name}.parquet"), model=model, device="cpu",
                    overwrite=True, restart=True, **kw)
    summary = run(cfg, progress=False)
    return pq.read_table(cfg.output), summary


def _scores(out, src, key="doc_id"):
    got = dict(zip(out.column(key).to_pylist(), out.column("score").to_numpy()))
    return np.array([got[d] for d in src.column(key).to_pylist()])


def _ref(model, src, max_length=8192):
    return reference_scores(model, src.column("instruction").to_pylist(), src.column("query").to_pylist(),
                            src.column("document").to_pylist(), max_length=max_length)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    # Real pairs with query_id and per-row instructions (three sets, 2-4 candidates per query).
    t = real_pairs(40)
    path = tmp_path_factory.mktemp("share") / "pairs.parquet"
    pq.write_table(t, path)
    return path


@pytest.mark.parametrize("which", ["tied", "untied"])
@pytest.mark.parametrize("max_length,budget,window", [(8192, None, 10000), (120, None, 50), (8192, 300, 7)])
def test_sharing_on_equals_the_recipe(tmp_path, models, long_file, which, max_length, budget, window):
    """query_id + per-row instructions; a cut document (max 120); groups split across batches
    (300-token budget) and units (7-pair windows)."""
    model = models[which]
    src = pq.read_table(long_file)
    out, summary = _run(tmp_path, long_file, model, "on", prefix_sharing="on", max_length=max_length,
                        max_batch_tokens=budget, window_pairs=window)
    ref = _ref(model, src, max_length)
    assert ref.std() > 0.02
    assert np.abs(_scores(out, src) - ref).max() <= TOL
    before, after = summary.extra["tokens_before_sharing"], summary.extra["tokens_after_sharing"]
    assert before == summary.tokens and after < 0.8 * before, (before, after)


def test_query_longer_than_max_length(tmp_path, tied_model):
    """The body is cut inside the query: every candidate of a query has the same ids, so all but
    the last token is shared."""
    t = pq.read_table(shared("spartqa.long.parquet")).slice(0, 24)
    path = tmp_path / "longq.parquet"
    pq.write_table(t, path)
    from transformers import AutoTokenizer

    from pipeline.engines.template import QWEN3_RERANKER

    tok = AutoTokenizer.from_pretrained(tied_model)
    frame = len(tok.encode(QWEN3_RERANKER.prefix + QWEN3_RERANKER.suffix, add_special_tokens=False))
    max_length = frame + 40
    qlens = [len(tok.encode(f"<Instruct>: {i}\n<Query>: {q}", add_special_tokens=False))
             for i, q in zip(t.column("instruction").to_pylist(), t.column("query").to_pylist())]
    assert min(qlens) > 45  # the cut falls inside the query
    out, summary = _run(tmp_path, path, tied_model, "on", prefix_sharing="on", max_length=max_length)
    ref = _ref(tied_model, t, max_length)
    assert np.abs(_scores(out, t) - ref).max() <= TOL
    assert summary.extra["tokens_after_sharing"] < 0.5 * summary.extra["tokens_before_sharing"]


def test_nested_input_with_sharing(tmp_path, tied_model):
    nested = pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 25)
    pn = tmp_path / "n.parquet"
    pq.write_table(nested, pn)
    out, _ = _run(tmp_path, pn, tied_model, "on", prefix_sharing="on", window_pairs=30)
    flat = out.sort_by([("query_id", "ascending"), ("doc_index", "ascending")])
    ref = reference_scores(tied_model, flat.column("instruction").to_pylist(), flat.column("query").to_pylist(),
                           flat.column("document").to_pylist())
    assert flat.num_rows > 90
    assert np.abs(flat.column("score").to_numpy() - ref).max() <= TOL


@pytest.mark.parametrize("engine", ["fused", "transformers"])
def test_on_equals_off_on_both_engines(tmp_path, tied_model, long_file, engine):
    src = pq.read_table(long_file)
    on, s_on = _run(tmp_path, long_file, tied_model, "on", prefix_sharing="on", engine=engine,
                    max_batch_tokens=500)
    off, s_off = _run(tmp_path, long_file, tied_model, "off", prefix_sharing="off", engine=engine,
                      max_batch_tokens=500)
    assert np.abs(_scores(on, src) - _scores(off, src)).max() <= TOL
    assert s_off.extra["tokens_after_sharing"] == s_off.tokens
    assert s_on.extra["tokens_after_sharing"] < s_off.extra["tokens_after_sharing"]


def test_auto_shares_only_where_it_pays(tmp_path, tied_model, long_file, monkeypatch):
    from pipeline.engines import resolve

    _, s = _run(tmp_path, long_file, tied_model, "auto-cpu")
    assert s.extra["tokens_after_sharing"] == s.tokens  # auto shares on CUDA only
    monkeypatch.setattr(resolve, "SHARING_AUTO_DEVICES", ("cuda", "cpu"))  # the rule itself, on this CPU
    _, s = _run(tmp_path, long_file, tied_model, "auto")
    assert s.extra["tokens_after_sharing"] < 0.8 * s.tokens
    # One candidate per query: nothing to share, the plain path runs.
    src = pq.read_table(long_file)
    firsts = np.unique(np.asarray(src.column("query_id").to_pylist()), return_index=True)[1]
    one = src.take(pa.array(np.sort(firsts)))
    assert one.num_rows == len(set(src.column("query_id").to_pylist())) > 10
    p1 = tmp_path / "one.parquet"
    pq.write_table(one, p1)
    _, s1 = _run(tmp_path, p1, tied_model, "one-out")
    assert s1.extra["tokens_after_sharing"] == s1.tokens


@pytest.mark.parametrize("family", ["gemma", "qwen3-seq-cls"])
def test_gemma_template_and_decoder_seq_cls_share(tmp_path, long_file, family):
    """bge-reranker-v2-gemma's template (query before document, transformers engine) and a Qwen3
    seq-cls head (fused engine): sharing on equals off."""
    from conftest import _corpus
    from pipeline.bench.synthetic import build_gemma_reranker, build_qwen3_seq_cls

    build = build_gemma_reranker if family == "gemma" else build_qwen3_seq_cls
    model = str(build(tmp_path / "model", _corpus()))
    src = pq.read_table(long_file)
    on, s_on = _run(tmp_path, long_file, model, "on", prefix_sharing="on", max_batch_tokens=400)
    off, _ = _run(tmp_path, long_file, model, "off", prefix_sharing="off")
    a, b = _scores(on, src), _scores(off, src)
    assert b.std() > 0.02
    assert np.abs(a - b).max() <= TOL
    assert s_on.extra["tokens_after_sharing"] < 0.8 * s_on.tokens


def test_cli_option_summary_and_fingerprint(tmp_path, tied_model, long_file):
    import json

    from conftest import run_cli

    s = tmp_path / "s.json"
    r = run_cli(["run", long_file, "--model", tied_model, "-o", tmp_path / "o.parquet", "-q", "--device", "cpu",
                 "--prefix-sharing", "on", "--summary", s])
    assert r.exit_code == 0, r.output
    summary = json.loads(s.read_text())
    assert summary["extra"]["tokens_before_sharing"] == summary["tokens"]
    assert 0 < summary["extra"]["tokens_after_sharing"] < summary["tokens"]
    bad = run_cli(["run", long_file, "--model", tied_model, "-o", tmp_path / "p.parquet", "--prefix-sharing", "yes"])
    assert bad.exit_code == 2 and "--prefix-sharing" in bad.output
    # Sharing does not change scores beyond float tolerance: it is not part of the fingerprint.
    assert "prefix_sharing" not in RunConfig(inputs=(), output="x").score_fields()


def test_group_keys_are_the_same_in_every_process():
    """A resumed run must pack (hence round) as the first did: keys may not depend on Python's
    per-process string hash seed."""
    import subprocess
    import sys

    code = "from pipeline.engines.prefix import group_keys; print(group_keys(['i', 'i', 'j'], ['q', 'q', 'q']).tolist())"
    outs = set()
    for seed in ("1", "2"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1
    k = eval(outs.pop())
    assert k[0] == k[1] != k[2]
