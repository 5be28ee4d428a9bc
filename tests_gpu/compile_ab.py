"""A cross-encoder's engine eagerly (--compile off) against compiled (--compile on), in one process
on one GPU: the same random-weight model (`bench`'s shapes, bf16) and the same tokenized W-mixed
pairs, passes alternating between the two engines, so that both see the same device state. Per
engine: pairs/s and MFU of each pass, and the largest score difference between the two.
Usage: python tests_gpu/compile_ab.py [arch] [pairs] [passes]; writes $OUT/compile_ab_<arch>.json."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.bench.peer import ENCODER_MAX_LENGTH, _timed, build_saved_model, encoder_flops  # noqa: E402
from pipeline.bench.throughput import WORKLOADS, measure_matmul_peak, workload_table  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engines.score import load_engine  # noqa: E402

arch = sys.argv[1] if len(sys.argv) > 1 else "modernbert-base"
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
passes = int(sys.argv[3]) if len(sys.argv) > 3 else 3
dev = torch.device("cuda")
with tempfile.TemporaryDirectory() as work:
    mdir = build_saved_model(arch, os.path.join(work, "model"), dev, torch.bfloat16)
    table = workload_table(WORKLOADS["w-mixed"], pairs)
    q, d = table.column("query").to_pylist(), table.column("document").to_pylist()
    engines = {c: load_engine(RunConfig(inputs=(), output="", model=mdir, device="cuda", max_length=ENCODER_MAX_LENGTH,
                                        compile=c)) for c in ("off", "on")}
    enc = engines["off"].encoder.encode([""] * len(q), q, d)
    flops, peak = encoder_flops(enc.lengths, arch), measure_matmul_peak(dev)
    rec = {"arch": arch, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "pairs": len(enc),
           "tokens": int(enc.offsets[-1]), "matmul_peak_tflops": round(peak / 1e12, 1)}
    outs = {c: e.score(enc) for c, e in engines.items()}  # first use: kernels load, shapes compile
    times: dict = {c: [] for c in engines}
    for _ in range(passes):
        for c, e in engines.items():
            dt, outs[c] = _timed(lambda: e.score(enc), dev)
            times[c].append(dt)
    for c, ts in times.items():
        rec[f"compile_{c}"] = {"compiled": engines[c].info.compiled, "kernel": engines[c].info.kernel,
                               "pairs_per_s": [round(len(enc) / t, 1) for t in ts],
                               "mfu": [round(flops / t / peak, 4) for t in ts]}
    rec["max_abs_diff"] = float(np.abs(np.asarray(outs["on"]) - np.asarray(outs["off"])).max())
print(json.dumps(rec), flush=True)
with open(os.path.join(os.environ.get("OUT", "."), f"compile_ab_{arch}.json"), "w") as f:
    json.dump(rec, f, indent=2)
