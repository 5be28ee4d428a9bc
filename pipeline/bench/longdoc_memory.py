"""Host memory of a `--chunk-tokens` run as the input grows: does the expansion into windows stream?

    python -m pipeline.bench.longdoc_memory --docs 10000 1000 --tokens 8000 [--window 256]
        [--chunk-tokens 512 --chunk-overlap 128] [--dir /tmp/longdoc_memory] [--json PATH]

For each --docs D: writes (once, kept in --dir) a Parquet input of D documents of about --tokens
tokens each with the tiny Qwen3 reranker's tokenizer (sample_data/tiny-qwen3-reranker; random
word sequences, zstd-compressed, 10 documents per query), then runs `rerank-batch run` on it in a
child process whose forward is the bench's NullForward (zero logits at once: reading, tokenizing,
expanding, encoding, packing, parts, checkpoint and final write run as in a real run, the model
costs nothing). While it runs, the child's VmRSS and the units done (records in the checkpoint's
done/ folder) are sampled every 0.5 s. Per D the record gives the peak RSS (the child's VmHWM) of
the whole run and until the final write starts (every unit read, expanded and scored; the final
write is bounded by its own budget, data/write.py), the RSS when 10%, 50% and 90% of the units were
done, and the slope of RSS over documents done between 10% and 90% (MiB per 10,000 documents):
flat means memory follows a unit, not the input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "sample_data", "tiny-qwen3-reranker")
PER_QUERY = 10  # documents per query
ROW_GROUP = 500

# The CLI with the engine's forward replaced by NullForward (as the tests' forward doubles do).
# It prints the process's high-water mark (VmHWM: this process image's alone) when the final write
# starts (all units scored: the peak of reading, expanding and scoring) and at the end. The final
# write's memory is its own, bounded by its budget (data/write.py; tests/test_streaming.py).
CHILD = r"""
import sys
sys.argv = ["rerank-batch"] + sys.argv[1:]
from pipeline.bench.host import NullForward
from pipeline.engines import forwards
forwards.choose = lambda m, cfg: NullForward(m.device)
import pipeline.run
def hwm():
    return [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
real_finish = pipeline.run.finish
def finish(*a, **k):
    print("VMHWM_SCORED", hwm(), file=sys.stderr, flush=True)
    return real_finish(*a, **k)
pipeline.run.finish = finish
from jobs.cli import cli
try:
    cli(standalone_mode=False)
finally:
    print("VMHWM", hwm(), file=sys.stderr)
"""


def peaks_kib(stderr: str) -> tuple[int, int]:
    """The child's VmHWM when the final write started, and at its end (KiB)."""
    return (int(stderr.rsplit("VMHWM_SCORED", 1)[1].split()[0]), int(stderr.rsplit("VMHWM", 1)[1].split()[0]))


def words_per_doc(tokens: int) -> int:
    """Words of WORDS that make about `tokens` tokens with the tiny model's tokenizer."""
    from tokenizers import Tokenizer

    from pipeline.bench.throughput import WORDS

    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    rng = np.random.default_rng(1)
    sample = " ".join(rng.choice(np.array(WORDS), 4000))
    per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 4000
    return max(1, round(tokens / per_word))


def write_input(path: str, docs: int, tokens: int, seed: int = 0) -> None:
    """D documents of about `tokens` tokens (distinct random word sequences), written a row group at
    a time (the generator holds one group) with zstd, into `path` atomically."""
    from pipeline.bench.throughput import WORDS

    words = list(WORDS)  # a list: joining numpy strings costs ten times more
    n_words = words_per_doc(tokens)
    rng = np.random.default_rng(seed)
    schema = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("doc_id", pa.string()),
                        ("document", pa.string())])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for s in range(0, docs, ROW_GROUP):
            ids = range(s, min(docs, s + ROW_GROUP))
            idx = rng.integers(0, len(words), size=(len(ids), n_words)).tolist()
            w.write_table(pa.table({
                "query_id": [f"q{i // PER_QUERY}" for i in ids],
                "query": [" ".join(map(words.__getitem__, rng.integers(0, len(words), 6).tolist())) for _ in ids],
                "doc_id": [f"d{i}" for i in ids],
                "document": [" ".join(map(words.__getitem__, row)) for row in idx],
            }, schema=schema))
    os.replace(tmp, path)


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _done(done_dir: str) -> int:
    try:
        return sum(1 for n in os.listdir(done_dir) if n.endswith(".json") and not n.startswith("."))  # not temp files
    except OSError:
        return 0  # not there yet, or removed after the output was written


