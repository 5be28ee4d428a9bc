"""Find the input files, check their columns, plan units of work and read them in bounded windows.

A unit is a contiguous range of input rows of one file. It is planned from the Parquet footer
alone (a JSONL file: from one read of its bytes, pipeline/data/jsonl.py), so its id is stable
across runs and any executor can read it on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.data import jsonl
from pipeline.errors import InputError, first_line
from pipeline.storage.checkpoint import UNIT_ID  # noqa: F401 - the names Unit.id makes
from pipeline.storage.location import location


@dataclass(frozen=True)
class Unit:
    """One self-contained piece of work: rows [start, stop) of one input file."""

    file_index: int
    path: str  # the input file's path or URI (pipeline.storage.location reads it)
    start: int
    stop: int
    # Global row number of `start`, counted over all inputs; orders output rows.
    global_start: int
    # JSONL: the bytes that hold the rows (of the decompressed stream for gzip); unused for Parquet.
    byte_start: int = 0
    byte_stop: int = 0

    @property
    def id(self) -> str:
        return f"{self.file_index:05d}-{self.start:012d}-{self.stop:012d}"  # matches UNIT_ID

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
    chunked: bool = False  # --chunk-tokens: the output gains `chunks` and `best_chunk` (data/chunks.py)
    source: str = ""  # the file the layout was read from (messages compare the others with it)


def open_parquet(path) -> pq.ParquetFile:
    """A Parquet file (a path, a URI or a Location), read by ranges through its Location; close
    it with `close(force=True)` (it holds the file open)."""
    f = None
    try:
        f = location(path).open()
        # pre_buffer=False: the default pre-buffering keeps every row group read so far (RSS
        # grew ~0.5 GB per 1M long pairs of one file); without it memory stays about a window.
        return pq.ParquetFile(f, pre_buffer=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as exc:
        if f is not None:
            f.close()
        # A file named like another format (a CSV, a .json) was passed by mistake: say which
        # formats are read, rather than suggest the file is damaged.
        fix = ("check that the file is complete and is Parquet" if str(path).lower().endswith(".parquet") else
               "rerank-batch reads Parquet (.parquet) and JSONL (.jsonl, .jsonl.gz): convert the file to one of them")
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)}); {fix}") from None


class Footers:
    """The Parquet footers of the inputs, each read once while a run is planned (layout, nulls,
    units): one open per file, however many checks look at it. Files are not kept open."""

    def __init__(self):
        self._md: dict[str, pq.FileMetaData] = {}

    def get(self, path) -> pq.FileMetaData:
        key = str(path)
        md = self._md.get(key)
        if md is None:
            pf = open_parquet(path)
            md = pf.metadata
            pf.close(force=True)
            self._md[key] = md
        return md

    def schema(self, path) -> pa.Schema:
        return self.get(path).schema.to_arrow_schema()


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_of_strings(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)) and _is_string(t.value_type)


def _scan(path: str, cfg: RunConfig) -> jsonl.Scan:
    return jsonl.scan(path, cfg.query_col, cfg.doc_col, cfg.docs_col, cfg.instruction_col, cfg.window_pairs)


def inspect_layout(path: str, cfg: RunConfig, footers: Footers | None = None) -> InputLayout:
    """Decide long or nested form from one file's schema, and check the column types."""
    scan = _scan(path, cfg) if jsonl.is_jsonl(path) else None
    schema = scan.schema if scan is not None else (footers or Footers()).schema(path)
    names = schema.names
    if scan is not None and scan.query_missing:  # JSONL: the field is in the schema, but in no line
        names = [n for n in names if n != cfg.query_col]
    present = ", ".join(names)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{path}: the column name {dup[0]!r} appears more than once; rename the copies")
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
    reserved += ("chunks", "best_chunk") if cfg.chunk_tokens else ()
    for name in reserved:
        if name in names:
            raise InputError(
                f"{path}: the input already has a column {name!r}, which the output adds; "
                "rename or drop it first"
            )
    # the final rank's own working columns (a clash failed after all the scoring), the windows' scores
    for name in ("_ord", "_g") + (("_chunk_scores",) if cfg.chunk_tokens else ()):
        if name in names:
            raise InputError(f"{path}: column {name!r} is a name rerank-batch uses internally; rename it first")
    if instruction_col is not None and instruction_col in (cfg.query_col, doc_col):
        raise InputError(f"{path}: --instruction-col {instruction_col!r} is also the query or document column; "
                         "pass another --instruction-col")
    if scan is not None and nested and scan.null_list is not None:  # an error under either --on-null
        raise InputError(f"{path}: line {scan.null_list}: field {doc_col!r} is null or missing; give an empty "
                         "list or remove the line")
    if scan is not None and scan.first_null is not None and cfg.on_null == "error":  # as footers tell of Parquet
        line, name = scan.first_null
        what = "holds a null document" if nested and name == doc_col else "is null or missing"
        raise InputError(f"{path}: line {line}: field {name!r} {what}; fill it, or pass --on-null skip to keep such "
                         "rows unscored")
    return InputLayout(nested, cfg.query_col, doc_col, instruction_col, tuple(names), schema,
                       chunked=bool(cfg.chunk_tokens), source=str(path))


