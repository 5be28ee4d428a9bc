"""`bench --devices 1,2,...`: the whole run (Parquet in, ranked Parquet out) on 1..N devices.

The random-weight model is saved to disk once, because pool workers load it the way a user's
run does. Each row is one run: its pairs/s from the first worker being ready to the end (so the
workers' model loading is reported apart, not averaged in), pairs/s per device, each device's
busy share, and the driver's CPU time per unit (what would limit a driver feeding many GPUs).
The plain single-process run is measured in the same call, as the baseline of `--devices 1`.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.bench.throughput import WORKLOADS, build_model, workload_table
from pipeline.config import RunConfig
from pipeline.run import run


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def save_random_reranker(arch: str, workdir: str) -> str:
    # Random init of a 4B model takes minutes on the host and seconds on a GPU.
    dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model, tok, _ = build_model(arch, dev, torch.bfloat16, workdir)
    out = os.path.join(workdir, f"model-{arch}")
    model.config.architectures = ["Qwen3ForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _one_run(inp: str, model: str, devices: str | None, workdir: str, cfg_kw: dict) -> dict:
    out = os.path.join(workdir, f"out-{devices or 'plain'}.parquet")
    cfg = RunConfig(inputs=(inp,), output=out, model=model, overwrite=True, restart=True, devices=devices,
                    **cfg_kw)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    s = run(cfg, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    # The plain run's model and cached blocks must not sit on cuda:0 while pool workers size
    # their budgets from its free memory.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = {"devices": devices or "plain", "pairs": s.pairs_scored, "tokens": s.tokens, "wall_seconds": round(wall, 3),
           "units": s.units, "driver_cpu_seconds": round(cpu, 3),
           "driver_cpu_ms_per_unit": round(1000 * cpu / max(1, s.units), 2)}
    rows = s.extra.get("devices")
    if rows:
        scoring = max(r["seconds_after_load"] or 0.0 for r in rows)
        # The job's rate above counts from the first worker ready, so it pays for workers that
        # loaded later; the steady-state total is the sum of each device's own rate.
        row["sum_device_pairs_per_s"] = round(sum(r["pairs"] / max(r["seconds_after_load"] or 1e-9, 1e-9)
                                                  for r in rows), 1)
        row["load_seconds_max"] = max(r["load_seconds"] for r in rows)
        row["per_device"] = [{"device": r["device"], "pairs": r["pairs"], "units": r["units"],
                              "pairs_per_s": round(r["pairs"] / max(r["seconds_after_load"] or 1e-9, 1e-9), 1),
                              "busy_share": round(r["busy_seconds"] / max(r["seconds_after_load"] or 1e-9, 1e-9), 3)}
                             for r in rows]
    else:
        scoring = s.pairs_scored / max(s.scoring_pairs_per_s, 1e-9)
    row["scoring_seconds"] = round(scoring, 3)
    row["pairs_per_s"] = round(s.pairs_scored / max(scoring, 1e-9), 1)
    row["output"] = out
    return row


def run_devices_bench(arch: str, workload: str, counts: list[int], *, pairs: int | None = None,
                      repeats: int = 1, window: int = 2048) -> dict:
    ndev = torch.cuda.device_count()
    if ndev == 0:
        device_list = lambda n: ",".join(["cpu"] * n)  # noqa: E731 - CI's smoke path
    else:
        counts = [n for n in counts if n <= ndev]
        device_list = lambda n: ",".join(f"cuda:{i}" for i in range(n))  # noqa: E731
    rec = {"arch": arch, "workload": workload, "device": torch.cuda.get_device_name(0) if ndev else "cpu",
           "visible_devices": ndev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as workdir:
        model = save_random_reranker(arch, workdir)
        inp = os.path.join(workdir, "input.parquet")
        pq.write_table(workload_table(WORKLOADS[workload], pairs), inp)
        cfg_kw = {"window_pairs": window, "device": "cuda:0" if ndev else "cpu"}
        for _ in range(repeats):
            for devices in [None] + [device_list(n) for n in counts]:
                rec["runs"].append(_one_run(inp, model, devices, workdir, cfg_kw))
                # Each run as it ends: a call cut off by its time limit still leaves its rows.
                print(json.dumps({k: v for k, v in rec["runs"][-1].items() if k != "output"}), file=sys.stderr,
                      flush=True)
        # Every run must give the same output as the plain one (scores to bf16 run-to-run noise).
        ref = pq.read_table(rec["runs"][0]["output"])
        for r in rec["runs"][1:]:
            got = pq.read_table(r["output"])
            r["same_rows_as_plain"] = got.num_rows == ref.num_rows and got.drop(["score", "rank"]).equals(
                ref.drop(["score", "rank"]))
            if got.num_rows == ref.num_rows:
                r["max_abs_score_diff_vs_plain"] = float(np.abs(got["score"].to_numpy() - ref["score"].to_numpy()).max())
            del r["output"]
        del rec["runs"][0]["output"]
    plain = [r["pairs_per_s"] for r in rec["runs"] if r["devices"] == "plain"]
    base = sorted(plain)[len(plain) // 2]
    one = None
    for n in counts:
        runs = [r for r in rec["runs"] if r["devices"] == device_list(n)]
        rates = sorted(r["pairs_per_s"] for r in runs)
        steady = sorted(r.get("sum_device_pairs_per_s", r["pairs_per_s"]) for r in runs)
        med, steady_med = rates[len(rates) // 2], steady[len(steady) // 2]
        one = one or med
        rec[f"devices_{n}"] = {"pairs_per_s_median": med, "pairs_per_s_all": rates,
                               "over_plain": round(med / base, 3), "speedup_over_1": round(med / one, 3),
                               "per_device_pairs_per_s": round(med / n, 1),
                               # Both devices working: what a long job gets once every worker is up.
                               "steady_pairs_per_s_median": steady_med, "steady_pairs_per_s_all": steady,
                               "steady_speedup_over_1": round(steady_med / one, 3)}
    rec["plain_pairs_per_s"] = {"median": base, "all": sorted(plain)}
    return rec


def format_devices_table(rec: dict) -> str:
    lines = [f"{rec['arch']} {rec['workload']} on {rec['device']} x{rec['visible_devices']}",
             f"plain run: {rec['plain_pairs_per_s']['median']} pairs/s (all {rec['plain_pairs_per_s']['all']})"]
    for k, v in rec.items():
        if k.startswith("devices_"):
            lines.append(f"{k}: {v['pairs_per_s_median']} pairs/s (all {v['pairs_per_s_all']}), "
                         f"x{v['speedup_over_1']} over 1 device, {v['over_plain']} of plain, "
                         f"{v['per_device_pairs_per_s']} per device; steady state (every worker up) "
                         f"{v['steady_pairs_per_s_median']} pairs/s, x{v['steady_speedup_over_1']}")
    for r in rec["runs"]:
        lines.append(f"  {r['devices']}: {r['pairs_per_s']} pairs/s, scoring {r['scoring_seconds']} s of "
                     f"{r['wall_seconds']} s wall, driver {r['driver_cpu_ms_per_unit']} ms CPU/unit"
                     + (f", busy {[d['busy_share'] for d in r.get('per_device', [])]}" if r.get("per_device") else ""))
    return "\n".join(lines)
