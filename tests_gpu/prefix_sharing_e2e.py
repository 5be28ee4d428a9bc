"""Prefix sharing off vs on on a GPU, about 4 minutes: END TO END
(`run()`: Parquet in, ranked Parquet out, the model loaded once) and model only (token ids given),
0.6B random weights in bf16, on the short, long-query and mixed workloads (docs/PERFORMANCE.md;
mixed: off vs auto, the default).
Modes alternate within each repeat; medians with every pass listed. Each e2e run also records
the run's stage timers (seconds waiting for input = the GPU starved by the host side) and the host
side alone on this machine (bench --host-only's rows). The tokenizer keeps its default threads:
nothing here sets TOKENIZERS_PARALLELISM. Writes $OUT/prefix_e2e.json after every piece.

    OUT=/tmp/out python tests_gpu/prefix_sharing_e2e.py            # GPU
    python tests_gpu/prefix_sharing_e2e.py --smoke                   # CPU, tiny, small: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.bench import throughput as bench  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.run import run  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true", help="CPU, tiny arch, few pairs: checks the script runs")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--budget-s", type=float, default=230, help="skip further repeats past this many seconds")
ap.add_argument("--workloads", default="w-short,w-longq,w-mixed")
args = ap.parse_args()

SMOKE = args.smoke
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
ARCH, PAIRS = ("tiny", 200) if SMOKE else ("0.6b", None)
if SMOKE:
    args.repeats = min(args.repeats, 2)
ON = {"w-short": "on", "w-longq": "on", "w-mixed": "auto"}
OUT = os.path.join(os.environ.get("OUT", "."), "prefix_e2e.json")
os.makedirs(os.path.dirname(OUT), exist_ok=True)
T0 = time.time()
REC = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "arch": ARCH, "dtype": str(DTYPE),
       "torch": torch.__version__, "cpu_cores": len(os.sched_getaffinity(0)),
       "TOKENIZERS_PARALLELISM_at_start": os.environ.get("TOKENIZERS_PARALLELISM"), "date": time.strftime("%F %T")}


def save():
    REC["elapsed_s"] = round(time.time() - T0, 1)
    with open(OUT, "w") as f:
        json.dump(REC, f, indent=1)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def spread(xs):
    return {"median": round(float(np.median(xs)), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


def over_budget():
    return time.time() - T0 > args.budget_s


with tempfile.TemporaryDirectory() as wd:
    import pyarrow.parquet as pq

    from pipeline.bench.host import run_host_bench

    model, tok, shape = bench.build_model(ARCH, DEV, DTYPE, wd)
    vocab = len(tok) if ARCH == "tiny" else model.config.vocab_size
    # One engine per sharing mode (the mode is its config's), all over one forward.
    engines = bench.sharing_engines(model, tok, {"model": "<m>", "device": DEV.type}, DEV, ("off", "on", "auto"))
    sc = engines["off"]
    REC.update(engine=sc.info.forward, attention=sc.info.kernel, budget=sc.token_budget)
    peak = bench.measure_matmul_peak(DEV) if DEV.type == "cuda" else None
    REC["matmul_peak_tflops"] = round(peak / 1e12, 1) if peak else None
    warm = bench.synthetic_encoded(bench.WORKLOADS["w-short"], vocab, 600)
    for m in ("on", "off"):  # warm-up / compile, both layouts
        engines[m].score(warm)
    sync()
    REC["setup_s"] = round(time.time() - T0, 1)
    save()
    for wname in args.workloads.split(","):
        w = bench.WORKLOADS[wname]
        modes = ("off", ON[wname])
        inp = os.path.join(wd, f"{wname}.parquet")
        table = bench.workload_table(w, PAIRS)
        pq.write_table(table, inp)
        enc = bench.synthetic_encoded(w, vocab, PAIRS)
        res = {m: {"model_s": [], "e2e_s": [], "waiting_for_input_s": []} for m in modes}
        for m in modes:  # e2e warm-up: first-run costs (compile of new shapes, file cache) out of the timings
            run(RunConfig(inputs=(inp,), output=os.path.join(wd, "o.parquet"), overwrite=True, restart=True,
                          model="<m>", device=DEV.type, prefix_sharing=m), progress=False, scorer=engines[m])
        for rep in range(args.repeats):
            if rep >= 2 and over_budget():
                res["skipped_repeats"] = args.repeats - rep
                break
            for m in modes:
                st0 = engines[m].stats()
                sync()
                t0 = time.perf_counter()
                engines[m].score(enc)
                sync()
                res[m]["model_s"].append(time.perf_counter() - t0)
                st = engines[m].stats()
                res[m]["tokens_computed"] = st.tokens_computed - st0.tokens_computed
                res[m]["attention_area"] = st.attention_area - st0.attention_area
            for m in modes:
                cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, "o.parquet"), overwrite=True, restart=True,
                                model="<m>", device=DEV.type, prefix_sharing=m)
                t0 = time.perf_counter()
                s = run(cfg, progress=False, scorer=engines[m])
                res[m]["e2e_s"].append(time.perf_counter() - t0)
                res[m]["waiting_for_input_s"].append(s.extra.get("seconds_waiting_for_input", 0.0))
                res[m]["pairs"] = s.pairs_scored
                res[m]["tokens_before_after"] = [s.extra.get("tokens_before_sharing"), s.extra.get("tokens_after_sharing")]
        for m in modes:
            r = res[m]
            r["model_pairs_per_s"] = spread([len(enc) / t for t in r["model_s"]])
            r["e2e_pairs_per_s"] = spread([r["pairs"] / t for t in r["e2e_s"]])
            if peak:
                r["mfu_unshared"] = round(bench.model_flops(enc.lengths, shape) / float(np.median(r["model_s"])) / peak, 4)
                r["mfu_computed"] = round(bench.computed_flops(r["tokens_computed"], r["attention_area"], shape)
                                          / float(np.median(r["model_s"])) / peak, 4)
            for k in ("model_s", "e2e_s", "waiting_for_input_s"):
                r[k] = [round(x, 3) for x in r[k]]
        off, on = res[modes[0]], res[modes[1]]
        res["speedup_model_only"] = round(on["model_pairs_per_s"]["median"] / off["model_pairs_per_s"]["median"], 3)
        res["speedup_e2e"] = round(on["e2e_pairs_per_s"]["median"] / off["e2e_pairs_per_s"]["median"], 3)
        res["e2e_over_model_only_on"] = round(on["e2e_pairs_per_s"]["median"] / on["model_pairs_per_s"]["median"], 3)
        REC[wname] = res
        save()
        print(wname, json.dumps({k: res[k] for k in ("speedup_model_only", "speedup_e2e", "e2e_over_model_only_on")}),
              flush=True)
    # The host side alone on this machine (no model): what it can feed the GPU.
    for wname in ("w-short", "w-longq"):
        if over_budget():
            REC.setdefault("host_only_skipped", []).append(wname)
            continue
        h = run_host_bench(wname, pairs=PAIRS, repeats=1 if SMOKE else 2)
        REC[f"host_only_{wname}"] = {"pairs_per_s": h["pairs_per_s"], "tokenizers_parallelism": h["tokenizers_parallelism"]}
        save()
        print("host only", wname, json.dumps({k: v["median"] for k, v in h["pairs_per_s"].items()}), flush=True)
REC["TOKENIZERS_PARALLELISM_at_end"] = os.environ.get("TOKENIZERS_PARALLELISM")
save()
print("wrote", OUT, "in", REC["elapsed_s"], "s", flush=True)
