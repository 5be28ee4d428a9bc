"""The places a run reads and writes, found and claimed before any scoring, from plain values
(specs, paths or URIs, the input Locations, the flags that decide):

    locate(specs, output)                         INPUT specs (files, directories, globs, prefixes;
                                                  local or in object storage) to input files, and
                                                  the output (the default beside the first input)
    check_output(output, ckpt_dir, inputs, ...)   refuse an output the run cannot or must not write
    open_checkpoint(ckpt_dir, fingerprint, ...)   take the checkpoint (CheckpointSink.open) and
                                                  check the output again under its lease
    check_chunk_scores(target, sink, ...)         refuse a --chunk-scores file the run must not write

Planning (pipeline/driver/plan.py) calls these; the config itself does no I/O. Each refusal is one
InputError (exit 2) naming the path and the fix.
"""

from __future__ import annotations

import os

from pipeline.errors import InputError
from pipeline.storage.checkpoint import MARKER, made_for, marked_for
from pipeline.storage.location import Location, is_glob, location
from pipeline.storage.output import Output
from pipeline.storage.sink import CheckpointSink


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
            if loc.local_path is not None and not os.path.isfile(loc.local_path):  # opening a pipe waits forever
                raise InputError(f"{spec}: not a regular file (a pipe, socket or device); write the pairs to a file "
                                 "and pass that")
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


def locate(specs, output: str | None) -> tuple[tuple[Location, ...], str]:
    """What a run's config leaves to planning: its input specs expanded to files (resolve_inputs)
    and the output it writes (resolve_output)."""
    return resolve_inputs(specs), resolve_output(specs, output)


def _stem(name: str) -> str:
    for suffix in (".parquet", ".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _utf8(name: str, what: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name!r}: the {what} name is not valid UTF-8; rename it") from None


def check_output(output: str, ckpt_dir: str, inputs, *, overwrite: bool, restart: bool,
                 resumable: bool | None = None) -> None:
    """Refuse an output the run cannot or must not write (exit 2). `resumable`: the checkpoint
    holds work of this output (None: peek at its marker)."""
    _utf8(output, "output")
    _utf8(ckpt_dir, "checkpoint directory")
    out = Output(output)
    if resumable is None:  # peek at the checkpoint's marker: made for this output?
        resumable = marked_for(location(ckpt_dir), out.key)
    out.check(inputs, resumable, overwrite, restart)
    if location(ckpt_dir).kind() == "file":
        raise InputError(f"{ckpt_dir}: the checkpoint directory is a file; pass a directory with --checkpoint-dir")


def open_checkpoint(ckpt_dir: str, fingerprint: dict, inputs, *, output: str, overwrite: bool, restart: bool,
                    run_id: str | None = None, own_root: bool = False) -> tuple[CheckpointSink, bool]:
    """The run's checkpoint, opened under its lease (CheckpointSink.open), with the output checked
    again under that lease: a run that finished meanwhile has published it. Returns the sink and
    whether the output existed then (False: one there at the end is someone else's)."""
    out = Output(output)
    where = location(ckpt_dir)
    if where.key == out.where.key or where.inside(out.where):  # checked before the folder is made
        raise InputError(f"--checkpoint-dir {ckpt_dir}: is the output or lies inside it; pass a directory beside "
                         "the output")
    ck = CheckpointSink.open(location(ckpt_dir), fingerprint, inputs, restart=restart, run_id=run_id,
                             own_root=own_root, output=out)
    try:
        ours = made_for(ck.marker, out.key)  # one made for another -o owns no file here
        check_output(output, ckpt_dir, inputs, overwrite=overwrite, restart=restart,
                     resumable=ours and ck.holds_work())
    except BaseException:
        ck.close(remove=not ck.holds_work())
        raise
    return ck, out.exists()


def check_chunk_scores(target_spec: str, sink: CheckpointSink, *, overwrite: bool) -> None:
    """Before any scoring: the file is not an input, the output or a directory; its directory
    exists; an existing one is replaced only with --overwrite or by the run that wrote it (a
    checkpoint of this output that holds work)."""
    target, out = location(target_spec), location(sink.output.spec)
    opt = f"--chunk-scores {target_spec}"
    resumable = made_for(sink.marker, sink.output.key) and sink.holds_work()
    for i in sink.inputs:
        if i.key == target.key:
            raise InputError(f"{opt}: is also the input {i}; pass another path")
    if target.key == out.key or target.inside(out):
        raise InputError(f"{opt}: is the output or lies inside it; pass a path beside it")
    kind = target.kind()
    if kind == "dir":
        raise InputError(f"{opt}: is a directory; pass a file path")
    if target.local_path is not None and target.parent.kind() != "dir":
        raise InputError(f"{opt}: the directory {target.parent} does not exist; create it or pass another path")
    if kind == "file" and not overwrite and not resumable:
        raise InputError(f"{opt}: exists; pass --overwrite to replace it")


__all__ = ["locate", "resolve_inputs", "resolve_output", "default_output", "check_output", "open_checkpoint", "check_chunk_scores"]