def read_layout(paths, cfg: RunConfig, footers: Footers | None = None) -> InputLayout:
    """The layout of all input files (paths, URIs or Locations; checked to agree); for JSONL, one
    schema unified over the files (a field that is int in one file and float in another is read
    as float everywhere)."""
    paths = [str(p) for p in paths]
    footers = footers or Footers()
    formats = {jsonl.is_jsonl(p) for p in paths}
    if len(formats) > 1:
        other = next(p for p in paths if jsonl.is_jsonl(p) != jsonl.is_jsonl(paths[0]))
        raise InputError(f"{other}: Parquet and JSONL inputs in one run; convert them to one format, or run each "
                         "format on its own")
    layout = inspect_layout(paths[0], cfg, footers)
    check_same_layout(paths, layout, cfg, footers)
    if not jsonl.is_jsonl(paths[0]):
        return layout
    schema = layout.schema
    for path in paths[1:]:
        try:
            schema = pa.unify_schemas([schema, _scan(path, cfg).schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{path}: a field has another type than in {paths[0]} ({first_line(exc)}); give files "
                             "of one schema in one run") from None
    return replace(layout, schema=pa.schema([schema.field(n) for n in layout.columns]))


def check_same_layout(paths, layout: InputLayout, cfg: RunConfig, footers: Footers | None = None) -> None:
    for path in paths[1:]:
        other = inspect_layout(path, cfg, footers)
        if other.nested != layout.nested or set(other.columns) != set(layout.columns):
            raise InputError(
                f"{path}: its columns ({', '.join(other.columns)}) differ from {paths[0]} "
                f"({', '.join(layout.columns)}); give files of one schema in one run"
            )
        for name in layout.columns if not jsonl.is_jsonl(path) else ():  # JSONL: unified by read_layout
            a, b = layout.schema.field(name).type, other.schema.field(name).type
            if a != b and not (_is_string(a) and _is_string(b)) and not (
                    _is_list_of_strings(a) and _is_list_of_strings(b)):
                raise InputError(
                    f"{path}: column {name!r} is {b}, but {a} in {paths[0]}; give files of one schema in one run"
                )


def _list_leaf_counts(md: pq.FileMetaData, list_col: str) -> list[int]:
    """Elements of the list column per row group, read from the footer's column statistics."""
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


def plan_units(paths, layout: InputLayout, window_pairs: int, cfg: RunConfig | None = None,
               footers: Footers | None = None) -> tuple[list[Unit], int]:
    """Split every file into row ranges of about `window_pairs` pairs; return units and total pairs.

    For nested input the pairs per row are estimated per row group from the footer, so that a
    window of lists of 100 documents holds as many pairs as a window of long rows. JSONL files
    (which need `cfg`, for their column names) are cut by their scan, row by row.
    """
    units: list[Unit] = []
    total_pairs = 0
    global_row = 0
    footers = footers or Footers()
    for fi, path in enumerate(str(p) for p in paths):
        if jsonl.is_jsonl(path):
            scan = jsonl.scan(path, cfg.query_col, cfg.doc_col, cfg.docs_col, cfg.instruction_col, window_pairs)
            units += [Unit(fi, path, s.start, s.stop, global_row + s.start, s.byte_start, s.byte_stop)
                      for s in scan.spans]
            total_pairs += scan.pairs
            global_row += scan.rows
            continue
        md = footers.get(path)
        rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        rg_pairs = _list_leaf_counts(md, layout.doc_col) if layout.nested else rg_rows
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


def check_nulls(paths, layout: InputLayout, cfg: RunConfig, footers: Footers | None = None) -> None:
    """Nulls in query, document and query_id, found from footer statistics before any scoring;
    only a row group whose statistics count nulls is read (one column) to name the row."""
    if cfg.on_null != "error":
        return
    names = [layout.query_col] + ([] if layout.nested else [layout.doc_col])
    names += ["query_id"] if "query_id" in layout.columns else []
    footers = footers or Footers()
    for path in map(str, paths):
        if jsonl.is_jsonl(path):  # its scan checked every line (inspect_layout)
            continue
        md = footers.get(path)
        leaf = {md.schema.column(j).path: j for j in range(md.num_columns)}
        start = 0
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for name in names:
                st = rg.column(leaf[name]).statistics if name in leaf else None
                if st is not None and st.has_null_count and st.null_count > 0:
                    pf = open_parquet(path)
                    col = pf.read_row_group(i, columns=[name]).column(0)
                    pf.close(force=True)
                    k = col.to_pylist().index(None)
                    raise InputError(
                        f"{path}: row {start + k} (from 0): column {name!r} is null; fill it, or pass --on-null skip "
                        "to keep such rows unscored"
                    )
            start += rg.num_rows


def inspect_inputs(paths, cfg: RunConfig) -> tuple[InputLayout, list[Unit], int]:
    """Everything planning learns of the input files, each footer read once: their layout
    (checked to agree), nulls found from footer statistics, and the units with the total pairs."""
    footers = Footers()
    layout = read_layout(paths, cfg, footers)
    check_nulls(paths, layout, cfg, footers)
    units, total_pairs = plan_units(paths, layout, cfg.window_pairs, cfg, footers)
    return layout, units, total_pairs


def iter_unit_tables(units, columns=None, schema: pa.Schema | None = None):
    """Yield (unit, table) for each unit of an iterable that may be lazy (a worker pulls units from
    its driver one at a time). Consecutive units of one file continue one reader; a unit that
    jumps back, or past the reader's row group, reopens the file at the row group it needs.
    Record batches are unit-sized, so memory holds about two units whatever the row groups are.
    JSONL units need `schema` (the layout's): every unit is parsed with the same types."""
    cursor = None
    for unit in units:
        if cursor is None or not cursor.can_continue(unit):
            if cursor is not None:
                cursor.close()
                cursor = None
            if jsonl.is_jsonl(unit.path):
                if schema is None:
                    raise ValueError("iter_unit_tables: JSONL units need the layout's schema")
                cursor = jsonl.JsonlCursor(unit, schema)
            else:
                cursor = _FileCursor(unit, columns)
        table = cursor.take(unit)
        yield unit, (table.select(columns) if columns is not None and jsonl.is_jsonl(unit.path) else table)
    if cursor is not None:
        cursor.close()


class _FileCursor:
    """A forward-only reader of one file's rows, from the row group that holds its first unit."""

    def __init__(self, unit, columns):
        self.path = unit.path
        self.columns = columns
        self.pf = open_parquet(unit.path)
        md = self.pf.metadata
        self.rg_starts = []
        acc = 0
        for i in range(md.num_row_groups):
            self.rg_starts.append(acc)
            acc += md.row_group(i).num_rows
        first_rg = max((i for i, s in enumerate(self.rg_starts) if s <= unit.start), default=0)
        self.buf_start = self.rg_starts[first_rg] if self.rg_starts else 0
        self.batches = self.pf.iter_batches(batch_size=max(1, unit.rows),
                                            row_groups=range(first_rg, md.num_row_groups),
                                            columns=columns, use_threads=True)
        self.buffered: list[pa.RecordBatch] = []
        self.buf_rows = 0

    def close(self) -> None:
        self.pf.close(force=True)

    def can_continue(self, unit) -> bool:
        if unit.path != self.path or unit.start < self.buf_start:
            return False
        # Skipping rows means reading them: reopen instead when the unit starts in a later row group.
        later = [s for s in self.rg_starts if self.buf_start + self.buf_rows < s <= unit.start]
        return not later

    def take(self, unit) -> pa.Table:
        path = self.path
        if self.buf_start + self.buf_rows <= unit.start:  # all buffered rows lie before this unit
            self.buf_start += self.buf_rows
            self.buffered, self.buf_rows = [], 0
        while self.buf_start + self.buf_rows < unit.stop:
            try:
                b = next(self.batches)
            except StopIteration:
                raise InputError(
                    f"{path}: the file ended before row {unit.stop}; was it changed during the run?"
                ) from None
            except (pa.ArrowException, OSError) as exc:
                raise InputError(
                    f"{path}: cannot read rows near {self.buf_start + self.buf_rows} ({first_line(exc)}); "
                    "the file is damaged: rewrite it"
                ) from None
            if self.buf_rows == 0 and self.buf_start + b.num_rows <= unit.start:
                self.buf_start += b.num_rows  # skipped on resume: never kept in memory
                continue
            self.buffered.append(b)
            self.buf_rows += b.num_rows
        if unit.rows == 0:
            return self.pf.schema_arrow.empty_table().select(self.columns or self.pf.schema_arrow.names)
        window = pa.Table.from_batches(self.buffered)
        out = window.slice(unit.start - self.buf_start, unit.rows).combine_chunks()
        rest = window.slice(unit.stop - self.buf_start)
        self.buffered = rest.to_batches()
        self.buf_rows = rest.num_rows
        self.buf_start = unit.stop
        return out
