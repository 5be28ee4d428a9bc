"""Does committing by time cost throughput? End to end (`run()`: Parquet in, ranked Parquet out, the
model loaded once), the same W-mixed-like synthetic input scored with a huge --commit-every (no
commit inside a unit) and a small one, alternating within each repeat, 0.6B random weights in
bf16 on CUDA. The window holds the whole input, so every commit the small interval makes is a
partial commit inside the one unit (the worst case: with the default window, units end and
commit on their own). Records pairs/s per pass, medians, the partial commits made, and the
seconds spent making them.

    OUT=/tmp/out python tests_gpu/commit_interval.py                 # GPU: writes $OUT/commit_interval.json
    python tests_gpu/commit_interval.py /tmp/ci.json                 # or a path
    python tests_gpu/commit_interval.py --smoke                      # CPU, tiny model, few pairs: does it run
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
from pipeline.engines.score import engine_from_model  # noqa: E402
from pipeline.run import run  # noqa: E402
from pipeline.storage import sink  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("path", nargs="?", help="JSON record to write [default: $OUT/commit_interval.json]")
ap.add_argument("--smoke", action="store_true", help="CPU, tiny arch, few pairs: checks the script runs")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--pairs", type=int, default=30000, help="pairs of the W-mixed-like input (W-mixed has 6,000)")
ap.add_argument("--intervals", default="1e9,2", help="--commit-every values, seconds, comma-separated")
args = ap.parse_args()

SMOKE = args.smoke
if SMOKE:
    if args.pairs == ap.get_default("pairs"):  # a size given on the command line is kept
        args.pairs = 300
    if args.repeats == ap.get_default("repeats"):
        args.repeats = 2
    if args.intervals == ap.get_default("intervals"):
        args.intervals = "1e9,0.05"  # the tiny model scores 300 pairs in about a second
DEV = torch.device("cpu" if SMOKE else "cuda")
if not SMOKE and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with --smoke on CPU")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
ARCH = "tiny" if SMOKE else "0.6b"
INTERVALS = [float(x) for x in args.intervals.split(",")]
OUT = args.path or os.path.join(os.environ.get("OUT", "."), "commit_interval.json")
os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
T0 = time.time()
REC = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "arch": ARCH, "dtype": str(DTYPE),
       "torch": torch.__version__, "cpu_cores": len(os.sched_getaffinity(0)), "pairs": args.pairs,
       "workload": "w-mixed", "window": args.pairs, "intervals_s": INTERVALS, "date": time.strftime("%F %T")}

# Count the partial commits and time them (the commit's own cost: the device-to-host copy is
# in the scorer, the write here).
COMMITS = {"n": 0, "s": 0.0}
_real_commit = sink.CheckpointSink.commit_partials


def _counted(self, *a, **k):
    t0 = time.perf_counter()
    out = _real_commit(self, *a, **k)
    COMMITS["n"] += 1
    COMMITS["s"] += time.perf_counter() - t0
    return out


sink.CheckpointSink.commit_partials = _counted


def save():
    REC["elapsed_s"] = round(time.time() - T0, 1)
    with open(OUT, "w") as f:
        json.dump(REC, f, indent=1)


def spread(xs):
    return {"median": round(float(np.median(xs)), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


with tempfile.TemporaryDirectory() as wd:
    import pyarrow.parquet as pq

    model, tok, shape = bench.build_model(ARCH, DEV, DTYPE, wd)
    sc = engine_from_model(model, tok, RunConfig(inputs=(), output="", model="<m>", device=DEV.type), DEV)
    REC.update(engine=sc.info.forward, attention=sc.info.kernel, budget=sc.token_budget,
               prefix_sharing=sc.info.sharing)
    inp = os.path.join(wd, "in.parquet")
    pq.write_table(bench.workload_table(bench.WORKLOADS["w-mixed"], args.pairs), inp)

    def one(every: float):
        cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, "o.parquet"), overwrite=True, restart=True,
                        model="<m>", device=DEV.type, window_pairs=args.pairs, commit_every=every)
        n0, s0 = COMMITS["n"], COMMITS["s"]
        t0 = time.perf_counter()
        s = run(cfg, progress=False, scorer=sc)
        return s, time.perf_counter() - t0, COMMITS["n"] - n0, COMMITS["s"] - s0

    for every in INTERVALS:  # warm-up: first-run costs (new shapes, file cache) out of the timings
        one(every)
    REC["setup_s"] = round(time.time() - T0, 1)
    res = {str(e): {"e2e_s": [], "scoring_pairs_per_s": [], "partial_commits": [], "commit_write_s": []}
           for e in INTERVALS}
    for rep in range(args.repeats):
        order = INTERVALS if rep % 2 == 0 else INTERVALS[::-1]  # alternate who goes first
        for every in order:
            s, wall, n, cs = one(every)
            r = res[str(every)]
            r["e2e_s"].append(round(wall, 3))
            r["scoring_pairs_per_s"].append(s.scoring_pairs_per_s)  # pairs over the scoring stage's seconds
            r["partial_commits"].append(n)
            r["commit_write_s"].append(round(cs, 4))
            r["pairs"] = s.pairs_scored
        REC["results"] = res
        save()
    for e, r in res.items():
        r["e2e_pairs_per_s"] = spread([r["pairs"] / t for t in r["e2e_s"]])
        r["scoring_pairs_per_s_median"] = round(float(np.median(r["scoring_pairs_per_s"])), 1)
    base = res[str(INTERVALS[0])]
    for e, r in res.items():
        r["e2e_vs_first"] = round(r["e2e_pairs_per_s"]["median"] / base["e2e_pairs_per_s"]["median"], 4)
    REC["results"] = res
    save()

print(f"{'commit every':>12}  {'e2e pairs/s (median, min-max)':>32}  {'scoring pairs/s':>15}  {'commits':>7}  "
      f"{'vs first':>8}")
for e, r in res.items():
    p = r["e2e_pairs_per_s"]
    print(f"{float(e):>11g}s  {p['median']:>14.1f} ({p['min']:.1f}-{p['max']:.1f})".ljust(48)
          + f"{r['scoring_pairs_per_s_median']:>15.1f}  {int(np.median(r['partial_commits'])):>7d}  "
          f"{r['e2e_vs_first']:>8.4f}")
print("wrote", OUT, "in", REC["elapsed_s"], "s", flush=True)
