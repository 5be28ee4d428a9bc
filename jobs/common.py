"""What every job shares: logging setup, sizes, and mapping domain errors to exit codes."""

from __future__ import annotations

import contextlib
import logging
import re
import sys

import click

from pipeline.errors import RerankError


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


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="rerank-batch: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
