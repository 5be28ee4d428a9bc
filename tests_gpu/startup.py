"""Seconds to the first batch, measured on a GPU machine in one process tree.

    python3 tests_gpu/startup.py --out $OUT            # H100: 0.6B + encoder shapes, 6000 mixed-workload pairs
    python3 tests_gpu/startup.py --smoke --out /tmp/x  # CPU: the tiny shape, 300 pairs (checks the script)

For each shape: a random-weight model saved to disk (bench/peer.py build_saved_model), a mixed-workload
Parquet file (bench/throughput.py workload_table), then the CLI in fresh processes:
  1. `cold`: one run with an empty Inductor cache (the first run on a machine) - also the warm-up
     of the file cache;
  2. `runs`: N runs with the warm cache: wall, the first batch (startup_total_s: process start to
     the first scored batch), scoring seconds, wall / scoring, the startup stages;
  3. `transformers_load`: one run with RERANK_DIRECT_LOAD=0 (weights and tokenizer through
     transformers, as every model loaded before direct loading), with the max score difference against
     the direct runs (in bf16 on the H100 it measured 0.018-0.019: the same kernels, but not bitwise equal).
For Qwen3 shapes, the direct tokenizer is checked against AutoTokenizer on this machine's
transformers: the same backend (JSON) and the same ids of the file's texts.
JSON to OUT/startup.json, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cli_run(model: str, inp: str, work: str, tag: str, device: str, max_length: int, env: dict, prefix=(),
            extra=()) -> dict:
    out, summ = os.path.join(work, f"{tag}.parquet"), os.path.join(work, f"{tag}.json")
    cmd = [sys.executable, *(prefix or ("-m", "jobs.cli")), "run", inp, "--model", model, "-o", out, "--overwrite", "--restart",
           "-q", "--device", device, "--max-length", str(max_length), "--summary", summ, *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"tag": tag, "error": p.stderr.strip().splitlines()[-3:]}
    with open(summ) as f:
        s = json.load(f)
    scoring = s["pairs_scored"] / max(s["scoring_pairs_per_s"], 1e-9)
    st = {k.removeprefix("startup_").removesuffix("_s"): v for k, v in s["extra"].items() if k.startswith("startup_")}
    return {"tag": tag, "wall_s": round(wall, 3), "first_batch_s": st.get("total"), "scoring_s": round(scoring, 3),
            "pairs_per_s": s["scoring_pairs_per_s"], "wall_over_scoring": round(wall / scoring, 2),
            "batch_token_budget": s["batch_token_budget"], "stages": st, "output": out}


def max_diff(a: str, b: str) -> float:
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    # (query, document) names a pair's score: the same document twice in one query scores the same.
    sa = dict(zip(zip(ta.column("query_id").to_pylist(), ta.column("document").to_pylist()), ta.column("score").to_numpy()))
    sb = dict(zip(zip(tb.column("query_id").to_pylist(), tb.column("document").to_pylist()), tb.column("score").to_numpy()))
    common = list(sa)
    return float(np.max(np.abs(np.array([sa[k] for k in common]) - np.array([sb[k] for k in common]))))


def check_tokenizer(model: str, inp: str) -> dict:
    """The direct tokenizer against AutoTokenizer on this machine's transformers."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer, __version__

    from pipeline.config import DEFAULT_INSTRUCTION
    from pipeline.engines import fast_tokenizer
    from pipeline.engines.template import QWEN3_RERANKER
    from pipeline.engines.tokenize import PairEncoder

    ours, why = fast_tokenizer.load(model)
    if ours is None:
        return {"direct": False, "why": why, "transformers": __version__}
    ref = AutoTokenizer.from_pretrained(model)
    same_backend = json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    t = pq.read_table(inp).slice(0, 2000)
    q, d = t.column("query").to_pylist(), t.column("document").to_pylist()
    ins = [DEFAULT_INSTRUCTION] * len(q)
    same_ids = True
    for max_length in (256, 8192):
        a = PairEncoder(ours, QWEN3_RERANKER, max_length).encode(ins, q, d)
        b = PairEncoder(ref, QWEN3_RERANKER, max_length).encode(ins, q, d)
        same_ids &= bool(np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets))
    return {"direct": True, "same_backend": same_backend, "same_ids": same_ids, "transformers": __version__}


