"""Rank the scored parts per query and write the final Parquet file (or a dataset's files).

Ranking is global: a query's candidates may sit in several units or files. It runs in two
streaming passes over the parts, so the driver's memory stays bounded by the memory budget and
the number of queries (about 220 bytes each at the peak), not by the rows:
  1. narrow (rank.py, pass 1): every row's group key is hashed; the groups' first positions,
     sizes and contiguity are indexed;
  2. wide (rank.py, pass 2): queries whose rows are one contiguous run are ranked straight from
     the stream; the rows of the others are spilled to buckets beside the output, read back,
     ranked and merged in; in the input's own Arrow types.

The parts come from a part source (`Parts`: the checkpoint's, which checks each part against its
record as it reads it), never from paths. Consecutive parts are read into tables of many rows
(`part_tables`) before any hashing or ranking, so the cost is linear in the rows, whatever the
number of parts (10,000 one-row files make 10,000 parts). Where the result goes and how it is put
in place is the caller's (pipeline/storage/output.py): these functions write local files.
"""

from __future__ import annotations

import os
import shutil
from contextlib import closing
from typing import Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.data.rank import Ranker, buckets, build_index, contiguous, merge, spill
from pipeline.data.read import InputLayout
from pipeline.storage.output import part_name

MAX_CHUNK_ROWS = 65536  # rows per output row group
# Bytes of rows held at once (chunks, spill buffers, one bucket). 32 MiB is thousands of rows of
# usual width per chunk, already linear in time; more only raises the driver's peak.
MEMORY_BUDGET = 32 << 20


class Parts(Protocol):
    """The scored parts in input order (pipeline.storage.sink.UnitParts, or any sequence of
    tables with these methods)."""

    def __len__(self) -> int: ...

    def rows(self, i: int) -> int: ...

    def read(self, i: int, columns: list[str]): ...  # a pa.Table, or None for a part that failed its check


