"""Many small input files: a run's cost must grow with the rows, not with files × anything.

2,000 one-row files are 2,000 units (a unit never spans files). The run is counted, not timed:
how often each input file is opened or read, how many objects the checkpoint writes and how
often each part is read back, and how many tables the final rank hashes and ranks. A step that
works per unit (or per file) inside a loop over units (or files) shows up as counts that grow
with the number of files; here an input costs a small constant, the units scored together are
committed together (one part, one record), and the final write hashes and ranks a few chunks of
rows, not one table per unit."""

from __future__ import annotations

import collections
import os

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipeline.config import RunConfig
from pipeline.run import run

TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
FILES = 2000


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    src = pq.read_table(os.path.join(ROOT, "sample_data", "pairs.parquet"))
    files = d / "in"
    files.mkdir()
    for i in range(FILES):  # queries repeat every 28 files: their rows are scattered over the parts
        pq.write_table(src.slice(i % src.num_rows, 1), files / f"f{i:05d}.parquet")
    return d


def test_2000_one_row_files_cost_a_constant_per_file_and_per_part(many, monkeypatch):
    from pipeline.data import rank
    from pipeline.storage.location import LocalLocation

    reads: collections.Counter = collections.Counter()  # key -> opens and whole reads
    for verb in ("open", "read_bytes"):
        real = getattr(LocalLocation, verb)

        def counted(self, _real=real):
            reads[self.key] += 1
            return _real(self)

        monkeypatch.setattr(LocalLocation, verb, counted)
    hashed = []
    real_hashes = rank.key_hashes

    def counted_hashes(keys):
        hashed.append(keys.height)
        return real_hashes(keys)

    monkeypatch.setattr(rank, "key_hashes", counted_hashes)
    ranked = []
    real_rank = rank.Ranker.__call__

    def counted_rank(self, table, g):
        ranked.append(table.num_rows)
        return real_rank(self, table, g)

    monkeypatch.setattr(rank.Ranker, "__call__", counted_rank)

    writes = []
    real_write = LocalLocation.write_atomic

    def counted_write(self, data):
        writes.append(self.key)
        return real_write(self, data)

    monkeypatch.setattr(LocalLocation, "write_atomic", counted_write)

    out = many / "out.parquet"
    # commit_every: no commits by time (their count would depend on this machine's speed).
    cfg = RunConfig(inputs=(str(many / "in"),), output=str(out), model=TINY, device="cpu", commit_every=1e9)
    s = run(cfg, progress=False)
    assert s.rows == FILES and s.units == FILES and pq.read_metadata(out).num_rows == FILES

    inputs = [k for k in reads if os.path.dirname(k) == str(many / "in")]
    parts = [k for k in reads if os.path.basename(os.path.dirname(k)) == "parts"]
    assert len(inputs) == FILES
    # An input: its footer when planning, its bytes for the fingerprint, its rows when scored,
    # its footer when re-checked before the output is published.
    assert max(reads[k] for k in inputs) <= 4, collections.Counter(reads[k] for k in inputs)
    # The checkpoint: its marker, fingerprint and the published marker, and for the units
    # scored together one part and one record (not two objects per unit).
    ckpt = [k for k in writes if ".ckpt" in k]
    assert len(ckpt) <= 6 and len(parts) == 1, ckpt
    # A part: read (and checked against its record) once by each pass of the final write, and
    # once more for the row width; no separate pass that hashes every part.
    assert max(reads[k] for k in parts) <= 3, collections.Counter(reads[k] for k in parts)
    # The final write works on chunks of rows: a few hashings and rankings, not one per part.
    assert len(hashed) <= 4 and sum(hashed) <= 2 * FILES, hashed
    assert len(ranked) <= 30 and sum(ranked) == FILES, ranked  # the scattered queries: one bucket each at most
