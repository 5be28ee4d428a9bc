"""What the score cache and exact dedup save, end to end (`run()`: Parquet in, ranked Parquet out,
the model loaded once), on W-mixed-like synthetic text, 0.6B random weights in bf16 on CUDA:

  first  vs rerun      the input scored into an empty cache, then again with the cache (goal: the
                       rerun's scoring time <= 5% of the first's)
  grown  vs new-only   the input plus 10% new pairs (spread through it) with the cache, against
                       the new pairs alone without it (goal: within 15%)
  dups   vs deduped    the input with 30% exact repeats (other ids), against the same input with
                       the repeats removed by hand, both without the cache (goal: within 5%)
  lookups              the cache's CPU side on a 10M-entry cache (pipeline/cache/bench.py):
                       lookups per CPU second, one thread (goal: >= 200k/s/core), and the RSS

"Scoring time" is the summary's: from the first unit read to the last part written
(pairs_this_run / scoring_pairs_per_s); the whole run() call is recorded beside it.

    OUT=/tmp/out python tests_gpu/cache_bench.py           # GPU: writes $OUT/cache_bench.json
    python tests_gpu/cache_bench.py --smoke                # CPU, tiny model, few pairs: does it run
    python tests_gpu/cache_bench.py --smoke --pairs 3000 --window 500   # repeats across many units
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.bench import throughput as bench  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engines.score import load_engine  # noqa: E402
from pipeline.run import run  # noqa: E402

def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", help="JSON record to write [default: $OUT/cache_bench.json]")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny arch, few pairs: checks the script runs")
    ap.add_argument("--pairs", type=int, default=100_000, help="pairs of the base input")
    ap.add_argument("--grow", type=float, default=0.10, help="share of new pairs added for the grown input")
    ap.add_argument("--dups", type=float, default=0.30, help="share of exact repeats in the duplicated input")
    ap.add_argument("--lookup-entries", type=int, default=10_000_000, help="entries of the lookup cache (0: skip)")
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=None, help="--window of the runs [default: the run's]")
    ap.add_argument("--repeats", type=int, default=1, help="passes of each pair of runs (alternating order)")
    ap.add_argument("--parts", default="rerun,grown,dups",
                    help="comma list of the comparisons to run: rerun, grown, dups [default: all]")
    args = ap.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"rerun", "grown", "dups"}
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose among rerun, grown, dups")
    if args.smoke:
        for name, small in (("pairs", 600), ("lookup_entries", 200_000), ("lookups", 50_000)):
            if getattr(args, name) == ap.get_default(name):  # a size given on the command line is kept
                setattr(args, name, small)
    return args


class Bench:
    def __init__(self, args):
        self.args = args
        smoke = args.smoke
        if not smoke and not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on CPU")
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.arch = "tiny" if smoke else "0.6b"
        self.out = args.path or os.path.join(os.environ.get("OUT", "."), "cache_bench.json")
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        self.t0 = time.time()
        self.rec = {"device": torch.cuda.get_device_name(0) if self.dev.type == "cuda" else "cpu", "arch": self.arch,
                    "dtype": "float32" if smoke else "bfloat16", "torch": torch.__version__,
                    "cpu_cores": len(os.sched_getaffinity(0)), "pairs": args.pairs, "workload": "w-mixed",
                    "grow": args.grow, "dups": args.dups, "date": time.strftime("%F %T"), "runs": {}}

    def save(self):
        self.rec["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(self.out, "w") as f:
            json.dump(self.rec, f, indent=1)

    def inputs(self, wd: str) -> dict[str, str]:
        """base, grown (base + new, shuffled in), new, dups (unique + repeats), deduped (unique)."""
        a = self.args
        n, n_new = a.pairs, int(a.pairs * a.grow)
        t = bench.workload_table(bench.WORKLOADS["w-mixed"], n + n_new)
        t = t.append_column("doc_id", pa.array([f"d{i}" for i in range(t.num_rows)]))
        base, new = t.slice(0, n), t.slice(n, n_new)
        rng = np.random.default_rng(5)
        grown = pa.concat_tables([base, new]).take(pa.array(rng.permutation(n + n_new)))
        n_unique = n - int(n * a.dups)
        unique = base.slice(0, n_unique)
        rep = unique.take(pa.array(rng.integers(0, n_unique, n - n_unique)))
        rep = rep.set_column(rep.column_names.index("doc_id"), "doc_id",
                             pa.array([f"r{i}" for i in range(rep.num_rows)], rep.schema.field("doc_id").type))
        dups = pa.concat_tables([unique, rep]).take(pa.array(rng.permutation(n)))
        paths = {}
        for name, table in (("base", base), ("grown", grown), ("new", new), ("dups", dups), ("deduped", unique)):
            paths[name] = os.path.join(wd, f"{name}.parquet")
            pq.write_table(table, paths[name])
        self.rec["inputs"] = {k: pq.read_metadata(p).num_rows for k, p in paths.items()}
        return paths

    def one(self, sc, model_dir: str, wd: str, inp: str, cache: str | None, tag: str) -> dict:
        cfg = RunConfig(inputs=(inp,), output=os.path.join(wd, f"out-{tag}.parquet"), overwrite=True, restart=True,
                        model=model_dir, device=self.dev.type, cache=cache,
                        **({"window_pairs": self.args.window} if self.args.window else {}))
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        b0 = sc.stats().batches
        t0 = time.perf_counter()
        s = run(cfg, progress=False, scorer=sc)
        wall = time.perf_counter() - t0
        scoring = s.pairs_this_run / s.scoring_pairs_per_s if s.scoring_pairs_per_s else 0.0
        row = {"wall_s": round(wall, 3), "scoring_s": round(scoring, 3), "pairs": s.pairs_scored,
               "pairs_computed": s.pairs_computed, "pairs_from_cache": s.pairs_from_cache,
               "duplicate_pairs": s.duplicate_pairs, "tokens": s.tokens, "batches": sc.stats().batches - b0}
        self.rec["runs"].setdefault(tag, []).append(row)
        self.save()
        return row

    def scoring_runs(self, wd: str) -> None:
        from pipeline.bench.devices import save_random_reranker

        os.environ.setdefault("XDG_CACHE_HOME", os.path.join(wd, "xdg"))  # the model's hash memo, apart
        model_dir = save_random_reranker(self.arch, wd)
        sc = load_engine(RunConfig(inputs=(), output="", model=model_dir, device=self.dev.type,
                                   dtype=self.rec["dtype"]))
        self.rec.update(engine=sc.info.forward, attention=sc.info.kernel, budget=sc.token_budget,
                        prefix_sharing=sc.info.sharing)
        paths = self.inputs(wd)
        self.one(sc, model_dir, wd, paths["new"], None, "warm-up")  # first-run costs (shapes, file cache) out
        self.rec["setup_s"] = round(time.time() - self.t0, 1)
        parts = set(self.args.parts.split(","))
        for rep in range(self.args.repeats):
            cache = os.path.join(wd, f"cache-{rep}")
            if {"rerun", "grown"} & parts:
                self.one(sc, model_dir, wd, paths["base"], cache, "first")  # fills the cache
            if "rerun" in parts:
                self.one(sc, model_dir, wd, paths["base"], cache, "rerun")
            pairs = {"grown": [("grown", cache), ("new", None)], "dups": [("dups", None), ("deduped", None)]}
            for pair in (pairs[p] for p in ("grown", "dups") if p in parts):
                for tag, c in (pair if rep % 2 == 0 else pair[::-1]):  # alternate who goes first
                    self.one(sc, model_dir, wd, paths[tag], c, tag)
        r = self.rec["runs"]
        res = {"goals": {}}
        goals = {"rerun_vs_first": "<= 0.05", "grown_vs_new": "<= 1.15", "dups_vs_deduped": "<= 1.05"}
        for part, (a, b) in (("rerun", ("rerun", "first")), ("grown", ("grown", "new")), ("dups", ("dups", "deduped"))):
            if part in parts:
                for key in ("scoring", "wall"):
                    res[f"{a}_vs_{b}_{key}"] = ratio(r[a], r[b], f"{key}_s")
                res["goals"][f"{a}_vs_{b}_scoring"] = goals[f"{a}_vs_{b}"]
        self.rec["results"] = res
        self.save()
        del sc
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def lookups(self, wd: str) -> None:
        from pipeline.cache import bench as cbench
        from pipeline.cache.admin import prune

        a = self.args
        lk = {"entries": a.lookup_entries, "lookups": a.lookups, "hashing": cbench.hashing_rate()}
        for dpq in (1, 100):
            loc = os.path.join(wd, f"lookup-{dpq}")
            built = cbench.build(loc, a.lookup_entries, dpq)
            written = cbench.measure(loc, a.lookup_entries, dpq, a.lookups)
            t0 = time.perf_counter()
            prune(loc)
            lk[f"docs_per_query_{dpq}"] = {"build": built, "as_written": written,
                                           "prune_s": round(time.perf_counter() - t0, 2),
                                           "after_prune": cbench.measure(loc, a.lookup_entries, dpq, a.lookups)}
            self.rec["lookups"] = lk
            self.save()

    def report(self) -> None:
        res = self.rec["results"]
        for k in (k for k in ("rerun_vs_first", "grown_vs_new", "dups_vs_deduped") if k + "_scoring" in res):
            print(f"{k:>16}: scoring {res[k + '_scoring']:.4f}, whole run {res[k + '_wall']:.4f} "
                  f"(goal {res['goals'][k + '_scoring']})")
        for dpq in (1, 100):
            x = self.rec.get("lookups", {}).get(f"docs_per_query_{dpq}")
            for state in ("as_written", "after_prune") if x else ():
                m = x[state]
                print(f"lookups, {dpq} doc(s)/query, {state}: {m['lookups_per_cpu_s']:,} per CPU second "
                      f"({m['lookups_per_s']:,}/s wall), {m['files']} files, headers "
                      f"{m['header_memory_bytes'] / 2**20:.1f} MiB, peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB")
        print("wrote", self.out, "in", self.rec["elapsed_s"], "s", flush=True)


def ratio(a: list[dict], b: list[dict], key: str) -> float:
    return round(float(np.median([x[key] for x in a])) / max(float(np.median([x[key] for x in b])), 1e-9), 4)


def main(argv=None) -> None:
    b = Bench(parse_args(argv))
    with tempfile.TemporaryDirectory() as wd:
        b.scoring_runs(wd)
        if b.args.lookup_entries:
            b.lookups(wd)
    b.report()


if __name__ == "__main__":  # the lookup measurement spawns processes, which import this file
    main()
