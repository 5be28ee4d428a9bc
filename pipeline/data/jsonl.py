"""JSONL input (`.jsonl`, `.jsonl.gz`): one JSON object per line, parsed by pyarrow.json.

A JSONL file has no footer, so a run reads each one once at its start (`scan`): in chunks of whole
lines, each parsed by pyarrow.json, it checks every line (syntax, field types, nulls, UTF-8),
infers one schema for the file and cuts it into units of about a window of pairs. A unit is a
range of rows (non-blank lines) with the byte range that holds them, found from the bytes alone,
so the same file gives the same units in every run and a resumed run reads the same rows in each
unit. An uncompressed file is read by ranges (any unit, any order, local or object storage); a
gzip file is a stream, decompressed from its start, so a reader only moves forward through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from pipeline.errors import InputError, first_line
from pipeline.storage.location import location

SUFFIXES = (".jsonl", ".jsonl.gz")
# Bytes of whole lines parsed at once while scanning; pyarrow parses each chunk in blocks of
# BLOCK bytes on its threads (a line longer than a block is parsed again as one block).
CHUNK = 16 << 20
BLOCK = 1 << 20
_WS = np.zeros(256, bool)
_WS[[9, 10, 13, 32]] = True


def is_jsonl(path: str) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def _gz(path: str) -> bool:
    return str(path).lower().endswith(".gz")


def open_stream(path: str):
    """The file's bytes from its start (gzip decompressed), through its Location."""
    return location(path).open_stream(gzip=_gz(path))


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of a file and the bytes [byte_start, byte_stop) that hold them
    (offsets in the decompressed stream for gzip)."""

    start: int
    stop: int
    byte_start: int
    byte_stop: int


@dataclass
class Scan:
    """What a run needs of one JSONL file: its schema, units, pairs and the first bad row."""

    schema: pa.Schema
    rows: int
    pairs: int
    spans: list[Span]
    first_null: tuple[int, str] | None  # (line, column) of the first null query, document or query_id
    null_list: int | None  # line of the first null or missing list of documents (nested form)
    # No line has the query field (a misnamed field: the schema names it all the same, typed in
    # advance as the scored columns are)
    query_missing: bool = False


_CACHE: dict[tuple, Scan] = {}


def _read_options(block: int) -> pj.ReadOptions:
    return pj.ReadOptions(block_size=block, use_threads=True)


def _line_starts(data: bytes) -> np.ndarray:
    """Byte offsets (in `data`) of its non-blank lines: the rows pyarrow.json reads from it."""
    a = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.r_[0, nl + 1]
    ends = np.r_[nl, len(a)]
    keep = starts < len(a)
    starts, ends = starts[keep], ends[keep]
    content = np.r_[0, np.cumsum(~_WS[a], dtype=np.int64)]
    return starts[content[ends] - content[starts] > 0]


def _lines_before(data: bytes, offsets: np.ndarray) -> np.ndarray:
    """1-based line numbers (within `data`) of the lines that start at `offsets`."""
    nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    return np.searchsorted(nl, offsets) + 1


def parse(data: bytes, schema: pa.Schema | None, infer: bool, block: int = BLOCK) -> pa.Table:
    """Whole lines to a table: the fields of `schema` with its types, others inferred (`infer`)
    or ignored. Raises pa.ArrowInvalid on a bad line; its "row N" counts non-blank lines of
    `data` when the data was one block (see `_parse_located`)."""
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer" if infer else "ignore")
    return pj.read_json(pa.BufferReader(data), read_options=_read_options(block), parse_options=opts)


def _parse_located(path: str, data: bytes, first_line_no: int, schema, infer: bool) -> pa.Table:
    """parse(), with a bad line reported as one line naming the file and its line number."""
    try:
        return parse(data, schema, infer)
    except pa.ArrowInvalid:
        pass  # maybe a line longer than a block: parse it again as one block, which also locates errors
    try:
        return parse(data, schema, infer, block=len(data) + 1)
    except pa.ArrowInvalid as exc:
        msg = first_line(exc)
        m = re.search(r" in row (\d+)", msg)
        line = None
        if m:
            starts = _line_starts(data)
            row = int(m.group(1))
            if row < len(starts):
                line = first_line_no - 1 + int(_lines_before(data, starts[row:row + 1])[0])
        reason = re.sub(r"^JSON parse error: ", "", msg[: m.start()] if m else msg).rstrip(". ")
        where = f"line {line}" if line is not None else f"a line after line {first_line_no - 1}"
        raise InputError(
            f"{path}: {where} is not a JSON object of the file's fields ({reason}); fix or remove that line "
            "(each line must be one JSON object, every value of a field of one type)"
        ) from None


def _chunks(path: str, size: int = CHUNK):
    """(bytes of whole lines, offset of their first byte, number of their first line)."""
    carry = b""
    offset = 0
    line = 1
    try:
        with open_stream(path) as f:
            while True:
                block = f.read(size)
                data = carry + block
                if not block:
                    if data:
                        yield data, offset, line
                    return
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a chunk: read on until it ends
                    carry = data
                    continue
                yield data[:cut], offset, line
                offset += cut
                line += data.count(b"\n", 0, cut)
                carry = data[cut:]
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read the file ({first_line(exc)}); check that it is complete "
                         f"{'gzip ' if _gz(path) else ''}JSONL") from None


def _stringify_times(schema: pa.Schema) -> pa.Schema:
    """pyarrow.json infers timestamps from date-like strings; a pass-through column is written back
    as the text it was, so those fields are read as strings."""
    return pa.schema([f.with_type(pa.string()) if pa.types.is_timestamp(f.type) else f for f in schema])


def _explicit(names: set[str], query_col, doc_col, docs_col, instruction_col) -> pa.Schema:
    """The types the columns that are scored must have; a line with another type is a bad line."""
    fields = [pa.field(query_col, pa.string())]
    if doc_col in names:
        fields.append(pa.field(doc_col, pa.string()))
    elif docs_col in names:
        fields.append(pa.field(docs_col, pa.list_(pa.string())))
    if instruction_col in names and instruction_col not in (query_col, doc_col, docs_col):
        fields.append(pa.field(instruction_col, pa.string()))
    return pa.schema(fields)


def scan(path: str, query_col: str, doc_col: str, docs_col: str, instruction_col: str, window_pairs: int,
         chunk_bytes: int = CHUNK) -> Scan:
    """Read the whole file once: its schema, its units of about `window_pairs` pairs (long form: a
    row is a pair; nested form: its list's length), and the first null query, document or
    query_id. Cached per file version and arguments within this process."""
    try:
        st = location(path).stat()
        ident = (st.size, st.mtime_ns) if st is not None else None
    except (OSError, pa.ArrowException):
        ident = None
    key = (path, ident, query_col, doc_col, docs_col, instruction_col, window_pairs, chunk_bytes)
    if ident is not None and key in _CACHE:
        return _CACHE[key]
    explicit = None
    order: list[str] = []  # field names in the order of the lines (the explicit ones would come first)
    schemas: list[pa.Schema] = []
    spans: list[Span] = []
    rows = pairs = 0
    unit_start, unit_byte, acc = 0, 0, 0  # the open unit: first row, first byte, pairs so far
    first_null = null_list = None
    query_nulls, query_keyed = 0, False
    end = 0
    for data, offset, line_no in _chunks(path, chunk_bytes):
        end = offset + len(data)
        if explicit is None:
            # Which of the column names are fields: from the first chunk's own inference.
            head = _parse_located(path, data, line_no, None, True)
            explicit = _explicit(set(head.column_names), query_col, doc_col, docs_col, instruction_col)
            order = head.column_names
            query_keyed = query_col in order  # the key in a line, even with a null value
        t = _parse_located(path, data, line_no, explicit, True)
        starts = _line_starts(data)
        if len(starts) != t.num_rows:
            last = line_no + data.count(b"\n")
            raise InputError(f"{path}: lines {line_no}-{last} hold {t.num_rows} JSON objects in {len(starts)} lines; "
                             "write each object on one line")
        schemas.append(_stringify_times(t.schema))
        nested = doc_col not in t.column_names and docs_col in t.column_names
        if nested:
            lists = t.column(docs_col).combine_chunks()
            per_row = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            per_row = np.ones(t.num_rows, np.int64)
        query_nulls += t.column(query_col).null_count
        if first_null is None:
            first_null = _first_null(t, query_col, doc_col, docs_col, nested, data, starts, line_no)
        if nested and null_list is None and t.column(docs_col).null_count:
            k = int(np.argmax(pc.is_null(t.column(docs_col).combine_chunks()).to_numpy(zero_copy_only=False)))
            null_list = _line_of(data, starts, k, line_no)
        _check_utf8(path, t, [query_col, doc_col, docs_col, instruction_col, "query_id"], data, starts, line_no)
        # Units: close one at the row where its pairs reach the window.
        cs = np.cumsum(per_row)
        i = 0
        while i < len(per_row):
            base = cs[i - 1] if i else 0
            j = int(np.searchsorted(cs, base + (window_pairs - acc), side="left"))
            if j >= len(per_row):
                acc += int(cs[-1] - base)
                break
            stop_row = rows + j + 1
            stop_byte = offset + (int(starts[j + 1]) if j + 1 < len(starts) else len(data))
            spans.append(Span(unit_start, stop_row, unit_byte, stop_byte))
            unit_start, unit_byte, acc = stop_row, stop_byte, 0
            i = j + 1
        rows += t.num_rows
        pairs += int(cs[-1]) if len(cs) else 0
    if rows > unit_start:
        spans.append(Span(unit_start, rows, unit_byte, end))
    if not schemas:
        raise InputError(f"{path}: the file holds no JSON object; give a file with one object per line")
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"{path}: a field holds values of two types ({first_line(exc)}); give each field one "
                         "type in every line") from None
    names = list(dict.fromkeys([n for n in order if n in schema.names] + schema.names))
    result = Scan(pa.schema([schema.field(n) for n in names]), rows, pairs, spans, first_null, null_list,
                  query_missing=not query_keyed and query_nulls == rows)
    if ident is not None:
        if len(_CACHE) > 1024:
            _CACHE.clear()
        _CACHE[key] = result
    return result


def _line_of(data: bytes, starts: np.ndarray, row: int, line_no: int) -> int:
    return line_no - 1 + int(_lines_before(data, starts[row:row + 1])[0])


def _first_null(t: pa.Table, query_col, doc_col, docs_col, nested, data, starts, line_no):
    """(line, column) of the first null or missing query, document (a list's element) or
    query_id of this chunk, or None."""
    names = [query_col] + ([] if nested else [doc_col]) + (["query_id"] if "query_id" in t.column_names else [])
    best = None
    for name in names:
        if name not in t.column_names:
            continue
        col = t.column(name)
        if col.null_count:
            k = int(np.argmax(pc.is_null(col.combine_chunks()).to_numpy(zero_copy_only=False)))
            if best is None or k < best[0]:
                best = (k, name)
    if nested:
        lists = t.column(docs_col).combine_chunks()
        flat = pc.list_flatten(lists)
        if flat.null_count:
            parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
            k = int(parent[int(np.argmax(pc.is_null(flat).to_numpy(zero_copy_only=False)))])
            if best is None or k < best[0]:
                best = (k, docs_col)
    if best is None:
        return None
    return _line_of(data, starts, best[0], line_no), best[1]


def _check_utf8(path, t: pa.Table, names, data, starts, line_no) -> None:
    for name in dict.fromkeys(names):
        if name not in t.column_names:
            continue
        col = t.column(name).combine_chunks()
        try:
            col.validate(full=True)
        except pa.ArrowInvalid as exc:
            m = re.search(r"index (\d+)", str(exc))
            k = int(m.group(1)) if m else 0
            if pa.types.is_list(col.type):
                k = int(pc.list_parent_indices(col).to_numpy(zero_copy_only=False)[k]) if m else 0
            raise InputError(f"{path}: line {_line_of(data, starts, k, line_no)}: field {name!r} is not valid "
                             "UTF-8; re-encode the file as UTF-8") from None


class JsonlCursor:
    """Reads units of one JSONL file: by byte range where the file can seek, else forward only
    through its decompressed stream (a unit before the position needs a new cursor)."""

    def __init__(self, unit, schema: pa.Schema):
        self.path = unit.path
        self.schema = schema
        self.seekable = not _gz(unit.path)
        try:
            self.f = location(unit.path).open() if self.seekable else open_stream(unit.path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{unit.path}: cannot open the file ({first_line(exc)}); was it moved during the run?") \
                from None
        self.pos = 0

    def close(self) -> None:
        self.f.close()

    def can_continue(self, unit) -> bool:
        return unit.path == self.path and (self.seekable or unit.byte_start >= self.pos)

    def take(self, unit) -> pa.Table:
        n = unit.byte_stop - unit.byte_start
        try:
            if self.seekable:
                self.f.seek(unit.byte_start)
            else:
                while self.pos < unit.byte_start:  # other workers' units: decompressed, not parsed
                    skipped = len(self.f.read(min(CHUNK, unit.byte_start - self.pos)))
                    if not skipped:
                        break
                    self.pos += skipped
            data = self.f.read(n) if n else b""
            self.pos = unit.byte_start + len(data)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self.path}: cannot read lines near row {unit.start} ({first_line(exc)}); "
                             "the file is damaged: rewrite it") from None
        if len(data) != n:
            raise InputError(f"{self.path}: the file ended before row {unit.stop}; was it changed during the run?")
        if not n:
            return self.schema.empty_table()
        try:
            table = parse(data, self.schema, False, block=max(BLOCK, len(data) + 1))
        except pa.ArrowInvalid as exc:
            raise InputError(f"{self.path}: rows {unit.start}-{unit.stop} no longer parse ({first_line(exc)}); "
                             "was the file changed during the run?") from None
        if table.num_rows != unit.rows:
            raise InputError(f"{self.path}: rows {unit.start}-{unit.stop} changed during the run; rerun with "
                             "--restart to score the new version")
        return table
