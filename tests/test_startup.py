"""The summary says where the seconds before the first batch went; CPU thread pools follow the
usable cores unless the user says otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.runtime import startup
from pipeline.config import RunConfig
from pipeline.run import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
STAGES = ["inputs_and_config", "tokenizer", "weights", "model_setup", "memory_probe", "first_batch"]


def test_summary_has_the_startup_stages(tmp_path):
    s = run(RunConfig(inputs=(SAMPLE,), output=str(tmp_path / "o.parquet"), model=TINY, device="cpu"), progress=False)
    got = {k.removeprefix("startup_").removesuffix("_s"): v for k, v in s.extra.items() if k.startswith("startup_")}
    assert set(STAGES) <= set(got), got
    assert all(got[k] >= 0 for k in STAGES)
    # The stages tile the timeline: they add up to the total (rounding aside).
    parts = sum(v for k, v in got.items() if k != "total")
    assert abs(parts - got["total"]) < 0.01 * len(got)
    # A second run in the same process starts its own timeline (no process start in it).
    s2 = run(RunConfig(inputs=(SAMPLE,), output=str(tmp_path / "o.parquet"), model=TINY, device="cpu",
                       overwrite=True), progress=False)
    assert "startup_process_to_run_s" not in s2.extra and "startup_first_batch_s" in s2.extra


def test_timeline_marks_in_order():
    tl = startup.Timeline.begin("begin")
    with startup.recording(tl):
        startup.mark("a")  # as the engine marks its loading stages
    tl.mark("b")
    startup.mark("not recorded")  # no timeline is being recorded here
    st = tl.stages()
    assert list(st)[-3:] == ["a", "b", "total"] and st["total"] >= st["a"] + st["b"] - 0.002
    assert tl.seen("a") and not tl.seen("c") and not tl.seen("not recorded")


def test_a_workers_timeline_continues_the_runs():
    """A worker's marks (another process's, sent back) follow the run's own: the gap until the
    worker's process started is `spawn_workers`, and the stages still tile the total."""
    run_tl = startup.Timeline([("origin", 100.0), ("inputs_and_config", 101.0)])
    worker = startup.Timeline([("origin", 101.5), ("worker_process", 102.5), ("weights", 103.0),
                               ("first_batch", 104.0)])
    run_tl.then(worker.marks, "spawn_workers")
    assert run_tl.stages() == {"inputs_and_config": 1.0, "spawn_workers": 0.5, "worker_process": 1.0,
                               "weights": 0.5, "first_batch": 1.0, "total": 4.0}
    # Another host's clock behind ours: no stage is negative.
    skewed = startup.Timeline([("origin", 100.0), ("inputs_and_config", 101.0)])
    skewed.then([("origin", 90.0), ("worker_process", 100.5), ("first_batch", 102.0)], "spawn_workers")
    assert skewed.stages() == {"inputs_and_config": 1.0, "spawn_workers": 0.0, "worker_process": 0.0,
                               "first_batch": 1.0, "total": 2.0}


def test_cpu_threads_follow_affinity_and_env(monkeypatch):
    from pipeline.engines.threads import configure_cpu, usable_cores

    before = torch.get_num_threads()
    try:
        _clear_thread_env(monkeypatch)
        monkeypatch.setenv("RERANK_CPU_THREADS", "1")
        got = configure_cpu()
        assert got["torch_threads"] == 1 and torch.get_num_threads() == 1
        assert got["tokenizer_parallel"] == (usable_cores() > 4)
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's choice wins
        assert configure_cpu()["tokenizer_parallel"] is True
    finally:
        torch.set_num_threads(before)


