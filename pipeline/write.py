"""Rank the scored parts per query and write the final Parquet file atomically.

Ranking is global: a query's candidates may sit in several units or files. Polars does the
group-wise sort over all parts in its streaming engine; the chunks are cast back to the input's
Arrow types and written to a temp file that replaces the output only when complete.
"""

from __future__ import annotations

import os
import tempfile

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import fsync_dir
from .config import RunConfig
from .read import InputLayout

CHUNK_ROWS = 65536


def output_schema(layout: InputLayout) -> pa.Schema:
    fields = [f for f in layout.schema if f.name != layout.doc_col or not layout.nested]
    if layout.nested:
        fields += [pa.field("document", layout.schema.field(layout.doc_col).type.value_type),
                   pa.field("doc_index", pa.int32())]
    return pa.schema(fields + [pa.field("score", pa.float32()), pa.field("rank", pa.int32())])


def group_keys(layout: InputLayout) -> list[str]:
    """query_id when present, else (instruction, query)."""
    if "query_id" in layout.columns:
        return ["query_id"]
    keys = [layout.query_col]
    if layout.instruction_col:
        keys.insert(0, layout.instruction_col)
    return keys


def ranked_frame(part_paths: list[str], layout: InputLayout, cfg: RunConfig) -> pl.LazyFrame:
    keys = group_keys(layout)
    lf = pl.scan_parquet(part_paths)
    if layout.instruction_col in keys:
        # A null instruction means the default one, so it joins the default's group.
        lf = lf.with_columns(_gi=pl.col(layout.instruction_col).fill_null(cfg.instruction))
        keys = ["_gi" if k == layout.instruction_col else k for k in keys]
    lf = (
        lf.with_columns(_first=pl.col("_ord").min().over(keys))
        # Groups in order of first appearance; best score first; ties keep input order.
        .sort(["_first", "score", "_ord"], descending=[False, True, False], nulls_last=True)
        .with_columns(rank=pl.when(pl.col("score").is_null()).then(None)
                      .otherwise(pl.int_range(1, pl.len() + 1).over(keys)).cast(pl.Int32))
    )
    if cfg.top_k is not None:
        lf = lf.filter(pl.col("rank") <= cfg.top_k)
    return lf


def write_ranked(part_paths: list[str], layout: InputLayout, cfg: RunConfig) -> int:
    """Write the ranked output to cfg.output atomically; return the number of rows written."""
    schema = output_schema(layout)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=out_dir)
    os.close(fd)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            if part_paths:
                lf = ranked_frame(part_paths, layout, cfg).select(schema.names)
                for chunk in lf.collect_batches(chunk_size=CHUNK_ROWS):
                    table = chunk.to_arrow().cast(schema)
                    writer.write_table(table)
                    rows += table.num_rows
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, cfg.output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(out_dir)
    return rows
