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


# -- cross-encoders: the CLI's scoring span, in fresh processes -------------------------------------

# The host side does not depend on the model's size (its forward is a stand-in), only on its
# tokenizer (the real kind and vocabulary size) and family: a small model of the family loads fast.
_SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
# Tokens per packed batch as on an H100 (budget.MAX_BATCH_TOKENS; CPU runs default to 8,192).
GPU_BATCH_TOKENS = 65536


def build_host_model(arch: str, out_dir: str) -> str:
    """A cross-encoder of `arch`'s family and tokenizer (peer.ENCODER_ARCHS: its real kind and
    vocabulary size), with a small random model, saved to out_dir."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.bench.peer import ENCODER_ARCHS, TOKENIZER_STYLE, encoder_config
    from pipeline.bench.synthetic import train_cross_tokenizer
    from pipeline.bench.throughput import WORDS

    style, shape = ENCODER_ARCHS[arch]
    tok = train_cross_tokenizer(out_dir, TOKENIZER_STYLE[style], [" ".join(WORDS)] * 5,
                                pad_vocab_to=shape["vocab_size"] - 8)
    config = encoder_config(style, {**shape, **_SMALL}, tok)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _child_run(model_dir: str, inp: str, out: str, workdir: str, env: dict) -> dict:
    import json
    import subprocess
    import sys

    rec_path, summ = os.path.join(workdir, "child.json"), os.path.join(workdir, "summary.json")
    cmd = [sys.executable, "-m", "pipeline.bench.host_child", rec_path, "run", inp, "--model", model_dir, "-o", out,
           "--overwrite", "--restart", "-q", "--device", "cpu", "--max-length", "512",
           "--max-batch-tokens", str(GPU_BATCH_TOKENS), "--summary", summ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"host bench run failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    with open(rec_path) as f:
        rec = json.load(f)
    with open(summ) as f:
        s = json.load(f)
    rec.update(wall_s=round(wall, 3), pairs=s["pairs_scored"], scoring_pairs_per_s=s["scoring_pairs_per_s"],
               summary_scoring_s=round(s["pairs_scored"] / max(s["scoring_pairs_per_s"], 1e-9), 4),
               batches=s["batches"], waiting_for_input_s=s["extra"].get("seconds_waiting_for_input"))
    return rec


def _ceiling(runs: list[dict], pairs: int, cores: int) -> dict:
    """Per pair, medians over the runs: CPU seconds of the process in the scoring span, of the
    reading thread outside the Rust tokenizer, of the consuming (main) thread, and of the
    tokenizer; and the pairs/s they allow: the two Python threads share one GIL (their sum is
    the serial bound, conservative: some of it is native work with the GIL released), the
    tokenizer spreads over the cores."""
    def med(f):
        return float(np.median([f(r) for r in runs]))
    st = lambda r, k: r["stages"].get(k, {}).get("cpu_s", 0.0)  # noqa: E731
    reading = med(lambda r: st(r, "reading_thread_total") - st(r, "tokenize_rust_call")) / pairs
    main = med(lambda r: r["scoring_main_thread_cpu_s"]) / pairs
    total = med(lambda r: r["scoring_process_cpu_s"]) / pairs
    tok = max(0.0, total - reading - main)
    return {"cpu_us_per_pair": round(total * 1e6, 2), "reading_thread_us_per_pair": round(reading * 1e6, 2),
            "main_thread_us_per_pair": round(main * 1e6, 2), "tokenizer_us_per_pair": round(tok * 1e6, 2),
            "serial_bound_pairs_per_s": round(1 / max(reading + main, 1e-12), 1),
            "pairs_per_s_per_core": round(1 / max(total, 1e-12), 1),
            "ceiling_pairs_per_s": {n: round(min(1 / max(reading + main, 1e-12), n / max(total, 1e-12)), 1)
                                    for n in sorted({cores, 16})}}


def run_cross_host_bench(arch: str, workload: str = "w-mixed", pairs: tuple[int, ...] = (3000, 30000),
                         repeats: int = 3) -> dict:
    """`rerank-batch run` in fresh processes on `arch`'s tokenizer with a forward that costs nothing,
    per input size: the scoring span's rate and seconds, when its first batch ran, and where its
    seconds went (host_child.py), medians of `repeats`; and the CPU each pair costs, with the
    host's ceiling on this machine's cores and on 16."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")  # as on a GPU run (a CPU run of 2 cores turns it off)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rec = {"arch": arch, "workload": workload, "device": "cpu, forward returns zeros (host side only)",
           "cpu_cores": cores, "tokenizers_parallelism": env["TOKENIZERS_PARALLELISM"],
           "batch_token_budget": GPU_BATCH_TOKENS, "repeats": repeats,
           "load_average_before": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M"),
           "sizes": {}}
    with tempfile.TemporaryDirectory() as wd:
        mdir = build_host_model(arch, os.path.join(wd, "model"))
        for n in pairs:
            inp = os.path.join(wd, f"in-{n}.parquet")
            pq.write_table(workload_table(WORKLOADS[workload], n), inp)
            runs = [_child_run(mdir, inp, os.path.join(wd, "out.parquet"), wd, env) for _ in range(repeats)]
            names = sorted({k for r in runs for k in r["stages"]})
            stages = {k: {f: round(float(np.median([r["stages"].get(k, {}).get(f, 0.0) for r in runs])), 4)
                          for f in ("wall_s", "cpu_s")} | {"calls": max(r["stages"].get(k, {}).get("calls", 0) for r in runs)}
                      for k in names}
            rates = [r["scoring_pairs_per_s"] for r in runs]
            rec["sizes"][str(n)] = {
                "pairs": runs[0]["pairs"], "batches": runs[0]["batches"],
                "scoring_pairs_per_s": _spread(rates),
                "scoring_s": _spread([r["summary_scoring_s"] for r in runs]),
                "first_batch_after_s": round(float(np.median([r["first_batch_after_s"] for r in runs])), 4),
                "final_write_s": round(float(np.median([r["final_write_s"] for r in runs])), 4),
                "waiting_for_input_s": round(float(np.median([r["waiting_for_input_s"] for r in runs])), 4),
                "wall_s": _spread([r["wall_s"] for r in runs]),
                "stages": stages, **_ceiling(runs, n, cores), "runs": runs}
    rec["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return rec


def format_cross_host_table(rec: dict) -> str:
    lines = [f"host side only, `rerank-batch run` in fresh processes, {rec['arch']} tokenizer, {rec['workload']}, "
             f"{rec['cpu_cores']} cores, TOKENIZERS_PARALLELISM={rec['tokenizers_parallelism']}, batches of "
             f"{rec['batch_token_budget']} tokens, load {rec['load_average_before']} -> {rec['load_average_after']}",
             f"{'pairs':>6} {'scoring pairs/s':>22} {'scoring s':>8} {'1st batch s':>11} {'cpu us/pair':>11} "
             f"{'serial us/pair':>14} {'tokenizer us/pair':>17} {'ceiling pairs/s':>24}"]
    for n, r in rec["sizes"].items():
        sp, ce = r["scoring_pairs_per_s"], r["ceiling_pairs_per_s"]
        lines.append(f"{n:>6} {sp['median']:>8.1f} [{sp['min']:.0f}-{sp['max']:.0f}] {r['scoring_s']['median']:>8.3f} "
                     f"{r['first_batch_after_s']:>11.3f} {r['cpu_us_per_pair']:>11.1f} "
                     f"{r['reading_thread_us_per_pair'] + r['main_thread_us_per_pair']:>14.1f} "
                     f"{r['tokenizer_us_per_pair']:>17.1f} "
                     + ", ".join(f"{c} cores {v:.0f}" for c, v in ce.items()))
    for n, r in rec["sizes"].items():
        lines.append(f"stages, {n} pairs (wall s / thread cpu s, median): "
                     + ", ".join(f"{k} {v['wall_s']:.3f}/{v['cpu_s']:.3f}" for k, v in r["stages"].items()))
    return "\n".join(lines)