def measure(inp: str, docs: int, a, workdir: str) -> dict:
    out = os.path.join(workdir, "out.parquet")
    args = ["run", inp, "--model", MODEL, "-o", out, "--overwrite", "--restart", "-q",
            "--chunk-tokens", str(a.chunk_tokens), "--chunk-overlap", str(a.chunk_overlap),
            "--window", str(a.window), "--summary", os.path.join(workdir, "summary.json")]
    units = -(-docs // a.window)
    done_dir = out + ".ckpt/done"
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, rss MiB, units done; -1: no checkpoint)
    last_done = 0
    while p.poll() is None:
        rss = _rss_kib(p.pid)
        # Never backwards: the cleanup after the final write removes the records one by one.
        last_done = max(last_done, _done(done_dir))
        if rss:  # 0 while the child's image is being replaced (exec)
            samples.append((round(time.monotonic() - t0, 1), round(rss / 1024, 1), last_done))
        time.sleep(0.5)
    stdout, stderr = p.communicate()
    seconds = time.monotonic() - t0
    if p.returncode:
        sys.exit(stderr[-3000:])
    scored, hwm = (x / 1024 for x in peaks_kib(stderr))
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)

    def at(frac):
        hit = [s for s in samples if s[2] >= frac * units]
        return hit[0][1] if hit else None

    # RSS over documents done, between 10% and 90% of the units: after start-up, before the final write.
    mid = [s for s in samples if 0.1 * units <= s[2] <= 0.9 * units]
    slope = None
    if len(mid) >= 3 and len({s[2] for s in mid}) >= 2:
        x = np.array([min(s[2] * a.window, docs) for s in mid], float)
        y = np.array([s[1] for s in mid], float)
        slope = float(np.polyfit(x, y, 1)[0]) * 10_000
    scoring = [s[1] for s in samples if 0 < s[2] < units]
    keep = max(1, len(samples) // 200)  # at most about 200 samples in the record
    return {
        "docs": docs, "units": units, "seconds": round(seconds, 1),
        "windows": summary["extra"]["chunking"]["windows"], "pairs_scored": summary["pairs_scored"],
        "tokens": summary["tokens"], "input_mib": round(os.path.getsize(inp) / 2**20, 1),
        "peak_rss_mib": round(hwm, 1),
        "peak_rss_until_final_write_mib": round(scored, 1),
        "sampled_rss_max_while_scoring_mib": max(scoring) if scoring else None,
        "rss_mib_at_units": {"10%": at(0.1), "50%": at(0.5), "90%": at(0.9)},
        "slope_mib_per_10k_docs_10_to_90pct": None if slope is None else round(slope, 2),
        "samples_seconds_rss_mib_units": samples[::keep],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 1_000])
    ap.add_argument("--tokens", type=int, default=8000, help="tokens per document (about)")
    ap.add_argument("--window", type=int, default=256, help="--window of the run: documents per unit")
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--chunk-overlap", type=int, default=128)
    ap.add_argument("--dir", default="/tmp/longdoc_memory", help="inputs (kept) and the runs' output")
    ap.add_argument("--json", default=None, help="also write the record there")
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    rec = {"tokens_per_doc": a.tokens, "window": a.window, "chunk_tokens": a.chunk_tokens,
           "chunk_overlap": a.chunk_overlap, "model": "sample_data/tiny-qwen3-reranker (tokenizer; forward: NullForward)",
           "cpu_cores": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d %H:%M"), "runs": []}
    for d in a.docs:
        inp = os.path.join(a.dir, f"in-{d}x{a.tokens}.parquet")
        if not os.path.exists(inp):
            t0 = time.monotonic()
            write_input(inp, d, a.tokens)
            print(f"wrote {inp} in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        run = measure(inp, d, a, a.dir)
        rec["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if not k.startswith("samples")}), flush=True)
        runs = sorted(rec["runs"], key=lambda r: r["docs"])
        rec["peak_rss_ratio_largest_to_smallest_input"] = round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3)
        rec["peak_rss_until_final_write_ratio"] = round(runs[-1]["peak_rss_until_final_write_mib"]
                                                        / runs[0]["peak_rss_until_final_write_mib"], 3)
        if a.json:  # after each run: a long one that is stopped keeps the record of those before
            with open(a.json + ".tmp", "w") as f:
                json.dump(rec, f, indent=1)
            os.replace(a.json + ".tmp", a.json)
    print(json.dumps({k: v for k, v in rec.items() if k != "runs"}))


if __name__ == "__main__":
    main()
