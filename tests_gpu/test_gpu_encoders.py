"""Packed cross-encoders on CUDA: the bidirectional varlen kernel against the float32 CPU
reference (bf16), and the float32 CUDA path (padded SDPA) to 1e-5. A deliberately causal kernel
must fail the same bound, so the bound can tell right from wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_conftest import _corpus, real_pairs
from pipeline.engines import fused_encoder
from pipeline.config import RunConfig
from pipeline.engines.score import load_engine

PAIRS = 240


@pytest.fixture(scope="module")
def texts():
    t = real_pairs(PAIRS // 3)
    return t.column("query").to_pylist(), t.column("document").to_pylist()


def _score(model_dir, texts, **kw):
    s = load_engine(RunConfig(inputs=(), output="", model=model_dir, max_length=512, **kw))
    q, d = texts
    enc = s.encoder.encode([""] * len(q), q, d)
    return s.score(enc), s


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "modernbert"])
def test_packed_encoder_on_cuda(tmp_path, texts, arch, monkeypatch):
    from pipeline.bench.synthetic import build_cross_encoder

    m = str(build_cross_encoder(tmp_path, arch, _corpus(), num_labels=1))
    ref, _ = _score(m, texts, device="cpu")
    assert ref.std() > 0.02
    torch.backends.cuda.matmul.allow_tf32 = False
    f32, s = _score(m, texts, device="cuda", dtype="float32")
    assert s.info.forward == "fused-encoder"
    assert np.abs(f32 - ref).max() <= 1e-5, np.abs(f32 - ref).max()
    bf, s = _score(m, texts, device="cuda")
    assert s.info.forward == "fused-encoder" and s.info.kernel in ("torch_varlen", "flash_attn"), s.info
    err = np.abs(bf - ref).max()
    print(f"{arch}: float32 cuda {np.abs(f32 - ref).max():.2e}, bf16 {s.info.kernel} {err:.2e}")
    assert err < 0.03
    # The same bound on a causal kernel: it must fail, or the bound proves nothing.
    from pipeline.engines import attention

    def causal(q, k, v, cu, max_len, scale, kernel, window=None):
        return attention.packed_attention(q, k, v, cu, max_len, scale, kernel)

    monkeypatch.setattr(fused_encoder, "bidirectional_attention", causal)
    wrong, _ = _score(m, texts, device="cuda")
    print(f"{arch}: causal kernel off by {np.abs(wrong - ref).max():.2e}")
    assert np.abs(wrong - ref).max() > 0.03


@pytest.mark.parametrize("window", [None, 64])
def test_bidirectional_attention_takes_q_k_v_as_views_of_the_qkv_rows(window):
    """The fused encoders hand the kernel q, k and v as strided views of the q/k/v GEMM's rows:
    the same result as contiguous copies."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, d = 16, 64
    lengths = [5, 300, 17, 1, 64]
    t = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    qkv = torch.randn(t, 3, h, d, device="cuda", generator=g).to(torch.bfloat16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous() and q.stride(-1) == 1
    got = fused_encoder.bidirectional_attention(q, k, v, cu, max(lengths), d ** -0.5, "torch_varlen", window)
    want = fused_encoder.bidirectional_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lengths),
                                                 d ** -0.5, "torch_varlen", window)
    assert torch.equal(got, want)


def test_a_cuda_engine_leaves_torch_one_cpu_thread(tmp_path, texts, monkeypatch):
    """On CUDA the engine gives torch's CPU pool one thread (engines/threads.py), the CPU engine
    the usable cores; the CUDA engine's float32 scores still match the CPU's."""
    from pipeline.bench.synthetic import build_cross_encoder
    from pipeline.engines.threads import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RERANK_CPU_THREADS", raising=False)
    before, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    try:
        m = str(build_cross_encoder(tmp_path, "bert", _corpus(), num_labels=1))
        ref, _ = _score(m, texts, device="cpu")
        assert torch.get_num_threads() == usable_cores()
        torch.backends.cuda.matmul.allow_tf32 = False
        got, _ = _score(m, texts, device="cuda", dtype="float32")
        assert torch.get_num_threads() == 1
        assert np.abs(got - ref).max() <= 1e-5
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32
