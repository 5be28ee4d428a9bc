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

import os
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.arrays import to_arrow, to_numpy
from pipeline.data.chunks import SCORES_COLUMN, Chunking
from pipeline.data.pairs import ORD_STRIDE
from pipeline.errors import InputError, RerankError, first_line
from pipeline.storage import uri
from pipeline.storage.uri import is_uri, read_part


def _columns(layout) -> tuple[str, str | None]:
    """The part columns that give query_id and doc_id (None: the input row, from _ord)."""
    qcol = "query_id" if "query_id" in layout.columns else layout.query_col
    if "doc_id" in layout.columns:
        return qcol, "doc_id"
    return qcol, ("doc_index" if layout.nested else None)


def check_target(plan) -> None:
    """Before any scoring: the file is not an input, the output or a directory; its directory
    exists; an existing one is replaced only with --overwrite or by the run that wrote it (a
    checkpoint of this output that holds work)."""
    from pipeline.driver.plan import output_key
    from pipeline.storage.checkpoint import made_for

    cfg = plan.cfg
    path = cfg.chunk_scores
    opt = f"--chunk-scores {path}"
    resumable = made_for(plan.ckpt.marker, output_key(cfg.output)) and plan.ckpt.holds_work()
    if is_uri(path):
        if path in cfg.inputs or path.rstrip("/") == cfg.output.rstrip("/"):
            raise InputError(f"{opt}: is also an input or the output; pass another path")
        where = uri.kind(path)
        if where == "dir":
            raise InputError(f"{opt}: a prefix with objects under it; pass an object key")
        if where == "file" and not cfg.overwrite and not resumable:
            raise InputError(f"{opt}: exists; pass --overwrite to replace it")
        return
    real = os.path.realpath(path)
    for p in cfg.inputs:
        if not is_uri(p) and os.path.realpath(p) == real:
            raise InputError(f"{opt}: is also the input {p}; pass another path")
    if not is_uri(cfg.output):
        out = os.path.realpath(cfg.output)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            raise InputError(f"{opt}: is the output or lies inside it; pass a path beside it")
    if os.path.isdir(real):
        raise InputError(f"{opt}: is a directory; pass a file path")
    if not os.path.isdir(os.path.dirname(real)):
        raise InputError(f"{opt}: the directory {os.path.dirname(real)} does not exist; create it or pass another "
                         "path")
    if os.path.exists(real) and not cfg.overwrite and not resumable:
        raise InputError(f"{opt}: exists; pass --overwrite to replace it")


def exists(path: str) -> bool:
    return uri.stat(path) is not None if is_uri(path) else os.path.exists(path)


def tables(part_paths, layout, chunking: Chunking):
    """The rows of the file, part by part (one part's rows at a time)."""
    qcol, dcol = _columns(layout)
    cols = list(dict.fromkeys([qcol] + ([dcol] if dcol else []) + ["_ord", SCORES_COLUMN]))
    for path in part_paths:
        t = read_part(path, cols)
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


def _write_local(plan, target: str) -> int:
    from pipeline.storage.local import fsync_dir

    ck = plan.ckpt
    d = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target).encode()[:180].decode(errors="ignore")
    # Temp files of earlier, killed attempts of this checkpoint's runs are ours to remove.
    stems = tuple(f".{base}.{i}-" for i in [ck.marker.get("run_id", ""), *ck.marker.get("earlier_run_ids", [])])
    for name in os.listdir(d):
        if name.startswith(stems) and name.endswith(".partial"):
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass
    tmp = os.path.join(d, f".{base}.{ck.marker.get('run_id', '')}-{uuid.uuid4().hex[:8]}.partial")
    try:
        rows = _write_file(plan, tmp)
        os.replace(tmp, target)
        fsync_dir(d)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return rows


def _write_file(plan, path: str) -> int:
    sch = schema(plan.layout)
    rows = 0
    with pq.ParquetWriter(path, sch) as w:
        for t in tables(plan.ckpt.parts([u.id for u in plan.units]), plan.layout, Chunking.of(plan.cfg)):
            if t.num_rows:
                w.write_table(t.cast(sch))
                rows += t.num_rows
        if not rows:
            w.write_table(sch.empty_table())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return rows


def write(plan) -> int:
    """Write the file from every unit's part (all finished); return its rows."""
    target = plan.cfg.chunk_scores
    try:
        if not is_uri(target):
            return _write_local(plan, target)
        with tempfile.TemporaryDirectory(prefix="rerank-batch-") as stage:
            local = os.path.join(stage, target.rsplit("/", 1)[-1] or "chunk-scores.parquet")
            rows = _write_file(plan, local)
            uri.publish(local, target)
            return rows
    except OSError as exc:
        raise RerankError(f"--chunk-scores {target}: cannot write it ({first_line(exc)}); free space (or check the "
                          "bucket) and rerun the same command: the scores are kept in the checkpoint") from None


def write_if_missing(plan) -> None:
    """After the output was published (a rerun that only cleans up): the file is written when it
    is not there, from the parts the checkpoint still holds."""
    if exists(plan.cfg.chunk_scores):
        return
    if any(u.id not in plan.ckpt.done for u in plan.units):
        raise InputError(f"--chunk-scores {plan.cfg.chunk_scores}: the checkpoint no longer holds every unit's "
                         "scores; rerun with --restart --overwrite to score again")
    write(plan)
