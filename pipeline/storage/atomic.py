"""Whole-file atomic writes outside checkpoints (prepare's outputs): a temp file beside the
target, fsynced, renamed over it, and the directory fsynced, so a reader sees the old file or
the whole new one."""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.local import fsync_dir


def _atomic(path: str, write, suffix: str = "") -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def _umask() -> int:
    try:  # Linux shows it; reading it elsewhere means setting it, racy with other threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_parquet(table: pa.Table, path: str) -> None:
    _atomic(path, lambda tmp: pq.write_table(table, tmp), suffix=".parquet")



def atomic_write_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, write)
