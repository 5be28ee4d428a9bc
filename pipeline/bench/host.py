"""The host side alone: how many pairs/s reading, tokenizing, grouping, packing and writing can
feed a device, without one.

`rerank-batch run` end to end (Parquet in, ranked Parquet out) on a workload, with an engine whose
forward (NullForward) returns zeros at once: everything else (prefetch thread, tokenizer, prefix grouping and
layout, tensors, parts, final write) runs as in a real run. Sharing off and on alternate within
each repeat. The encoder alone (tokenize + lay out the window's pairs, in the prefetch thread's
chunks) gets its own row. The tokenizer runs as on an accelerator run (its own threads on every
core) unless TOKENIZERS_PARALLELISM is set.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.bench.throughput import WORKLOADS, build_model, sharing_engines, workload_table
from pipeline.config import RunConfig
from pipeline.engines.forwards import to_device
from pipeline.engines.prefix import SharedBatch
from pipeline.run import run
from pipeline.scoring import MAX_CHUNK


class NullForward:
    """A forward (engines.forwards.Forward) that costs nothing: zero logits, one per pair; or, with
    `us_per_token`, one that sleeps as long as a device would take for the tokens computed (the
    GIL free, as while a GPU works): does the host side overlap a device of that speed?"""

    name = "null"
    kernel = "none"
    padded = False
    compiled = False

    def __init__(self, device: torch.device, us_per_token: float = 0.0):
        self.device = device
        self.us_per_token = us_per_token

    def logits(self, batch) -> torch.Tensor:
        # The host's share of a real forward: the batch's arrays made tensors on the device.
        rows = [batch.cu_q, batch.cu_k, batch.kv_idx, batch.last] if isinstance(batch, SharedBatch) else [batch.cu]
        for a in rows + [batch.ids, batch.pos]:
            to_device(a, np.int64, self.device)
        if self.us_per_token:
            time.sleep(len(batch.ids) * self.us_per_token * 1e-6)
        return torch.zeros(batch.pairs, 1, dtype=torch.float32)


def _spread(xs: list[float]) -> dict:
    return {"median": round(float(np.median(xs)), 1), "min": round(min(xs), 1), "max": round(max(xs), 1),
            "all": [round(x, 1) for x in xs]}


def run_host_bench(workload: str, pairs: int | None = None, repeats: int = 3, us_per_token: float = 0.0) -> dict:
    user = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = user or "true"  # as a GPU run (configure_cpu keeps a set value)
    try:
        return _measure(workload, pairs, repeats, us_per_token)
    finally:
        if user is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _measure(workload: str, pairs: int | None, repeats: int, us_per_token: float) -> dict:
    dev = torch.device("cpu")
    w = WORKLOADS[workload]
    rec = {"workload": workload, "device": "cpu (host side only: the forward returns zeros)",
           "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
           "load_average": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as wd:
        model, tok, _ = build_model("tiny", dev, torch.float32, wd)
        # Sharing off and on: one engine each (the mode is its config's), over one NullForward.
        engines = sharing_engines(model, tok, {"model": "<host>", "device": "cpu"}, dev,
                                  forward=NullForward(dev, us_per_token))
        rec["simulated_device_us_per_token"] = us_per_token
        table = workload_table(w, pairs)
        inp = os.path.join(wd, "host-input.parquet")
        pq.write_table(table, inp)
        n = table.num_rows
        rec["pairs"] = n
        instr = ["Given a web search query, retrieve relevant passages that answer the query"] * n
        q, d = table.column("query").to_pylist(), table.column("document").to_pylist()
        rates: dict[str, list[float]] = {"encode": [], "e2e_off": [], "e2e_on": []}
        stages: dict[str, dict] = {}
        tokens = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, n, MAX_CHUNK):
                tokens += int(engines["off"].encoder.encode(instr[s:s + MAX_CHUNK], q[s:s + MAX_CHUNK],
                                                            d[s:s + MAX_CHUNK]).offsets[-1])
            rates["encode"].append(n / (time.perf_counter() - t0))
            for mode in ("off", "on"):
                cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, "host-output.parquet"), overwrite=True,
                                restart=True, model="<host>", device="cpu", prefix_sharing=mode)
                t0 = time.perf_counter()
                summary = run(cfg, progress=False, scorer=engines[mode])
                rates[f"e2e_{mode}"].append(summary.pairs_scored / (time.perf_counter() - t0))
                stages[mode] = {k: v for k, v in summary.extra.items() if k.startswith(("seconds_", "tokens_"))}
                stages[mode]["simulated_device_s"] = round(summary.extra["tokens_after_sharing"] * us_per_token * 1e-6, 3)
        rec["tokens_per_pair"] = round(tokens / repeats / n, 1)
    rec["pairs_per_s"] = {k: _spread(v) for k, v in rates.items()}
    rec["last_run_stages"] = stages
    return rec


def format_host_table(rec: dict) -> str:
    sim = rec.get("simulated_device_us_per_token")
    lines = [f"host side only, {rec['workload']} ({rec['pairs']} pairs, {rec['tokens_per_pair']} tokens/pair), "
             f"{rec['cpu_cores']} cores, TOKENIZERS_PARALLELISM={rec['tokenizers_parallelism']}, "
             f"load {rec['load_average']}" + (f", device simulated at {sim} us/token" if sim else ""),
             f"{'row':<10} {'pairs/s median':>15} {'min':>9} {'max':>9}"]
    for name, r in rec["pairs_per_s"].items():
        dev_s = rec["last_run_stages"].get(name.removeprefix("e2e_"), {}).get("simulated_device_s") if sim else None
        lines.append(f"{name:<10} {r['median']:>15.1f} {r['min']:>9.1f} {r['max']:>9.1f}"
                     + (f"   (device alone: {rec['pairs'] / dev_s:.1f} pairs/s)" if dev_s else ""))
    return "\n".join(lines)
