"""On the GPU: the bf16 CUDA path against float32 CPU scores on the shared data, the kernels
against each other, a real CUDA OOM recovered, and the memory cap enforced. The measured
deviations are written to $OUT/gpu_parity.json (or the working directory)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cpu_conftest import shared
from pipeline.config import RunConfig
from pipeline.run import run
from pipeline.engines.score import TorchEngine, engine_from_model, load_engine

RECORD = {}


def _spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _record(key, **values):
    RECORD[key] = values
    path = os.path.join(os.environ.get("OUT", "."), "gpu_parity.json")
    with open(path, "w") as f:
        json.dump(RECORD, f, indent=2)
    print(key, values)


@pytest.fixture(scope="module")
def shared_pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tables = [pq.read_table(shared(f"{n}.long.parquet")) for n in ("ARC-Challenge", "physicaliqa", "spartqa")]
    path = d / "all.parquet"
    pq.write_table(pa.concat_tables(tables), path)
    return path


def _scores(path, model, out, **kw):
    cfg = RunConfig(inputs=(str(path),), output=str(out), model=model, overwrite=True, restart=True, **kw)
    s = run(cfg, progress=False)
    t = pq.read_table(out)
    return dict(zip(t.column("doc_id").to_pylist(), t.column("score").to_numpy())), s


def test_bf16_cuda_against_float32_cpu_on_all_shared_pairs(shared_pairs, tied_model, tmp_path):
    cpu, _ = _scores(shared_pairs, tied_model, tmp_path / "cpu.parquet", device="cpu")
    gpu, s = _scores(shared_pairs, tied_model, tmp_path / "gpu.parquet", device="cuda")
    keys = sorted(cpu)
    a, b = np.array([cpu[k] for k in keys]), np.array([gpu[k] for k in keys])
    diff = np.abs(a - b)
    rho = _spearman(a, b)
    _record("tiny_bf16_vs_cpu_fp32", pairs=len(keys), max_abs=float(diff.max()), mean_abs=float(diff.mean()),
            spearman=rho, attention=s.attention, score_std=float(a.std()))
    assert a.std() > 0.02
    assert diff.max() < 0.03 and rho > 0.99


def test_float32_cuda_equals_cpu(shared_pairs, tied_model, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t = pq.read_table(shared_pairs).slice(0, 2000)
    p = tmp_path / "sub.parquet"
    pq.write_table(t, p)
    cpu, _ = _scores(p, tied_model, tmp_path / "c.parquet", device="cpu")
    gpu, s = _scores(p, tied_model, tmp_path / "g.parquet", device="cuda", dtype="float32")
    d = max(abs(cpu[k] - gpu[k]) for k in cpu)
    _record("tiny_fp32_cuda_vs_cpu", pairs=len(cpu), max_abs=float(d), attention=s.attention)
    assert d <= 1e-5


def test_real_size_06b_bf16_against_float32_cpu(tmp_path):
    """The 0.6B architecture (random weights): GPU bf16 against CPU float32 on 256 real pairs."""
    from pipeline.bench.throughput import build_model

    import copy

    t = pq.read_table(shared("ARC-Challenge.long.parquet")).slice(0, 256)
    cpu_model, tok, _ = build_model("0.6b", torch.device("cpu"), torch.float32, str(tmp_path))
    gpu_model = copy.deepcopy(cpu_model)  # the same random weights on both sides
    gpu = engine_from_model(gpu_model, tok, RunConfig(inputs=(), output="", device="cuda"))
    args = (t.column("instruction").to_pylist(), t.column("query").to_pylist(), t.column("document").to_pylist())
    b = gpu.score(gpu.encoder.encode(*args))
    torch.set_num_threads(os.cpu_count() or 4)
    cpu = engine_from_model(cpu_model, tok, RunConfig(inputs=(), output="", device="cpu"))
    a = cpu.score(cpu.encoder.encode(*args))
    diff = np.abs(a - b)
    rho = _spearman(a, b)
    _record("0.6b_bf16_vs_cpu_fp32", pairs=len(a), max_abs=float(diff.max()), mean_abs=float(diff.mean()),
            spearman=rho, score_std=float(a.std()))
    assert diff.max() < 0.05 and rho > 0.98


def test_kernels_and_compile_agree(shared_pairs, tied_model, tmp_path):
    t = pq.read_table(shared_pairs).slice(0, 3000)
    p = tmp_path / "sub.parquet"
    pq.write_table(t, p)
    base, s0 = _scores(p, tied_model, tmp_path / "a.parquet", device="cuda", attention="torch_varlen", compile="on")
    other = {
        "sdpa": _scores(p, tied_model, tmp_path / "b.parquet", device="cuda", attention="sdpa", compile="on")[0],
        "eager": _scores(p, tied_model, tmp_path / "c.parquet", device="cuda", attention="torch_varlen",
                         compile="off")[0],
        "transformers": _scores(p, tied_model, tmp_path / "d.parquet", device="cuda", engine="transformers")[0],
    }
    diffs = {k: float(max(abs(base[x] - v[x]) for x in base)) for k, v in other.items()}
    _record("bf16_paths_vs_fused_compiled_varlen", **diffs)
    assert all(d < 0.02 for d in diffs.values())


def test_real_cuda_oom_is_split_and_the_cap_holds(tied_model):
    t = pq.read_table(shared("spartqa.long.parquet")).slice(0, 4000)
    args = (t.column("instruction").to_pylist(), t.column("query").to_pylist(), t.column("document").to_pylist())
    limit = 1 << 30
    ref_scorer = load_engine(RunConfig(inputs=(), output="", model=tied_model, device="cuda"))
    enc = ref_scorer.encoder.encode(*args)
    ref = ref_scorer.score(enc)
    del ref_scorer
    torch.cuda.empty_cache()
    cfg = RunConfig(inputs=(), output="", model=tied_model, device="cuda", gpu_memory_limit=limit,
                    max_batch_tokens=65536)
    capped = load_engine(cfg)  # sets the allocator's cap
    # Batches of 65536 tokens whatever the probe found: the engine over the same forward, started there.
    scorer = TorchEngine(capped.forward, capped.encoder, cfg, capped.info, token_budget=65536)
    # Ballast leaves ~40 MiB under the cap: 64k-token batches must OOM for real and split.
    free = limit - torch.cuda.memory_reserved() - (40 << 20)
    ballast = torch.empty(free, dtype=torch.uint8, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    got = scorer.score(enc)
    peak = torch.cuda.max_memory_reserved()
    del ballast
    torch.cuda.set_per_process_memory_fraction(1.0)
    d = float(np.abs(ref - got).max())
    _record("oom_under_cap", oom_retries=scorer.stats().oom_retries, peak_reserved=int(peak), limit=limit,
            max_abs_vs_uncapped=d, budget_after=scorer.token_budget)
    assert scorer.stats().oom_retries > 0
    assert peak <= limit
    assert d < 0.02


def test_other_families_on_cuda_against_cpu(tmp_path):
    """Cross-encoders (padded) and a Qwen3 seq-cls model (packed, fused) on CUDA in bf16 against
    float32 on the CPU, on real pairs."""
    from cpu_conftest import _corpus, real_pairs
    from pipeline.bench.synthetic import build_cross_encoder, build_qwen3_seq_cls

    texts = _corpus()
    models = {a: build_cross_encoder(tmp_path / a, a, texts, num_labels=2 if a == "modernbert" else 1)
              for a in ("bert", "xlm-roberta", "modernbert")}
    models["qwen3-seq-cls"] = build_qwen3_seq_cls(tmp_path / "q3", texts)
    p = tmp_path / "pairs.parquet"
    pq.write_table(real_pairs(300), p)
    found = {}
    for name, m in models.items():
        cpu, _ = _scores(p, str(m), tmp_path / f"{name}-c.parquet", device="cpu", max_length=256)
        gpu, s = _scores(p, str(m), tmp_path / f"{name}-g.parquet", device="cuda", max_length=256)
        a = np.array([cpu[k] for k in sorted(cpu)])
        b = np.array([gpu[k] for k in sorted(cpu)])
        found[name] = {"max_abs": float(np.abs(a - b).max()), "spearman": _spearman(a, b), "attention": s.attention}
    _record("families_bf16_vs_cpu_fp32", **found)
    for name, v in found.items():
        assert v["max_abs"] < 0.05 and v["spearman"] > 0.98, (name, v)
