"""Where a run's ranked rows go: one Parquet file, or a dataset (a folder of part-00000.parquet,
... and a `_SUCCESS` marker). Checked before any work, written to a staging place, and put in
place so that readers never see half of it; the same on the local disk and in object storage,
through the output's Location.

A file: staged beside the output (TMPDIR for object storage), then renamed (uploaded and moved)
onto it. A dataset: written into a staging folder, then published whole (Location.publish_dir):
locally the folder is renamed into place, in object storage the files are moved into place and
`_SUCCESS` comes last. A folder counts as a dataset of ours (to be replaced with --overwrite) only
when it holds nothing but the names we write and our `_SUCCESS`; anyone else's files are never
deleted.
"""

from __future__ import annotations

import json
import re

from pipeline.errors import InputError, RerankError, first_line
from pipeline.storage.location import Location, Stat, location

SUCCESS = "_SUCCESS"
WRITER = "rerank-batch"
_PART = re.compile(r"^part-\d{5}\.parquet$")
_OURS_IN_DATASET = (SUCCESS, "_temporary")


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def is_part_name(name: str) -> bool:
    return bool(_PART.match(name))


class Output:
    """The output of a run: `spec` as given (a dataset's ends in "/")."""

    def __init__(self, spec: str):
        self.spec = spec
        self.dataset = spec.endswith("/")
        self.where: Location = location(spec.rstrip("/") if self.dataset else spec)

    @property
    def key(self) -> str:
        """How a checkpoint's marker names its output: the absolute path, or the URI."""
        return self.where.key

    def __str__(self) -> str:
        return self.spec

    def exists(self) -> bool:
        """Anything there (an empty local directory counts)."""
        return self.where.exists()

    # -- before any work -----------------------------------------------------------------------
    def check(self, inputs, resumable: bool, overwrite: bool, restart: bool) -> None:
        """Refuse an output that is one of the inputs, in a folder that cannot be written, or that
        exists (unless --overwrite, or this run resumes the checkpoint that made it:
        `resumable`). Exit 2."""
        if self.dataset:
            return self._check_dataset(inputs, resumable, overwrite, restart)
        out = self.where
        real = out.real_key
        if any(i.key == out.key or i.real_key == real for i in inputs):
            raise InputError(f"{self.spec}: the output is one of the inputs; pass another -o")
        st = out.stat()
        if st is not None and st.kind == "dir":
            raise InputError(f"{self.spec}: the output is a {out.FOLDER}; pass {out.A_FILE} with -o")
        if out.exists() and not overwrite and (restart or not resumable):
            raise InputError(f"{self.spec}: the output exists; pass --overwrite to replace it")
        self._check_parent()

    def _check_parent(self) -> None:
        parent = self.where.parent
        if parent.folder_missing():
            raise InputError(f"{self.spec}: the directory {parent} does not exist; create it or pass another -o")
        why = parent.writable()
        if why:
            raise InputError(f"{self.spec}: cannot write in {parent} ({why}); {parent.WRITABLE_FIX}")

    def _check_dataset(self, inputs, resumable: bool, overwrite: bool, restart: bool) -> None:
        out = self.where
        for i in inputs:
            if i.inside(out):
                raise InputError(f"{self.spec}: the input {i} lies inside the output directory; pass another -o")
        st = out.stat()
        if st is not None and st.kind == "file":
            raise InputError(f"{self.spec}: a file, not a directory; pass a directory path (ending in /) for a "
                             "dataset, or a file path without the /")
        strangers = self._foreign_names(resumable)
        if strangers:
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            raise InputError(f"{self.spec}: the directory is not empty and is not a dataset written by rerank-batch "
                             f"(holds {shown}); pass a new or empty directory with -o")
        if out.list() and not overwrite and (restart or not resumable):
            raise InputError(f"{self.spec}: the output exists; pass --overwrite to replace it")
        self._check_parent()

    def _foreign_names(self, resumable: bool) -> list[str]:
        """Names in an existing dataset folder that say it is not ours (empty: ours, empty, or
        absent). Without our _SUCCESS only a run that resumes this output's checkpoint
        (`resumable`) takes bare part files for its own: those of its own killed publish."""
        names = self.where.list()
        if not names:
            return []
        # _temporary/ is where object-storage uploads wait; in a local folder it is someone else's.
        ours = _OURS_IN_DATASET if self.where.local_path is None else (SUCCESS,)
        strangers = [n for n in names if not (_PART.match(n) or n in ours)]
        if strangers:
            return strangers
        if self._success() is None and not resumable:
            return [SUCCESS if (self.where / SUCCESS).exists() else names[0]]
        return []

    def _success(self) -> dict | None:
        """Our _SUCCESS's record (files, rows), or None when absent or someone else's."""
        try:
            body = json.loads((self.where / SUCCESS).read_bytes())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) and body.get("writer") == WRITER else None

    # -- after a publish -----------------------------------------------------------------------
    def still_published(self, rec: dict) -> bool:
        """The output a checkpoint recorded as published (path, size, mtime, rows) is still there."""
        import pyarrow.parquet as pq

        if rec.get("path") != self.key:
            return False
        if self.dataset:
            st = (self.where / SUCCESS).stat()
            if st is None or (st.size, st.mtime_ns) != (rec.get("size"), rec.get("mtime_ns")):
                return False
            body = self._success()
            if body is None or body.get("rows") != rec.get("rows"):
                return False
            return all(((self.where / f["name"]).stat() or Stat("", -1, 0)).size == f["bytes"]
                       for f in body.get("files", []))
        st = self.where.stat()
        if st is None or (st.size, st.mtime_ns) != (rec.get("size"), rec.get("mtime_ns")):
            return False
        with self.where.open() as f:
            return pq.read_metadata(f).num_rows == rec.get("rows")

    # -- the final write -----------------------------------------------------------------------
    def write(self, write_file, write_dir, run_ids: list[str], critical, published) -> int:
        """Write the output and put it in place; return its rows.

        `write_file(path) -> rows` writes one Parquet file at a local path; `write_dir(folder) ->
        [{"name", "rows", "bytes"}]` writes a dataset's files into an empty local folder. Inside
        `critical()` (a block that signals do not split) the output is put in place and
        `published(stat, rows, **more)` records it. `run_ids`: this checkpoint's runs, the
        first the current one; what their killed attempts left staged is removed first."""
        self.where.remove_staged(run_ids, lambda n: is_part_name(n) or n == SUCCESS)
        try:
            if self.dataset:
                return self._write_dataset(write_dir, run_ids[0], critical, published)
            with self.where.staged(run_ids[0]) as tmp:
                rows = write_file(tmp)
                with critical():
                    st = self.where.publish(tmp)
                    published(st, rows)
            return rows
        except OSError as exc:
            raise RerankError(
                f"{self.spec}: cannot write the output ({exc.strerror or first_line(exc)}); "
                f"{self.where.parent.SPACE_FIX.format(self.where.parent.key)} and rerun the same command: the "
                "scores are kept in the checkpoint"
            ) from None

    def _write_dataset(self, write_dir, run_id: str, critical, published) -> int:
        with self.where.staged_dir(run_id) as tmp:
            files = write_dir(tmp)
            rows = sum(f["rows"] for f in files)
            body = json.dumps({"writer": WRITER, "run_id": run_id, "rows": rows, "files": files}, indent=1,
                              sort_keys=True).encode()
            with critical():
                self.where.publish_dir(tmp, [f["name"] for f in files], SUCCESS, body, is_part_name, run_id)
                published((self.where / SUCCESS).stat(), rows, files=len(files))
        return rows


__all__ = ["Output", "SUCCESS", "part_name", "is_part_name"]
