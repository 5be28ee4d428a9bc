"""The cache's CPU side, measured: writes, lookups per second per core and memory, on a cache of
N entries built from synthetic keys, as runs build it (one file per unit, merged as tiers fill)
and after `cache prune` (one run of range-cut files).

    python -m pipeline.cache.bench --entries 10000000 --docs-per-query 1 --json out.json

Keys are random with the structure of real ones (key.py: a query's documents share the high 32
bits), so the files, filters and blocks are those of real text; the text hashing that makes keys
is measured apart (pair_keys on synthetic strings). Lookups go through PairCache.lookup one unit
(16,384 keys) at a time, listing the folder each time as a run does. One thread: per core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time

import numpy as np

from pipeline.cache.admin import prune
from pipeline.cache.cache import PairCache, prepare
from pipeline.cache.key import Scope, pair_keys


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_keys(n: int, docs_per_query: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    queries = -(-n // docs_per_query)
    q32 = rng.integers(0, 2**32, queries, dtype=np.uint64)
    hi = (np.repeat(q32, docs_per_query)[:n] << np.uint64(32)) | rng.integers(0, 2**32, n, dtype=np.uint64)
    lo = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    return hi, lo


def _scope():
    return Scope(b"\x01" * 16, {"bench": True}, {"path": "bench", "name": "bench"})


def build(location: str, n: int, docs_per_query: int, unit: int = 16384, seed: int = 0) -> dict:
    """Write n entries as runs would: one file per unit of `unit` new keys, merged as tiers fill."""
    prepare(location)
    cache = PairCache(location, _scope())
    hi, lo = synthetic_keys(n, docs_per_query, seed)
    scores = np.random.default_rng(seed + 1).random(n).astype(np.float32)
    t0 = time.perf_counter()
    for s in range(0, n, unit):
        cache.add(hi[s:s + unit], lo[s:s + unit], scores[s:s + unit])
    dt = time.perf_counter() - t0
    cache.files.refresh()
    rec = {"entries": n, "seconds": round(dt, 2), "entries_per_s": round(n / dt), "files": len(cache.files.headers),
           "merges": cache.stats["merges"],
           "bytes": sum(h.size for h in cache.files.headers.values())}
    cache.close()
    return rec


def _queries(n: int, docs_per_query: int, lookups: int, seed: int, hit_share: float):
    hi, lo = synthetic_keys(n, docs_per_query, seed)
    rng = np.random.default_rng(seed + 7)
    hits = int(lookups * hit_share)
    # Whole queries, as a unit of a rerun asks for them: a run of consecutive entries.
    starts = rng.integers(0, max(1, n - hits), max(1, hits // max(docs_per_query, 1) + 1))
    pick = (starts[:, None] + np.arange(docs_per_query)[None, :]).ravel()[:hits] % n
    mhi, mlo = synthetic_keys(lookups - hits, docs_per_query, seed + 99)  # keys not in the cache
    return np.concatenate([hi[pick], mhi]), np.concatenate([lo[pick], mlo]), hits


def _child(location: str, qfile: str, unit: int, out) -> None:
    """A fresh process: open the cache, look the keys up a unit at a time, report time and memory."""
    q = np.load(qfile)
    qhi, qlo = q[0].copy(), q[1].copy()
    del q
    rss0 = rss_bytes()
    cache = PairCache(location, _scope())
    t0, c0 = time.perf_counter(), time.process_time()
    found = 0
    for s in range(0, len(qhi), unit):
        f, _ = cache.lookup(qhi[s:s + unit], qlo[s:s + unit])
        found += int(f.sum())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    out.put({"found": found, "seconds": dt, "cpu_seconds": cpu, "files": len(cache.files.headers),
             "header_memory_bytes": cache.files.memory, "blocks_read": cache.files.blocks_read,
             "bytes_read": cache.files.bytes_read, "rss_before_bytes": rss0, "rss_after_bytes": rss_bytes(),
             "peak_rss_bytes": hwm})
    cache.close()


def measure(location: str, n: int, docs_per_query: int, lookups: int, unit: int = 16384, seed: int = 0,
            hit_share: float = 0.9) -> dict:
    """Lookups of `lookups` keys (a share `hit_share` of them in the cache), a unit at a time, in
    a fresh process (its RSS is the reader's: imports, the keys asked, the headers, the blocks)."""
    qhi, qlo, hits = _queries(n, docs_per_query, lookups, seed, hit_share)
    qfile = os.path.join(location, "..", f"queries-{docs_per_query}.npy")
    np.save(qfile, np.stack([qhi, qlo]))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_child, args=(location, qfile, unit, out))
    p.start()
    r = out.get()
    p.join()
    os.unlink(qfile)
    r.update(lookups=lookups, expected_found=hits, lookups_per_s=round(lookups / r["seconds"]),
             lookups_per_cpu_s=round(lookups / max(r["cpu_seconds"], 1e-9)),
             cpu_ms_per_million=round(1000 * r["cpu_seconds"] / lookups * 1e6, 1),
             rss_growth_bytes=r["rss_after_bytes"] - r["rss_before_bytes"])
    return r


def hashing_rate(pairs: int = 200_000, docs_per_query: int = 10, doc_chars: int = 900) -> dict:
    """pair_keys on synthetic texts: the per-pair cost of making keys (BLAKE2b in Python)."""
    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    docs = ["".join(rng.choice(letters, doc_chars)) + str(i) for i in range(min(pairs, 2000))]
    docs = [docs[i % len(docs)] + str(i) for i in range(pairs)]
    queries = [f"query {i // docs_per_query} about something" for i in range(pairs)]
    instr = ["Given a web search query, retrieve relevant passages that answer the query"] * pairs
    t0 = time.perf_counter()
    pair_keys(b"\x02" * 16, instr, queries, docs)
    dt = time.perf_counter() - t0
    return {"pairs": pairs, "doc_chars": doc_chars, "seconds": round(dt, 3), "pairs_per_s": round(pairs / dt)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=10_000_000)
    ap.add_argument("--docs-per-query", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where to build the caches (a temp folder by default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--lookups-only", action="store_true",
                    help="measure lookups in caches this command built before in --dir (as they are now)")
    a = ap.parse_args(argv)
    rec = {"entries": a.entries, "lookups": a.lookups, "cpu": os.cpu_count(), "rows": [],
           "hashing": hashing_rate()}
    base = a.dir or tempfile.mkdtemp(prefix="rerank-cache-bench-")
    os.makedirs(base, exist_ok=True)
    for dpq in a.docs_per_query:
        loc = os.path.join(base, f"cache-{dpq}")
        if a.lookups_only:
            rec["rows"].append({"docs_per_query": dpq, "lookup": measure(loc, a.entries, dpq, a.lookups)})
            print(json.dumps(rec["rows"][-1], indent=1), flush=True)
            continue
        built = build(loc, a.entries, dpq)
        as_written = measure(loc, a.entries, dpq, a.lookups)
        t0 = time.perf_counter()
        pr = prune(loc)
        prune_s = time.perf_counter() - t0
        pruned = measure(loc, a.entries, dpq, a.lookups)
        rec["rows"].append({"docs_per_query": dpq, "build": built, "lookup_as_written": as_written,
                            "prune_seconds": round(prune_s, 2), "prune": pr, "lookup_after_prune": pruned})
        print(json.dumps(rec["rows"][-1], indent=1), flush=True)
    rec["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps({"hashing": rec["hashing"], "peak_rss_bytes": rec["peak_rss_bytes"]}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=2)


if __name__ == "__main__":
    main()
