"""Issue 12, end to end only: `rerank-batch run` (library call, model loaded) on W-short and
W-longq, sharing off vs on alternating, with the run's own stage timers. Writes $OUT/prefix_e2e.json."""

from __future__ import annotations

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
from pipeline.engines.score import Scorer  # noqa: E402

DEV = torch.device("cuda")
REC = {"device": torch.cuda.get_device_name(0), "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}
T0 = time.time()
with tempfile.TemporaryDirectory() as wd:
    import pyarrow.parquet as pq

    model, tok, shape = bench.build_model("0.6b", DEV, torch.bfloat16, wd)
    sc = Scorer.from_model(model, tok, RunConfig(inputs=(), output="", model="<m>", device="cuda"), DEV)
    enc = bench.synthetic_encoded(bench.WORKLOADS["w-short"], shape["vocab_size"], 600)
    for m in ("on", "off"):
        sc.sharing = m
        sc.score(enc)  # warm-up/compile
    for wname in ("w-short", "w-longq"):
        inp = os.path.join(wd, f"{wname}.parquet")
        pq.write_table(bench.workload_table(bench.WORKLOADS[wname]), inp)
        out = {m: {"e2e_s": [], "extra": None} for m in ("off", "on")}
        for _ in range(2):
            for m in ("off", "on"):
                sc.sharing = m
                cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, "o.parquet"), overwrite=True, restart=True,
                                model="<m>", device="cuda", prefix_sharing=m)
                t0 = time.perf_counter()
                s = run(cfg, progress=False, scorer=sc)
                out[m]["e2e_s"].append(round(time.perf_counter() - t0, 3))
                out[m]["extra"] = s.extra
                out[m]["pairs"] = s.pairs_scored
        for m in ("off", "on"):
            out[m]["e2e_pairs_per_s"] = round(out[m]["pairs"] / float(np.median(out[m]["e2e_s"])), 1)
        out["speedup_e2e"] = round(out["on"]["e2e_pairs_per_s"] / out["off"]["e2e_pairs_per_s"], 3)
        REC[wname] = out
        REC["elapsed_s"] = round(time.time() - T0, 1)
        with open(os.path.join(os.environ.get("OUT", "."), "prefix_e2e.json"), "w") as f:
            json.dump(REC, f, indent=1)
        print(wname, json.dumps(out), flush=True)
