"""Long documents as windows stream: peak RSS of a `--chunk-tokens` run stays flat as the input grows.

The expansion of documents into windows (data/chunks.py) happens per unit, inside the unit's
windowed read, so a run holds a unit's windows (their texts and token ids), never the input's.
A child CLI process per input size, its forward the bench's NullForward (zero logits at once), so
that reading, tokenizing, expanding, encoding, parts and the final write are all it does; its peak
is its own VmHWM (see test_streaming.py for why not ru_maxrss) when the final write starts: every
unit has then been read, expanded and scored. The final write's own peak rises with the output
until it reaches its memory budget (data/write.py), past these inputs; test_streaming.py holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from conftest import ROOT
from pipeline.bench.longdoc_memory import CHILD, MODEL, peaks_kib, write_input

TOKENS = 3000  # per document: 8 windows of 512 tokens, overlap 128
WINDOW = 100  # documents per unit


def _run(tmp_path, docs):
    inp, out, summary = (str(tmp_path / f"{n}{docs}") for n in ("in", "out", "summary"))
    write_input(inp, docs, TOKENS)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, "run", inp, "--model", MODEL, "-o", out + ".parquet", "-q",
         "--chunk-tokens", "512", "--chunk-overlap", "128", "--window", str(WINDOW), "--summary", summary],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert pq.read_metadata(out + ".parquet").num_rows == docs
    with open(summary) as f:
        s = json.load(f)
    return peaks_kib(p.stderr)[0] * 1024, s


def test_chunked_run_peak_rss_flat_in_input_size(tmp_path):
    # 4 and 40 units: past the first units' rise (the prefetch thread a unit ahead, allocator
    # arenas), which 2 units of 200 documents do not reach (measured: +18 MiB from 2 to 6 units,
    # +3 from 6 to 20).
    small, s_small = _run(tmp_path, 400)
    large, s_large = _run(tmp_path, 4000)
    windows = s_large["extra"]["chunking"]["windows"]
    assert windows == 10 * s_small["extra"]["chunking"]["windows"] and windows >= 7 * 4000
    # What the 3,600 more documents would add to a run that expanded the whole input at once: at
    # the least their windows' token ids as the encoder holds them (int32, ~600 a window with the
    # template; ~64 MiB), before their texts (~2 bytes a token) and the documents themselves.
    more_ids = (s_large["tokens"] - s_small["tokens"]) * 4
    assert more_ids > 60 * 2**20
    grown = large - small
    # Measured on a 2-core CPU: +6 MiB streaming (532 -> 538 MiB); +266 MiB with the whole input
    # as one unit (a window of 10**6 documents), as an expansion of the whole input would be.
    assert grown < more_ids / 2, (f"peak RSS grew by {grown / 2**20:.0f} MiB with 10x the documents "
                                  f"(their windows' ids alone: {more_ids / 2**20:.0f} MiB)")
