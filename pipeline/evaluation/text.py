"""Reading the text files of evaluation (qrels, TREC runs), one InputError naming the file for
what is not text."""

from __future__ import annotations

import os

from pipeline.errors import InputError


def text_lines(path: str):
    """(line number, line) of a UTF-8 text file; a directory or bytes that are not UTF-8 are one
    InputError naming the file (they were tracebacks)."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; pass a file")
    with open(path, encoding="utf-8") as f:
        try:  # the decoder reads ahead in blocks, so the line of a bad byte is not known
            yield from enumerate(f, 1)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
