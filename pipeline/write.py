"""Rank the scored parts per query and write the final Parquet file atomically.

Ranking is global: a query's candidates may sit in several units or files. It runs in two
passes so that memory stays bounded by a few windows, not by the input:
  1. narrow: the group keys, score and input position of every row (no payload columns) are
     ranked with polars, giving each output row its (part, row) source;
  2. wide: window-sized output chunks gather their rows from the parts (a small cache keeps the
     last parts read, and queries are usually contiguous, so each part is read about once), in
     the input's own Arrow types, into a temp file that replaces the output only when complete.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import fsync_dir
from .config import RunConfig
from .read import InputLayout

MAX_CHUNK_ROWS = 65536
PART_CACHE = 3


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


def rank_order(part_paths: list[str], layout: InputLayout, cfg: RunConfig) -> pl.DataFrame:
    """Output order as rows (_part, _row, rank): groups in order of first appearance, best
    score first, ties and null scores in input order (nulls last, with a null rank)."""
    keys = group_keys(layout)
    frames = []
    for i, path in enumerate(part_paths):
        t = read_part(path, keys + ["score", "_ord"])
        frames.append(pl.from_arrow(t).with_columns(
            _part=pl.lit(i, pl.Int32), _row=pl.int_range(0, pl.len(), dtype=pl.Int64)))
    df = pl.concat(frames, how="vertical_relaxed")
    if layout.instruction_col in keys:
        # A null instruction means the default one, so it joins the default's group.
        df = df.with_columns(pl.col(layout.instruction_col).fill_null(cfg.instruction))
    df = (
        df.with_columns(_first=pl.col("_ord").min().over(keys))
        .sort(["_first", "score", "_ord"], descending=[False, True, False], nulls_last=True)
        .with_columns(rank=pl.when(pl.col("score").is_null()).then(None)
                      .otherwise(pl.int_range(1, pl.len() + 1).over(keys)).cast(pl.Int32))
    )
    if cfg.top_k is not None:
        df = df.filter(pl.col("rank") <= cfg.top_k)
    return df.select("_part", "_row", "rank")


def _gather(order: pl.DataFrame, part_paths: list[str], schema: pa.Schema, chunk_rows: int):
    """Yield output tables of up to `chunk_rows` rows (a window, so memory stays bounded by the
    window whatever the row width), in output order."""
    cache: OrderedDict[int, pa.Table] = OrderedDict()
    columns = [n for n in schema.names if n != "rank"]

    def part(i: int) -> pa.Table:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        t = read_part(part_paths[i], columns)
        cache[i] = t
        if len(cache) > PART_CACHE:
            cache.popitem(last=False)
        return t

    for start in range(0, order.height, chunk_rows):
        chunk = order.slice(start, chunk_rows)
        parts = chunk["_part"].to_numpy()
        rows = chunk["_row"].to_numpy()
        # Take rows part by part (stable, so each part's rows keep chunk order), then undo it.
        by_part = np.argsort(parts, kind="stable")
        bounds = np.flatnonzero(np.diff(parts[by_part])) + 1
        pieces = [part(int(parts[seg[0]])).take(pa.array(rows[seg]))
                  for seg in np.split(by_part, bounds) if len(seg)]
        table = pa.concat_tables(pieces).take(pa.array(np.argsort(by_part, kind="stable")))
        table = table.append_column("rank", chunk["rank"].to_arrow().cast(pa.int32()))
        yield table.select(schema.names).cast(schema)


def read_part(path: str, columns) -> pa.Table:
    """One checkpoint part, local or in object storage (parts are small: read whole)."""
    from .storage_remote import is_uri, open_input

    if is_uri(path):
        with open_input(path) as f:
            return pq.read_table(f, columns=columns, pre_buffer=False)
    return pq.read_table(path, columns=columns, pre_buffer=False)


def write_ranked(part_paths: list[str], layout: InputLayout, cfg: RunConfig, *, tmp: str | None = None,
                 publish=os.replace) -> int:
    """Write the ranked output to `tmp`, then publish(tmp, cfg.output) (an atomic rename by
    default); return the number of rows written. `tmp` should be unique per run."""
    schema = output_schema(layout)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    tmp = tmp or os.path.join(out_dir, "." + os.path.basename(cfg.output) + ".partial")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            if part_paths:
                order = rank_order(part_paths, layout, cfg)
                chunk_rows = max(1, min(MAX_CHUNK_ROWS, cfg.window_pairs))
                for table in _gather(order, part_paths, schema, chunk_rows):
                    writer.write_table(table)
                    rows += table.num_rows
            else:
                writer.write_table(schema.empty_table())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, cfg.output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(out_dir)
    return rows
