"""`--chunk-scores PATH`: every window's score as Parquet, written from the checkpoint's parts.

Each part of a chunked run keeps its rows' window scores (`_chunk_scores`, data/chunks.py), so
the file is derived from checkpointed data alone: a resumed run writes the same file as an
uninterrupted one. Columns: `query_id` (the input's, else the query text), `doc_id` (the input's,
else `doc_index` for nested input or the 0-based input row for the long form), `chunk` (0-based),
`start_token` (chunk × step, in the document's own tokens) and `score` (float32), in input order,
then chunk order. It is written atomically (a temp file beside it, fsynced, renamed; on object
storage, staged locally and published whole) before the ranked output, so a run killed between
the two writes both again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.arrays import to_arrow, to_numpy
from pipeline.data.chunks import SCORES_COLUMN, Chunking
from pipeline.data.pairs import ORD_STRIDE
from pipeline.errors import InputError, RerankError, first_line
from pipeline.storage.location import location


def _columns(layout) -> tuple[str, str | None]:
    """The part columns that give query_id and doc_id (None: the input row, from _ord)."""
    qcol = "query_id" if "query_id" in layout.columns else layout.query_col
    if "doc_id" in layout.columns:
        return qcol, "doc_id"
    return qcol, ("doc_index" if layout.nested else None)


def tables(parts, layout, chunking: Chunking):
    """The rows of the file, unit by unit (one part's rows at a time). `parts`: the sink's
    verified part source (CheckpointSink.parts)."""
    qcol, dcol = _columns(layout)
    cols = list(dict.fromkeys([qcol] + ([dcol] if dcol else []) + ["_ord", SCORES_COLUMN]))
    for i in range(len(parts)):
        t = parts.read(i, cols)
        if t is None:  # a part that failed its check: check() below names it
            continue
        lists = t.column(SCORES_COLUMN).combine_chunks()
        counts = np.asarray(lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        rows = np.repeat(np.arange(t.num_rows, dtype=np.int64), counts)
        chunk = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        take = to_arrow(rows)
        if dcol is not None:
            doc = t.column(dcol).take(take)
        else:
            doc = to_arrow(to_numpy(t.column("_ord"))[rows] // ORD_STRIDE)
        yield pa.table({"query_id": t.column(qcol).take(take), "doc_id": doc,
                        "chunk": to_arrow(chunk, pa.int32()),
                        "start_token": to_arrow(chunk * chunking.step, pa.int64()),
                        "score": lists.flatten()})


def schema(layout) -> pa.Schema:
    qcol, dcol = _columns(layout)

    def typ(name):  # as the parts hold it: string views are read as large strings
        t = layout.schema.field(name).type
        return pa.large_string() if getattr(pa.types, "is_string_view", lambda _: False)(t) else t

    doc = typ(dcol) if dcol not in (None, "doc_index") else (pa.int32() if dcol else pa.int64())
    return pa.schema([("query_id", typ(qcol)), ("doc_id", doc), ("chunk", pa.int32()),
                      ("start_token", pa.int64()), ("score", pa.float32())])


def _write_file(parts, layout, chunking: Chunking, path: str) -> int:
    sch = schema(layout)
    rows = 0
    with pq.ParquetWriter(path, sch) as w:
        for t in tables(parts, layout, chunking):
            if t.num_rows:
                w.write_table(t.cast(sch))
                rows += t.num_rows
        if not rows:
            w.write_table(sch.empty_table())
    parts.check()  # a part not the one committed: PartsChanged, and the run scores it again
    return rows


def write(sink, target_spec: str, unit_ids, layout, chunking: Chunking, *, if_missing: bool = False) -> int:
    """Write the file at `target_spec` from the parts of `unit_ids` (all finished) in the
    checkpoint `sink`; return its rows. Staged beside the target (or locally for object storage)
    and published whole, so readers never see half. `if_missing` (a rerun that only cleans up,
    after the output was published): only when the file is not there (then 0 rows), from the
    parts the checkpoint still holds."""
    target = location(target_spec)
    if if_missing:
        if target.exists():
            return 0
        if any(u not in sink.done for u in unit_ids):
            raise InputError(f"--chunk-scores {target_spec}: the checkpoint no longer holds every unit's "
                             "scores; rerun with --restart --overwrite to score again")
    run_id = sink.marker.get("run_id", "")
    try:
        # Staged files of earlier, killed attempts of this checkpoint's runs are ours to remove.
        target.remove_staged([run_id, *sink.marker.get("earlier_run_ids", [])])
        with target.staged(run_id) as tmp:
            rows = _write_file(sink.parts(list(unit_ids)), layout, chunking, tmp)
            target.publish(tmp)
        return rows
    except OSError as exc:
        raise RerankError(f"--chunk-scores {target}: cannot write it ({first_line(exc)}); free space (or check the "
                          "bucket) and rerun the same command: the scores are kept in the checkpoint") from None
