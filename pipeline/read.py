"""Find the input files, check their columns, plan units of work and read them in bounded windows.

A unit is a contiguous range of input rows of one file. It is planned from the Parquet footer
alone, so its id is stable across runs and any executor can read it on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .config import RunConfig
from .errors import InputError, first_line
from .inputs import resolve_inputs  # noqa: F401  (re-exported: it lived here)


@dataclass(frozen=True)
class Unit:
    """One self-contained piece of work: rows [start, stop) of one input file."""

    file_index: int
    path: str
    start: int
    stop: int
    # Global row number of `start`, counted over all inputs; orders output rows.
    global_start: int

    @property
    def id(self) -> str:
        return f"{self.file_index:05d}-{self.start:012d}-{self.stop:012d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputLayout:
    """How the pairs are laid out in the input files (the same for every file)."""

    nested: bool
    query_col: str
    doc_col: str  # for nested input: the list column
    instruction_col: str | None
    columns: tuple[str, ...]  # every input column, in order
    schema: pa.Schema


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a readable Parquet file ({first_line(exc)}); check that the file is complete and is "
            "Parquet"
        ) from None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_of_strings(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)) and _is_string(t.value_type)


def inspect_layout(path: str, cfg: RunConfig) -> InputLayout:
    """Decide long or nested form from one file's schema, and check the column types."""
    schema = open_parquet(path).schema_arrow
    names = schema.names
    present = ", ".join(names)
    if cfg.query_col not in names:
        raise InputError(
            f"{path}: no query column {cfg.query_col!r} (columns: {present}); pass --query-col NAME"
        )
    if cfg.doc_col in names:
        nested, doc_col = False, cfg.doc_col
    elif cfg.docs_col in names:
        nested, doc_col = True, cfg.docs_col
    else:
        raise InputError(
            f"{path}: no document column {cfg.doc_col!r} and no list column {cfg.docs_col!r} "
            f"(columns: {present}); pass --doc-col NAME or --docs-col NAME"
        )
    qtype = schema.field(cfg.query_col).type
    if not _is_string(qtype):
        raise InputError(
            f"{path}: column {cfg.query_col!r} is {qtype}, not string; cast it to string or pass --query-col"
        )
    dtype = schema.field(doc_col).type
    if nested and not _is_list_of_strings(dtype):
        raise InputError(
            f"{path}: column {doc_col!r} is {dtype}, not a list of strings; cast it or pass --docs-col"
        )
    if not nested and not _is_string(dtype):
        raise InputError(
            f"{path}: column {doc_col!r} is {dtype}, not string; cast it to string or pass --doc-col"
        )
    instruction_col = cfg.instruction_col if cfg.instruction_col in names else None
    if instruction_col and not _is_string(schema.field(instruction_col).type):
        raise InputError(
            f"{path}: column {instruction_col!r} is {schema.field(instruction_col).type}, not string; "
            "cast it to string or rename it"
        )
    reserved = ("score", "rank") + (("document", "doc_index") if nested else ())
    for name in reserved:
        if name in names:
            raise InputError(
                f"{path}: the input already has a column {name!r}, which the output adds; "
                "rename or drop it first"
            )
    return InputLayout(nested, cfg.query_col, doc_col, instruction_col, tuple(names), schema)


def check_same_layout(paths, layout: InputLayout, cfg: RunConfig) -> None:
    for path in paths[1:]:
        other = inspect_layout(path, cfg)
        if other.nested != layout.nested or set(other.columns) != set(layout.columns):
            raise InputError(
                f"{path}: its columns ({', '.join(other.columns)}) differ from {paths[0]} "
                f"({', '.join(layout.columns)}); give files of one schema in one run"
            )