def part_tables(parts: Parts, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """The parts' rows in order, in tables of at least `rows` rows (the last one shorter): many
    small parts are concatenated, so that what follows costs per chunk of rows, not per part.
    A part read as None (it failed its check) is left out."""
    held: list[pa.Table] = []
    n = 0
    for i in range(len(parts)):
        t = parts.read(i, columns)
        if t is None or not t.num_rows:
            continue
        held.append(t)
        n += t.num_rows
        if n >= rows:
            yield held[0] if len(held) == 1 else pa.concat_tables(held).combine_chunks()
            held, n = [], 0
    if held:
        yield held[0] if len(held) == 1 else pa.concat_tables(held).combine_chunks()


def _checked(parts: Parts) -> None:
    """After the first pass: a part source that checks what it reads says now which parts were bad."""
    check = getattr(parts, "check", None)
    if check is not None:
        check()


def output_schema(layout: InputLayout) -> pa.Schema:
    fields = [f for f in layout.schema if f.name != layout.doc_col or not layout.nested]
    if layout.nested:
        fields += [pa.field("document", layout.schema.field(layout.doc_col).type.value_type),
                   pa.field("doc_index", pa.int32())]
    fields.append(pa.field("score", pa.float32()))
    if layout.chunked:  # the row's windows and its best one (data/chunks.py)
        fields += [pa.field("chunks", pa.int32()), pa.field("best_chunk", pa.int32())]
    return pa.schema(fields + [pa.field("rank", pa.int32())])


def group_keys(layout: InputLayout) -> list[str]:
    """query_id when present, else (instruction, query)."""
    if "query_id" in layout.columns:
        return ["query_id"]
    keys = [layout.query_col]
    if layout.instruction_col:
        keys.insert(0, layout.instruction_col)
    return keys


def spill_path(output: str, parent: str) -> str:
    """A fixed hidden name, like the temp output's: a run killed (SIGKILL) while spilling leaves
    it, and the rerun removes it before spilling again."""
    return os.path.join(parent, "." + os.path.basename(output.rstrip("/")) + ".spill")


def ranked_tables(parts: Parts, layout: InputLayout, cfg: RunConfig, spill_parent: str,
                  memory_budget: int = MEMORY_BUDGET, groups: bool = False) -> Iterator:
    """The output rows in order, as tables of whole query groups (with `groups`: (table, g), g
    each row's group number, non-decreasing); spill files (only for queries whose rows are not
    contiguous) go in a hidden dir under `spill_parent`, removed when the generator ends or is
    closed."""
    keys = group_keys(layout)
    fill = {layout.instruction_col: cfg.instruction} if layout.instruction_col in keys else {}
    index = build_index(part_tables(parts, keys + ["_ord"], MAX_CHUNK_ROWS), keys, fill)
    _checked(parts)
    if not index.groups:
        return
    names = [n for n in output_schema(layout).names if n != "rank"]
    columns = list(dict.fromkeys(names + keys + ["_ord"]))
    rank = Ranker(keys, fill, names, cfg.top_k)
    # Rows per chunk and per bucket from the in-memory width of a row; a chunk is copied a few
    # times on its way (concatenated, taken in rank order, regrouped for the writer).
    sample = parts.read(next(i for i in range(len(parts)) if parts.rows(i)), columns)
    budget_rows = max(1, int(memory_budget // (4 * max(sample.nbytes / sample.num_rows, 1.0))))
    chunk_rows = min(budget_rows, MAX_CHUNK_ROWS)
    spill_dir = None
    try:
        scattered: Iterator = iter(())
        if index.scattered.any():
            spill_dir = spill_path(cfg.output, spill_parent)
            shutil.rmtree(spill_dir, ignore_errors=True)  # left by a run killed while writing
            os.makedirs(spill_dir)
            files = spill(part_tables(parts, columns, chunk_rows), index, keys, fill, spill_dir, budget_rows,
                          memory_budget // 2)
            scattered = buckets(files, rank)
        stream: Iterator = iter(())
        if not index.scattered.all():
            stream = contiguous(part_tables(parts, columns, chunk_rows), index, keys, fill, rank, chunk_rows)
        for table, g in merge(stream, scattered):
            yield (table, g) if groups else table
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)


def _row_groups(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    """Regroup the ranked slices (some tiny, where groups of the two streams interleave) into
    tables of whole row groups of `size` rows, the last one shorter."""
    held: list[pa.Table] = []
    n = 0
    for t in tables:
        held.append(t)
        n += t.num_rows
        if n >= size:
            t = pa.concat_tables(held)
            k = n - n % size
            yield t.slice(0, k)
            held, n = [t.slice(k)], n - k
    if n:
        yield pa.concat_tables(held)


def write_ranked(parts: Parts, layout: InputLayout, cfg: RunConfig, path: str,
                 memory_budget: int = MEMORY_BUDGET) -> int:
    """Write the ranked output to the local file `path` (a staging name: the caller puts it in
    place, storage.Location.publish); return the number of rows written. Spill files go beside
    it. `memory_budget` (bytes) sizes the chunks and spill buckets held at once. On an error the
    file is removed."""
    schema = output_schema(layout)
    rows = 0
    try:
        with pq.ParquetWriter(path, schema) as writer:
            group_rows = max(1, min(MAX_CHUNK_ROWS, cfg.window_pairs))
            with closing(ranked_tables(parts, layout, cfg, os.path.dirname(os.path.abspath(path)),
                                       memory_budget)) as tables:
                for table in _row_groups(tables, group_rows):
                    writer.write_table(table.cast(schema), row_group_size=group_rows)
                    rows += table.num_rows
            if not rows:
                writer.write_table(schema.empty_table())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return rows


def write_dataset(parts: Parts, layout: InputLayout, cfg: RunConfig, directory: str,
                  memory_budget: int = MEMORY_BUDGET) -> list[dict]:
    """Write the ranked output as files part-00000.parquet, ... into the existing, empty local
    `directory` (a staging folder: the caller puts it in place, storage.Location.publish_dir);
    return [{"name", "rows", "bytes"}] in order. The union of the files in name order is the
    single-file output. A file holds at most cfg.output_file_rows rows and only whole query
    groups; a group larger than that gets a file of its own."""
    schema = output_schema(layout)
    limit = cfg.output_file_rows
    group_rows = max(1, min(MAX_CHUNK_ROWS, cfg.window_pairs, limit))
    files: list[dict] = []
    state = {"writer": None, "rows": 0, "held": [], "held_rows": 0}

    def flush(final: bool) -> None:
        held, n = state["held"], state["held_rows"]
        if not n or (n < group_rows and not final):
            return
        t = pa.concat_tables(held)
        k = n if final else n - n % group_rows
        state["writer"].write_table(t.slice(0, k).cast(schema), row_group_size=group_rows)
        state["held"], state["held_rows"] = [t.slice(k)] if k < n else [], n - k

    def open_next() -> None:
        files.append({"name": part_name(len(files)), "rows": 0})
        state["writer"] = pq.ParquetWriter(os.path.join(directory, files[-1]["name"]), schema)
        state["rows"] = 0

    def close() -> None:
        flush(final=True)
        if not state["rows"]:
            state["writer"].write_table(schema.empty_table())
        state["writer"].close()
        state["writer"] = None
        files[-1].update(rows=state["rows"], bytes=os.path.getsize(os.path.join(directory, files[-1]["name"])))

    def write(t: pa.Table) -> None:
        state["held"].append(t)
        state["held_rows"] += t.num_rows
        state["rows"] += t.num_rows
        flush(final=False)

    last_g = -1
    try:
        with closing(ranked_tables(parts, layout, cfg, os.path.dirname(os.path.abspath(directory)),
                                   memory_budget, groups=True)) as stream:
            for t, g in stream:
                n = len(g)
                if not n:
                    continue
                new = np.r_[g[0] != last_g, g[1:] != g[:-1]]
                starts = np.flatnonzero(new)
                pos = 0
                while pos < n:
                    if state["writer"] is None:
                        open_next()
                    room = limit - state["rows"]
                    if n - pos <= room:
                        cut = n
                    else:
                        k = int(np.searchsorted(starts, pos + room, side="right")) - 1
                        if k >= 0 and starts[k] > pos:  # whole groups up to there fit
                            cut = int(starts[k])
                        elif new[pos] and state["rows"]:  # the next group does not fit: a new file
                            close()
                            continue
                        else:  # a group larger than a file (or one that goes on): whole, here
                            nxt = int(np.searchsorted(starts, pos, side="right"))
                            cut = int(starts[nxt]) if nxt < len(starts) else n
                    write(t.slice(pos, cut - pos))
                    pos = cut
                last_g = g[-1]
        if state["writer"] is None:  # no rows: one empty file, so that readers get the schema
            open_next()
        close()
    finally:
        if state["writer"] is not None:
            state["writer"].close()
    return files
