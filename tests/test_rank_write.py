"""The streaming rank-and-write against a plain in-memory reference (all parts in one polars
frame, one sort), on random parts: ties, null scores, null instructions and queries, --top-k,
many small and few big groups, contiguous and scattered queries, long and nested, query_id and
(instruction, query) keys, and a tiny memory budget that forces the spill path."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import rank
from pipeline.config import RunConfig
from pipeline.errors import RerankError
from pipeline.data import write as wmod
from pipeline.data.write import group_keys, output_schema
from pipeline.bench.final_write import synth_parts
from pipeline.storage.sink import FileParts


def write_ranked(paths, layout, cfg, **kw) -> int:
    """The final write of parts made without a checkpoint, to cfg.output."""
    return wmod.write_ranked(FileParts(paths), layout, cfg, cfg.output, **kw)


def reference(paths, layout, cfg) -> pa.Table:
    """Groups by first appearance, best score first, ties and nulls in input order."""
    schema = output_schema(layout)
    keys = group_keys(layout)
    t = pa.concat_tables(pq.read_table(p) for p in paths)
    df = pl.from_arrow(t.select(keys + ["score", "_ord"])).with_columns(_i=pl.int_range(pl.len()))
    if "instruction" in keys:
        df = df.with_columns(pl.col("instruction").fill_null(cfg.instruction))
    df = (df.with_columns(_first=pl.col("_ord").min().over(keys))
          .sort(["_first", "score", "_ord"], descending=[False, True, False], nulls_last=True)
          .with_columns(rank=pl.when(pl.col("score").is_null()).then(None)
                        .otherwise(pl.int_range(1, pl.len() + 1).over(keys)).cast(pl.Int32)))
    if cfg.top_k is not None:
        df = df.filter(pl.col("rank") <= cfg.top_k)
    out = t.take(df["_i"].to_arrow()).append_column("rank", df["rank"].to_arrow())
    return out.select(schema.names).cast(schema)


CASES = {
    "long-id-small-groups": dict(rows=3000, per_group=3, ties=4, null_score=0.05),
    "long-id-big-groups": dict(rows=3000, per_group=900, ties=3, null_score=0.1),
    "long-id-scattered": dict(rows=3000, per_group=20, scatter=0.3, ties=5, null_score=0.05),
    "long-text-scattered": dict(rows=3000, key="text", per_group=7, scatter=0.2, ties=3,
                                null_score=0.05, null_instruction=0.3, null_query=0.02),
    "long-text-all-moved": dict(rows=2000, key="text", per_group=5, scatter=1.0, ties=2),
    "nested-id": dict(rows=3000, nested=True, per_group=13, ties=4, null_score=0.05),
    "nested-id-scattered": dict(rows=3000, nested=True, per_group=6, scatter=0.3, ties=3),
    "nested-text-scattered": dict(rows=3000, nested=True, key="text", per_group=4, scatter=0.4,
                                  ties=2, null_instruction=0.5, null_score=0.1),
}


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("budget", [256 << 20, 20_000])  # the default, and a few hundred rows
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_in_memory_reference(tmp_path, case, budget, top_k):
    kw = dict(CASES[case])
    paths, layout = synth_parts(str(tmp_path / "parts"), kw.pop("rows"), part_rows=257,
                                seed=sorted(CASES).index(case), **kw)
    out = tmp_path / "out.parquet"
    cfg = RunConfig(inputs=(), output=str(out), top_k=top_k, window_pairs=100)
    rows = write_ranked(paths, layout, cfg, memory_budget=budget)
    got, ref = pq.read_table(out), reference(paths, layout, cfg)
    assert rows == got.num_rows == ref.num_rows
    assert got.schema == ref.schema
    assert got.equals(ref)
    assert [n for n in os.listdir(tmp_path) if n != "parts"] == ["out.parquet"]  # no spill left


def test_tiny_budget_spills_in_many_buckets(tmp_path, monkeypatch):
    paths, layout = synth_parts(str(tmp_path / "parts"), 4000, per_group=10, scatter=0.5,
                                part_rows=300, ties=3, seed=3)
    made = []
    real = rank.spill

    def spy(*a, **k):
        files = real(*a, **k)
        made.append(len(files))
        return files

    monkeypatch.setattr("pipeline.data.write.spill", spy)
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    write_ranked(paths, layout, cfg, memory_budget=10_000)
    assert made and made[0] > 10  # the scattered rows went through many bucket files
    assert pq.read_table(cfg.output).equals(reference(paths, layout, cfg))


def test_contiguous_input_spills_nothing(tmp_path, monkeypatch):
    paths, layout = synth_parts(str(tmp_path / "parts"), 3000, per_group=40, part_rows=256, seed=4)
    monkeypatch.setattr("pipeline.data.write.spill", lambda *a, **k: pytest.fail("spilled"))
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    write_ranked(paths, layout, cfg, memory_budget=10_000)
    assert pq.read_table(cfg.output).equals(reference(paths, layout, cfg))


def test_parts_out_of_input_order(tmp_path):
    paths, layout = synth_parts(str(tmp_path / "parts"), 2000, per_group=30, part_rows=128, ties=2, seed=5)
    paths = paths[::-1]
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    write_ranked(paths, layout, cfg, memory_budget=30_000)
    assert pq.read_table(cfg.output).equals(reference(paths, layout, cfg))


def test_a_hash_collision_stops_the_write(tmp_path, monkeypatch):
    paths, layout = synth_parts(str(tmp_path / "parts"), 500, per_group=10, part_rows=100, seed=6)
    # Every key hashes alike: the groups merge, and the key check must catch it.
    monkeypatch.setattr("pipeline.data.rank.key_hashes",
                        lambda k: (np.zeros(k.height, np.uint64), np.zeros(k.height, np.uint64)))
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    with pytest.raises(RerankError, match="share a 128-bit hash"):
        write_ranked(paths, layout, cfg)
    assert not os.path.exists(cfg.output)
    assert os.listdir(tmp_path) == ["parts"]  # temp output removed


def test_a_failure_mid_write_removes_the_spill(tmp_path, monkeypatch):
    paths, layout = synth_parts(str(tmp_path / "parts"), 2000, per_group=10, scatter=0.5,
                                part_rows=200, seed=7)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.data.write.buckets", boom)
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    with pytest.raises(OSError, match="disk full"):
        write_ranked(paths, layout, cfg, memory_budget=20_000)
    assert os.listdir(tmp_path) == ["parts"]


def test_a_spill_left_by_a_killed_run_is_replaced_and_removed(tmp_path):
    paths, layout = synth_parts(str(tmp_path / "parts"), 1500, per_group=10, scatter=0.5,
                                part_rows=200, seed=8)
    stale = tmp_path / ".out.parquet.spill"
    stale.mkdir()
    (stale / "bucket-00000.arrow").write_bytes(b"left by SIGKILL")
    cfg = RunConfig(inputs=(), output=str(tmp_path / "out.parquet"))
    write_ranked(paths, layout, cfg, memory_budget=20_000)
    assert pq.read_table(cfg.output).equals(reference(paths, layout, cfg))
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "parts"]
