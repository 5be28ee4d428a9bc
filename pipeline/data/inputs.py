"""Where a run reads and writes: INPUT specs (files, directories, globs) to files, and the
default output path. Standard library only, so that `pipeline.config` stays light to import."""

from __future__ import annotations

import glob
import os

from pipeline.errors import InputError

_MAGIC = "*?["


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in _MAGIC)


def _in_checkpoint(path: str) -> bool:
    """A file under a directory that holds a checkpoint's marker (a run's own OUTPUT.ckpt/parts,
    met by a recursive glob): scores of a run, not input."""
    from pipeline.storage.uri import CHECKPOINT_MARKER

    d = os.path.dirname(os.path.abspath(path))
    for _ in range(3):  # the marker sits at most two folders above a part (ckpt/parts/x.parquet)
        if os.path.exists(os.path.join(d, CHECKPOINT_MARKER)):
            return True
        d = os.path.dirname(d)
    return False


def resolve_inputs(specs) -> tuple[str, ...]:
    """Expand files, directories (their *.parquet, *.jsonl and *.jsonl.gz, sorted) and globs into a
    list of files.

    A single string is one spec (not a sequence of characters)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = (specs,)
    from pipeline.storage.uri import INPUT_SUFFIXES, expand, is_uri

    files: list[str] = []
    for spec in map(os.fspath, specs):
        if is_uri(spec):  # object storage: an object, a prefix or a glob on keys
            files.extend(expand(spec))
        elif _is_glob(spec) and not os.path.exists(spec):  # a file named data[1].parquet is that file
            found = sorted(p for p in glob.glob(spec, recursive=True)
                           if os.path.isfile(p) and not _in_checkpoint(p))
            if not found:
                raise InputError(f"{spec}: no file matches this pattern; check the glob")
            files.extend(found)
        elif os.path.isdir(spec):
            found = sorted(
                os.path.join(spec, n) for n in os.listdir(spec)
                if n.endswith(INPUT_SUFFIXES) and os.path.isfile(os.path.join(spec, n))
            )
            if not found:
                raise InputError(f"{spec}: the directory holds no *.parquet, *.jsonl or *.jsonl.gz file; pass a file or "
                                 "another directory")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise InputError(f"{spec}: no such file or directory; check the path")
    seen = set()
    unique = []
    for f in files:
        key = f if is_uri(f) else os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return tuple(unique)


def default_output(first_spec: str) -> str:
    """`<stem>.reranked.parquet` beside a file; `DIR.reranked.parquet` beside a directory.

    Never inside an input directory: the next run would read the output as an input. A glob
    counts as the directory it searches (`data/*.parquet` -> `data.reranked.parquet`)."""
    from pipeline.storage.uri import is_uri, kind

    spec = os.fspath(first_spec)
    if is_uri(spec):  # the same rules on keys: beside the object, the prefix or the glob's folder
        if _is_glob(spec):
            fixed = spec[: min(spec.index(c) for c in _MAGIC if c in spec)].rsplit("/", 1)[0]
            return fixed + ".reranked.parquet"
        if spec.endswith("/") or kind(spec) == "dir":
            return spec.rstrip("/") + ".reranked.parquet"
        return _stem(spec) + ".reranked.parquet"
    if _is_glob(spec):
        parts = spec.split(os.sep)
        fixed = os.sep.join(p for p in parts[: next(i for i, p in enumerate(parts) if _is_glob(p))])
        if fixed in ("", ".", os.sep) or fixed.rstrip(os.sep) in ("", "."):
            raise InputError(f"{spec}: a glob in the current directory has no default output beside it; pass -o")
        return fixed.rstrip(os.sep) + ".reranked.parquet"
    if os.path.isdir(spec):
        d = os.path.normpath(spec)
        if d in (".", os.sep) or os.path.basename(d) in ("", ".", ".."):
            raise InputError(f"{spec}: the current directory has no default output beside it; pass -o")
        return d + ".reranked.parquet"
    d, name = os.path.split(spec)
    return os.path.join(d, f"{_stem(name)}.reranked.parquet")


def _stem(name: str) -> str:
    for suffix in (".parquet", ".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
