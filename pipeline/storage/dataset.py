"""A dataset output: a directory (or object-storage prefix) of part-00000.parquet, ... and a
`_SUCCESS` marker, published so that readers never see a half-written dataset.

Local: every file is written into a hidden temp directory beside the output, which is renamed
into place (a previous output of ours is first renamed aside, then deleted): the output path
shows the old dataset, the whole new one, or, between the two renames, nothing.
Object storage has no rename of a prefix: the files are uploaded under `OUTPUT/_temporary/<run>/`
(a name readers skip), the old `_SUCCESS` is deleted, the files are moved into place, stale
files of an older output are deleted, and `_SUCCESS` is written last: readers of object storage
take a prefix as complete only when `_SUCCESS` is there (Spark's convention).

A directory counts as ours (to be replaced with --overwrite) only when it holds nothing but the
names we write, and our `_SUCCESS`; files of anyone else are never deleted.
"""

from __future__ import annotations

import json
import os
import re
import uuid

from pipeline.errors import InputError
from pipeline.storage.local import LocalStore, fsync_dir
from pipeline.storage.uri import is_uri

SUCCESS = "_SUCCESS"
TEMPORARY = "_temporary"
WRITER = "rerank-batch"
_PART = re.compile(r"^part-\d{5}\.parquet$")


def store(output: str):
    """The store of an output directory or prefix (the checkpoint's verbs)."""
    from pipeline.storage.checkpoint import store_for

    return store_for(output.rstrip("/"))


def read_success(st) -> dict | None:
    """Our _SUCCESS's record (files, rows), or None when absent or someone else's."""
    try:
        body = json.loads(st.read(SUCCESS)) if st.exists(SUCCESS) else None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("writer") == WRITER else None


def foreign_names(output: str, resumable: bool) -> list[str]:
    """Names in an existing output directory that say it is not a dataset of ours (empty: ours,
    or empty, or absent). Without our _SUCCESS only a run that resumes this output's checkpoint
    (`resumable`) takes bare part files for its own: those of its own killed publish."""
    st = store(output)
    names = [n for n in st.list("")]
    if not names:
        return []
    strangers = [n for n in names if not (_PART.match(n) or n in (SUCCESS, TEMPORARY))]
    if strangers:
        return strangers
    if read_success(st) is None and not resumable:
        return [SUCCESS if st.exists(SUCCESS) else names[0]]
    return []


def check_output_dir(output: str, resumable: bool, overwrite: bool, restart: bool) -> None:
    """check_output for a dataset: refuse a file, someone else's directory, or one of ours
    without --overwrite (unless this run resumes it)."""
    if not is_uri(output) and os.path.exists(output.rstrip("/")) and not os.path.isdir(output.rstrip("/")):
        raise InputError(f"{output}: a file, not a directory; pass a directory path (ending in /) for a dataset, or "
                         "a file path without the /")
    strangers = foreign_names(output, resumable)
    if strangers:
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise InputError(f"{output}: the directory is not empty and is not a dataset written by rerank-batch (holds "
                         f"{shown}); pass a new or empty directory with -o")
    if store(output).list("") and not overwrite and (restart or not resumable):
        raise InputError(f"{output}: the output exists; pass --overwrite to replace it")


def exists(output: str) -> bool:
    """The output directory holds anything (an empty local directory counts as there)."""
    if not is_uri(output):
        return os.path.lexists(output.rstrip("/"))
    return bool(store(output).list(""))


