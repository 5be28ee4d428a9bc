"""What every job shares: logging setup, sizes, and mapping domain errors to exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import re
import sys

import click

from pipeline.config import RunConfig
from pipeline.errors import RerankError, StoreUnavailable, first_line


# The running CLI's stop token, which SIGINT/SIGTERM set (runtime/signals.py; jobs.cli.main sets this).
STOP = None


class JobError(click.ClickException):
    """A domain error shown as one line, with the exit code of its kind (2 input, 1 runtime)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def domain_errors(before_work: bool = False, kept: str = ""):
    """RerankError -> its one line and exit code; an OSError nobody expected -> exit 1. `before_work`:
    nothing is scored yet (the message says so); `kept`: what a rerun finds again, told after it."""
    try:
        yield
    except RerankError as exc:
        raise JobError(str(exc), exc.exit_code) from None
    except OSError as exc:  # the disk, a bucket or the network failed where no step expected it
        if before_work:
            raise JobError(str(StoreUnavailable.before_work(exc)), 1) from None
        raise JobError(f"{first_line(exc, 300)}; check the disk, the bucket or the network, then rerun the same "
                       f"command{kept}", 1) from None


def check_target(path: str, option: str, reads=(), writes=(), overwrite: bool = True) -> None:
    """A file a job will write: not a directory, not one of the files it reads or its other
    outputs, in a directory that exists, and (unless `overwrite`) not there yet. Exit 2."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise JobError(f"{option} {path}: is a directory; pass a file path", 2)
    if os.path.exists(real) and not os.path.isfile(real):  # a pipe: opening it would wait for a reader
        raise JobError(f"{option} {path}: not a regular file (a pipe, socket or device); pass a file path", 2)
    for what, paths in (("input", reads), ("output", writes)):
        for p in paths:
            if p and os.path.realpath(p) == real:
                raise JobError(f"{option} {path}: is also the {what} {p}; pass another file", 2)
    if not os.path.isdir(os.path.dirname(real)):
        raise JobError(f"{option} {path}: the directory {os.path.dirname(real)} does not exist; create it or pass "
                       "another path", 2)
    if not overwrite and os.path.exists(real):
        raise JobError(f"{option} {path}: exists; pass --overwrite to replace it", 2)


OURS = ("rerank-batch", "pipeline", "jobs")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# The final `wrote ...` line goes through this logger, which -q and --log-level leave on: it is
# the one line a quiet job still owes (what it made, and where).
RESULT = "rerank-batch.result"


class _Prefix(logging.Formatter):
    """Our lines start with `rerank-batch:`; a dependency's (shown with -v) with its logger name.
    With `stamp`, a local ISO 8601 time first: cron and scheduler logs have no other."""

    def __init__(self, stamp: bool = False):
        super().__init__()
        self.stamp = stamp

    def format(self, record):
        ours = record.name.split(".")[0] in OURS
        line = f"{'rerank-batch' if ours else record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")
        if self.stamp:
            when = datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="seconds")
            line = f"{when} {line}"
        return line


def log_options(command):
    """-q, -v and --log-level, the same on every subcommand (setup_logging reads them)."""
    command = click.option("--log-level", type=click.Choice(list(LEVELS)), default=None,
                           help="Show our log lines from this level up. [default: info; -q: error; -v: debug]")(command)
    command = click.option("-v", "--verbose", is_flag=True,
                           help="Debug lines, and the warnings of dependencies (silent otherwise).")(command)
    command = click.option("-q", "--quiet", is_flag=True, help="Errors and the final `wrote ...` line only "
                           "(no progress bar, no summary line).")(command)
    return command


def setup_logging(verbose: bool = False, quiet: bool = False, log_level: str | None = None, stream=None) -> int:
    """Our lines from `log_level` (INFO by default, ERROR with -q, DEBUG with -v), timestamped
    when stderr is not a terminal. Dependencies (transformers, the hub client, matplotlib, ...)
    stay quiet unless -v, which shows their warnings too. Returns the level."""
    if quiet and verbose:
        raise JobError("-q and -v contradict each other; pass one of them", 2)
    implied = "error" if quiet else "debug" if verbose else None
    if log_level and implied and log_level != implied:
        raise JobError(f"--log-level {log_level} contradicts {'-q' if quiet else '-v'}; pass one of them", 2)
    level = LEVELS[log_level or implied or "info"]
    stream = stream or sys.stderr
    try:
        stamp = not stream.isatty()
    except (AttributeError, ValueError):
        stamp = True
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Prefix(stamp))
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, handlers=[handler], force=True)
    for name in OURS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger(RESULT).setLevel(logging.INFO)
    # transformers sets its root logger's level when first imported (later, lazily), from this
    # variable; set the level too, for when it is already imported.
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    for chatty in ("urllib3", "filelock", "httpx", "httpcore", "matplotlib", "PIL", "fsspec"):
        logging.getLogger(chatty).setLevel(logging.WARNING if verbose else logging.ERROR)
    return level


def wrote(message: str, *args) -> None:
    """The final line of a job that wrote a file (`wrote PATH (...)`), shown even with -q."""
    logging.getLogger(RESULT).info("wrote " + message, *args)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}


class SizeType(click.ParamType):
    """A byte size such as 4GiB, 4096MiB, 3.5GB or 1000000."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size; write it like 4GiB, 4096MiB or 3.5GB", param, ctx)
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n <= 0:
            self.fail(f"{value!r} must be more than zero", param, ctx)
        return n


class FiniteRange(click.FloatRange):
    """click.FloatRange without nan and inf: a range check lets nan through (every comparison
    with it is false), and `fuse --k nan` once scored every row nan."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number; pass one like 60 or 0.05", param, ctx)
        return rv


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def config_option(*decls: str, **kw):
    """click.option for a RunConfig field, its default and the values it takes read from the
    config (pipeline/config.py declares them once): a choice, a range, a flag. The field is the
    parameter name in `decls` ("--window", "window_pairs"), else the long option's name. `kw`
    adds the help and may set a type of the CLI's own (SizeType)."""
    names = [d for d in decls if not d.startswith("-")]
    name = names[0] if names else max(decls, key=len).lstrip("-").replace("-", "_")
    f = _CONFIG_FIELDS[name]
    meta, default = f.metadata, f.default
    if "choices" in meta:
        kw.setdefault("type", click.Choice(list(meta["choices"])))
    elif meta.get("whole"):
        kw.setdefault("type", click.IntRange(min=meta["at_least"]))
    elif "at_least" in meta:
        kw.setdefault("type", FiniteRange(min=meta["above"], min_open=True) if meta["above"] is not None
                      else FiniteRange(min=meta["at_least"]))
    elif meta.get("place"):
        kw.setdefault("metavar", "LOCATION")
    if isinstance(default, bool):
        kw["is_flag"] = True
    elif default is not None:
        kw["show_default"] = True
    return click.option(*decls, default=default, **kw)