def _list_leaf_counts(pf: pq.ParquetFile, list_col: str) -> list[int]:
    """Elements of the list column per row group, read from the footer's column statistics."""
    md = pf.metadata
    leaf = None
    for j in range(md.num_columns):
        p = md.schema.column(j).path
        if p.split(".")[0] == list_col:
            leaf = j
            break
    counts = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        counts.append(rg.column(leaf).num_values if leaf is not None else rg.num_rows)
    return counts


def plan_units(paths, layout: InputLayout, window_pairs: int) -> tuple[list[Unit], int]:
    """Split every file into row ranges of about `window_pairs` pairs; return units and total pairs.

    For nested input the pairs per row are estimated per row group from the footer, so that a
    window of lists of 100 documents holds as many pairs as a window of long rows.
    """
    units: list[Unit] = []
    total_pairs = 0
    global_row = 0
    for fi, path in enumerate(paths):
        pf = open_parquet(path)
        md = pf.metadata
        rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        rg_pairs = _list_leaf_counts(pf, layout.doc_col) if layout.nested else rg_rows
        total_pairs += sum(rg_pairs)
        start = 0
        rg_start = 0
        for rows, pairs in zip(rg_rows, rg_pairs):
            per_row = max(1.0, pairs / rows) if rows else 1.0
            step = max(1, int(window_pairs / per_row))
            rg_stop = rg_start + rows
            while start < rg_stop:
                stop = min(rg_stop, start + step)
                units.append(Unit(fi, path, start, stop, global_row + start))
                start = stop
            rg_start = rg_stop
        global_row += md.num_rows
    return units, total_pairs


def iter_unit_tables(units, columns=None):
    """Yield (unit, table) for each unit, reading each file once from the first row group needed.

    Units of one file must come in row order. Record batches are unit-sized, so memory holds
    about two units whatever the file's row groups are.
    """
    by_file: dict[str, list[Unit]] = {}
    for u in units:
        by_file.setdefault(u.path, []).append(u)
    for path, file_units in by_file.items():
        pf = open_parquet(path)
        md = pf.metadata
        rg_starts = []
        acc = 0
        for i in range(md.num_row_groups):
            rg_starts.append(acc)
            acc += md.row_group(i).num_rows
        first = file_units[0].start
        first_rg = max(i for i, s in enumerate(rg_starts) if s <= first) if rg_starts else 0
        pos = rg_starts[first_rg] if rg_starts else 0
        batches = pf.iter_batches(
            batch_size=max(1, max(u.rows for u in file_units)), row_groups=range(first_rg, md.num_row_groups), columns=columns,
            use_threads=True,
        )
        buffered: list[pa.RecordBatch] = []
        buf_start = pos  # file row of the first buffered row
        buf_rows = 0
        for unit in file_units:
            if buf_start + buf_rows <= unit.start:  # all buffered rows belong to finished units
                buf_start += buf_rows
                buffered, buf_rows = [], 0
            while buf_start + buf_rows < unit.stop:
                try:
                    b = next(batches)
                except StopIteration:
                    raise InputError(
                        f"{path}: the file ended before row {unit.stop}; was it changed during the run?"
                    ) from None
                except (pa.ArrowException, OSError) as exc:
                    raise InputError(
                        f"{path}: cannot read rows near {buf_start + buf_rows} ({first_line(exc)}); "
                        "the file is damaged: rewrite it"
                    ) from None
                if buf_rows == 0 and buf_start + b.num_rows <= unit.start:
                    buf_start += b.num_rows  # skipped on resume: never kept in memory
                    continue
                buffered.append(b)
                buf_rows += b.num_rows
            if unit.rows == 0:
                yield unit, pf.schema_arrow.empty_table().select(columns or pf.schema_arrow.names)
                continue
            window = pa.Table.from_batches(buffered)
            yield unit, window.slice(unit.start - buf_start, unit.rows).combine_chunks()
            rest = window.slice(unit.stop - buf_start)
            buffered = rest.to_batches()
            buf_rows = rest.num_rows
            buf_start = unit.stop
