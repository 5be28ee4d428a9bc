"""What every job shares: logging setup, sizes, and mapping domain errors to exit codes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

import click

from pipeline.errors import RerankError


# The running CLI's stop flag (jobs.cli.main sets it): a job asks it whether a signal came.
STOP = None


class JobError(click.ClickException):
    """A domain error shown as one line, with the exit code of its kind (2 input, 1 runtime)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def domain_errors():
    try:
        yield
    except RerankError as exc:
        raise JobError(str(exc), exc.exit_code) from None
    except OSError as exc:  # the disk, a bucket or the network failed where no step expected it
        from pipeline.errors import first_line

        raise JobError(f"{first_line(exc, 300)}; check the disk, the bucket or the network, then rerun the same "
                       "command (finished units are kept in the checkpoint)", 1) from None


def check_target(path: str, option: str, reads=(), writes=(), overwrite: bool = True) -> None:
    """A file a job will write: not a directory, not one of the files it reads or its other
    outputs, in a directory that exists, and (unless `overwrite`) not there yet. Exit 2."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise JobError(f"{option} {path}: is a directory; pass a file path", 2)
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


class _Prefix(logging.Formatter):
    """Our lines start with `rerank-batch:`; a dependency's (shown with -v) with its logger name."""

    def format(self, record):
        ours = record.name.split(".")[0] in OURS
        return f"{'rerank-batch' if ours else record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines (DEBUG with -v). Dependencies (transformers, the hub client, matplotlib, ...)
    stay quiet unless -v, which shows their warnings too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Prefix())
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, handlers=[handler], force=True)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # transformers sets its root logger's level when first imported (later, lazily), from this
    # variable; set the level too, for when it is already imported.
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    for chatty in ("urllib3", "filelock", "httpx", "httpcore", "matplotlib", "PIL", "fsspec"):
        logging.getLogger(chatty).setLevel(logging.WARNING if verbose else logging.ERROR)


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