def shape_record(arch: str, args, work: str, deadline: float) -> dict:
    import pyarrow.parquet as pq
    import torch

    from pipeline.bench.peer import ENCODER_ARCHS, ENCODER_MAX_LENGTH, build_saved_model
    from pipeline.bench.throughput import WORKLOADS, workload_table

    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rec: dict = {"arch": arch, "pairs": args.pairs}
    t0 = time.perf_counter()
    mdir = build_saved_model(arch, os.path.join(work, f"model-{arch}"), dev, torch.bfloat16)
    inp = os.path.join(work, f"w-mixed-{arch}.parquet")
    pq.write_table(workload_table(WORKLOADS["w-mixed"], args.pairs), inp)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    encoder = arch in ENCODER_ARCHS
    max_length = ENCODER_MAX_LENGTH if encoder else 8192
    if not encoder:
        rec["tokenizer_check"] = check_tokenizer(mdir, inp)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, f"inductor-{arch}")}
    rec["cold"] = cli_run(mdir, inp, work, "cold", str(dev), max_length, env)
    rec["runs"] = []
    for r in range(args.runs):
        if time.perf_counter() > deadline:
            rec["cut_short"] = True
            break
        rec["runs"].append(cli_run(mdir, inp, work, f"warm{r}", str(dev), max_length, env))
        if args.baseline_env:  # the same run with the variables set, right after: an A/B on one machine
            rec.setdefault("baseline_runs", []).append(
                cli_run(mdir, inp, work, f"base{r}", str(dev), max_length, {**env, **args.baseline_env}))
    if not encoder and time.perf_counter() < deadline:
        base = cli_run(mdir, inp, work, "transformers_load", str(dev), max_length, {**env, "RERANK_DIRECT_LOAD": "0"})
        if "error" not in base and rec["runs"] and "error" not in rec["runs"][0]:
            base["max_score_diff_vs_direct"] = max_diff(base["output"], rec["runs"][0]["output"])
        rec["transformers_load"] = base
    for runs, pre in ((rec["runs"], ""), (rec.get("baseline_runs", []), "baseline_")):
        ok = [r for r in runs if "error" not in r]
        for key in ("wall_s", "first_batch_s", "scoring_s", "wall_over_scoring", "pairs_per_s"):
            vals = sorted(r[key] for r in ok)
            if vals:
                rec[pre + key] = {"median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1]}
    return rec


def table(recs: list[dict]) -> str:
    lines = ["| shape | run | wall s | first batch s | scoring s | wall/scoring | pairs/s | stages |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec in recs:
        rows = [rec.get("cold")] + rec.get("runs", []) + rec.get("baseline_runs", []) + [rec.get("transformers_load")]
        for r in rows:
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {rec['arch']} | {r['tag']} | error: {r['error']} |||||")
                continue
            st = ", ".join(f"{k} {v}" for k, v in r["stages"].items() if k != "total")
            lines.append(f"| {rec['arch']} | {r['tag']} | {r['wall_s']} | {r['first_batch_s']} | {r['scoring_s']} | "
                         f"{r['wall_over_scoring']} | {r['pairs_per_s']} | {st} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape, 300 pairs")
    ap.add_argument("--arch", default=None, help="comma list [default: 0.6b,minilm-l6,xlmr-large; smoke: tiny]")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=215, help="no new run starts after this many seconds")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="after each warm run, one more with these variables set (tagged baseN)")
    args = ap.parse_args()
    args.baseline_env = dict(kv.split("=", 1) for kv in args.baseline_env)
    if args.smoke:
        args.device, args.pairs = "cpu", args.pairs or 300
        archs = (args.arch or "tiny").split(",")
    else:
        args.pairs = args.pairs or 6000
        archs = (args.arch or "0.6b,minilm-l6,xlmr-large").split(",")
    os.makedirs(args.out, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    recs = []
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        for arch in archs:
            if time.perf_counter() > deadline:
                recs.append({"arch": arch, "skipped": "out of time"})
                continue
            d = os.path.join(work, arch)
            os.makedirs(d)
            try:
                recs.append(shape_record(arch, args, d, deadline))
            except Exception as exc:  # one shape's failure must not lose the others' numbers
                recs.append({"arch": arch, "error": f"{type(exc).__name__}: {exc}"})
            for r in ([recs[-1].get("cold")] + recs[-1].get("runs", []) + recs[-1].get("baseline_runs", [])
                      + [recs[-1].get("transformers_load")]):
                if r:
                    r.pop("output", None)
            with open(os.path.join(args.out, "startup.json"), "w") as f:
                json.dump({"device": _device_name(args.device), "records": recs}, f, indent=2)
    print(table([r for r in recs if "arch" in r and "error" not in r and "skipped" not in r]))
    for r in recs:
        if "error" in r or "skipped" in r or "tokenizer_check" in r:
            print(r["arch"], r.get("error") or r.get("skipped") or r.get("tokenizer_check"),
                  r.get("transformers_load", {}).get("max_score_diff_vs_direct", ""))


def _device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


if __name__ == "__main__":
    main()
