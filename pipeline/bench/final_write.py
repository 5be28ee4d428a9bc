"""Synthetic scored parts in the checkpoint's layout, and a benchmark of the final rank-and-write.

    python -m pipeline.bench.final_write --rows 20000000 --key query_id --dir /tmp/wb [--repo PATH] [--repeat 3]

makes (once, cached in --dir) parts like a real run's (16,384 rows each, query_id or (instruction,
query) keys, doc_id, document, relevance, _ord, score), then runs `write_ranked` of the checkout
at --repo (default: this one) in a fresh process per repeat, and prints its peak RSS, CPU and
wall seconds as JSON lines. The tests build their random parts with `synth_parts` too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.pairs import ORD_STRIDE
from pipeline.data.read import InputLayout

LS = pa.large_string()


def synth_layout(key: str = "query_id", nested: bool = False) -> InputLayout:
    fields = ([pa.field("query_id", LS)] if key == "query_id" else []) + [
        pa.field("instruction", LS), pa.field("query", LS)]
    if nested:
        fields += [pa.field("documents", pa.large_list(LS)), pa.field("label", pa.int32())]
    else:
        fields += [pa.field("doc_id", LS), pa.field("document", LS), pa.field("relevance", pa.int32())]
    schema = pa.schema(fields)
    return InputLayout(nested=nested, query_col="query", doc_col="documents" if nested else "document",
                       instruction_col="instruction", columns=tuple(schema.names), schema=schema)


def synth_parts(directory: str, rows: int, *, key: str = "query_id", nested: bool = False,
                per_group: int = 50, part_rows: int = 16384, scatter: float = 0.0,
                null_score: float = 0.0, null_instruction: float = 0.0, null_query: float = 0.0,
                ties: int = 0, seed: int = 0) -> tuple[list[str], InputLayout]:
    """Write `rows` scored rows as parts of `part_rows`. Rows of a group are contiguous
    (per_group rows each; in nested form one input row's documents), except a `scatter`
    fraction of groups' rows (long) or input rows (nested) that take a random other group;
    `ties` > 0 rounds scores to that many levels."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = max(1, -(-rows // per_group))
    paths = []
    for i, start in enumerate(range(0, rows, part_rows)):
        r = np.arange(start, min(rows, start + part_rows), dtype=np.int64)
        n = len(r)
        parent = r // per_group if nested else r
        g = r // per_group
        moved = rng.random(n) < scatter
        if nested:  # a whole input row takes another row's query
            pick = np.flatnonzero(moved & (r % per_group == 0))
            new = rng.integers(0, groups, len(pick))
            for j, k in zip(pick, new):
                g[(parent == parent[j])] = k
        else:
            g[moved] = rng.integers(0, groups, int(moved.sum()))
        score = rng.random(n, dtype=np.float32)
        if ties:
            score = np.floor(score * ties).astype(np.float32) / ties
        df = pl.DataFrame({"g": g, "r": r})
        df = df.with_columns(
            query_id=pl.format("q{}", "g").cast(pl.String),
            instruction=pl.when(pl.lit(rng.random(n) < null_instruction)).then(None)
            .otherwise(pl.lit("Given a web search query, retrieve relevant passages")),
            query=pl.when(pl.lit(rng.random(n) < null_query)).then(None)
            .otherwise(pl.format("what is the answer to question number {} of the set", "g")),
            doc_id=pl.format("d{}", "r"),
            document=pl.format("document {} on topic {}: some filler text of a plausible length", "r", "g"),
            relevance=(pl.col("r") % 2).cast(pl.Int32),
        )
        cols = {c: df[c].to_arrow().cast(LS) for c in ("query_id", "instruction", "query", "doc_id", "document")}
        out = {}
        if key == "query_id":
            out["query_id"] = cols["query_id"]
        out["instruction"], out["query"] = cols["instruction"], cols["query"]
        if nested:
            out["document"] = cols["document"]
            out["doc_index"] = pa.array((r % per_group).astype(np.int32))
            out["label"] = df["relevance"].to_arrow()
            ords = parent * ORD_STRIDE + r % per_group
        else:
            out["doc_id"], out["document"] = cols["doc_id"], cols["document"]
            out["relevance"] = df["relevance"].to_arrow()
            ords = r * ORD_STRIDE
        out["_ord"] = pa.array(ords)
        mask = rng.random(n) < null_score
        out["score"] = pa.array(score, pa.float32(), mask=mask if mask.any() else None)
        path = os.path.join(directory, f"{i:06d}.parquet")
        pq.write_table(pa.table(out), path)
        paths.append(path)
    return paths, synth_layout(key, nested)


# The timed process imports only the checkout under test (it may predate this module).
_CHILD = """
import json, resource, sys, time
import pyarrow as pa
from pipeline.config import RunConfig
from pipeline.data.read import InputLayout
from pipeline.data.write import write_ranked
LS = pa.large_string()
""" + inspect.getsource(synth_layout) + """
paths, key, nested, out = json.loads(sys.argv[1])
layout = synth_layout(key, nested)
cfg = RunConfig(inputs=(), output=out)
r0 = resource.getrusage(resource.RUSAGE_SELF)
rss0 = r0.ru_maxrss
t0 = time.perf_counter()
try:  # parts are read through a part source (a checkout from before reads paths)
    from pipeline.storage.sink import FileParts
    rows = write_ranked(FileParts(paths), layout, cfg, out)
except ImportError:
    rows = write_ranked(paths, layout, cfg)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rows": rows, "wall_s": round(time.perf_counter() - t0, 2),
                  "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                  "peak_rss_mb": round(r1.ru_maxrss / 1024), "rss_after_imports_mb": round(rss0 / 1024)}))
"""


def _du(directory: str, prefix: str) -> int:
    """Bytes under the entries of `directory` whose names start with `prefix`."""
    total = 0
    for e in os.scandir(directory):
        if not e.name.startswith(prefix):
            continue
        try:
            paths = [e.path] if e.is_file() else [os.path.join(e.path, f) for f in os.listdir(e.path)]
            total += sum(os.path.getsize(q) for q in paths)
        except OSError:
            pass
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--key", choices=["query_id", "text"], default="query_id")
    ap.add_argument("--nested", action="store_true")
    ap.add_argument("--per-group", type=int, default=50)
    ap.add_argument("--scatter", type=float, default=0.0)
    ap.add_argument("--dir", default="/tmp/write_bench")
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None, help="output file (default: DIR/out.parquet)")
    a = ap.parse_args(argv)
    name = f"{a.rows}-{a.key}-{'nested' if a.nested else 'long'}-{a.per_group}-{a.scatter}"
    d = os.path.join(a.dir, name)
    if not os.path.exists(os.path.join(d, "DONE")):
        synth_parts(d, a.rows, key=a.key, nested=a.nested, per_group=a.per_group, scatter=a.scatter)
        open(os.path.join(d, "DONE"), "w").close()
    paths = sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".parquet"))
    parts_mb = sum(os.path.getsize(p) for p in paths) / 2**20
    out = os.path.abspath(a.out or os.path.join(a.dir, "out.parquet"))
    env = dict(os.environ, PYTHONPATH=a.repo)
    for _ in range(a.repeat):
        p = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps([paths, a.key, a.nested, out])],
                             env=env, cwd=a.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The writer's own disk (temp output, spill), sampled while it runs.
        peak_disk = 0
        while p.poll() is None:
            peak_disk = max(peak_disk, _du(os.path.dirname(out), "." + os.path.basename(out)))
            time.sleep(0.2)
        stdout, stderr = p.communicate()
        if p.returncode:
            sys.exit(stderr[-3000:])
        line = json.loads(stdout.strip().splitlines()[-1])
        line.update(case=name, repo=a.repo, parts_mb=round(parts_mb), out_mb=round(os.path.getsize(out) / 2**20),
                    peak_write_disk_mb=round(peak_disk / 2**20))
        print(json.dumps(line), flush=True)
        os.unlink(out)


if __name__ == "__main__":
    main()
