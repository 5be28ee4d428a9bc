"""Turn one unit's input table into scoring requests and its scored rows into a result part.

Nested input (a list of documents per row) is exploded here: each element becomes a row with
its 0-based `doc_index`; a row with an empty list stays, as one unscored row with a null
document, doc_index and score (ranked last in its group, like a skipped null). Every row
carries `_ord`, its position in the whole input, so that the final writer can restore input
order after the length sort (ties in rank keep input order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.data.arrays import to_arrow, to_numpy
from pipeline.data.read import InputLayout, Unit

# _ord = global input row * ORD_STRIDE + doc_index: one sortable int64 for both forms.
ORD_STRIDE = 1 << 21


@dataclass
class UnitPairs:
    """The rows of one unit, exploded, with the strings to score and which rows are null."""

    table: pa.Table  # output columns (without score/rank), plus _ord
    instructions: list[str]
    queries: list[str]
    documents: list[str]
    valid: np.ndarray  # bool per row: False where query or document is null (--on-null skip) or a list is empty
    empty_lists: int = 0  # rows of nested input whose list is empty (among the rows not valid)
    # With --chunk-tokens (data/chunks.py): the strings above are one pair per window of each valid
    # row, and this ChunkMap says which windows are whose; None: one pair per valid row.
    chunks: object = None

    def score_ords(self) -> np.ndarray:
        """Sorted int64 ids of the pairs to score, for a unit's partial commits: the valid rows'
        `_ord`, or with windows their positions in the unit's expansion (the same in every run)."""
        if self.chunks is not None:
            return np.arange(self.chunks.total, dtype=np.int64)
        return to_numpy(self.table.column("_ord"))[self.valid]


def build_pairs(unit: Unit, table: pa.Table, layout: InputLayout, cfg: RunConfig, tokenizer=None) -> UnitPairs:
    """The unit's pairs; with cfg.chunk_tokens one per window of each document, which needs the
    model's `tokenizer` (data/chunks.py)."""
    pairs = _build_pairs(unit, table, layout, cfg)
    if cfg.chunk_tokens:
        from pipeline.data.chunks import Chunking, expand

        return expand(pairs, Chunking.of(cfg), tokenizer)
    return pairs


