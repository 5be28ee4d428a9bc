"""The summary says where the seconds before the first batch went; CPU thread pools follow the
usable cores unless the user says otherwise."""

from __future__ import annotations

import os

import torch

from pipeline.job import startup
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
    startup.reset("begin")
    startup.mark("a")
    startup.mark("b")
    st = startup.stages()
    assert list(st)[-3:] == ["a", "b", "total"] and st["total"] >= st["a"] + st["b"] - 0.002
    assert startup.seen("a") and not startup.seen("c")


def test_cpu_threads_follow_affinity_and_env(monkeypatch):
    from pipeline.engines.threads import configure_cpu, usable_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("RERANK_CPU_THREADS", "1")
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        got = configure_cpu()
        assert got["torch_threads"] == 1 and torch.get_num_threads() == 1
        assert got["tokenizer_parallel"] == (usable_cores() > 4)
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's choice wins
        assert configure_cpu()["tokenizer_parallel"] is True
    finally:
        torch.set_num_threads(before)
