"""Many small input files: a run's cost must grow with the rows, not with files × anything.

2,000 one-row files are 2,000 units and 2,000 parts. The run is counted, not timed: how often
each input file and each part is opened or read, and how many tables the final rank hashes and
ranks. A step that works per part (or per file) inside a loop over parts (or files) shows up as
counts that grow with the number of files; here every count is a small constant per file or per
part, and the final write hashes and ranks a few chunks of rows, not one table per part."""

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
    from pipeline.data import rank_index, rank_stream
    from pipeline.storage.location import LocalLocation

    reads: collections.Counter = collections.Counter()  # key -> opens and whole reads
    for verb in ("open", "read_bytes"):
        real = getattr(LocalLocation, verb)

        def counted(self, _real=real):
            reads[self.key] += 1
            return _real(self)

        monkeypatch.setattr(LocalLocation, verb, counted)
    hashed = []
    for mod in (rank_index, rank_stream):
        real_hashes = mod.key_hashes

        def counted_hashes(keys, _real=real_hashes):
            hashed.append(keys.height)
            return _real(keys)

        monkeypatch.setattr(mod, "key_hashes", counted_hashes)
    ranked = []
    real_rank = rank_stream.Ranker.__call__

    def counted_rank(self, table, g):
        ranked.append(table.num_rows)
        return real_rank(self, table, g)

    monkeypatch.setattr(rank_stream.Ranker, "__call__", counted_rank)

    out = many / "out.parquet"
    s = run(RunConfig(inputs=(str(many / "in"),), output=str(out), model=TINY, device="cpu"), progress=False)
    assert s.rows == FILES and s.units == FILES and pq.read_metadata(out).num_rows == FILES

    inputs = [k for k in reads if os.path.dirname(k) == str(many / "in")]
    parts = [k for k in reads if os.path.basename(os.path.dirname(k)) == "parts"]
    assert len(inputs) == FILES and len(parts) == FILES
    # An input: its footer when planning, its bytes for the fingerprint, its rows when scored,
    # its footer when re-checked before the output is published.
    assert max(reads[k] for k in inputs) <= 4, collections.Counter(reads[k] for k in inputs)
    # A part: read (and checked against its record) once by each pass of the final write, the
    # first once more for the row width; no separate pass that hashes every part.
    assert max(reads[k] for k in parts) <= 3 and sum(reads[k] for k in parts) <= 2 * FILES + 1, \
        collections.Counter(reads[k] for k in parts)
    # The final write works on chunks of rows: a few hashings and rankings, not one per part.
    assert len(hashed) <= 4 and sum(hashed) <= 2 * FILES, hashed
    assert len(ranked) <= 30 and sum(ranked) == FILES, ranked  # the scattered queries: one bucket each at most
