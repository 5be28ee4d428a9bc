"""Whole-file atomic writes outside checkpoints (prepare's, fuse's and export's outputs), through
the file's Location: written to a staging name, then put in place (locally: fsync, rename, fsync
the folder), so a reader sees the old file or the whole new one."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.location import location


def atomic_write_parquet(table: pa.Table, path: str) -> None:
    loc = location(path)
    with loc.staged() as tmp:
        pq.write_table(table, tmp)
        loc.publish(tmp)


def atomic_write_text(text: str, path: str) -> None:
    location(path).write_atomic(text.encode("utf-8"))