def _clear_thread_env(monkeypatch):
    # setenv first, so that monkeypatch restores these even where the code under test sets them.
    for name in ("RERANK_CPU_THREADS", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


def test_accelerator_runs_give_torch_one_thread_unless_the_user_sets_it(monkeypatch):
    """On an accelerator torch's pool only copies batches into pinned memory: one thread, so its
    spinning threads leave the cores to the tokenizer and the launching thread; the user's
    OMP_NUM_THREADS or RERANK_CPU_THREADS wins, and a bad RERANK_CPU_THREADS is a one-line error."""
    from pipeline.engines import threads
    from pipeline.engines.threads import ACCELERATOR_TORCH_THREADS, configure, usable_cores
    from pipeline.errors import InputError

    before = torch.get_num_threads()
    cuda = torch.device("cuda", 0)  # configure only reads the device's type
    try:
        _clear_thread_env(monkeypatch)
        torch.set_num_threads(2)
        assert configure(cuda)["torch_threads"] == ACCELERATOR_TORCH_THREADS == torch.get_num_threads() == 1
        assert configure(torch.device("cpu"))["torch_threads"] == usable_cores() == torch.get_num_threads()
        # A CPU engine that made the tokenizer serial (small machines) leaves a later accelerator
        # engine of the process a parallel one; the user's own setting stays.
        monkeypatch.setattr(threads, "TOKENIZER_SERIAL_CORES", 10 ** 6)
        assert configure(torch.device("cpu"))["tokenizer_parallel"] is False
        configure(cuda)
        assert "TOKENIZERS_PARALLELISM" not in os.environ
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
        configure(cuda)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's pool stays as it is
        torch.set_num_threads(2)
        assert configure(cuda)["torch_threads"] == 2
        monkeypatch.setenv("RERANK_CPU_THREADS", "3")
        assert configure(cuda)["torch_threads"] == 3 == torch.get_num_threads()
        for bad in ("many", "0", "-2", "1.5"):
            monkeypatch.setenv("RERANK_CPU_THREADS", bad)
            with pytest.raises(InputError, match=f"RERANK_CPU_THREADS='{bad}'.*whole number"):
                configure(cuda)
            with pytest.raises(InputError):
                configure(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_every_engine_sets_its_threads_for_its_device(monkeypatch):
    """loading.prepare hands the engine's device to threads.configure (CPU and accelerator alike)."""
    from pipeline.engines import loading
    from pipeline.engines.score import load_engine

    seen = []
    monkeypatch.setattr(loading.threads, "configure", lambda device: seen.append(device.type))
    load_engine(RunConfig(inputs=(), output="", model=TINY, device="cpu"))
    assert seen == ["cpu"]


def test_compile_auto_runs_narrow_cross_encoders_eagerly_on_cuda(monkeypatch, tmp_path):
    """--compile auto compiles on CUDA, except a cross-encoder no wider than MiniLM (384): its
    one compiled step spares the device little and costs seconds of every start. on and off
    mean what they say; loading.prepare hands the rule a cross-encoder's hidden size and a
    causal reranker's None."""
    from types import SimpleNamespace

    from conftest import _corpus
    from pipeline.bench.synthetic import build_cross_encoder
    from pipeline.engines import compiled, loading
    from pipeline.engines.score import load_engine

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    mode = lambda m: SimpleNamespace(compile=m)  # noqa: E731
    assert compiled.EAGER_ENCODER_WIDTH == 384
    assert compiled.wanted(mode("auto"), cuda) and compiled.wanted(mode("auto"), cuda, 385)
    assert compiled.wanted(mode("auto"), cuda, 1024)
    assert not compiled.wanted(mode("auto"), cuda, 384) and not compiled.wanted(mode("auto"), cuda, 128)
    assert not compiled.wanted(mode("auto"), cpu) and not compiled.wanted(mode("auto"), cpu, 1024)
    assert compiled.wanted(mode("on"), cuda, 384) and compiled.wanted(mode("on"), cpu)
    assert not compiled.wanted(mode("off"), cuda) and not compiled.wanted(mode("off"), cuda, 1024)

    seen = []
    real = compiled.wanted
    monkeypatch.setattr(loading.compiled, "wanted", lambda cfg, device, width=None: seen.append(width) or real(cfg, device, width))
    bert = build_cross_encoder(tmp_path / "bert", "bert", _corpus()[:200], num_labels=1)
    load_engine(RunConfig(inputs=(), output="", model=str(bert), device="cpu"))
    load_engine(RunConfig(inputs=(), output="", model=TINY, device="cpu", engine="transformers"))
    assert seen == [64, None]  # the tiny BERT's hidden size; the Qwen3 reranker is no cross-encoder


def test_cpu_workers_keep_their_share_of_the_cores(monkeypatch):
    """A CPU worker of the device pool (or Ray) gets usable_cores // workers threads, and its
    engine's configure_cpu keeps that share; a user's RERANK_CPU_THREADS still wins."""
    from pipeline.engines.threads import configure_cpu, usable_cores
    from pipeline.executors.pool import _limit_threads

    before = torch.get_num_threads()
    try:
        _clear_thread_env(monkeypatch)
        torch.set_num_threads(2)
        _limit_threads("cpu", 1)
        assert torch.get_num_threads() == 1 and configure_cpu()["torch_threads"] == 1
        _clear_thread_env(monkeypatch)
        _limit_threads("cuda:0", 1)  # a GPU worker: its engine chooses (configure_accelerator)
        assert "RERANK_CPU_THREADS" not in os.environ
        assert configure_cpu()["torch_threads"] == usable_cores()
        monkeypatch.setenv("RERANK_CPU_THREADS", "2")
        _limit_threads("cpu", 1)
        assert configure_cpu()["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_compile_warm_up_serves_the_first_batch(tmp_path):
    """--compile on (CPU): the fused steps compile once, on dummy rows while the weights load, and
    the batches reuse them (no recompilation, a batch of one pair included); the kernels land in
    the stable cache directory; the scores equal the eager run's to float32 rounding."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from pipeline.config import RunConfig; from pipeline.run import run\n"
        "from torch._dynamo.utils import counters\n"
        "out = {}\n"
        "for c in ('off', 'on'):\n"
        f"    s = run(RunConfig(inputs=({SAMPLE!r},), output={str(tmp_path / 'o.parquet')!r} + c, model={TINY!r},\n"
        "                      device='cpu', compile=c, window_pairs=10), progress=False)\n"
        "    import pyarrow.parquet as pq\n"
        "    t = pq.read_table(s.output)\n"
        "    out[c] = dict(zip(t.column('doc_id').to_pylist(), t.column('score').to_pylist()))\n"
        "    out[c + '_extra'] = s.extra\n"
        "from pipeline.reranker import Reranker\n"
        f"r = Reranker({TINY!r}, device='cpu', compile='on')\n"
        "out['one'] = float(r.predict([('what is a reranker', 'a model that orders passages')])[0])\n"
        "out['two'] = float(r.predict([('what is a reranker', 'a model that orders passages'), ('q', 'd')])[0])\n"
        "out['graphs'] = counters['stats']['unique_graphs']\n"
        "import os; out['dir'] = os.environ.get('TORCHINDUCTOR_CACHE_DIR')\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    # rms_norm, qk_norm_rope, add_norm, swiglu: one graph each, so nothing compiled again for a batch
    assert got["graphs"] == 4, got
    assert abs(got["one"] - got["two"]) <= 1e-5, got
    assert "startup_compile_s" in got["on_extra"] and "startup_compile_s" not in got["off_extra"]
    assert max(abs(got["on"][k] - got["off"][k]) for k in got["off"]) <= 1e-5
    assert got["dir"] == str(tmp_path / "cache" / "rerank-batch" / "inductor"), got["dir"]
    assert os.listdir(got["dir"])
