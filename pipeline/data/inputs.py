"""Where a run reads and writes: INPUT specs (files, directories, globs; local or in object
storage) to input files, and the output path when none is given. This is the I/O of planning
(pipeline/driver/plan.py), done through storage Locations; the config itself does none.
"""

from __future__ import annotations

import os

from pipeline.errors import InputError
from pipeline.storage.location import Location, is_glob, location

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")  # what a directory or prefix contributes


def _glob_parts(spec: str) -> tuple[str, str]:
    """(the folder a glob searches, the pattern under it): `data/*.parquet` -> (`data`, `*.parquet`)."""
    head = spec[: min(spec.index(ch) for ch in "*?[" if ch in spec)]
    if "/" not in head:
        return "", spec
    folder = head.rsplit("/", 1)[0]
    return folder or "/", spec[len(folder):].lstrip("/")


class _Checkpoints:
    """Which folders hold a checkpoint's marker (asked once per folder): the files under them (a
    run's own OUTPUT.ckpt/parts, met by a recursive glob) are scores of a run, not input."""

    def __init__(self):
        self._seen: dict[str, bool] = {}

    def _marked(self, folder: Location) -> bool:
        from pipeline.storage.checkpoint import MARKER

        if folder.key not in self._seen:
            self._seen[folder.key] = (folder / MARKER).exists()
        return self._seen[folder.key]

    def holds(self, f: Location) -> bool:
        d = f.parent
        for _ in range(3):  # the marker sits at most two folders above a part (ckpt/parts/x.parquet)
            if self._marked(d):
                return True
            d = d.parent
        return False


def resolve_inputs(specs) -> tuple[Location, ...]:
    """Expand files, directories (their *.parquet, *.jsonl and *.jsonl.gz, sorted) and globs into
    input files, each once. A single string is one spec (not a sequence of characters)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = (specs,)
    files: list[Location] = []
    for spec in map(os.fspath, specs):
        loc = location(spec)
        if is_glob(spec) and not loc.exists():  # a file named data[1].parquet is that file
            folder, pattern = _glob_parts(spec)
            marks = _Checkpoints()
            found = [f for f in location(folder).glob(pattern) if not marks.holds(f)]
            if not found:
                raise InputError(f"{spec}: no {loc.FILE} matches this pattern; check the glob")
            files.extend(found)
            continue
        st = loc.stat()
        if st is None:
            raise InputError(f"{spec}: no such {loc.FILE} or {loc.FOLDER}; {loc.CHECK}")
        if st.kind == "file":
            files.append(loc)
            continue
        found = [loc / n for n in loc.list("file") if n.endswith(SUFFIXES)]
        if not found:
            raise InputError(f"{spec}: the {loc.FOLDER} holds no *.parquet, *.jsonl or *.jsonl.gz {loc.FILE}; pass "
                             f"{loc.AN_FILE} or another {loc.FOLDER}")
        files.extend(found)
    seen = set()
    unique = []
    for f in files:
        if f.real_key not in seen:
            seen.add(f.real_key)
            unique.append(f)
    return tuple(unique)


def default_output(first_spec: str) -> str:
    """`<stem>.reranked.parquet` beside a file; `DIR.reranked.parquet` beside a directory.

    Never inside an input directory: the next run would read the output as an input. A glob
    counts as the directory it searches (`data/*.parquet` -> `data.reranked.parquet`)."""
    spec = os.fspath(first_spec)
    if is_glob(spec):
        folder = _glob_parts(spec)[0]
        if folder.rstrip("/") in ("", "."):
            raise InputError(f"{spec}: a glob in the current directory has no default output beside it; pass -o")
        return folder.rstrip("/") + ".reranked.parquet"
    loc = location(spec)
    if spec.endswith("/") or loc.kind() == "dir":
        d = loc.clean
        if d in (".", os.sep) or os.path.basename(d) in ("", ".", ".."):
            raise InputError(f"{spec}: the current directory has no default output beside it; pass -o")
        return d + ".reranked.parquet"
    head, name = spec.rsplit("/", 1) if "/" in spec else ("", spec)
    return (head + "/" if head else "") + f"{_stem(name)}.reranked.parquet"


def resolve_output(specs, output: str | None) -> str:
    """The output a run writes: `output`, or the default beside the first input; an existing
    directory (or a prefix with objects under it) gets its "/" (a dataset output)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = (specs,)
    specs = [os.fspath(s) for s in specs]
    if output is None:
        return default_output(specs[0]) if specs else ""
    output = os.fspath(output)
    if output and not output.endswith("/") and location(output).kind() == "dir":
        return output + "/"
    return output


def _stem(name: str) -> str:
    for suffix in (".parquet", ".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