def _build_pairs(unit: Unit, table: pa.Table, layout: InputLayout, cfg: RunConfig) -> UnitPairs:
    n_rows = table.num_rows
    row_in_file = np.arange(unit.start, unit.stop, dtype=np.int64)
    global_row = np.arange(unit.global_start, unit.global_start + n_rows, dtype=np.int64)
    if layout.nested:
        lists = table.column(layout.doc_col).combine_chunks() if n_rows else pa.array([], pa.list_(pa.string()))
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        if n_rows and lengths.max(initial=0) >= ORD_STRIDE:
            bad = int(np.argmax(lengths >= ORD_STRIDE))
            raise InputError(
                f"{unit.path}: row {unit.start + bad} (from 0) has {lengths[bad]} documents, more than "
                f"{ORD_STRIDE - 1}; split the list into several rows"
            )
        null_lists = np.asarray(pc.is_null(lists).to_numpy(zero_copy_only=False), dtype=bool) if n_rows else np.zeros(0, bool)
        if null_lists.any():
            bad = int(np.argmax(null_lists))
            raise InputError(
                f"{unit.path}: row {unit.start + bad} (from 0): column {layout.doc_col!r} is null; "
                "give an empty list or remove the row"
            )
        empty = lengths == 0  # each keeps one row, with a null document
        parent = np.repeat(np.arange(n_rows), np.maximum(lengths, 1))
        no_doc = empty[parent]  # the rows standing for an empty list
        doc_index = _doc_index(lengths)
        rest = table.drop_columns([layout.doc_col]).take(to_arrow(parent))
        docs = pc.list_flatten(lists) if n_rows else pa.array([], pa.string())
        if no_doc.any():
            src = np.zeros(len(parent), dtype=np.int64)
            src[~no_doc] = np.arange(len(parent) - int(no_doc.sum()))
            docs = docs.take(to_arrow(src, mask=no_doc))
        out = rest.append_column("document", docs).append_column(
            "doc_index", to_arrow(doc_index, pa.int32(), mask=no_doc if no_doc.any() else None))
        doc_name = "document"
        ords = global_row[parent] * ORD_STRIDE + doc_index
        file_rows = row_in_file[parent]
    else:
        out = table
        no_doc = np.zeros(n_rows, dtype=bool)
        doc_name = layout.doc_col
        ords = global_row * ORD_STRIDE
        file_rows = row_in_file
    out = out.append_column("_ord", to_arrow(ords))

    queries = out.column(layout.query_col)
    documents = out.column(doc_name)
    valid = ~no_doc
    # A null query_id would put unrelated rows in one ranked group: as bad as a null query.
    checked = [(layout.query_col, queries), (doc_name, documents)]
    if "query_id" in layout.columns:
        checked.append(("query_id", out.column("query_id")))
    for name, col in checked:
        if not col.null_count:
            continue
        # One chunk's to_numpy, not the ChunkedArray's (which goes through pandas' machinery).
        nulls = np.asarray(pc.is_null(col.combine_chunks()).to_numpy(zero_copy_only=False), dtype=bool) & ~no_doc
        if nulls.any():
            if cfg.on_null == "error":
                k = int(np.argmax(nulls))
                where = f"row {file_rows[k]} (from 0)"
                if layout.nested:
                    where += f", document {int(out.column('doc_index')[k].as_py())}"
                    if name == doc_name:  # an element of the list column
                        name = layout.doc_col
                raise InputError(
                    f"{unit.path}: {where}: column {name!r} is null; fill it, or pass --on-null skip "
                    "to keep such rows unscored"
                )
            valid &= ~nulls
    try:
        if layout.instruction_col:
            instr = pc.fill_null(out.column(layout.instruction_col), cfg.instruction).to_pylist()
        else:
            instr = [cfg.instruction] * out.num_rows
        q = queries.to_pylist()
        d = documents.to_pylist()
    except UnicodeDecodeError:
        raise _bad_utf8(unit, out, layout, doc_name, file_rows) from None
    if not valid.all():
        keep = np.flatnonzero(valid)
        instr = [instr[i] for i in keep]
        q = [q[i] for i in keep]
        d = [d[i] for i in keep]
    return UnitPairs(out, instr, q, d, valid, int(no_doc.sum()))


def _doc_index(lengths: np.ndarray) -> np.ndarray:
    """Each exploded row's position in its list, an empty list's one row counted as position 0."""
    n = np.maximum(lengths, 1)
    return (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)).astype(np.int32)


def _bad_utf8(unit: Unit, out: pa.Table, layout: InputLayout, doc_name: str, file_rows) -> InputError:
    for name in (layout.instruction_col, layout.query_col, doc_name):
        if not name:
            continue
        col = out.column(name).combine_chunks()
        try:
            col.validate(full=True)
        except pa.ArrowInvalid as exc:
            k = int(str(exc).rsplit("index", 1)[1].split()[0]) if "index" in str(exc) else 0
            shown = layout.doc_col if layout.nested and name == doc_name else name
            return InputError(f"{unit.path}: row {file_rows[k]} (from 0): column {shown!r} is not valid UTF-8; "
                              "re-encode the text as UTF-8")
    return InputError(f"{unit.path}: a string column is not valid UTF-8; re-encode the text as UTF-8")


def result_part(pairs: UnitPairs, scores: np.ndarray) -> pa.Table:
    """The unit's rows with a float32 `score` (null where the pair was skipped); with windows,
    `scores` are theirs and the row gets their aggregate (data/chunks.py)."""
    if pairs.chunks is not None:
        from pipeline.data.chunks import result_part as chunked_part

        return chunked_part(pairs, scores)
    full = np.zeros(pairs.table.num_rows, dtype=np.float32)
    full[pairs.valid] = scores
    mask = ~pairs.valid
    return pairs.table.append_column(
        "score", to_arrow(full, pa.float32(), mask=mask)
    )
