"""The benchmark cannot rot: its smoke mode runs in CI, and its workloads and FLOP counts match
the figures docs/PERFORMANCE.md gives for them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import run_cli
from pipeline.bench.throughput import WORKLOADS, draw_lengths, model_flops, non_embedding_params, workload_table
from pipeline.bench.synthetic import ARCHS


def test_bench_smoke_runs_all_three_ways(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli(["bench", "--smoke", "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    for way in ("seed", "engine", "e2e"):
        assert rec[way]["pairs"] > 0 and rec[way]["tokens_per_s"] > 0
    assert rec["e2e"]["rows_written"] == 64
    assert rec["speedup_model_only"] > 0
    # The naive recipe (fp16, padded; the record's "seed" row) and our packed float32 way score the
    # same pairs alike (on CPU its fp16 model runs in fp16 too; the bound covers that rounding).
    assert rec["seed_vs_engine_max_abs_diff"] < 5e-3
    assert "speed-up over the naive recipe" in r.output and "\nnaive " in r.output


def test_workloads_have_their_documented_lengths():
    q, d = draw_lengths(WORKLOADS["w-mixed"])
    lengths = 70 + q + d
    assert len(lengths) == 6000
    assert 270 < lengths.mean() < 320  # documented: mean about 293
    assert 900 < np.percentile(lengths, 99) < 1200  # documented: p99 about 1,040
    q, d = draw_lengths(WORKLOADS["w-short"])
    assert len(q) == 10000 and len(set(q[:100])) == 1  # 100 candidates share their query
    assert d.min() >= 10 and d.max() <= 400
    t = workload_table(WORKLOADS["w-short"], pairs=300)
    assert t.num_rows == 300 and len(set(t.column("query_id").to_pylist())) == 3


def test_flops_of_the_real_architectures():
    assert abs(non_embedding_params(ARCHS["0.6b"]) / 1e9 - 0.44) < 0.01  # documented: 0.44 B
    a = ARCHS["0.6b"]
    one = model_flops(np.array([100]), a)
    assert one == 2 * non_embedding_params(a) * 100 + 2 * 28 * 16 * 128 * 100 ** 2


def test_w_longq_and_shared_synthetic_prefixes():
    from pipeline.bench.throughput import synthetic_encoded
    from pipeline.engines.prefix import prefix_lengths

    w = WORKLOADS["w-longq"]
    q, d = draw_lengths(w)
    assert len(q) == 10000 and len(set(q[:50])) == 1 and len(set(q[::50].tolist())) > 100
    assert q.min() >= 20 and q.max() <= 600 and 100 < np.median(q[::50]) < 140  # median 120
    assert d.min() >= 10 and d.max() <= 1000 and 85 < np.median(d) < 115  # median 100
    enc = synthetic_encoded(w, 1000, pairs=150)
    pl = prefix_lengths(enc.ids, enc.offsets, np.arange(150), enc.keys)
    # Candidates of a query share the template and the query (the first document token may match
    # by chance), never more than their own length less one.
    assert (pl >= 70 + q[:150]).all() and (pl < enc.lengths).all()


def test_bench_smoke_with_prefix_sharing_reports_both_mfus(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli(["bench", "--smoke", "--workload", "w-short", "--prefix-sharing", "on", "--seed-pairs", "0",
                 "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["prefix_sharing"] == "on"
    assert 0 < rec["engine"]["tokens_computed"] < 0.8 * rec["engine"]["tokens"]
    assert "MFUc" in r.output


def test_bench_devices_smoke_reports_job_and_steady_rates(tmp_path):
    """`bench --devices` (the scaling measurement) on CPU workers: every run's rows equal the plain
    run's, each device's share adds up to the job, and the steady-state rate is the sum of the
    devices' own rates (the figure that shows scaling when workers finish loading at different
    times)."""
    out = tmp_path / "devices.json"
    r = run_cli(["bench", "--smoke", "--devices", "1,2", "--pairs", 48, "--window", 8, "--repeats", 1,
                 "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    runs = rec["runs"]
    assert [x["devices"] for x in runs] == ["plain", "cpu", "cpu,cpu"]
    for x in runs[1:]:
        assert x["same_rows_as_plain"] and x["max_abs_score_diff_vs_plain"] < 1e-6
        assert sum(d["pairs"] for d in x["per_device"]) == x["pairs"] == 48
        assert sum(d["units"] for d in x["per_device"]) == x["units"] == 6
        # Each rate is rounded to 0.1 pairs/s: on a loaded machine the rates are a few pairs/s,
        # so the rounding of the parts alone moves their sum by up to 0.05 per device.
        assert x["sum_device_pairs_per_s"] == pytest.approx(sum(d["pairs_per_s"] for d in x["per_device"]),
                                                            rel=1e-2, abs=0.05 * len(x["per_device"]) + 0.05)
    assert rec["devices_2"]["steady_pairs_per_s_median"] == runs[2]["sum_device_pairs_per_s"]
    assert rec["devices_1"]["speedup_over_1"] == 1.0
    assert "steady state" in r.output


def test_bench_host_only_runs_the_pipeline_without_a_model(tmp_path):
    out = tmp_path / "host.json"
    r = run_cli(["bench", "--host-only", "--smoke", "--workload", "w-short", "--device-us-per-token", "0.5",
                 "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert set(rec["pairs_per_s"]) == {"encode", "e2e_off", "e2e_on"}
    assert all(v["median"] > 0 for v in rec["pairs_per_s"].values())
    on, off = rec["last_run_stages"]["on"], rec["last_run_stages"]["off"]
    assert off["tokens_after_sharing"] == off["tokens_before_sharing"] == on["tokens_before_sharing"]
    assert on["tokens_after_sharing"] < 0.8 * on["tokens_before_sharing"]
    # The simulated device's time follows the tokens computed: less with sharing.
    assert abs(on["simulated_device_s"] - on["tokens_after_sharing"] * 0.5e-6) <= 0.001
    assert on["simulated_device_s"] < off["simulated_device_s"]
    assert "TOKENIZERS_PARALLELISM=true" in r.output or "TOKENIZERS_PARALLELISM" in os.environ


def test_longdoc_bench_smoke(tmp_path):
    """Documents of 2k-8k tokens as windows: `run --chunk-tokens` against Reranker.predict over the
    same windows; both give the same scores."""
    out = tmp_path / "longdoc.json"
    r = run_cli(["bench", "--smoke", "--chunk-tokens", 512, "--chunk-overlap", 128, "--pairs", 4, "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["workload"] == "w-longdoc" and rec["documents"] == 4
    assert rec["windows"] > 4 * 4 and rec["windows_split_documents"] == 4  # 2k+ tokens: 5+ windows each
    for row in ("run", "expand", "predict", "predict_per_query"):
        assert rec[row]["seconds"] > 0
    assert rec["speedup_over_expand_and_predict"] > 0
    assert rec["run_vs_predict_max_abs_diff"] <= 1e-6
    assert "run --chunk-tokens vs expand + predict" in r.output


def test_w_longdoc_lengths():
    q, d = draw_lengths(WORKLOADS["w-longdoc"])
    assert len(d) == 1000 and len(set(q[:50])) == 1 and len(set(q[::50].tolist())) > 1  # 50 candidates a query
    assert q.min() >= 6 and q.max() <= 12 and d.min() >= 2000 and d.max() <= 8000


@pytest.mark.parametrize("args", [["--arch", "0.6b"], ["--arch", "minilm-l6", "--no-cli-row"],
                                  ["--arch", "minilm-l6", "--host-only"]])
def test_cli_stages_and_cli_pairs_need_the_peer_cli_row(args):
    r = run_cli(["bench", *args, "--cli-stages"])
    assert r.exit_code == 2
    assert ("Error: --cli-stages times the peer bench's CLI row: use it with --peer (or a cross-encoder --arch) and "
            "the CLI row, without --no-cli-row, --devices, --chunk-tokens or --host-only") in r.output
    r = run_cli(["bench", *args, "--cli-pairs", "100"])
    assert r.exit_code == 2
    assert ("Error: --cli-pairs sizes the peer bench's CLI row: use it with --peer (or a cross-encoder --arch) and "
            "the CLI row, without --no-cli-row, --devices, --chunk-tokens or --host-only") in r.output


def test_peer_bench_runs_the_peer_with_the_processs_own_torch_threads(monkeypatch):
    """The engine sets torch's threads for itself (one on an accelerator); sentence-transformers'
    rows run with what the process had, as in a user's process, and the record says both."""
    import torch
    from sentence_transformers import CrossEncoder

    from pipeline.bench.peer import run_peer_bench

    from pipeline.engines.score import TorchEngine

    seen, ours = [], []
    predict, score = CrossEncoder.predict, TorchEngine.score

    def counting(self, *a, **k):
        seen.append(torch.get_num_threads())
        return predict(self, *a, **k)

    def engine_counting(self, *a, **k):
        ours.append(torch.get_num_threads())
        return score(self, *a, **k)

    before = torch.get_num_threads()
    monkeypatch.setattr(CrossEncoder, "predict", counting)
    monkeypatch.setattr(TorchEngine, "score", engine_counting)
    monkeypatch.setenv("RERANK_CPU_THREADS", "1")  # the engine's choice, unlike the process's 2
    try:
        torch.set_num_threads(2)
        rec = run_peer_bench("minilm-l6", "w-mixed", device="cpu", pairs=8, repeats=2, cli=False)
        assert rec["torch_threads"] == {"engine": 1, "st": 2}
        assert seen and set(seen) == {2}  # the warm-up and every timed row
        assert len(ours) >= 5 and set(ours) == {1}  # warm-up, then each repeat's two engine rows
        assert torch.get_num_threads() == 1  # the engine's again after the peer's rows
        assert rec["env"]["RERANK_CPU_THREADS"] == "1"  # what the CLI rows' processes would inherit
        assert rec["st_bs32"]["pairs_per_s"] > 0 and rec["engine"]["pairs_per_s"] > 0
    finally:
        torch.set_num_threads(before)