def success_stat(output: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of the output's _SUCCESS, or None."""
    if is_uri(output):
        from pipeline.storage import uri

        return uri.stat(output.rstrip("/") + "/" + SUCCESS)
    try:
        st = os.stat(os.path.join(output, SUCCESS))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def still_published(output: str, rec: dict) -> bool:
    """The dataset the checkpoint recorded is still there: same _SUCCESS, every file of its size."""
    if success_stat(output) != (rec.get("size"), rec.get("mtime_ns")):
        return False
    st = store(output)
    body = read_success(st)
    if body is None or body.get("rows") != rec.get("rows"):
        return False
    return all(st.size(f["name"]) == f["bytes"] for f in body.get("files", []))


def success_body(files: list[dict], run_id: str) -> bytes:
    return json.dumps({"writer": WRITER, "run_id": run_id, "rows": sum(f["rows"] for f in files),
                       "files": files}, indent=1, sort_keys=True).encode()


def _delete_ours(directory: str) -> None:
    """Delete the names we write in a local directory, then the directory if it is empty."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for n in names:
        p = os.path.join(directory, n)
        if _PART.match(n) or n == SUCCESS:
            try:
                os.unlink(p)
            except OSError:
                pass
    try:
        os.rmdir(directory)
    except OSError:
        pass


def local_names(output: str, run_ids: list[str]) -> tuple[str, str, tuple[str, ...]]:
    """(parent directory, base name, the temp-name stems of these runs) of a local output."""
    out = os.path.abspath(output.rstrip("/"))
    base = os.path.basename(out).encode()[:180].decode(errors="ignore")
    return os.path.dirname(out), base, tuple(f".{base}.{i}-" for i in run_ids)


def remove_stale_local(output: str, run_ids: list[str]) -> None:
    """Temp and set-aside directories of earlier, killed attempts of these runs: ours to remove."""
    parent, _, stems = local_names(output, run_ids)
    for name in os.listdir(parent):
        if name.startswith(stems) and name.endswith((".partial", ".old")):
            _delete_ours(os.path.join(parent, name))


def new_local_temp(output: str, run_id: str) -> str:
    parent, _, (stem,) = local_names(output, [run_id])
    tmp = os.path.join(parent, f"{stem}{uuid.uuid4().hex[:8]}.partial")
    os.mkdir(tmp)
    return tmp


def publish_local(tmp: str, output: str, run_id: str) -> None:
    """Rename the finished temp directory into place; a previous dataset of ours goes aside first
    (deleted by `drop_aside`). Call inside the critical section that records the publish."""
    out = os.path.abspath(output.rstrip("/"))
    parent = os.path.dirname(out)
    if os.path.isdir(out) and os.listdir(out):
        os.replace(out, os.path.join(parent, f".{local_names(output, [run_id])[1]}.{run_id}-"
                                             f"{uuid.uuid4().hex[:8]}.old"))
    os.replace(tmp, out)  # onto an absent or empty directory
    fsync_dir(parent)


def drop_aside(output: str, run_id: str) -> None:
    parent, _, stems = local_names(output, [run_id])
    for name in os.listdir(parent):
        if name.startswith(stems) and name.endswith(".old"):
            _delete_ours(os.path.join(parent, name))


def publish_remote(stage: str, files: list[dict], output: str, run_id: str) -> None:
    """Upload the staged files under _temporary/<run>/, then put them in place, _SUCCESS last."""
    from pipeline.storage import uri

    root = output.rstrip("/")
    st = store(output)
    temp = f"{TEMPORARY}/{run_id}"
    for f in files:
        uri.publish(os.path.join(stage, f["name"]), f"{root}/{temp}/{f['name']}")
    st.delete(SUCCESS)  # from here until the end, readers see no complete dataset
    for f in files:
        st.fs.move(f"{st.base}/{temp}/{f['name']}", f"{st.base}/{f['name']}")
    keep = {f["name"] for f in files}
    for n in st.list(""):
        if _PART.match(n) and n not in keep:  # a file of the older, longer output
            st.delete(n)
    st.write(SUCCESS, success_body(files, run_id))
    remove_remote_temp(output)


def remove_remote_temp(output: str) -> None:
    """What is left under _temporary/ of our uploads (a killed publish's)."""
    st = store(output)
    for run in st.list(TEMPORARY):
        for n in st.list(run):
            if _PART.match(n.rsplit("/", 1)[-1]):
                st.delete(n)
        st.remove_empty(run)
    st.remove_empty(TEMPORARY)


def write_success_local(directory: str, files: list[dict], run_id: str) -> None:
    LocalStore(directory).write(SUCCESS, success_body(files, run_id))
